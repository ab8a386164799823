"""Many requests in flight at once during every live job: fio at queue depth 32 in four
jobs, reads and writes mixed, with a verify pattern, while the job runs.

    [A] <- [B] <- [C] <- [D] <- [E]   (the 32 MiB seed; fio writes the flat file)
        stream node=D base=B   ->  [A] <- [B] <- [D] <- [E]
        stream base=A          ->  [A] <- [E]
        commit top=D base=B    ->  [A] <- [B] <- [E]
        commit base=A          ->  [A]                       (active; both copy modes)
        copy F sync=full       ->  [F]                       (both copy modes)
        copy F sync=top        ->  [A] <- [B] <- [C] <- [D] <- [F]   (both copy modes)
        backup F sync=full     ->  F: the disk at the command
        backup F sync=top      ->  F over D: the disk at the command
        snapshot S             ->  [A] <- ... <- [E] <- [S]

One mount for the module serves a seed chain per case (``NAME-A.qcow2`` ...
``NAME-E.qcow2``).  The guest (``Fio``, a thread) runs fio rounds on the chain's flat
file with ``ioengine=libaio``, ``direct=1`` and ``iodepth=32``: four jobs, each in its
own 6 MiB region (the first 2 MiB of each quarter is never written), in 4 KiB..64 KiB
blocks with a crc32c verify header every 4 KiB, ``norandommap`` so that blocks are
overwritten (``serialize_overlap``: never two overlapping requests in flight at once).
Two jobs mix random reads and writes (``rw=randrw``) and verify what they wrote while
they run (``verify_backlog``); the other two write (``rw=randwrite``) and verify all of
it at the end of the round.  The job starts once fio's requests are in flight (a backup
before fio starts: its point in time is then the seed) at a ``speed=`` that makes it
last about a round; a job that waits to be ready is completed under load; the guest
stops at the end of the round during which the job ended, so that round's verify reads
after the pivot.  Every round must end without an error.  Meanwhile two threads
(``SeedReader``) read the parts fio never writes (2.6 MiB of the seed's data, from every
layer: what a stream or commit moves) with O_DIRECT, each read checked against the seed
as it returns.

The model, from the rounds' ``write_iolog`` (every write, in the order fio issued them),
on the flat file read once the job and fio ended: every 4 KiB block fio never wrote is
the seed's, and every one it wrote starts with the verify header of its last write there
(which names the block's offset, the fio job and the write's number in the job).  A lost
write leaves the seed or an older write there, a misplaced one a header naming another
offset: caught even in a round fio verified before the job ended, and in the parts of a
write that fio's own verify skips (it drops a whole logged write that a later one
overlaps).  A backup's DEST (read through the chain's lower layers for ``sync=top``) is
the seed.  At the end of the module, unmounted: ``qemu-img check`` is clean on every
image in the directory, and ``qemu-img compare`` finds each chain equal to its flat file
as read; mounted again, each flat file reads the same.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
    SEED_SIZE,
    GuestThread,
    Mount,
    Mounter,
    Seeds,
    assert_clean,
    assert_content,
    assert_flat,
    first_difference,
    read_direct,
    run,
    wait_for,
)

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")

KiB, MiB = im.KiB, im.MiB
SIZE = SEED_SIZE  # 32 MiB
BLOCK = 4 * KiB  # fio's block alignment and verify interval
# one region per fio job; the first 2 MiB of each quarter (2.6 MiB of the seed's data, from
# every layer) fio never writes: ``SeedReader`` reads them
REGIONS = [(i * 8 * MiB + 2 * MiB, 6 * MiB) for i in range(4)]
GAPS = [(i * 8 * MiB, 2 * MiB) for i in range(4)]
READERS = 2
ROUND_IO = "12m"  # what each fio job reads and writes in a round (about a second idle)
# the jobs' rates: each lasts about a round, a first pass of a mirror (whose dirty data
# fio keeps growing) a few rounds
SPEED = "4M"
MIRROR_SPEED = "16M"
FIO_MAGIC = 0xACCA  # the first two bytes of fio's verify header (little-endian)
# what fio says of every job here (norandommap with a block size range), not an error
NOISE = "norandommap given for variable block sizes, verify limited"
TIMEOUT = 240.0  # a job under fio on a loaded 2-core machine, with room to spare


class Fio(GuestThread):
    """fio rounds on ``flat`` until ``stop()``: the round running then (or the next one,
    if none is) is the last.  ``count`` is the writes fio reported; ``written`` the last
    writer of each 4 KiB block any round wrote, from the rounds' ``write_iolog``."""

    def __init__(self, flat: Path, workdir: Path) -> None:
        super().__init__()
        self.flat, self.workdir = flat, workdir
        self.rounds = 0
        self.written: dict[int, tuple[int, int]] = {}
        self._stop_event = threading.Event()

    def _loop(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            self._round(self.rounds)
            self.rounds += 1
            if self._stop_event.is_set():
                return

    def _round(self, n: int) -> None:
        jobfile = self.workdir / f"round{n}.fio"
        jobfile.write_text(self.jobfile(n))
        proc = subprocess.run(
            ["fio", "--output-format=json", jobfile.name],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=TIMEOUT,
        )
        head, brace, body = proc.stdout.partition("{")  # fio may print lines before its json
        report = json.loads(brace + body) if brace else {"jobs": []}
        errors = [(j["jobname"], j["error"]) for j in report["jobs"] if j["error"]]
        if proc.returncode != 0 or errors or len(report["jobs"]) != len(REGIONS):
            said = [x for x in (proc.stderr + head).splitlines() if NOISE not in x]
            raise AssertionError(
                f"fio round {n} exited {proc.returncode}, job errors {errors}:\n" + "\n".join(said)
            )
        self.count += sum(int(j["write"]["total_ios"]) for j in report["jobs"])
        for i in range(len(REGIONS)):
            self.written |= last_writes(self.workdir / f"round{n}-job{i}.iolog", i)

    def jobfile(self, n: int) -> str:
        lines = [
            "[global]",
            f"filename={self.flat}",
            "ioengine=libaio",
            "direct=1",
            "iodepth=32",
            "bsrange=4k-64k",
            f"blockalign={BLOCK}",
            "norandommap",
            "serialize_overlap=1",
            "verify=crc32c",
            f"verify_interval={BLOCK}",
            "verify_fatal=1",
            "verify_dump=0",
            "verify_state_save=0",
            f"io_size={ROUND_IO}",
            "randrepeat=0",
        ]
        for i, (offset, length) in enumerate(REGIONS):
            lines += [
                f"[job{i}]",
                f"offset={offset}",
                f"size={length}",
                f"write_iolog=round{n}-job{i}.iolog",
            ]
            if i % 2 == 0:  # reads and writes, verified while the job runs
                lines += ["rw=randrw", "verify_backlog=16"]
            else:  # writes verified at the end of the round, after the job ended
                # (fio 3.33 reports blocks of an earlier write there in a randrw job
                # without a random map, on a plain file too: so writes only)
                lines.append("rw=randwrite")
        return "\n".join(lines) + "\n"

    def iolog_bytes(self) -> tuple[int, int]:
        """(round, how much of its ``write_iolog`` fio wrote so far: it grows with I/O)."""
        n = self.rounds
        total = 0
        for i in range(len(REGIONS)):
            try:
                total += (self.workdir / f"round{n}-job{i}.iolog").stat().st_size
            except FileNotFoundError:
                pass
        return n, total

    def wait_io(self) -> None:
        """Until fio logged more I/O (it writes its log in buffered pieces, many requests
        each, so there are requests in flight by then) or started another round."""
        before = self.iolog_bytes()

        def more() -> bool:
            self.check()
            now = self.iolog_bytes()
            return now[0] > before[0] or now[1] > before[1]

        wait_for(more, "more fio I/O", TIMEOUT)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=TIMEOUT)
        assert not self.is_alive(), "fio did not stop"
        self.check()


class SeedReader(GuestThread):
    """O_DIRECT reads of 4 KiB..64 KiB in the ``GAPS``, each checked against the seed as
    it returns, until ``stop()``: reads among fio's, racing the job's copy of those
    clusters from layer to layer.  ``count`` is the reads."""

    def __init__(self, flat: Path, seed: bytes, n: int) -> None:
        super().__init__()
        self.flat, self.seed = flat, seed
        self.rng = random.Random(n)
        self._stop_event = threading.Event()

    def _loop(self) -> None:
        rng = self.rng
        buf = mmap.mmap(-1, 64 * KiB)  # page aligned, as O_DIRECT wants
        fd = os.open(self.flat, os.O_RDONLY | os.O_DIRECT)
        try:
            while not self._stop_event.is_set():
                start, length = rng.choice(GAPS)
                n = rng.randint(1, 16) * BLOCK
                off = start + rng.randrange((length - n) // BLOCK + 1) * BLOCK
                assert os.preadv(fd, [memoryview(buf)[:n]], off) == n
                got, want = buf[:n], self.seed[off : off + n]
                if got != want:
                    raise AssertionError(
                        f"read at {off} (never written): " + first_difference(got, want)
                    )
                self.count += 1
        finally:
            os.close(fd)
            buf.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=TIMEOUT)
        assert not self.is_alive(), "the reader did not stop"
        self.check()
        assert self.count, "the reader read nothing"


def stop_all(threads: list[Fio | SeedReader]) -> None:
    """Stop every one of them, then fail with the first one's failure."""
    failures: list[AssertionError] = []
    for t in threads:
        try:
            t.stop()
        except AssertionError as e:
            failures.append(e)
    if failures:
        raise failures[0]


def last_writes(iolog: Path, job: int) -> dict[int, tuple[int, int]]:
    """For each 4 KiB block an fio ``write_iolog`` (version 3) says was written, its last
    writer: (fio job, the write's number in the job), as fio's verify header names it."""
    blocks: dict[int, tuple[int, int]] = {}
    number = 0
    for line in iolog.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 5 and fields[2] == "write":
            offset, length = int(fields[3]), int(fields[4])
            assert offset % BLOCK == 0 and length % BLOCK == 0, line
            for b in range(offset // BLOCK, (offset + length) // BLOCK):
                blocks[b] = (job, number)
            number += 1
    return blocks


def assert_model(flat: bytes, seed: bytes, written: dict[int, tuple[int, int]]) -> None:
    """Blocks fio never wrote are the seed's; each one it wrote holds the verify header of
    its last write (fio's verify checks the data behind it)."""
    assert len(flat) == len(seed) == SIZE
    regions = {o // BLOCK + k for o, n in REGIONS for k in range(n // BLOCK)}
    assert written and written.keys() <= regions, "fio wrote outside its regions"
    bad: list[str] = []
    for b in range(SIZE // BLOCK):
        at = b * BLOCK
        got = flat[at : at + BLOCK]
        if b not in written:
            want = seed[at : at + BLOCK]
            assert got == want, f"block at {at} (never written): " + first_difference(got, want)
            continue
        magic, offset, thread, number = header(got)
        job, k = written[b]
        if magic != FIO_MAGIC:
            bad.append(f"{at}: no fio header (a lost write): {got[:8].hex()}")
        elif offset != at:
            bad.append(f"{at}: fio's block for offset {offset} (a misplaced write)")
        elif (thread, number) != (job + 1, k & 0xFFFF):
            bad.append(f"{at}: write {number} of job {thread - 1}, not {k} of {job} (stale)")
    assert not bad, f"{len(bad)} blocks are not fio's last write there: " + "; ".join(bad[:8])


def header(block: bytes) -> tuple[int, int, int, int]:
    """From fio's ``struct verify_header`` (verify.h): magic, offset, thread, numberio."""
    (magic,) = struct.unpack_from("<H", block)
    (offset,) = struct.unpack_from("<Q", block, 16)
    thread, number = struct.unpack_from("<HH", block, 32)
    return magic, offset, thread, number


@dataclass(frozen=True)
class Case:
    """One live job on the chain ``NAME-E``: its control file and text (``speed=`` added),
    and the chain's layers after it (active first), with ``NAME-`` left out of the names."""

    kind: str
    text: str
    after: tuple[str, ...]
    speed: str = SPEED

    @property
    def ready(self) -> bool:
        return "wait=ready" in self.text


SEED_LAYERS = ("E", "D", "C", "B", "A")


def mirror(kind: str, text: str, after: tuple[str, ...], mode: str) -> Case:
    return Case(kind, f"{text} copy-mode={mode} wait=ready", after, MIRROR_SPEED)


CASES = {
    "stream-intermediate": Case("stream", "node=D base=B", ("E", "D", "B", "A")),
    "stream-base": Case("stream", "base=A", ("E", "A")),
    "commit-intermediate": Case("commit", "top=D base=B", ("E", "B", "A")),
    **{
        f"commit-active-{mode}": mirror("commit", "base=A", ("A",), mode)
        for mode in ("background", "write-blocking")
    },
    **{
        f"copy-full-{mode}": mirror("copy", "F sync=full", ("F",), mode)
        for mode in ("background", "write-blocking")
    },
    **{
        f"copy-top-{mode}": mirror("copy", "F sync=top", ("F", *SEED_LAYERS[1:]), mode)
        for mode in ("background", "write-blocking")
    },
    "backup-full": Case("backup", "F sync=full", SEED_LAYERS),
    "backup-top": Case("backup", "F sync=top", SEED_LAYERS),
    "snapshot": Case("snapshot", "S", ("S", *SEED_LAYERS)),
}
# the default run (under a minute on two cores): one of each job, the rest under --runslow
FAST = {
    "stream-base",
    "commit-intermediate",
    "commit-active-write-blocking",
    "copy-full-background",
    "backup-full",
    "snapshot",
}


def layer(name: str, letter: str) -> str:
    """The file of layer (or DEST) ``letter`` of case ``name``'s chain."""
    return f"{name}-{letter}.qcow2"


def command(name: str, case: Case) -> str:
    """The case's text with its layers' file names: ``base=A`` -> ``base=NAME-A.qcow2``."""
    words = []
    for word in case.text.split():
        key, eq, value = word.rpartition("=")
        if len(value) == 1:
            value = layer(name, value)
        words.append(f"{key}{eq}{value}")
    return " ".join(words)


@dataclass
class Served:
    """One mount for the module, one seed chain ``NAME-A.qcow2 <- ... <- NAME-E.qcow2`` per
    case in its directory; ``done``: each finished case's new active layer and a raw file
    of its flat file as read when the job and fio had ended (the model of that chain), in
    ``models`` (the module's: a passed test's ``tmp_path`` is removed when it ends)."""

    mount: Mount
    seed: bytes
    models: Path
    done: dict[str, tuple[Path, Path]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    module_mounter: Mounter,
    seeds: Seeds,
) -> Served:
    root = tmp_path_factory.mktemp("inflight")
    d, models = root / "images", root / "models"
    models.mkdir()
    runslow = request.config.getoption("--runslow")
    for name in CASES if runslow else FAST:
        seeds(d, f"{name}-")
    return Served(module_mounter(d), seeds.template(SIZE, "qcow2").content, models)


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES],
)
def test_fio_at_queue_depth_32_during_the_job(served: Served, tmp_path: Path, name: str) -> None:
    m, case, chain = served.mount, CASES[name], f"{name}-E"
    flat = m.img(chain)
    guest = Fio(flat, tmp_path / "fio")
    readers = [SeedReader(flat, served.seed, i) for i in range(READERS)]
    for r in readers:
        r.start()
    try:
        if case.kind == "snapshot":
            guest.start()
            guest.wait_io()
            m.command(chain, "snapshot", command(name, case))
        else:
            if case.kind != "backup":  # a backup's point in time is the seed: fio after it
                guest.start()
                guest.wait_io()
            jid = m.start_job(chain, case.kind, f"{command(name, case)} speed={case.speed}")
            if case.kind == "backup":
                guest.start()
            if case.ready:
                wait_ready(m, chain, jid, guest)
                m.command(chain, "speed", f"{jid} 0")  # the dirty data left, at full speed
                m.command(chain, "complete", jid)
            end = m.wait_job(chain, jid, TIMEOUT)
            assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    finally:
        stop_all([guest, *readers])
    after = [layer(name, x) for x in case.after]
    assert m.layers(chain) == after
    got = read_direct(flat)
    assert_model(got, served.seed, guest.written)
    if case.kind == "backup":  # a finished DEST is an ordinary file: QEMU may read it now
        assert_content(m.source / layer(name, "F"), served.seed, tmp_path)
    model = served.models / f"{name}.raw"
    model.write_bytes(got)
    served.done[name] = (m.source / after[0], model)


def test_every_image_is_clean_and_every_chain_its_model_after_the_unmount(
    served: Served, mounter: Mounter
) -> None:
    # the chains as chainfs left them on disk: QEMU reads each one as its flat file was
    m = served.mount
    m.unmount()
    assert_clean(sorted(m.source.glob("*.qcow2")))
    for name, (active, model) in served.done.items():
        cmp = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", active, model, ok=(0, 1))
        assert cmp.returncode == 0, f"{name}: qemu-img compare {active}: {cmp.stdout}"
    # and chainfs, mounting them again
    m = mounter(m.source)
    for name, (_, model) in served.done.items():
        assert_flat(m.img(f"{name}-E"), model.read_bytes())
    m.unmount()


def wait_ready(m: Mount, chain: str, jid: str, guest: Fio) -> None:
    """JOB_READY of ``jid``, then more of fio's I/O: a ready job mirrors writes a while."""

    def ready() -> bool:
        guest.check()
        return any(e.get("job") == jid and e["event"] == "JOB_READY" for e in m.events(chain))

    wait_for(ready, f"{jid} to be ready", TIMEOUT)
    guest.wait_io()
