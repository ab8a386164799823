"""Whether holes and discard are on, as ``--version``, ``status`` and the daemon say it:
on with a pyfuse3 that has the lseek and fallocate handlers (third_party/pyfuse3), off
with a plain one, off without pyfuse3 at all; the real pyfuse3 is replaced here."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from chainfs import __version__, cli, features
from chainfs.control import parse_line
from chainfs.fs import Operations  # (imports the real pyfuse3 before any fake one)
from chainfs.source import Source


@pytest.fixture(autouse=True)
def _fresh_probe() -> Iterator[None]:
    """Each test probes its own (fake) pyfuse3, and leaves no answer cached behind it
    for the tests that ask about the real one."""
    features.pyfuse3_version.cache_clear()
    features.holes.cache_clear()
    features.busy_poll.cache_clear()
    yield
    features.pyfuse3_version.cache_clear()
    features.holes.cache_clear()
    features.busy_poll.cache_clear()


def fake_pyfuse3(monkeypatch: pytest.MonkeyPatch, version: str, operations: type) -> None:
    module = type(sys)("pyfuse3")
    module.__version__ = version  # type: ignore[attr-defined]
    module.Operations = operations  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyfuse3", module)


class PlainOperations:
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""


class PatchedOperations(PlainOperations):
    async def lseek(self, fh: int, off: int, whence: int, ctx: object) -> int:
        raise OSError(errno.ENOSYS, "")

    async def fallocate(self, fh: int, mode: int, off: int, length: int, ctx: object) -> None:
        raise OSError(errno.ENOSYS, "")


class HalfOperations(PlainOperations):
    async def lseek(self, fh: int, off: int, whence: int, ctx: object) -> int:
        return off


def version_output(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_version_with_the_patched_pyfuse3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pyfuse3(monkeypatch, "3.5.0+chainfs.1", PatchedOperations)
    assert features.holes() is True
    assert version_output(capsys) == (
        f"chainfs {__version__} (pyfuse3 3.5.0+chainfs.1: holes and discard on)\n"
    )


def test_version_with_a_plain_pyfuse3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pyfuse3(monkeypatch, "3.5.0", PlainOperations)
    assert features.holes() is False
    assert version_output(capsys) == (
        f"chainfs {__version__} (pyfuse3 3.5.0: holes and discard off "
        "(unpatched pyfuse3, see README))\n"
    )


def test_both_handlers_are_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pyfuse3(monkeypatch, "3.6.0", HalfOperations)
    assert features.holes() is False
    assert features.has_handlers(PatchedOperations)
    assert not features.has_handlers(HalfOperations)


def test_version_without_pyfuse3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # import raises ImportError
    assert features.pyfuse3_version() is None
    assert features.holes() is False
    assert version_output(capsys) == (
        f"chainfs {__version__} (pyfuse3 not installed: holes and discard off)\n"
    )


def test_version_does_not_import_pyfuse3_before_it_is_asked() -> None:
    code = "import sys, chainfs.cli; print('pyfuse3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


def daemon(**extra: object) -> dict[str, object]:
    return {"pid": 7, "source": "/srv", "mountpoint": "/mnt", "readonly": False, **extra}


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("pyfuse3=3.5.0+chainfs.1 holes=true", "pyfuse3 3.5.0+chainfs.1: holes and discard on"),
        (
            "pyfuse3=3.5.0 holes=false",
            "pyfuse3 3.5.0: holes and discard off (unpatched pyfuse3, see README)",
        ),
    ],
)
def test_status_says_it_under_the_daemon_line(line: str, said: str) -> None:
    fields = cli._typed(parse_line(f"pid=7 source=/srv mountpoint=/mnt readonly=false {line}"))
    text = cli.render_status({"daemon": fields, "chains": []})
    assert text.splitlines()[:2] == ["/mnt: /srv (pid 7, read-write)", said]


def test_status_of_an_older_daemon_says_nothing_of_it() -> None:
    text = cli.render_status({"daemon": daemon(), "chains": []})
    assert "holes" not in text and "pyfuse3" not in text


@pytest.mark.parametrize(
    ("operations", "holes"), [(PatchedOperations, "true"), (PlainOperations, "false")]
)
def test_the_daemon_line_of_control_status(
    monkeypatch: pytest.MonkeyPatch, operations: type, holes: str
) -> None:
    fake_pyfuse3(monkeypatch, "3.5.0+x", operations)
    ops = Operations([], Source("/srv", "/srv"), readonly=False, mountpoint="/mnt")
    first = ops.status_text().decode().splitlines()[0]
    assert parse_line(first) == {
        "pid": str(os.getpid()),
        "source": "/srv",
        "mountpoint": "/mnt",
        "readonly": "false",
        "pyfuse3": "3.5.0+x",
        "holes": holes,
    }


async def plain_main(min_tasks: int = 1, max_tasks: int = 99) -> None:
    return None


async def polling_main(min_tasks: int = 1, max_tasks: int = 99, busy_poll: float = 0) -> None:
    return None


@pytest.mark.parametrize(("main", "expected"), [(plain_main, False), (polling_main, True)])
def test_busy_poll_follows_the_main_loops_parameters(
    monkeypatch: pytest.MonkeyPatch, main: object, expected: bool
) -> None:
    # the mount passes busy_poll to pyfuse3.main only where main takes it
    # (third_party/pyfuse3/busy-poll.patch)
    fake_pyfuse3(monkeypatch, "3.5.0", PatchedOperations)
    sys.modules["pyfuse3"].main = main  # type: ignore[attr-defined]
    assert features.busy_poll() is expected


def test_busy_poll_off_without_pyfuse3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)
    assert features.busy_poll() is False
