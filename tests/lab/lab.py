"""The many-hosts lab on one machine: Debian's stock kernel under QEMU (KVM where it is
usable, else TCG: ``accelerator()``), serving
NFSv4.2 from its kernel nfsd to two hosts, ``a`` and ``b``, each a network, UTS and
mount namespace of the guest with its own host name (so its own NFSv4 client id and
lease).  Lease and grace are 10 s.

- The kernel: ``linux-image-amd64``'s versioned package, fetched with ``apt-get
  download`` and unpacked with ``dpkg -x`` (not installed) under ``tests/lab/cache/``
  (git-ignored), with ``depmod -b`` run over it once.
- The guest's root is this machine's ``/``, shared read-only over 9p under a tmpfs
  overlay: the guest runs this checkout's chainfs with this machine's python, and
  nfs-kernel-server's, nfs-common's and QEMU's tools from this machine's Debian.  A
  small initramfs (busybox, the virtio and 9p modules) mounts it and hands over to
  ``guest-init``.
- ``-nic none``: every byte of test traffic stays inside the guest.
- QEMU boots the kernel through its PVH entry (``boot_image``: the ELF unpacked from
  the bzImage once, cached), skipping the guest's own decompression under TCG.
- The tests drive it through ``agent.py`` on a virtio-serial port (QEMU's stdio):
  ``Lab.run(host, argv)`` runs a command on a host (``None``: the server);
  ``Lab.chainfs`` and ``Lab.spawn_chainfs`` a chainfs command, forked from the
  agent's zygote, which imported chainfs once (``CHAINFS_LAB_FORK=0``: a python each);
  ``Lab.wait_until`` waits for a shell condition inside the guest, in one command.

``Lab.start()`` raises ``LabUnavailable`` with the reason when the lab cannot start
(no qemu-system-x86_64, no kernel package to fetch), ``LabError`` when it was told to
use KVM (``$CHAINFS_LAB_ACCEL=kvm``) and KVM is unusable.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parents[1]
CACHE = LAB_DIR / "cache"
KERNEL_META = "linux-image-amd64"
PORT_NAME = "lab.ctl"
HOSTS = ("a", "b")
SERVER_IP = {"a": "10.0.1.1", "b": "10.0.2.1"}
V3_SERVER_IP = "10.0.3.2"  # the NFSv3 server (tests/lab/v3-server), seen from host b
LEASE = 10  # seconds: nfsv4leasetime and nfsv4gracetime in the guest
BOOT_TIMEOUT = 180.0
# The kernel modules the lab loads (with their dependencies, each once), all carried by
# the initramfs, in lanes that load side by side (``build_initramfs``):
# what the initramfs loads to reach the 9p root and the control port
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console", "veth")
# the server's, loaded by the initramfs beside those: nfsd starts first in guest-init
NFSD_MODULES = ("nfsd",)
# loaded by guest-init from /run/lab-modules, the first two lanes beside each other; the
# last, NFSv3's client, by tests/lab/v3-server, for the tests that mount NFSv3
GUEST_LANES = (("loop", "crc32c_generic", "ext4"), ("fuse", "nfsv4", "nfs"), ("nfsv3",))
# what modprobe would load too (softdeps): crc32c_intel for ext4 (crc32c_generic serves
# it, where the accelerated one's self-tests took 2 s under TCG)
SKIP_MODULES = ("crc32c_intel",)
MODULE_SIGNATURE = b"~Module signature appended~\n"


class LabUnavailable(Exception):
    """The lab cannot start here; the message says why."""


class LabError(AssertionError):
    """A lab command failed or the guest stopped answering."""


KVM_DEV = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_API_VERSION = 12
ACCEL_ENV = "CHAINFS_LAB_ACCEL"
FORK_ENV = "CHAINFS_LAB_FORK"  # 0: every chainfs command a python of its own (agent.py)
# what QEMU is given for each accelerator (TCG: the baseline that runs anywhere)
ACCEL_ARGS = {
    "kvm": ["-accel", "kvm", "-cpu", "host"],
    "tcg": ["-accel", "tcg,thread=multi", "-cpu", "max"],
}


SYS_MODULE = Path("/sys/module")
# KVM's back ends that run an unmodified kernel (hardware virtualization); kvm_pvm
# (PVM: pagetable-based, no VMX/SVM) runs only guests built for it -- Debian's stock
# kernel stops in its first seconds there ("KVM internal error ... emulation failure",
# "kvm-pvm: INTERNAL_ERROR in batch emul" in the kernel log), seen on this project's
# build machine, where /dev/kvm opens and KVM_CREATE_VM succeeds
KVM_HARDWARE = ("kvm_intel", "kvm_amd")


def kvm_unusable(dev: str = KVM_DEV, modules: Path = SYS_MODULE) -> str | None:
    """Why KVM cannot run the lab here (None: it can): ``dev`` opens read-write, speaks
    KVM's API version 12, and creates a VM (both closed again), and the kernel's KVM is
    hardware virtualization (``kvm_intel`` or ``kvm_amd`` under ``modules``)."""
    if not any((modules / m).exists() for m in KVM_HARDWARE):
        if (modules / "kvm_pvm").exists():
            return (
                "the kernel's KVM is kvm_pvm (no VMX/SVM), which runs only PVM-built "
                "guest kernels, not Debian's stock kernel"
            )
        return "no hardware KVM (neither kvm_intel nor kvm_amd is loaded)"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {dev}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"{dev} speaks KVM API {version}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as e:
        return f"KVM_CREATE_VM on {dev} failed: {e.strerror}"
    finally:
        os.close(fd)
    return None


def accelerator() -> tuple[str, str]:
    """The accelerator the lab boots with and why: ``$CHAINFS_LAB_ACCEL`` (``kvm`` or
    ``tcg``) when set -- ``kvm`` forced where it is unusable is a ``LabError`` (the
    tests fail, they do not skip), never a silent fallback --, else KVM when it is
    usable, else TCG."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced not in ("", "kvm", "tcg"):
        raise LabError(f"{ACCEL_ENV}={forced!r}: it takes kvm or tcg")
    if forced == "tcg":
        return "tcg", f"{ACCEL_ENV}=tcg"
    why = kvm_unusable()
    if forced == "kvm":
        if why is not None:
            raise LabError(f"{ACCEL_ENV}=kvm, but KVM is unusable: {why}")
        return "kvm", f"{ACCEL_ENV}=kvm"
    if why is not None:
        return "tcg", why
    return "kvm", f"{KVM_DEV} usable"


@dataclass
class Kernel:
    root: Path  # the unpacked package: boot/vmlinuz-VER, lib/modules/VER
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


@dataclass
class Result:
    argv: Sequence[str]
    host: str | None
    rc: int | None
    out: str
    err: str

    def check(self) -> Result:
        if self.rc != 0:
            raise LabError(
                f"on {self.host or 'server'}: {' '.join(self.argv)} -> {self.rc}\n"
                f"stdout: {self.out[-3000:]}\nstderr: {self.err[-3000:]}"
            )
        return self


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _apt_download(package: str, into: Path) -> Path:
    before = set(into.glob("*.deb"))
    p = subprocess.run(
        ["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False
    )
    new = set(into.glob("*.deb")) - before
    if p.returncode != 0 or not new:
        raise LabUnavailable(f"apt-get download {package} failed: {p.stderr.strip()[-500:]}")
    return new.pop()


def prepare_kernel() -> Kernel:
    """The unpacked stock kernel in the cache, fetched and unpacked the first time."""
    for tool in ("apt-get", "dpkg", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"{tool} is not installed (the lab unpacks a Debian kernel)")
    with _cache_lock():
        done = CACHE / "kernel.json"
        if done.exists():
            info = json.loads(done.read_text())
            kernel = Kernel(CACHE / info["root"], info["version"])
            if kernel.vmlinuz.exists():
                return kernel
        debs = CACHE / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir()
        meta = _apt_download(KERNEL_META, debs)
        depends = subprocess.run(
            ["dpkg-deb", "-f", str(meta), "Depends"], capture_output=True, text=True, check=True
        ).stdout
        image = next(
            (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")),
            None,
        )
        if image is None:
            raise LabUnavailable(f"{KERNEL_META} depends on no linux-image: {depends!r}")
        deb = _apt_download(image, debs)
        version = image.removeprefix("linux-image-")
        root = CACHE / "root"
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        subprocess.run(["depmod", "-b", str(root), version], check=True)
        shutil.rmtree(debs)
        done.write_text(json.dumps({"root": "root", "version": version}))
        return Kernel(root, version)


def _modules_with_deps(
    kernel: Kernel, names: Sequence[str], loaded: Sequence[Path] = ()
) -> list[Path]:
    """The module files for ``names`` and what they depend on, dependencies first,
    leaving out the ``loaded`` ones."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (kernel.modules / "modules.builtin").read_text().split()
    }
    # what modprobe loads first (ext4 and jbd2: crc32c, whose driver ext4 asks for)
    aliases: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.alias").read_text().splitlines():
        _, alias, module = line.split(" ", 2)
        aliases.setdefault(alias, []).append(module)
    pre: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.softdep").read_text().splitlines():
        words = line.split()
        if len(words) > 3 and words[0] == "softdep" and words[2] == "pre:":
            pre[words[1].replace("-", "_")] = [
                m.replace("-", "_") for w in words[3:] if w != "post:" for m in aliases.get(w, [w])
            ]
    order: list[str] = []
    skip = {str(p.relative_to(kernel.modules)) for p in loaded}

    def add(name: str) -> None:
        key = name.replace("-", "_")
        if key in builtin or key not in by_name or key in SKIP_MODULES:
            return
        path = by_name[key]
        if path in order or path in skip:
            return
        for p in pre.get(key, []):
            add(p)
        for d in reversed(deps[path]):
            add(Path(d).name.split(".ko")[0])
        order.append(path)

    for name in names:
        if name.replace("-", "_") not in by_name and name.replace("-", "_") not in builtin:
            raise LabUnavailable(f"the kernel has no module {name}")
        add(name)
    return [kernel.modules / p for p in order]


def _unsigned(module: bytes) -> bytes:
    """A module without its appended signature: the kernel (which does not enforce
    signatures here) then skips checking it, a hash of the whole module under TCG."""
    if not module.endswith(MODULE_SIGNATURE):
        return module
    end = len(module) - len(MODULE_SIGNATURE)
    # struct module_signature (12 bytes) ends with the signature's length, big-endian
    (sig_len,) = struct.unpack_from(">I", module, end - 4)
    return module[: end - 12 - sig_len]


def _cpio(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
lane() { for m in $(cat "$1"); do insmod "/lib/$m" || echo "initramfs: insmod $m failed"; done; }
# nfsd's modules beside the root's: the server starts first (guest-init)
lane /nfsd.lane &
nfsd=$!
lane /root.lane
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 root /host \
    || { echo "initramfs: no 9p root"; poweroff -f; }
mount -t tmpfs tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || { echo "initramfs: no overlay"; poweroff -f; }
# the guest's own /proc, /sys, /dev and scratch dirs, mounted here with busybox (the
# host's /proc, seen through 9p, would fool util-linux's mount)
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
# (/tmp stays the overlay's: the checkout under test may live in the host's /tmp)
mount -t tmpfs tmpfs /newroot/run
# the other modules go to guest-init, which loads them beside its own work
mv /guest /newroot/run/lab-modules
wait $nfsd
umount /proc
umount /dev
exec switch_root /newroot "$labinit"
"""


def build_initramfs(kernel: Kernel) -> Path:
    """The initramfs (cached next to the kernel): busybox, an init that mounts the 9p
    root and switches to ``guest-init``, and every module the lab loads, without their
    signatures (``_unsigned``), in lanes: the root's and nfsd's (loaded by the init side
    by side), and ``GUEST_LANES`` (in ``/run/lab-modules`` for guest-init, each
    ``N.lane`` listing its files in order).  Not compressed: the kernel unpacks it
    under TCG before the init starts."""
    root = _modules_with_deps(kernel, ROOT_MODULES)
    nfsd = _modules_with_deps(kernel, NFSD_MODULES, root)
    lanes: list[list[Path]] = []
    for names in GUEST_LANES:
        loaded = [*root, *nfsd, *(m for lane in lanes for m in lane)]
        lanes.append(_modules_with_deps(kernel, names, loaded))
    # named by what goes in, so that a changed init is never served from the cache
    what = [INITRAMFS_INIT, *([m.name for m in lane] for lane in (root, nfsd, *lanes))]
    digest = hashlib.sha256(repr(what).encode()).hexdigest()[:12]
    target = CACHE / f"initramfs-{kernel.version}-{digest}.cpio"
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise LabUnavailable("busybox is not installed (install busybox-static)")
    with _cache_lock():
        if target.exists():
            return target
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "mnt", "guest")
        ]
        entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes()))
        entries.append(("init", 0o100755, INITRAMFS_INIT.encode()))
        for name, mods in (("root", root), ("nfsd", nfsd)):
            entries.append((f"{name}.lane", 0o100644, "\n".join(m.name for m in mods).encode()))
            entries += [(f"lib/{m.name}", 0o100644, _unsigned(m.read_bytes())) for m in mods]
        for i, mods in enumerate(lanes):
            entries.append((f"guest/{i}.lane", 0o100644, "\n".join(m.name for m in mods).encode()))
            entries += [(f"guest/{m.name}", 0o100644, _unsigned(m.read_bytes())) for m in mods]
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(_cpio(entries))
        tmp.rename(target)
        for old in CACHE.glob(f"initramfs-{kernel.version}-*"):
            if old != target:
                old.unlink()  # (an older init or module list)
        return target


XZ_MAGIC = b"\xfd7zXZ\x00"
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel has the PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``)
    that lets QEMU boot it directly."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, at)
            name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def boot_image(kernel: Kernel) -> Path:
    """What QEMU boots: the kernel as an uncompressed ELF with its PVH entry, unpacked
    from the bzImage once (cached), when it has one -- QEMU then jumps straight into
    it, where a bzImage makes the guest decompress itself under TCG (3-5 s of the
    boot); else the bzImage."""
    target = CACHE / f"vmlinux-{kernel.version}"
    with _cache_lock():
        if target.exists():
            return target
        if (CACHE / f"vmlinux-{kernel.version}.none").exists():
            return kernel.vmlinuz
        data = kernel.vmlinuz.read_bytes()
        at = data.find(XZ_MAGIC)  # Debian's kernels are xz-compressed
        elf = b""
        if at >= 0:
            try:
                elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
            except lzma.LZMAError:
                elf = b""
        if not _has_pvh_entry(elf):
            (CACHE / f"vmlinux-{kernel.version}.none").touch()
            return kernel.vmlinuz
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(elf)
        tmp.rename(target)
        return target


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so that no guest
    outlives a killed test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Lab:
    """A running lab guest.  Use ``Lab.start()``; ``close()`` powers it off."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    accel: str = "tcg"  # the accelerator it runs under: kvm or tcg
    accel_why: str = ""  # why that one
    boot_seconds: float = 0.0
    _next_id: int = 0
    _answers: dict[int, dict[str, Any]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _wlock: threading.Lock = field(default_factory=threading.Lock)
    _reader: threading.Thread | None = None
    _dead: str | None = None

    @classmethod
    def start(cls, *, python: str | None = None) -> Lab:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise LabUnavailable("qemu-system-x86_64 is not installed (install qemu-system-x86)")
        accel, accel_why = accelerator()
        kernel = prepare_kernel()
        initramfs = build_initramfs(kernel)
        image = boot_image(kernel)
        precompile()
        workdir = Path(tempfile.mkdtemp(prefix="chainfs-lab-"))
        python = python or sys.executable
        cmdline = " ".join(
            [
                "console=ttyS0",
                "quiet",
                "loglevel=4",
                "panic=-1",
                *(["labtrace=1"] if os.environ.get("CHAINFS_LAB_TRACE") else []),
                "mitigations=off",
                "tsc=reliable",
                # what a test lab does without, each costly under TCG: the crypto
                # self-tests (at boot and at each module's load), audit, AppArmor, the
                # legacy serial ports and PS/2 probes, the timer check (0.35 s)
                "cryptomgr.notests",
                "audit=0",
                "apparmor=0",
                "8250.nr_uarts=1",
                "i8042.noaux",
                "i8042.nokbd",
                "no_timer_check",
                f"labinit={LAB_DIR / 'guest-init'}",
                f"labkmod={kernel.root}",
                f"labver={kernel.version}",
                f"labpy={python}",
                f"labagent={LAB_DIR / 'agent.py'}",
                f"labport={PORT_NAME}",
                f"lablease={LEASE}",
                f"labcode={code_tree()}",
                *(["labfork=0"] if os.environ.get(FORK_ENV) == "0" else []),
            ]
        )
        argv = [
            qemu,
            *ACCEL_ARGS[accel],
            "-machine",
            "q35",
            "-smp",
            "2",
            "-m",
            "2048",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
            "-no-reboot",
            "-kernel",
            str(image),
            "-initrd",
            str(initramfs),
            "-append",
            cmdline,
            "-serial",
            f"file:{workdir / 'console.log'}",
            "-virtfs",
            "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "stdio,id=ctl,signal=off",
            "-device",
            f"virtserialport,chardev=ctl,name={PORT_NAME}",
        ]
        t0 = time.monotonic()
        with open(workdir / "qemu.err", "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        lab = cls(proc, workdir, accel, accel_why)
        lab._reader = threading.Thread(target=lab._read, daemon=True)
        lab._reader.start()
        with lab._cond:
            ok = lab._cond.wait_for(lambda: -1 in lab._answers or lab._dead, BOOT_TIMEOUT)
        if not ok or lab._dead:
            console = lab.console()
            lab.close()
            raise LabError(f"the lab guest did not come up: {lab._dead}\n{console}")
        lab.boot_seconds = time.monotonic() - t0
        return lab

    def describe(self) -> str:
        """Which accelerator the guest runs under, and why."""
        return f"{self.accel} ({self.accel_why})"

    def console(self, tail: int = 20000) -> str:
        try:
            text = (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            text = ""
        try:
            text += (self.workdir / "qemu.err").read_text(errors="replace")
        except OSError:
            pass
        return f"[the lab under {self.describe()}]\n{text[-tail:]}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # noise before the agent started
            with self._cond:
                self._answers[-1 if obj.get("ready") else obj["id"]] = obj
                self._cond.notify_all()
        with self._cond:
            self._dead = f"qemu exited ({self.proc.wait()})"
            self._cond.notify_all()

    def request(self, op: str, limit: float | None = None, **kw: Any) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            rid = self._next_id
        data = json.dumps({"id": rid, "op": op, **kw}).encode() + b"\n"
        assert self.proc.stdin is not None
        with self._wlock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except OSError as e:
                raise LabError(f"the lab guest is gone: {e}\n{self.console()}") from None
        if limit is not None:
            limit += 30  # the command's own timeout, then the agent's answer
        with self._cond:
            self._cond.wait_for(lambda: rid in self._answers or self._dead, limit)
            if rid not in self._answers:
                raise LabError(
                    f"no answer to {op} {kw} ({self._dead or 'timeout'})\n{self.console()}"
                )
            return self._answers.pop(rid)

    def run(
        self,
        host: str | None,
        argv: Sequence[str],
        *,
        timeout: float = 120,
        stdin: str = "",
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> Result:
        """Run ``argv`` on ``host`` (``a``, ``b``; ``None``: the server) and wait."""
        t0 = time.monotonic()
        a = self.request(
            "run", timeout, argv=list(argv), host=host, timeout=timeout, stdin=stdin, env=env
        )
        r = Result(argv, host, a.get("rc"), a.get("out", ""), a.get("err", ""))
        if os.environ.get("CHAINFS_LAB_TRACE"):
            print(f"lab: {time.monotonic() - t0:6.2f}s {host}: {' '.join(argv)[:150]} -> {r.rc}")
        return r.check() if check else r

    def sh(self, host: str | None, script: str, **kw: Any) -> Result:
        return self.run(host, ["bash", "-euo", "pipefail", "-c", script], **kw)

    def chainfs(
        self,
        host: str | None,
        args: Sequence[str],
        *,
        timeout: float = 120,
        check: bool = True,
    ) -> Result:
        """``python -m chainfs ARGS`` on ``host``, with the code tree first on the module
        path (``python_env``), and wait: forked from the agent's zygote, which imported
        chainfs at boot (``agent.py``)."""
        t0 = time.monotonic()
        a = self.request(
            "run", timeout, chainfs=list(args), host=host, timeout=timeout, env=python_env()
        )
        argv = ["chainfs", *args]
        r = Result(argv, host, a.get("rc"), a.get("out", ""), a.get("err", ""))
        if os.environ.get("CHAINFS_LAB_TRACE"):
            print(f"lab: {time.monotonic() - t0:6.2f}s {host}: {' '.join(argv)[:150]} -> {r.rc}")
        return r.check() if check else r

    def spawn_chainfs(self, host: str | None, args: Sequence[str], log: str) -> int:
        """Start ``python -m chainfs ARGS`` on ``host`` (as ``chainfs``), both its outputs
        appended to ``log``; its pid."""
        a = self.request("spawn", chainfs=list(args), host=host, env=python_env(), log=log)
        if "pid" not in a:
            raise LabError(f"spawn chainfs {args} failed: {a}")
        return int(a["pid"])

    def wait_until(
        self, host: str | None, condition: str, timeout: float, interval: float = 0.1
    ) -> Result:
        """Run the shell ``condition`` on ``host`` every ``interval`` seconds until it
        succeeds (rc 0), in one command: rc 124 when ``timeout`` passed first; a
        condition may end the wait with an exit status of its own (``exit 3``)."""
        script = (
            f"end=$((SECONDS + {math.ceil(timeout)}))\n"
            f"until {condition}\ndo\n"
            f"    ((SECONDS < end)) || exit 124\n"
            f"    sleep {interval}\n"
            "done"
        )
        return self.sh(host, script, env=python_env(), timeout=timeout + 30, check=False)

    def spawn(
        self, host: str | None, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> int:
        a = self.request("spawn", argv=list(argv), host=host, env=env)
        if "pid" not in a:
            raise LabError(f"spawn {argv} failed: {a}")
        return int(a["pid"])

    def wait(self, pid: int, timeout: float = 120) -> Result:
        a = self.request("wait", timeout, pid=pid, timeout=timeout)
        return Result([str(pid)], None, a.get("rc"), a.get("out", ""), a.get("err", ""))

    def signal(self, pid: int, sig: str = "SIGTERM", group: bool = False) -> None:
        self.request("signal", pid=pid, sig=sig, group=group)

    def cut(self, host: str) -> None:
        """Cut ``host`` off the server (its veth's server end down)."""
        self.run(None, ["ip", "link", "set", f"lab-{host}", "down"])

    def heal(self, host: str) -> None:
        self.run(None, ["ip", "link", "set", f"lab-{host}", "up"])

    def nfs3(self) -> str:
        """The address of the guest's NFSv3 server, started on first use (``v3-server``):
        host b mounts its ``/srv`` (the lab's export) as NFSv3."""
        self.run(None, ["bash", str(LAB_DIR / "v3-server")])
        return V3_SERVER_IP

    def umount(self, host: str, where: str = "/shared") -> Result:
        return self.run(host, ["umount", "-l", where], check=False)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def code_tree() -> Path:
    """The chainfs tree the guest runs: this checkout, or ``$CHAINFS_LAB_CODE`` (another
    worktree, to try these tests on a branch that does not have them)."""
    return Path(os.environ.get("CHAINFS_LAB_CODE") or REPO).resolve()


def python_env() -> dict[str, str]:
    """The environment a chainfs command in the guest needs: the code tree first on the
    module path (the guest runs this machine's python over 9p), its bytecode compiled
    here before the boot (``precompile``), never written in the guest."""
    return {"PYTHONPATH": str(code_tree()), "PYTHONDONTWRITEBYTECODE": "1"}


def precompile(tree: Path | None = None) -> None:
    """Compile the code tree's ``chainfs`` to ``__pycache__`` here (git-ignored), with
    the python the guest runs: without it every chainfs command in the guest compiled
    its 9,000 lines again under TCG (about 0.3 s here, seconds there), the tree being
    read-only to the guest and ``PYTHONDONTWRITEBYTECODE`` set in this project's
    environment."""
    import compileall

    compileall.compile_dir(str((tree or code_tree()) / "chainfs"), quiet=1, workers=1)
