"""The qcow2 format driver (versions 2 and 3)."""

from .check import CHECK_FAILED, CHECK_UNSUPPORTED, CheckResult, NotChecked, check_image
from .create import create_overlay, set_backing
from .driver import Qcow2Layer
from .header import read_backing

__all__ = [
    "CHECK_FAILED",
    "CHECK_UNSUPPORTED",
    "CheckResult",
    "NotChecked",
    "Qcow2Layer",
    "check_image",
    "create_overlay",
    "read_backing",
    "set_backing",
]
