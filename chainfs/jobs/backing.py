"""The one rule for the backing string a job writes into an image header.

Snapshot, stream, commit and copy all point an image (the *node*) at a layer (the
*target*), and all spell the pointer the same way:

1. when an overlay already points at the target (``over``: the layer the node replaces
   as the target's overlay) from the node's own directory, its string is kept verbatim
   (it resolves the same from there, and ``qemu-img info`` keeps showing what the user
   wrote);
2. otherwise, a target beside the node is named by its file name;
3. otherwise, when ``over``'s string was a relative path through directories
   (``../dir1/base.img``), a path relative to the node's directory: chains spread over
   a tree stay relative, as libvirt keeps them, so the tree can move (qemu-iotests
   040's TestRelativePaths).  A bare file name only said that the target lay beside
   ``over``, which it does not beside the node;
4. otherwise the target's absolute path.

Relative strings are resolved from the image's own directory, never the working
directory, as QEMU does.
"""

from __future__ import annotations

import os


def backing_string(node: str, target: str, over: tuple[str, str | None] | None = None) -> str:
    """The string an image at ``node`` gets to point at the image at ``target``;
    ``over`` is ``(path, backing string)`` of the overlay that points at ``target``
    today, if any."""
    node_dir = os.path.dirname(node)
    old = over[1] if over is not None else None
    if over is not None and old and os.path.dirname(over[0]) == node_dir:
        return old
    if os.path.dirname(target) == node_dir:
        return os.path.basename(target)
    if old and not os.path.isabs(old) and "/" in old:
        return os.path.relpath(target, node_dir)
    return target
