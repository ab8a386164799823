"""The ``chainfs`` command line: argparse subcommands, each a thin call into the engine.

This is the one place that turns errors into exit codes: a ``ChainfsError`` (or an
``OSError`` from the host) becomes one line ``chainfs: <message>`` on stderr and exit
status 1, never a traceback.  ``mount`` and the job subcommands join as they are built.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import __version__
from .errors import ChainfsError

# The piece size ``digest`` reads the flat disk in.
DIGEST_PIECE = 1 << 20


def cmd_digest(ns: argparse.Namespace) -> int:
    """Print the xxh3-128 digest of the flat disk of the chain whose active layer is IMAGE."""
    import xxhash

    from .chain import Chain

    h = xxhash.xxh3_128()
    with Chain.open(ns.image) as chain:
        size = chain.size
        for offset in range(0, size, DIGEST_PIECE):
            h.update(chain.read(offset, min(DIGEST_PIECE, size - offset)))
    print(h.hexdigest())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainfs",
        description="Show chains of QEMU disk images as flat raw disks.",
    )
    parser.add_argument("--version", action="version", version=f"chainfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    digest = sub.add_parser(
        "digest",
        help="print the xxh3-128 digest of a chain's flat disk",
        description="Read the flat disk of the chain whose active layer is IMAGE through "
        "chainfs (as a guest would see it) and print its xxh3-128 hex digest.",
    )
    digest.add_argument("image", metavar="IMAGE", help="the chain's active layer")
    digest.set_defaults(func=cmd_digest)
    return parser


def _describe_os_error(e: OSError) -> str:
    reason = (e.strerror or str(e)).lower()
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    return reason


def main(args: list[str] | None = None) -> int:
    ns = build_parser().parse_args(args)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except ChainfsError as e:
        print(f"chainfs: {e}", file=sys.stderr)
    except OSError as e:
        print(f"chainfs: {_describe_os_error(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
