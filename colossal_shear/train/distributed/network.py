"""Which network interface gloo and NCCL use between nodes, chosen before the process group starts.

Left to itself, gloo advertises the address its host name resolves to. On many Debian/Ubuntu machines that is
127.0.1.1 (or 127.0.0.1), so on a multi-node run every other rank is told to connect to its own loopback and the
job dies in `Gloo connectFullMesh failed ... Connection refused`. NCCL's bootstrap has the same class of problem.
So `configure()` sets whichever of `GLOO_SOCKET_IFNAME` and `NCCL_SOCKET_IFNAME` is unset to the interface that
routes to MASTER_ADDR (the kernel's own answer: a UDP `connect()` sends nothing and reports the source address).
On the master node, whose own name may resolve to loopback, that route is `lo`: there the interface is the one
holding the address the other nodes' launchers reached the rendezvous store on (MASTER_PORT), read from
/proc/net/tcp; failing that, the default route's, or the only one up. A literal loopback MASTER_ADDR
(127.x, ::1, localhost) means every rank is on this machine: `lo`.

Overrides: set `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` yourself (each is left alone when set), or
`COLOSSAL_SHEAR_AUTO_IFNAME=0` to leave both to gloo/NCCL's own defaults.

`COLOSSAL_SHEAR_DIST_TIMEOUT` (seconds) is how long a rank waits on its peers (connecting, and in every collective)
before it fails. colossalai.launch passes no timeout, so torch's default applies otherwise: 30 minutes for gloo,
10 for NCCL. A peer whose processes die is noticed at once (its sockets close); this bounds the wait for one that
hangs or whose host drops off the network. Keep it above the longest pause between collectives (a checkpoint or
an export on rank 0 while the others wait). Standard library only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

from colossal_shear.core.errors import UserError
from colossal_shear.core.logger import EVERY_HOST, get_logger

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
AUTO_VAR = "COLOSSAL_SHEAR_AUTO_IFNAME"
TIMEOUT_VAR = "COLOSSAL_SHEAR_DIST_TIMEOUT"
_SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8
_TCP_ESTABLISHED = "01"


class NetworkError(UserError):
    """MASTER_ADDR cannot be resolved or reached, or no interface can be chosen; raised before the process group.
    What one host sees of the network may differ from another's: the rank that meets it prints it."""

    rank_local = True


@dataclass(frozen=True)
class Choice:
    ifname: str
    address: str
    reason: str


def resolve(host: str) -> list[str]:
    """Addresses of `host`, IPv4 first (what gloo and the TCP store try first)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NetworkError(
            f"MASTER_ADDR {host!r} does not resolve on host {socket.gethostname()!r} ({e.strerror}): "
            "fix its name (DNS or /etc/hosts on every node) or pass --master_addr with an IP "
            "address that every node reaches"
        ) from None
    addrs = list(dict.fromkeys(info[4][0] for info in infos))
    return sorted(addrs, key=lambda a: ":" in a)


def route_source(address: str, port: int) -> str:
    """The local address the kernel would send from to reach `address` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, port or 9))
        return s.getsockname()[0]


def _ifreq(sock: socket.socket, request: int, name: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))


def interfaces() -> dict[str, dict]:
    """{name: {"up": bool, "loopback": bool, "addresses": [...]}} for every interface of this network namespace."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                flags = struct.unpack("H", _ifreq(s, _SIOCGIFFLAGS, name)[16:18])[0]
            except OSError:  # gone meanwhile
                continue
            addrs = []
            try:
                addrs.append(socket.inet_ntoa(_ifreq(s, _SIOCGIFADDR, name)[20:24]))
            except OSError:  # no IPv4 address
                pass
            out[name] = {"up": bool(flags & _IFF_UP), "loopback": bool(flags & _IFF_LOOPBACK), "addresses": addrs}
    for name, addr in _ipv6_addresses():
        if name in out:
            out[name]["addresses"].append(addr)
    for name, addr in _secondary_ipv4():
        if name in out and addr not in out[name]["addresses"]:
            out[name]["addresses"].append(addr)
    return out


def _ipv6_addresses():
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, *_, name = line.split()
                yield name, str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    except OSError:
        return


def _secondary_ipv4():
    """Addresses beyond each interface's primary one (SIOCGIFADDR reports only that), from `ip -o -4 addr`."""
    if not shutil.which("ip"):
        return
    try:
        text = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "inet":
            yield parts[1], parts[3].split("/")[0]


def interface_of(address: str, ifaces: dict | None = None) -> str | None:
    ifaces = interfaces() if ifaces is None else ifaces
    want = ipaddress.ip_address(address.split("%")[0])
    for name, info in ifaces.items():
        if any(ipaddress.ip_address(a) == want for a in info["addresses"]):
            return name
    return None


def store_local_addresses(port: int) -> list[str]:
    """Local addresses of established TCP connections on `port` (the rendezvous store) from non-loopback peers,
    most frequent first: the addresses other nodes reach this one on."""
    counts: dict[str, int] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state != _TCP_ESTABLISHED or int(local.split(":")[1], 16) != port:
                continue
            la, ra = _proc_addr(local.split(":")[0], v6), _proc_addr(remote.split(":")[0], v6)
            if la.is_loopback or ra.is_loopback:
                continue
            counts[str(la)] = counts.get(str(la), 0) + 1
    return sorted(counts, key=lambda a: -counts[a])


def _proc_addr(hexaddr: str, v6: bool):
    """An address as /proc/net/tcp{,6} prints it (each 32-bit word in host byte order); IPv4-mapped IPv6 addresses
    (a dual-stack listener's IPv4 peers) come back as IPv4."""
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if not v6:
        return ipaddress.IPv4Address(raw)
    addr = ipaddress.IPv6Address(raw)
    return addr.ipv4_mapped or addr


def _is_loopback_literal(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def default_route_interface() -> str | None:
    try:
        with open("/proc/net/route") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[1] == "00000000" and fields[7] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def choose_interface(master_addr: str, master_port: int, multi_node: bool) -> Choice:
    """The interface this host's ranks should bind to so that every other rank can reach them."""
    addrs = resolve(master_addr)
    errors = []
    for addr in addrs:
        try:
            source = route_source(addr, master_port)
            break
        except OSError as e:
            errors.append(f"{addr}: {e.strerror or e}")
    else:
        raise NetworkError(
            f"MASTER_ADDR {master_addr!r} ({', '.join(errors)}) is unreachable from host "
            f"{socket.gethostname()!r}: no route to it; check this node's network and --master_addr"
        )
    ifaces = interfaces()
    what = f"MASTER_ADDR {master_addr}" + (f" ({addr})" if addr != master_addr else "")
    if not ipaddress.ip_address(source.split("%")[0]).is_loopback:
        name = interface_of(source, ifaces)
        if name is None:
            raise NetworkError(
                f"the route to {what} leaves from {source}, which no interface of host "
                f"{socket.gethostname()!r} holds: set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME"
            )
        return Choice(name, source, f"it routes to {what}")
    loopback = next((n for n, i in ifaces.items() if i["loopback"]), "lo")
    if not multi_node:
        return Choice(loopback, source, f"{what} is this host and every rank runs here")
    if master_addr == "localhost" or _is_loopback_literal(master_addr):
        return Choice(loopback, source, f"{what} is loopback: every node runs on this machine")
    # The master node of a multi-node run, whose name resolves to loopback here: the other nodes reach it elsewhere.
    for local in store_local_addresses(master_port):
        name = interface_of(local, ifaces)
        if name:
            return Choice(
                name, local, f"other nodes reach this host (the master) on {local} ({what} resolves to loopback here)"
            )
    candidates = {n: i for n, i in ifaces.items() if i["up"] and not i["loopback"] and i["addresses"]}
    name, why = default_route_interface(), "the default route's interface"
    if name not in candidates:
        name, why = (next(iter(candidates)), "the only interface up") if len(candidates) == 1 else (None, "")
    if name is None:
        raise NetworkError(
            f"{what} resolves to loopback on host {socket.gethostname()!r}, the master of a "
            "multi-node run, and no interface is evidently the one the other nodes reach it on "
            f"(up: {', '.join(candidates) or 'none'}): set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME"
        )
    return Choice(
        name, candidates[name]["addresses"][0], f"{why} ({what} resolves to loopback on this host, the master)"
    )


def configure(environ=None, log=None) -> Choice | None:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (those unset) for a torchrun / colossalai-run worker, and say
    which interface (`log`; by default the package logger, which shows it once per host). Does nothing for a world
    of one or with COLOSSAL_SHEAR_AUTO_IFNAME=0."""
    env = os.environ if environ is None else environ
    if env.get(AUTO_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    unset = [v for v in IFNAME_VARS if not env.get(v)]
    world = int(env.get("WORLD_SIZE", "1"))
    if not unset or world <= 1 or "MASTER_ADDR" not in env:
        return None
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    choice = choose_interface(env["MASTER_ADDR"], int(env.get("MASTER_PORT", "0")), multi_node=world > local_world)
    for var in unset:
        env[var] = choice.ifname
    kept = [f"{v}={env[v]} (given)" for v in IFNAME_VARS if v not in unset]
    (log or _say)(
        f"network: host {socket.gethostname()} uses {choice.ifname} ({choice.address}) for "
        f"{' and '.join(unset)}: {choice.reason}"
        + (f"; {', '.join(kept)}" if kept else "")
        + f". Override with {' / '.join(IFNAME_VARS)}, or {AUTO_VAR}=0 for gloo/NCCL's defaults."
    )
    return choice


def dist_timeout(environ=None) -> timedelta | None:
    """The process-group timeout asked for with COLOSSAL_SHEAR_DIST_TIMEOUT (seconds), or None for torch's."""
    value = (os.environ if environ is None else environ).get(TIMEOUT_VAR, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise NetworkError(f"{TIMEOUT_VAR}={value!r} is not a positive number of seconds")
    return timedelta(seconds=seconds)


def _say(line: str) -> None:
    get_logger(__name__).info(line, extra=EVERY_HOST)
