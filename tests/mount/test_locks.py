"""QEMU's image locks, both ways, through real mounts.

An image that ``qemu-io`` holds open for writing (as a running VM would) makes its chain
refused, with QEMU's words in ``chainfs status``, while the other chains are served.
While chainfs serves a chain, ``qemu-io`` cannot open any of its layers for writing and
``qemu-img info`` without ``-U`` refuses the active layer, as a second QEMU would; the
locks follow the chain through snapshot and stream (a layer that left the chain is
released), and a second chainfs mount of the same images serves the chain read-only,
owned elsewhere (``test_hosts.py`` has the rest of the many-hosts rules).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Mounter, Seeds, assert_clean, assert_content, assert_flat

Hold = Callable[[Path], Callable[[], None]]

# a chain whose image another process holds is left out of the mount, with a warning
lock_refused = pytest.mark.expect_log(
    r'WARNING chainfs\.mount: chain=\S+ refused: Failed to get (shared )?"write" lock'
)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=60
    )


def assert_refused(proc: subprocess.CompletedProcess[str], path: Path) -> None:
    assert proc.returncode != 0, f"QEMU opened a locked image:\n{proc.stdout}{proc.stderr}"
    assert 'Failed to get "write" lock' in proc.stderr or "Failed to get shared" in proc.stderr
    assert f"Is another process using the image [{path}]?" in proc.stderr, proc.stderr


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0 and "lock" not in proc.stderr, proc.stdout + proc.stderr


@pytest.fixture
def held_by_qemu() -> Iterator[Hold]:
    """Keep an image open for writing in an interactive ``qemu-io``; returns its quit."""
    procs: list[subprocess.Popen[str]] = []

    def quit_(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            try:
                proc.communicate("quit\n", timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()

    def hold(path: Path) -> Callable[[], None]:
        proc = subprocess.Popen(
            ["qemu-io", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        # an answer to a read proves qemu-io opened the image and holds its locks
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert "read 512/512 bytes at offset 0" in line, (line, proc.communicate()[1])
        return lambda: quit_(proc)

    yield hold
    for proc in procs:
        quit_(proc)


@lock_refused
def test_images_qemu_writes_are_refused(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, held_by_qemu: Hold
) -> None:
    images = tmp_path / "images"
    free = seeds(images)
    active = seeds(images, "act-")
    middle = seeds(images, "mid-")
    stop_active = held_by_qemu(active.active)
    stop_middle = held_by_qemu(middle.layer("C"))  # a VM running on C: C is written
    m = mounter(images)
    status = {e["chain"]: e for e in m.status()[1:]}
    assert {k: v["status"] for k, v in status.items()} == {
        "E": "served",
        "act-E": "refused",
        "mid-E": "refused",
    }
    assert status["act-E"]["reason"] == (
        f'Failed to get "write" lock. Is another process using the image [{active.active}]?'
    )
    assert status["mid-E"]["reason"] == (
        f'Failed to get shared "write" lock. '
        f"Is another process using the image [{middle.layer('C')}]?"
    )
    assert_flat(m.img("E"), free.content)
    m.unmount()
    stop_active()
    stop_middle()
    m = mounter(images)
    assert {e["chain"]: e["status"] for e in m.status()[1:]} == dict.fromkeys(
        ["E", "act-E", "mid-E"], "served"
    )
    m.unmount()


@lock_refused
def test_qemu_refuses_what_chainfs_serves(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    m = mounter(images)
    for layer in seed.layers:
        assert_refused(run("qemu-io", "-c", "write -P 0x99 0 512", layer), layer)
        assert_ok(run("qemu-io", "-r", "-U", "-c", "read 0 512", layer))
    assert_refused(run("qemu-img", "info", seed.active), seed.active)
    assert_ok(run("qemu-img", "info", "-U", seed.active))

    # a second chainfs (serving these images from a TOML file elsewhere) is refused too
    toml = tmp_path / "again.toml"
    toml.write_text(f'[chains.again]\nactive = "{seed.active}"\n')
    second = mounter(toml)
    (entry,) = second.status()[1:]
    assert entry["status"] == "refused"
    assert entry["reason"] == (
        f'Failed to get "write" lock. Is another process using the image [{seed.active}]?'
    )
    second.unmount()

    # the locks follow the chain: the snapshot is the active layer now, E a backing one
    m.command("E", "snapshot", "S.qcow2")
    snap = images / "S.qcow2"
    assert_refused(run("qemu-img", "info", snap), snap)
    assert_refused(run("qemu-io", "-c", "write 0 512", seed.active), seed.active)
    assert_ok(run("qemu-img", "info", seed.active))
    # B, C, D and E leave the chain and are released; S and A stay locked
    m.run_job("E", "stream", "base=A.qcow2")
    for letter in "BCDE":
        assert_ok(run("qemu-img", "info", seed.layer(letter)))
        assert_ok(run("qemu-io", "-c", "read 0 512", seed.layer(letter)))
    assert_refused(run("qemu-io", "-c", "write 0 512", seed.layer("A")), seed.layer("A"))
    assert_refused(run("qemu-img", "info", snap), snap)
    m.unmount()
    assert_ok(run("qemu-img", "info", snap))
    assert_clean([*seed.layers, snap])
    assert_content(snap, seed.content, tmp_path / "cmp")


def test_read_only_mount_keeps_writers_out(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    m = mounter(tmp_path / "images", "ro")
    for layer in seed.layers:
        assert_refused(run("qemu-io", "-c", "write 0 512", layer), layer)
        assert_ok(run("qemu-io", "-r", "-c", "read 0 512", layer))
    # read-only mounts share the images with each other
    other = mounter(tmp_path / "images", "ro")
    assert_flat(other.img("E"), seed.content)
    assert_flat(m.img("E"), seed.content)
    other.unmount()
    m.unmount()


@pytest.mark.expect_log(r"WARNING chainfs\.fs: .*chain 'E' is served read-only: owned by chainfs")
def test_second_mount_while_a_job_runs(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """A chain belongs to one read-write mount (its owner lock): a second mount, read-write
    or read-only, serves it read-only as owned elsewhere -- the flat file 0400, a write
    EROFS, a command EROFS -- and the first one's running job is left alone."""
    images = tmp_path / "images"
    seed = seeds(images)
    first = mounter(images)
    job = first.start_job("E", "stream", "base=A.qcow2 speed=2M")
    for options in ([], ["ro"]):
        second = mounter(images, *options)
        [status] = [c for c in second.status() if c.get("chain") == "E"]
        assert status["owner"] == "elsewhere", status
        assert status["holder"].startswith("chainfs on host "), status
        assert f"pid {first.pid}," in status["holder"], status
        assert second.lines("E", "chain")[0]["owner"] == "elsewhere"
        assert os.stat(second.img("E")).st_mode & 0o777 == 0o400
        with pytest.raises(OSError) as exc:
            os.open(second.img("E"), os.O_WRONLY)
        assert exc.value.errno == errno.EROFS
        if not options:
            second.refuse("E", "snapshot", "X.qcow2", errno.EROFS)
        second.unmount()
    end = first.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    history = first.events("E")
    first.unmount()
    again = mounter(images)
    assert again.layers("E") == ["E.qcow2", "A.qcow2"]
    # the history, and nothing new: no job was left to resume
    assert again.events("E") == history and again.lines("E", "jobs") == []
    again.unmount()
    assert_clean(seed.layers)
    assert_content(seed.active, seed.content, tmp_path / "cmp")
