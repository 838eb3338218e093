"""Several hosts on one machine for multi-node tests: network namespaces on a private bridge, an sshd in each.

Each host is a network namespace (its own interfaces, ports and routes) holding one `eth0` on a bridge that lives in
a separate "switch" namespace, so nothing is added to the machine's own network and nothing can leave it: the hosts
reach only each other (10.231.0.0/24) and their own loopback. Each host also has its own host name and /etc/hosts
(private UTS and mount namespaces, a bind mount) in which its own name resolves to 127.0.1.1, as on a default
Debian/Ubuntu machine: the set-up that makes gloo advertise loopback. The file system is otherwise shared, like the
shared file system of a cluster. `colossalai run` reaches the hosts through fabric/paramiko with a temporary key and
`~/.ssh/config` in a temporary HOME (fabric reads `~/.ssh/config` and `~/.ssh/id_*`, never known_hosts).

Everything made here (processes in the namespaces, the namespaces with their links, the bind mounts, temporary files)
is removed by `Cluster.close()`, which the fixture's finalizer and an atexit hook both call; namespaces and
directories left by a killed earlier run (named after its dead pid) are removed on the next start. Needs root.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "csmh"  # namespace names: csmh<pid>-sw, csmh<pid>-h1, ...
SUBNET = "10.231.0"
SSHD = "/usr/sbin/sshd"
ROOT = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """This machine cannot make the hosts (the reason is the message)."""


def _run(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def check_can_make_namespaces() -> None:
    """Raise Unavailable with the reason when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise Unavailable("multi-host tests make network namespaces, which needs root (run pytest as root)")
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            raise Unavailable(f"multi-host tests need `{tool}` (iproute2 / util-linux) to make network namespaces")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        raise Unavailable(
            f"multi-host tests make network namespaces, which this machine refuses "
            f"({made.stderr.strip()}): run pytest as root with CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )
    _run("ip", "netns", "del", probe, check=False)


def empty_netns() -> list[str]:
    """A command prefix that runs in a new network namespace holding only a loopback that is down: nothing it sends
    can leave (a DNS lookup fails at once). As root `unshare --net`; otherwise with a user namespace."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        if shutil.which("unshare") and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    raise Unavailable("cannot make a network namespace here (`unshare --net` fails): needs root or user namespaces")


def ensure_sshd() -> None:
    """Install openssh-server (and with it the ssh client) with apt-get when missing, without letting the package
    start a system sshd."""
    if os.access(SSHD, os.X_OK) and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    if not shutil.which("apt-get"):
        raise RuntimeError(f"{SSHD} is missing and there is no apt-get to install openssh-server")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # the Debian way to keep package scripts from starting services
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        wait = ["-o", "DPkg::Lock::Timeout=600"]
        _run("apt-get", *wait, "update", env=env, timeout=900)
        _run("apt-get", *wait, "install", "-y", "--no-install-recommends", "openssh-server", env=env, timeout=900)
    finally:
        if made_policy:
            policy.unlink()
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"apt-get installed openssh-server but {SSHD} is still missing")


def sweep_stale() -> None:
    """Remove namespaces (and the processes in them) left by an earlier run of this harness that was killed."""
    netns = Path("/run/netns")
    for ns in netns.iterdir() if netns.is_dir() else []:
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", ns.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_namespace_processes(ns.name)
            _run("ip", "netns", "del", ns.name, check=False)
    for d in Path(tempfile.gettempdir()).glob("cs-multihost-*-*"):
        m = re.match(r"cs-multihost-(\d+)-", d.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _namespace_pids(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_namespace_processes(ns: str, timeout: float = 10.0) -> None:
    for pid in _namespace_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while _namespace_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.05)


class Host:
    def __init__(self, index: int, cluster: Cluster):
        self.index, self.name = index, f"cs-node-{index}"
        self.netns = f"{cluster.prefix}-h{index}"
        self.address = f"{SUBNET}.{index + 1}"
        self.sshd: subprocess.Popen | None = None

    def nsenter(self) -> list[str]:
        """A command prefix that runs in this host: its network, host name and /etc/hosts."""
        return ["nsenter", f"--target={self.sshd.pid}", "--net", "--uts", "--mount", f"--wd={ROOT}", "--"]

    def pids(self) -> list[int]:
        """Every process in this host (sshd, and whatever ssh sessions started)."""
        return _namespace_pids(self.netns)


class Cluster:
    """`n` hosts cs-node-1.. at 10.231.0.2.., each with sshd; `env()` is the environment to launch from."""

    def __init__(self, n: int = 2):
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [Host(i, self) for i in range(1, n + 1)]
        self.dir = Path(tempfile.mkdtemp(prefix=f"cs-multihost-{os.getpid()}-"))
        self.home = self.dir / "home"
        self._closed = False
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # --- set-up -------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        sweep_stale()
        ssh = self.home / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        _run(
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "colossal_shear multihost test",
            "-f",
            ssh / "id_ed25519",
        )
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.dir / "host_key")
        shutil.copy(ssh / "id_ed25519.pub", self.dir / "authorized_keys")
        config = [
            f"Host {h.name}\n  HostName {h.address}\n  User root\n  IdentityFile {ssh / 'id_ed25519'}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {ssh / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            for h in self.hosts
        ]
        (ssh / "config").write_text("".join(config))
        pub = (self.dir / "host_key.pub").read_text().split()
        (ssh / "known_hosts").write_text("".join(f"{h.name},{h.address} {pub[0]} {pub[1]}\n" for h in self.hosts))
        self._made_privsep = not Path("/run/sshd").exists()
        if self._made_privsep:
            Path("/run/sshd").mkdir(mode=0o755)

        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            _run("ip", "netns", "add", h.netns)
            _run(
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                f"v{h.index}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                h.netns,
            )
            _run("ip", "-n", self.switch, "link", "set", f"v{h.index}", "master", "br0", "up")
            _run("ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _run("ip", "-n", h.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", h.netns, "link", "set", "lo", "up")
            self._start_sshd(h)
        for h in self.hosts:
            self._wait_for_sshd(h)
        for h in self.hosts:  # the whole chain a launcher uses: name, route, key, login
            for other in self.hosts:
                self.run_on(h, ["ssh", "-F", ssh / "config", "-o", "BatchMode=yes", other.name, "true"], timeout=60)

    def _start_sshd(self, h: Host) -> None:
        hosts = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{h.name}"]  # Debian's default: the own name is loopback
        hosts += [f"{o.address}\t{o.name}" for o in self.hosts if o is not h]
        (self.dir / f"hosts-{h.index}").write_text("\n".join(hosts) + "\n")
        cfg = self.dir / f"sshd-{h.index}.conf"
        cfg.write_text(
            f"Port 22\nListenAddress 0.0.0.0\nHostKey {self.dir / 'host_key'}\nPidFile none\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPrintMotd no\nMaxStartups 100\nMaxSessions 100\n"
        )
        inner = (
            f"mount --bind {self.dir / f'hosts-{h.index}'} /etc/hosts && hostname {h.name} && "
            f"exec {SSHD} -D -e -f {cfg}"
        )
        log = open(self.dir / f"sshd-{h.index}.log", "w")
        # ip netns exec and unshare exec in place: the Popen pid becomes sshd's own
        h.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                h.netns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def _wait_for_sshd(self, h: Host, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if h.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {h.name} exited: {(self.dir / f'sshd-{h.index}.log').read_text()}")
            probe = _run("ip", "netns", "exec", h.netns, "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/22", check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"sshd of {h.name} did not listen within {timeout:.0f} s")

    # --- use ----------------------------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        """The launching shell's environment: venv first on PATH, the test HOME (ssh key and config)."""
        bindir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "HOME": str(self.home),
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            **extra,
        }

    def hostfile(self, hosts=None) -> Path:
        path = self.dir / "hostfile"
        path.write_text("".join(f"{h.name}\n" for h in (hosts or self.hosts)))
        return path

    def run_on(self, host: Host, cmd, env=None, timeout=None, check=True, **kw) -> subprocess.CompletedProcess:
        """Run a command in `host` (as a user logged in there would), from the repository root."""
        try:
            proc = subprocess.run(
                host.nsenter() + [str(c) for c in cmd],
                env=env or self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=ROOT,
                **kw,
            )
        except subprocess.TimeoutExpired as e:
            self.kill_all_jobs()  # what the launcher started lives on in the hosts
            raise AssertionError(
                f"on {host.name}: {' '.join(map(str, cmd))} did not finish in {timeout} s:\n"
                f"{_text(e.stdout)[-6000:]}\n{_text(e.stderr)[-6000:]}"
            ) from None
        if check and proc.returncode != 0:
            raise AssertionError(
                f"on {host.name}: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    def popen_on(self, host: Host, cmd, env=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            host.nsenter() + [str(c) for c in cmd], env=env or self.env(), cwd=ROOT, start_new_session=True, **kw
        )

    def kill_jobs(self, host: Host) -> list[int]:
        """SIGKILL every process in `host` but its sshd listener: the host's share of a job dies at once."""
        pids = [p for p in host.pids() if p != host.sshd.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def kill_all_jobs(self) -> None:
        for host in self.hosts:
            self.kill_jobs(host)

    def close(self) -> None:
        """Kill every process in the hosts, delete the namespaces (their links go with them) and the files."""
        if self._closed:
            return
        self._closed = True
        for h in self.hosts:
            if Path(f"/run/netns/{h.netns}").exists():
                _kill_namespace_processes(h.netns)
            if h.sshd is not None:
                try:
                    h.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for ns in [h.netns for h in self.hosts] + [self.switch]:
            if Path(f"/run/netns/{ns}").exists():
                _run("ip", "netns", "del", ns, check=False)
        if getattr(self, "_made_privsep", False):
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)


# --- which host wrote which file ------------------------------------------------------------------------------------
_FAN_CLOEXEC, _FAN_NONBLOCK, _FAN_CLASS_NOTIF = 0x1, 0x2, 0x0
_FAN_MARK_ADD, _FAN_MARK_MOUNT = 0x1, 0x10
_FAN_CLOSE_WRITE = 0x8
_EVENT = struct.Struct("IBBHQii")


class WriteWatch:
    """Records which host closed which file after writing it, under `root`, through fanotify.

    Every host has its own copy of the mount that holds `root` (its own mount namespace), and a fanotify mount mark
    sees only writes made through the mount it marks: so each event is attributed to the host whose mount it came
    from, with no guessing from process ids. `writes()` returns {path relative to root: [host name per write]}."""

    def __init__(self, cluster: Cluster, root: Path):
        self.root = Path(root).resolve()
        self.events: list[tuple[str, str]] = []
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._fds = {}
        for h in cluster.hosts:
            fd = self._libc.fanotify_init(_FAN_CLASS_NOTIF | _FAN_CLOEXEC | _FAN_NONBLOCK, os.O_RDONLY)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"fanotify_init: {os.strerror(ctypes.get_errno())}")
            path = f"/proc/{h.sshd.pid}/root{self.root}".encode()
            if self._libc.fanotify_mark(fd, _FAN_MARK_ADD | _FAN_MARK_MOUNT, _FAN_CLOSE_WRITE, -100, path) != 0:
                os.close(fd)
                raise OSError(ctypes.get_errno(), f"fanotify_mark {path!r}: {os.strerror(ctypes.get_errno())}")
            self._fds[fd] = h.name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select(list(self._fds), [], [], 0.1)
            for fd in ready:
                self._drain(fd)
        for fd in self._fds:
            self._drain(fd)

    def _drain(self, fd: int) -> None:
        while True:
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                return
            off = 0
            while off + _EVENT.size <= len(buf):
                length, _, _, _, mask, efd, _pid = _EVENT.unpack_from(buf, off)
                if efd >= 0:
                    try:
                        path = os.readlink(f"/proc/self/fd/{efd}")
                    finally:
                        os.close(efd)
                    self.events.append((self._fds[fd], path))
                off += length

    def writes(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for host, path in self.events:
            p = Path(path.removesuffix(" (deleted)"))
            if p.is_relative_to(self.root):
                out.setdefault(str(p.relative_to(self.root)), []).append(host)
        return out

    def close(self) -> dict[str, list[str]]:
        self._stop.set()
        self._thread.join()
        for fd in self._fds:
            os.close(fd)
        self._fds = {}
        return self.writes()
