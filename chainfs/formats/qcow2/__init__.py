"""The qcow2 format driver (versions 2 and 3)."""

from .driver import Qcow2Layer, create_overlay, set_backing

__all__ = ["Qcow2Layer", "create_overlay", "set_backing"]
