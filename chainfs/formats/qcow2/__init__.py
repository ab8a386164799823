"""The qcow2 format driver (versions 2 and 3)."""

from .create import create_overlay, set_backing
from .driver import Qcow2Layer

__all__ = ["Qcow2Layer", "create_overlay", "set_backing"]
