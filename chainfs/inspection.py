"""Image files without a mount: ``chainfs info`` and ``chainfs check``, as qemu-img users know them.

``info`` opens an image (and with ``backing_chain`` its whole chain) through chainfs's own
format drivers, read-only and without image locks, and reports what ``qemu-img info``
reports, under the same JSON keys; each driver supplies its format's own fields.
``check`` takes the image's read lock and hands it to the qcow2 driver's check
(``formats.qcow2.check``), which walks the metadata as ``qemu-img check`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chain import Chain, resolve_backing
from .errors import ChainfsError, LockError, UnsupportedFeature
from .formats import open_file, open_layer
from .formats.base import Layer
from .formats.qcow2 import CHECK_FAILED, CHECK_UNSUPPORTED, CheckResult, NotChecked, check_image
from .hostfile import HostFile
from .locks import lock_image


def human_size(n: int) -> str:
    """A byte count as qemu-img prints one: three significant digits, 1024-based units."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while i + 1 < len(units) and n >= 1000 * 1024**i:
        i += 1
    return f"{n / 1024**i:.3g} {units[i]}"


# -- info ------------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    """What ``qemu-img info`` says about one image."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    dirty: bool = False
    cluster_size: int | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    format_specific: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "virtual-size": self.virtual_size,
            "filename": self.filename,
            "format": self.format,
            "actual-size": self.actual_size,
            "dirty-flag": self.dirty,
        }
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            out["full-backing-filename"] = self.full_backing_filename
        if self.backing_format is not None:
            out["backing-filename-format"] = self.backing_format
        if self.format_specific is not None:
            out["format-specific"] = {"type": self.format, "data": self.format_specific}
        return out

    def text(self) -> str:
        lines = [
            f"image: {self.filename}",
            f"file format: {self.format}",
            f"virtual size: {human_size(self.virtual_size)} ({self.virtual_size} bytes)",
            f"disk size: {human_size(self.actual_size)}",
        ]
        if self.cluster_size is not None:
            lines.append(f"cluster_size: {self.cluster_size}")
        if self.backing_filename is not None:
            line = f"backing file: {self.backing_filename}"
            if self.full_backing_filename != self.backing_filename:
                line += f" (actual path: {self.full_backing_filename})"
            lines.append(line)
        if self.backing_format is not None:
            lines.append(f"backing file format: {self.backing_format}")
        if self.dirty:
            lines.append("cleanly shut down: no")
        if self.format_specific:
            lines.append("Format specific information:")
            _nested(self.format_specific, 1, lines)
        return "\n".join(lines)


def _nested(value: dict[str, Any] | list[Any], depth: int, lines: list[str]) -> None:
    """Nested values as qemu-img prints them: one ``key: value`` a line, lists as ``[i]``."""
    items = (
        value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    )
    pad = "    " * depth
    for key, item in items:
        label = key.replace("-", " ")
        if isinstance(item, dict | list):
            lines.append(f"{pad}{label}:")
            _nested(item, depth + 1, lines)
        elif isinstance(item, bool):
            lines.append(f"{pad}{label}: {'true' if item else 'false'}")
        else:
            lines.append(f"{pad}{label}: {item}")


def _layer_info(layer: Layer, filename: str) -> ImageInfo:
    info = ImageInfo(
        filename=filename,
        format=layer.format_name,
        virtual_size=layer.virtual_size,
        actual_size=layer.allocated_bytes(),
    )
    own = layer.format_info()
    if own is not None:
        info.cluster_size, info.dirty, info.format_specific = own
    if layer.backing_string:
        info.backing_filename = layer.backing_string
        info.full_backing_filename = resolve_backing(filename, layer.backing_string)
        info.backing_format = layer.backing_format
    return info


def info(path: str, *, backing_chain: bool = False) -> list[ImageInfo]:
    """``qemu-img info [--backing-chain]``: the image first, then its backing files."""
    if not backing_chain:
        layer = open_layer(path, None, writable=False)
        try:
            return [_layer_info(layer, path)]
        finally:
            layer.close()
    # the chain's layers are named as QEMU names them: the path given, then each backing
    # string resolved against the overlay's name
    with Chain.open(path, writable=False, lock=False) as chain:
        out = []
        name = path
        for layer in chain.layers:
            item = _layer_info(layer, name)
            out.append(item)
            name = item.full_backing_filename or ""
        return out


# -- check -----------------------------------------------------------------------------------


def check(path: str, *, force_share: bool = False) -> CheckResult:
    """``qemu-img check``: verify a qcow2 image's metadata, read-only.

    Raises ChainfsError when the image cannot be opened or has a feature chainfs cannot
    check (the CLI exits 1, or 63 for a format with nothing to check).  Unless
    ``force_share``, QEMU's read locks are taken, so an image that QEMU or a chainfs mount
    is writing is refused rather than checked mid-write.
    """
    f = HostFile(path, False)
    try:
        if not force_share:
            try:
                lock_image(f.fd, f.path, write=False)
            except LockError as e:
                raise LockError(f"{e} (-U checks it anyway, as it changes)") from None
        return check_image(f, path)
    finally:
        f.close()


def repair_leaks(path: str) -> tuple[CheckResult, CheckResult]:
    """``qemu-img check -r leaks``: lower the refcount of every leaked cluster to its
    reference count, under QEMU's write lock; nothing is repaired on an image the check
    finds anything else wrong with.  Returns the check before the repair and the check
    of the image as it is after it."""
    from .formats.qcow2.check import repair_leaks as repair
    from .formats.qcow2.driver import Qcow2Layer

    f = HostFile(path, True)
    try:
        lock_image(f.fd, f.path, write=True)  # (before the driver reads or writes a byte)
    except BaseException:
        f.close()
        raise
    layer = open_file(f, None)
    try:
        if not isinstance(layer, Qcow2Layer) or layer.refs is None:
            raise NotChecked(f"{path!r} is not a qcow2 image: a raw image has no metadata to check")
        before = repair(f, layer.refs, path)
        return before, check_image(f, path)
    finally:
        layer.close()


def check_status(e: ChainfsError) -> int:
    """The exit status for a check that could not run."""
    return CHECK_UNSUPPORTED if isinstance(e, NotChecked | UnsupportedFeature) else CHECK_FAILED
