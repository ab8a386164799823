"""The qcow2 format driver (versions 2 and 3)."""

from .check import CHECK_FAILED, CHECK_UNSUPPORTED, CheckResult, NotChecked, check_image
from .create import create_image, create_overlay, remove_unfinished, set_backing, unfinished
from .driver import Qcow2Layer
from .header import read_backing

__all__ = [
    "CHECK_FAILED",
    "CHECK_UNSUPPORTED",
    "CheckResult",
    "NotChecked",
    "Qcow2Layer",
    "check_image",
    "create_image",
    "create_overlay",
    "read_backing",
    "remove_unfinished",
    "set_backing",
    "unfinished",
]
