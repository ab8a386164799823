"""The lab guest's test agent: runs the commands the tests send over the virtio-serial
port and answers with their results (standard library only; it runs in the guest).

One JSON object per line each way.  A request has an ``id`` and an ``op``; its answer
carries the same ``id``.  Requests run each in its own thread, so a long command does
not hold up the others:

- ``run``: ``argv``, optional ``host`` (``a`` or ``b``: run inside that host's network,
  UTS and mount namespaces), ``stdin`` (text), ``timeout`` (seconds), ``env``; answers
  ``rc``, ``out``, ``err`` (``rc`` is ``null`` when the timeout killed it).
- ``spawn``: like ``run`` but answers at once with ``pid``; the process's output goes
  to files the agent keeps.
- ``wait``: ``pid``, ``timeout``: answers ``rc`` (``null`` while it still runs), ``out``,
  ``err``.
- ``signal``: ``pid``, ``sig``.
- ``ping``.

``run`` and ``spawn`` take ``chainfs`` (a list of arguments) in place of ``argv``: that
is ``python -m chainfs ARGS``, forked from the ``Zygote`` when there is one (``spawn``
also takes ``log``: a file both outputs are appended to).

The first line the agent writes is ``{"ready": true}``, once the file named by its
second argument exists (the lab is built).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any

NAMESPACES = "/run/lab"


def host_prefix(host: str | None) -> list[str]:
    """The nsenter prefix that runs a command on lab host ``host`` (None: the server)."""
    if not host:
        return []
    d = f"{NAMESPACES}/{host}"
    return [
        "nsenter",
        f"--net=/run/netns/{host}",
        f"--uts={d}/uts",
        f"--mount={d}/mnt",
        "--",
    ]


PR_SET_CHILD_SUBREAPER = 36
NAMESPACE_FILES = (
    ("net", "/run/netns/{h}"),
    ("uts", NAMESPACES + "/{h}/uts"),
    ("mnt", NAMESPACES + "/{h}/mnt"),
)  # the order nsenter takes them in


class Zygote:
    """A child of the agent that imported chainfs's command line and daemon (trio,
    pyfuse3 and the rest: 8-12 s of every ``python -m chainfs`` under TCG, most of a
    mount's start) once, at boot, and forks each chainfs command from there: the fork
    enters the host's namespaces (``setns``, as nsenter does), takes the request's
    environment, working directory and output files, starts a session of its own and
    runs the ``chainfs`` module as ``python -m chainfs`` does.  It forks twice, so that
    the command is a child of the agent (a subreaper: ``PR_SET_CHILD_SUBREAPER``), which
    waits for it and signals it like any other; its pid is the chainfs process's own.

    Forked before the agent starts a thread (``setns`` into a mount namespace needs a
    single-threaded process, and a fork of a threaded one inherits their locks)."""

    def __init__(self, code: str) -> None:
        self.code = code
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                _zygote(theirs, code)
            finally:
                os._exit(1)
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()

    def fork(self, req: dict[str, Any], env: dict[str, str], fds: list[int]) -> int:
        """The pid of a chainfs command forked for ``req`` (stdout and stderr to
        ``fds``)."""
        msg = json.dumps(
            {
                "args": req["chainfs"],
                "host": req.get("host"),
                "env": env,
                "cwd": req.get("cwd") or "/",
            }
        ).encode()
        with self.lock:
            socket.send_fds(self.sock, [msg], fds)
            answer = self.sock.recv(64)
        if not answer:
            raise RuntimeError("the zygote is gone")
        return int(answer)


def _zygote(sock: socket.socket, code: str) -> None:
    # the imports at once, beside the boot (which runs mostly on one of the guest's two
    # CPUs), niced so that the boot goes first: the first test may need chainfs
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    sys.path[:0] = [code]
    import site

    site.main()  # the python's site-packages (the agent runs with -S)
    try:
        import runpy  # noqa: F401

        import chainfs.cli
        import chainfs.mount  # noqa: F401
    except Exception as e:  # each command will fail the same way, and say why
        print(f"zygote: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # (root may lower it again)
    libc = ctypes.CDLL(None, use_errno=True)
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        if not msg:
            os._exit(0)
        req = json.loads(msg)
        r, w = os.pipe()
        first = os.fork()
        if first == 0:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _chainfs(libc, sock, req, fds)
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            pid_text = f.read()
        os.waitpid(first, 0)
        for fd in fds:
            os.close(fd)
        sock.sendall(pid_text or b"0")


def _chainfs(libc: Any, sock: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
    """In the forked command: become it (never returns)."""
    code = 1
    try:
        sock.close()
        os.setsid()
        host = req.get("host")
        if host:
            for _kind, path in NAMESPACE_FILES:
                fd = os.open(path.format(h=host), os.O_RDONLY)
                if libc.setns(fd, 0) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path.format(h=host)}")
                os.close(fd)
        os.chdir(req["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (null, *fds):
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        import runpy

        sys.argv = ["chainfs", *req["args"]]
        try:
            runpy.run_module("chainfs", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException as e:
        try:
            print(f"zygote: {type(e).__name__}: {e}", file=sys.stderr)
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Forked:
    """A command the zygote forked, now the agent's child: ``Popen``'s ``wait``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self.lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> int:
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        with self.lock:
            if self.returncode is None:
                if not ready:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode


class Agent:
    def __init__(self, port: str, code: str | None = None) -> None:
        self.zygote: Zygote | None = None
        if code and os.environ.get("labfork", "1") != "0":  # noqa: SIM112 (the kernel command line's word)
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
            self.zygote = Zygote(code)
        self.fd = os.open(port, os.O_RDWR)  # a virtio port opens only once
        self.wlock = threading.Lock()
        self.procs: dict[int, tuple[Any, Any, Any]] = {}
        self.scratch = tempfile.mkdtemp(prefix="agent-")

    def forks(self, req: dict[str, Any]) -> bool:
        """Whether ``req``'s chainfs command is forked from the zygote (its code tree
        first on the module path), else run as ``python -m chainfs``."""
        if self.zygote is None or "chainfs" not in req:
            return False
        path: str = (req.get("env") or {}).get("PYTHONPATH", "")
        return path.split(":")[0] == self.zygote.code

    def argv(self, req: dict[str, Any]) -> list[str]:
        if "chainfs" in req:
            return host_prefix(req.get("host")) + [sys.executable, "-m", "chainfs", *req["chainfs"]]
        return host_prefix(req.get("host")) + list(req["argv"])

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self.wlock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]

    def env(self, req: dict[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(req.get("env") or {})
        return env

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.forks(req):
            return self.run_forked(req)
        argv = self.argv(req)
        try:
            p = subprocess.run(
                argv,
                input=(req.get("stdin") or "").encode(),
                capture_output=True,
                timeout=req.get("timeout"),
                env=self.env(req),
                cwd=req.get("cwd") or "/",
            )
        except subprocess.TimeoutExpired as e:
            return {"rc": None, "out": _text(e.stdout), "err": _text(e.stderr)}
        except OSError as e:
            return {"rc": 127, "out": "", "err": str(e)}
        return {"rc": p.returncode, "out": _text(p.stdout), "err": _text(p.stderr)}

    def run_forked(self, req: dict[str, Any]) -> dict[str, Any]:
        pid = self.op_spawn(req)["pid"]
        p, out, err = self.procs.pop(pid)
        try:
            rc: int | None = p.wait(req.get("timeout"))
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            p.wait()
            rc = None
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "out": _text(out.read()), "err": _text(err.read())}

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("log"):
            out = open(req["log"], "a+b")  # noqa: SIM115
            err = out
        else:
            out = tempfile.TemporaryFile(dir=self.scratch)  # noqa: SIM115
            err = tempfile.TemporaryFile(dir=self.scratch)  # noqa: SIM115
        if self.forks(req):
            assert self.zygote is not None
            pid = self.zygote.fork(req, self.env(req), [out.fileno(), err.fileno()])
            if pid <= 0:
                raise RuntimeError("the zygote could not fork")
            self.procs[pid] = (Forked(pid), out, err)
            return {"pid": pid}
        argv = self.argv(req)
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=self.env(req),
            cwd=req.get("cwd") or "/",
            start_new_session=True,
        )
        self.procs[p.pid] = (p, out, err)
        return {"pid": p.pid}

    def op_wait(self, req: dict[str, Any]) -> dict[str, Any]:
        p, out, err = self.procs[req["pid"]]
        try:
            rc = p.wait(timeout=req.get("timeout"))
        except subprocess.TimeoutExpired:
            rc = None
        out.seek(0)
        err.seek(0)
        both = err is out  # (a spawn's log)
        return {"rc": rc, "out": _text(out.read()), "err": "" if both else _text(err.read())}

    def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        sig = getattr(signal, req.get("sig", "SIGTERM"))
        pid = req["pid"]
        try:
            if req.get("group"):
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return {"rc": 1}
        return {"rc": 0}

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"rc": 0}

    def handle(self, req: dict[str, Any]) -> None:
        try:
            answer = getattr(self, "op_" + req["op"])(req)
        except Exception as e:  # the test sees it; the agent goes on
            answer = {"rc": 126, "out": "", "err": f"agent: {type(e).__name__}: {e}"}
        answer["id"] = req.get("id")
        self.send(answer)

    def serve(self, gate: str) -> None:
        while not os.path.exists(gate):
            threading.Event().wait(0.02)
        self.send({"ready": True})
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                # the host side closed the port: wait for it to come back
                threading.Event().wait(0.05)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                threading.Thread(target=self.handle, args=(req,), daemon=True).start()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")


if __name__ == "__main__":
    Agent(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None).serve(sys.argv[2])
