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

The first line the agent writes is ``{"ready": true}``, once the file named by its
second argument exists (the lab is built).
"""

from __future__ import annotations

import json
import os
import signal
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


class Agent:
    def __init__(self, port: str) -> None:
        self.fd = os.open(port, os.O_RDWR)  # a virtio port opens only once
        self.wlock = threading.Lock()
        self.procs: dict[int, tuple[subprocess.Popen[bytes], Any, Any]] = {}
        self.scratch = tempfile.mkdtemp(prefix="agent-")

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
        argv = host_prefix(req.get("host")) + list(req["argv"])
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

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        argv = host_prefix(req.get("host")) + list(req["argv"])
        out = tempfile.TemporaryFile(dir=self.scratch)  # noqa: SIM115
        err = tempfile.TemporaryFile(dir=self.scratch)  # noqa: SIM115
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
        return {"rc": rc, "out": _text(out.read()), "err": _text(err.read())}

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
    Agent(sys.argv[1]).serve(sys.argv[2])
