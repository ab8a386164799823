"""``chainfs`` whose count of a disk's data (``st_blocks``) can be held: a test fault point.

    python counthold.py HOLD_FILE mount -f SOURCE MOUNTPOINT [-o ...]

runs ``chainfs`` with ``Chain._holders`` (the map of who holds what, which every count of
the data walks region by region) wrapped: while ``HOLD_FILE`` exists and names a suffix
of the chain's active layer, building a region of that chain's map waits until the file
is gone, as counting a huge disk does for minutes; on entering the wait it creates
``HOLD_FILE.entered``.  The wait lets the chain's lock go, as a count walking many
regions does between two of them, so only whoever waits for the count itself waits.  A
test points the mount fixtures' ``CHAINFS`` at this script.
"""

from __future__ import annotations

import sys
import time
from array import array
from pathlib import Path

from chainfs import cli
from chainfs.chain import Chain


def main() -> int:
    hold = Path(sys.argv[1])
    entered = hold.with_name(hold.name + ".entered")
    real = Chain._holders

    def holders(self: Chain, region: int, level: int = 0) -> array[int]:
        try:
            suffix = hold.read_text().strip()
        except FileNotFoundError:
            suffix = ""
        if suffix and self.layers[0].path.endswith(suffix):
            entered.touch()
            self.lock.release()  # (the caller holds it)
            try:
                while hold.exists():
                    time.sleep(0.02)
            finally:
                self.lock.acquire()
        return real(self, region, level)

    Chain._holders = holders  # type: ignore[method-assign]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
