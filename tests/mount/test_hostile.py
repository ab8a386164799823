"""Hostile input to a real mount: thousands of bad writes to the control files, and
hostile images next to a good chain.

One mount serves the seed chain ``E`` beside hostile images: one whose header is
garbage, one whose L1 table lies past the end of the file, one backed by a FIFO, one
with a backing string that loops onto itself, and one that looks fine until an L2 table
is loaded (an entry points into its own L1 table).  Around the source directory lie an
allowed directory (holding a symlink that leads outside), a directory chainfs may not
write to, and a symlink from the source directory to it.

Every hostile write — random bytes, writes far beyond 4 KiB, commands cut in two,
``../`` and absolute paths elsewhere, symlinks out of the allowed directories, unknown
layers and jobs, from several threads at once — must fail with the SPEC's errno and add
one ``COMMAND_REJECTED`` line to ``events``; the server must stay up without logging a
traceback, the good chain must read as before, and not one file may change or appear:
every image and the listing of every directory involved are compared before and after.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from chainfs.control import COMMANDS, CommandError, parse_command
from chainfs.eventlog import EVENTS_DIR
from chainfs.ownership import OWNER_SUFFIX

from .conftest import MiB, Mount, Mounter, Seed, Seeds, assert_flat, expect_refusals, read_direct

OFFSET_MASK = 0x00FFFFFFFFFFFE00
WRITE_FILES = COMMANDS  # snapshot stream commit copy cancel complete


@dataclass
class Setup:
    root: Path
    seed: Seed
    mount: Mount
    unmounted: dict[str, str]  # every file under ``root`` before the mount

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def allowed(self) -> Path:
        return self.root / "allowed"


def hostile_images(d: Path) -> None:
    """Hostile tops beside the seed chain, each damaged in its own way."""
    size = 4 * MiB
    im.create(str(d / "garbage.qcow2"), size)
    im.patch(str(d / "garbage.qcow2"), 20, (40).to_bytes(4, "big"))  # 2^40-byte clusters
    im.create(str(d / "farl1.qcow2"), size)
    im.patch(str(d / "farl1.qcow2"), 40, (1 << 40).to_bytes(8, "big"))  # L1 past EOF
    os.mkfifo(d / "pipe")
    im.create(str(d / "fifo.qcow2"), size, backing="pipe", backing_fmt="raw", unsafe=True)
    im.create(str(d / "loop.qcow2"), size, backing="loop.qcow2", unsafe=True, cwd=str(d))
    lazy = str(d / "lazy.qcow2")
    im.create(lazy, size, cluster_size=4096)
    im.write(lazy, [(0, 64 * 1024, 0x6C)])
    header = im.read_header(lazy)
    l1 = int.from_bytes(header[40:48], "big")
    with open(lazy, "rb") as f:
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & OFFSET_MASK
    im.patch(lazy, l2 + 8, (1 << 63 | l1).to_bytes(8, "big"))  # data "in" the L1 table


def tree(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: files with a digest, symlinks with their target."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # the events history takes a refused command's reason, by design
            dirnames[:] = [d for d in dirnames if d != EVENTS_DIR]
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.suffix == OWNER_SUFFIX:  # the owner's heartbeat: time, by design
                    continue
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = im.file_digests([str(p)])[str(p)]
                else:
                    out[str(p)] = "dir" if p.is_dir() else "special"
    return out


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter, seeds: Seeds
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("hostile")
    seed = seeds(root / "images", size=4 * MiB)
    hostile_images(root / "images")
    for d in ("outside", "allowed", "allowed2", "allowed/sub"):
        (root / d).mkdir()
    (root / "allowed" / "taken.qcow2").write_bytes(b"not an image")
    (root / "allowed" / "link").symlink_to(root / "outside")
    (root / "images" / "escape").symlink_to(root / "outside")
    (root / "images" / "dangling.qcow2").symlink_to(root / "outside" / "nothing.qcow2")
    unmounted = tree(root)
    m = module_mounter(root / "images", f"allow_dir={root / 'allowed'}")
    yield Setup(root, seed, m, unmounted)


OUTSIDE_TARGETS = ("/tmp/x.qcow2", "/etc/x.qcow2", "/dev/shm/evil.qcow2", "/x.qcow2")


@pytest.fixture
def unharmed(setup: Setup) -> Iterator[None]:
    """Nothing on disk changes (nor appears where the hostile targets point), the server
    stays up and logs no traceback, and the good chain reads as before."""
    before = tree(setup.root)
    outside = {p: os.path.lexists(p) for p in OUTSIDE_TARGETS}
    yield
    assert setup.mount.alive, setup.mount.log_text()
    assert "Traceback" not in setup.mount.log_text()
    assert tree(setup.root) == before
    assert {p: os.path.lexists(p) for p in OUTSIDE_TARGETS} == outside
    assert setup.mount.lines("E", "jobs") == []
    assert_flat(setup.mount.img("E"), setup.seed.content)


# -- hostile images ---------------------------------------------------------------------


@pytest.mark.expect_log(r"WARNING chainfs\.mount: chain=\S+ refused: ")
def test_hostile_images_are_refused_next_to_a_good_chain(setup: Setup, unharmed: None) -> None:
    # mounting wrote to none of the images (the state file is new)
    now = tree(setup.root)
    assert {p: d for p, d in now.items() if p in setup.unmounted} == setup.unmounted
    status = {x.get("chain"): x for x in setup.mount.status()[1:]}
    assert status["E"]["status"] == "served"
    # chain -> words of the reason, and the file it must name
    reasons = {
        "garbage": ("invalid cluster size", "garbage.qcow2"),
        "farl1": ("past the end of the file", "farl1.qcow2"),
        "fifo": ("not a regular file", "pipe"),
    }
    for name, (words, culprit) in reasons.items():
        assert status[name]["status"] == "refused", status[name]
        assert words in status[name]["reason"], status[name]
        assert culprit in status[name]["reason"], status[name]
        assert not setup.mount.img(name).exists()
    # an image that is its own backing file is nobody's top: not served (the source scan
    # does not list it as refused either)
    assert status.get("loop", {}).get("status") != "served"


@pytest.mark.expect_log(r"WARNING chainfs\.fs: (read|write) failed: .* data pointing into metadata")
def test_damage_found_late_fails_its_requests_not_the_mount(setup: Setup, unharmed: None) -> None:
    """``lazy`` opens, but its L2 table points into its L1 table: its flat file answers
    EIO to reads and writes alike, nothing is written into it, and the mount goes on."""
    status = {x.get("chain"): x for x in setup.mount.status()[1:]}
    assert status["lazy"]["status"] == "served"
    img = setup.mount.img("lazy")
    for _ in range(3):
        with pytest.raises(OSError) as info:
            read_direct(img, 0, 4096)
        assert info.value.errno == errno.EIO
        fd = os.open(img, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = bytearray(4096)
            with pytest.raises(OSError) as info:
                os.pwrite(fd, buf, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
    assert "pointing into metadata" in setup.mount.log_text()
    lazy = str(setup.images / "lazy.qcow2")
    assert tree(setup.images)[lazy] == setup.unmounted[lazy]


# -- hostile writes to the control files ----------------------------------------------


def refused_locally(kind: str, data: bytes) -> bool:
    try:
        parse_command(kind, data)
    except CommandError:
        return True
    return False


def write_all(path: Path, writes: list[tuple[bytes, int]], *, one_fd: bool = False) -> int:
    """Write each ``data``; each write must fail with its errno.  Returns the count.

    With ``one_fd`` all go through one open file, whose writes make one command: after
    the first is refused, every later one is refused with EINVAL as its continuation."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC) if one_fd else -1
    try:
        for i, (data, expected) in enumerate(writes):
            err = errno.EINVAL if one_fd and i else expected
            f = fd if one_fd else os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(f, data)
            except OSError as e:
                assert e.errno == err, (
                    f"{path.name} {data[:80]!r}: {errno.errorcode.get(e.errno or 0)}"
                    f" instead of {errno.errorcode[err]}"
                )
            else:
                raise AssertionError(f"{path.name} accepted {data[:80]!r}")
            finally:
                if not one_fd:
                    os.close(f)
    finally:
        if one_fd:
            os.close(fd)
    return len(writes)


def rejected_since(setup: Setup, before: int) -> list[dict[str, str]]:
    new = setup.mount.events("E")[before:]
    assert all(e["event"] == "COMMAND_REJECTED" and e.get("reason") for e in new), new[:5]
    return new


def random_refused_bytes(rng: random.Random, kind: str, n: int) -> list[tuple[bytes, int]]:
    """``n`` random writes the grammar refuses: raw bytes, word soup, stray quotes."""
    words = ["base=", "node=", "top=", "speed=", "sync=", "wait=", "=", '"', "\\", "..", "/"]
    words += ["A.qcow2", "E.qcow2", "\x00", "\t", " ", "é", "\xff", "ready", "full", "10M"]
    out: list[tuple[bytes, int]] = []
    while len(out) < n:
        style = rng.randrange(3)
        if style == 0:
            data = rng.randbytes(rng.randint(1, 600))
        elif style == 1:
            data = "".join(rng.choice(words) for _ in range(rng.randint(1, 12))).encode(
                "utf-8", "surrogateescape"
            )
        else:
            data = b'"' + rng.randbytes(rng.randint(0, 40)).replace(b'"', b"")
        if data and refused_locally(kind, data):
            out.append((data, errno.EINVAL))
    return out


def random_bytes(setup: Setup, kind: str, seed: str, n: int) -> None:
    writes = random_refused_bytes(random.Random(seed), kind, n)
    before = len(setup.mount.events("E"))
    done = write_all(setup.mount.control("E", kind), writes[: n // 2])
    done += write_all(setup.mount.control("E", kind), writes[n // 2 :], one_fd=True)
    assert len(rejected_since(setup, before)) == done


@pytest.mark.parametrize("kind", WRITE_FILES)
@expect_refusals
def test_random_bytes(setup: Setup, unharmed: None, kind: str) -> None:
    random_bytes(setup, kind, f"random-{kind}", 400)


@pytest.mark.slow
@pytest.mark.parametrize("kind", WRITE_FILES)
@expect_refusals
def test_random_bytes_many(setup: Setup, unharmed: None, kind: str) -> None:
    random_bytes(setup, kind, f"many-{kind}", 5000)


@pytest.mark.parametrize("size", [4097, 64 * 1024, 1 << 20, 8 << 20])
@expect_refusals
def test_huge_writes(setup: Setup, unharmed: None, size: int) -> None:
    before = len(setup.mount.events("E"))
    payloads = [b"x" * size, b"base=" + b"A" * (size - 5), b'"' + b"/" * (size - 1)]
    for kind in WRITE_FILES:
        write_all(setup.mount.control("E", kind), [(p, errno.EINVAL) for p in payloads])
    new = rejected_since(setup, before)
    # one refusal per write(2), however the kernel cuts it up
    assert len(new) == 3 * len(WRITE_FILES), len(new)
    assert {e["reason"] for e in new} == {"command too long"}


@expect_refusals
def test_partial_writes(setup: Setup, unharmed: None) -> None:
    """A command cut in two is two commands, each refused on its own; a write at an
    offset (``pwrite``) is a whole command too."""
    rng = random.Random("partial")
    writes: list[tuple[str, bytes]] = []
    commands = [
        ("snapshot", b'"/my dir/x.qcow2"'),
        ("stream", b'base="A.qcow2"'),
        ("commit", b'top="D.qcow2" base=B.qcow2'),
        ("copy", b'"allowed/x.qcow2" sync=top'),
    ]
    for kind, data in commands:
        first, last = data.index(b'"'), data.rindex(b'"')
        for _ in range(25):  # cut strictly between the quotes: both halves unbalanced
            cut = rng.randint(first + 1, last)
            writes += [(kind, data[:cut]), (kind, data[cut:])]
    before = len(setup.mount.events("E"))
    for kind, part in writes:
        assert refused_locally(kind, part), (kind, part)
        fd = os.open(setup.mount.control("E", kind), os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, part)
            assert info.value.errno == errno.EINVAL
            with pytest.raises(OSError) as info:
                os.pwrite(fd, part, rng.randint(1, 1 << 40))
            assert info.value.errno == errno.EINVAL
        finally:
            os.close(fd)
    assert len(rejected_since(setup, before)) == 2 * len(writes)


def expected_target_errno(s: Setup, target: str) -> int | None:
    """What the SPEC says a snapshot/copy target gets: ENOENT for a missing directory,
    EACCES outside the source and allowed directories (symlinks resolved), EEXIST for
    an existing name; None for a target that would be accepted (never sent)."""
    if not target or "\0" in target:
        return errno.EINVAL
    path = os.path.normpath(target if os.path.isabs(target) else str(s.images / target))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return errno.ENOENT
    real = os.path.realpath(parent)
    allowed = [os.path.realpath(s.images), os.path.realpath(s.allowed)]
    if not any(real == d or real.startswith(d + "/") for d in allowed):
        return errno.EACCES
    if os.path.lexists(path):
        return errno.EEXIST
    return None


def hostile_targets(s: Setup, rng: random.Random, n: int) -> list[tuple[str, int]]:
    r = str(s.root)
    fixed = [
        "../outside/x.qcow2", "../../x.qcow2", "../" * 30 + "etc/x.qcow2", "/etc/x.qcow2",
        "/tmp/x.qcow2", "/proc/self/x.qcow2", "/dev/shm/evil.qcow2", "escape/x.qcow2",
f"{r}/allowed/link/x.qcow2", f"{r}/allowed/../outside/x.qcow2",
        f"{r}/allowed2/x.qcow2", f"{r}/allowed/sub/../../outside/x.qcow2", "nodir/x.qcow2",
        f"{r}/allowed/nodir/x.qcow2", "dangling.qcow2", "E.qcow2", "A.qcow2", "pipe",
        f"{r}/allowed/taken.qcow2", f"{r}/allowed/link", ".", "..", "/", "//", f"{r}/outside",
        "escape", f"{r}/images/../images/E.qcow2",
    ]  # fmt: skip
    pieces = ["..", ".", "escape", "outside", "allowed", "allowed2", "link", "sub", "nodir"]
    pieces += ["images", "E.qcow2", "x.qcow2", "", "etc", "tmp", r.lstrip("/")]
    out = [(t, e) for t in fixed if (e := expected_target_errno(s, t)) is not None]
    assert len(out) == len(fixed), [t for t in fixed if expected_target_errno(s, t) is None]
    while len(out) < n:
        target = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.3:
            target = "/" + target
        err = expected_target_errno(s, target)
        if err is not None and err != errno.EINVAL:
            out.append((target, err))
    return out


def quoted(text: str) -> bytes:
    return ('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


@expect_refusals
def test_path_traversal_and_symlinks_out(setup: Setup, unharmed: None) -> None:
    rng = random.Random("traversal")
    targets = hostile_targets(setup, rng, 300)
    assert {e for _, e in targets} == {errno.EACCES, errno.ENOENT, errno.EEXIST}
    before = len(setup.mount.events("E"))
    n = write_all(setup.mount.control("E", "snapshot"), [(quoted(t), e) for t, e in targets])
    copies = [(quoted(t) + b" sync=" + rng.choice([b"full", b"top"]), e) for t, e in targets]
    n += write_all(setup.mount.control("E", "copy"), copies)
    assert len(rejected_since(setup, before)) == n


@expect_refusals
def test_layers_and_jobs_that_are_not_there(setup: Setup, unharmed: None) -> None:
    """Layer references by traversal, absolute paths elsewhere, symlinks and look-alikes
    are not layers (EINVAL); unknown jobs do not exist (ENOENT)."""
    r, images = str(setup.root), str(setup.images)
    # (an absolute path that normalises to a layer, such as IMAGES/../images/B.qcow2,
    # names that layer: not sent here, it would start a job)
    refs = ["../images/A.qcow2", "/etc/passwd", "escape", f"{r}/outside", "./C.qcow2",
            "A.qcow2/", "lazy.qcow2", "garbage.qcow2", "pipe", f"{images}/escape/A.qcow2",
            f"{r}/outside/../images2/A.qcow2", "a.qcow2", "A.QCOW2", " A.qcow2 ",
            "dangling.qcow2", f"{images}/pipe"]  # fmt: skip
    writes: list[tuple[str, bytes, int]] = []
    for ref in refs:
        q = quoted(ref)
        writes += [("stream", b"base=" + q, errno.EINVAL), ("stream", b"node=" + q, errno.EINVAL)]
        writes += [("commit", b"top=" + q, errno.EINVAL), ("commit", b"base=" + q, errno.EINVAL)]
        writes += [("cancel", q, errno.ENOENT), ("complete", q, errno.ENOENT)]
    rng = random.Random("jobs")
    for _ in range(100):
        job = rng.choice(["stream", "commit", "copy", "x"]) + "-" + str(rng.randint(-9, 10**12))
        writes += [("cancel", job.encode(), errno.ENOENT), ("complete", job.encode(), errno.ENOENT)]
    before = len(setup.mount.events("E"))
    for kind, data, err in writes:
        write_all(setup.mount.control("E", kind), [(data, err)])
    assert len(rejected_since(setup, before)) == len(writes)


@expect_refusals
def test_concurrent_hostile_writers(setup: Setup, unharmed: None) -> None:
    """Eight threads write hostile commands to every control file at once while two
    more read the control files; every write gets its errno, the mount holds up."""
    rng = random.Random("concurrent")
    targets = hostile_targets(setup, rng, 120)
    plans: list[list[tuple[str, bytes, int]]] = []
    for w in range(8):
        trng = random.Random(f"writer-{w}")
        plan: list[tuple[str, bytes, int]] = []
        for _ in range(150):
            kind = trng.choice(WRITE_FILES)
            style = trng.randrange(3)
            if style == 0:
                data, err = random_refused_bytes(trng, kind, 1)[0]
            elif style == 1 and kind in ("snapshot", "copy"):
                target, err = trng.choice(targets)
                data = quoted(target)
            elif kind in ("cancel", "complete"):
                data, err = f"stream-{trng.randint(100, 10**6)}".encode(), errno.ENOENT
            else:
                data, err = b"x" * trng.choice([5000, 70_000]), errno.EINVAL
            plan.append((kind, data, err))
        plans.append(plan)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(plan: list[tuple[str, bytes, int]]) -> None:
        try:
            for kind, data, err in plan:
                write_all(setup.mount.control("E", kind), [(data, err)])
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                for name in ("chain", "jobs", "events"):
                    setup.mount.control("E", name).read_bytes()
                (setup.mount.mountpoint / "control" / ".status").read_bytes()
        except BaseException as e:
            errors.append(e)

    before = len(setup.mount.events("E"))
    threads = [threading.Thread(target=writer, args=(p,)) for p in plans]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads + readers)
    assert len(rejected_since(setup, before)) == sum(len(p) for p in plans)
