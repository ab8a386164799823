"""chainfs: QEMU disk-image chains as flat raw disks, with live block operations."""

__version__ = "0.2.0"
