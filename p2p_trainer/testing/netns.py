"""Network namespaces for tests and benchmarks: ``ip`` with a timeout, removal of what dead runs
left behind, and ``NatLab``, a small internet with home routers.

``NatLab(homes=2)`` builds, all inside namespaces (nothing is added to the host's own network):

    wan (a bridge) ── public   10.77.0.1          a peer anyone can reach
                   ├─ router0  10.77.0.10 ─ NAT ─ home0  192.168.10.2
                   └─ router1  10.77.0.11 ─ NAT ─ home1  192.168.11.2

A router MASQUERADEs its home's outgoing connections and drops every new connection from the wan
side (to the home or to itself), like a home router or Colab's NAT: a peer at home can dial out,
nobody can dial it. Per-router counters tell how many bytes went between a home and the public
peer, and between the two homes (a punched hole or a direct path would show there);
``forward_port`` opens a port to a home, as a user would on a home router.

Names carry a prefix with our pid (``p2pn<pid>``), so a later run removes the namespaces of runs
that died (``cleanup_stale``). Needs root and iptables; ``why_unavailable`` says why not, for a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass

from p2p_trainer.swarm import procs

WAN = "10.77.0"
PREFIX = "p2pn"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check,
                          timeout=30)


def cleanup_stale(prefix: str) -> list[str]:
    """Remove namespaces and root links named ``<prefix><pid><letter>...`` whose process is gone."""
    removed = []
    pattern = re.compile(rf"^{prefix}(\d+)[a-z]")
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pattern.match(name)
        if m and not procs.alive(int(m.group(1))):
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = pattern.match(name)
        if m and not procs.alive(int(m.group(1))):
            ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def why_unavailable(*, need_iptables: bool = False) -> str | None:
    """None when this process can build namespaces (and has iptables if asked); else the reason."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for ip netns"
    if not shutil.which("ip"):
        return "needs iproute2 (the `ip` command)"
    if need_iptables and not shutil.which("iptables"):
        return "needs iptables (apt-get install -y iptables)"
    probe = f"{PREFIX}{os.getpid()}z{uuid.uuid4().hex[:6]}"
    made = ip("netns", "add", probe, check=False)
    try:
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
        if need_iptables:  # the binary may be there without the kernel's netfilter behind it
            nat = in_ns(probe, "iptables", "-w", "5", "-t", "nat", "-L", "-n", check=False)
            if nat.returncode != 0:
                return f"iptables does not work here: {nat.stderr.strip()[:200] or nat.returncode}"
        return None
    finally:
        ip("netns", "delete", probe, check=False)


# byte counters of a router: its comment -> iptables match ({public}: the public peer, {others}: the
# rest of the wan, where the other homes' routers are)
_COUNTERS = {
    "to_public": ("-i", "lan0", "-d", "{public}"),
    "from_public": ("-o", "lan0", "-s", "{public}"),
    "to_other_homes": ("-i", "lan0", "-m", "iprange", "--dst-range", "{others}"),
    "from_other_homes": ("-o", "lan0", "-m", "iprange", "--src-range", "{others}"),
}


@dataclass(frozen=True)
class Home:
    ns: str  # where the home's peer runs
    addr: str  # its address on the home network
    router: str  # the router's namespace
    wan_addr: str  # the router's address on the wan: what the public side sees the home as


class NatLab:
    """The topology of the module docstring with ``homes`` homes; a context manager that removes
    every namespace it made, also when building it fails half-way."""

    _made_here = 0

    def __init__(self, homes: int = 2, wan: str = WAN) -> None:
        """``wan``: the first three bytes of the wan's addresses (libp2p treats private ones, like
        the default, differently from public ones in places: autorelay, observed addresses)."""
        NatLab._made_here += 1  # two labs of one process never share a name
        tag = f"{PREFIX}{os.getpid()}{chr(ord('a') + NatLab._made_here % 26)}"
        self.wan, self.public = f"{tag}w", f"{tag}p"
        self.wan_prefix = wan
        self.public_addr = f"{wan}.1"
        self.homes = [Home(f"{tag}h{i}", f"192.168.{10 + i}.2", f"{tag}r{i}", f"{wan}.{10 + i}")
                      for i in range(homes)]
        self._made: list[str] = []

    def __enter__(self) -> NatLab:
        cleanup_stale(PREFIX)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _wire(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair whose ends are born in their namespaces (no name ever lives in the host's)."""
        ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)

    def _up(self, ns: str, dev: str, addr: str | None = None) -> None:
        if addr:
            ip("-n", ns, "addr", "add", addr, "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")

    def _build(self) -> None:
        self._add_ns(self.wan)
        ip("-n", self.wan, "link", "add", "br0", "type", "bridge")
        self._up(self.wan, "br0")
        self._add_ns(self.public)
        self._wire(self.public, "eth0", self.wan, "pub")
        ip("-n", self.wan, "link", "set", "pub", "master", "br0")
        self._up(self.wan, "pub")
        self._up(self.public, "eth0", f"{self.public_addr}/24")
        for i, home in enumerate(self.homes):
            self._add_ns(home.router)
            self._add_ns(home.ns)
            self._wire(home.router, "eth0", self.wan, f"r{i}")
            ip("-n", self.wan, "link", "set", f"r{i}", "master", "br0")
            self._up(self.wan, f"r{i}")
            self._up(home.router, "eth0", f"{home.wan_addr}/24")
            lan = home.addr.rsplit(".", 1)[0]
            self._wire(home.router, "lan0", home.ns, "eth0")
            self._up(home.router, "lan0", f"{lan}.1/24")
            self._up(home.ns, "eth0", f"{home.addr}/24")
            ip("-n", home.ns, "route", "add", "default", "via", f"{lan}.1")
            self._nat(home, lan)

    def _nat(self, home: Home, lan: str) -> None:
        r = home.router
        in_ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ("iptables", "-w", "5")
        masquerade = ("-s", f"{lan}.0/24", "-o", "eth0", "-j", "MASQUERADE")
        in_ns(r, *ipt, "-t", "nat", "-A", "POSTROUTING", *masquerade)
        established = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        for chain in ("INPUT", "FORWARD"):  # nothing from the wan gets in unless it answers us
            in_ns(r, *ipt, "-A", chain, "-i", "eth0", *established)
            in_ns(r, *ipt, "-A", chain, "-i", "eth0", "-j", "DROP")
        # counters (rules with no target only count), named by their comment
        public, others = f"{self.public_addr}/32", f"{self.wan_prefix}.2-{self.wan_prefix}.254"
        for name, match in _COUNTERS.items():
            where = [w.format(public=public, others=others) for w in match]
            in_ns(r, *ipt, "-I", "FORWARD", *where, "-m", "comment", "--comment", name)

    def forward_port(self, home: Home, port: int, proto: str = "tcp") -> None:
        """Forward ``port`` (``proto``: tcp or udp) of the router's wan address to the home, as a user
        would on a home router: the home's peer becomes reachable at ``home.wan_addr:port``."""
        r, ipt = home.router, ("iptables", "-w", "5")
        dnat = ("-i", "eth0", "-p", proto, "--dport", str(port), "-j", "DNAT", "--to-destination",
                f"{home.addr}:{port}")
        in_ns(r, *ipt, "-t", "nat", "-A", "PREROUTING", *dnat)
        # before the DROP of new inbound connections, after the counters (which come first)
        accept = ("-i", "eth0", "-o", "lan0", "-p", proto, "-d", home.addr, "--dport", str(port),
                  "-j", "ACCEPT")
        in_ns(r, *ipt, "-I", "FORWARD", str(len(_COUNTERS) + 1), *accept)

    def forwarded_bytes(self, home: Home) -> dict[str, int]:
        """Bytes the home's router forwarded so far, both ways, between the home and the public
        peer and between the home and other wan addresses (the other homes: a direct or
        hole-punched path would show there), as IP packet bytes."""
        out = in_ns(home.router, "iptables-save", "-c", "-t", "filter").stdout
        counts = dict.fromkeys(_COUNTERS, 0)
        for m in re.finditer(r"^\[\d+:(\d+)\] -A FORWARD .*--comment (\w+)", out, re.M):
            counts[m.group(2)] = int(m.group(1))
        return counts

    @staticmethod
    def prefix(ns: str) -> list[str]:
        """The command prefix that runs a program in ``ns``."""
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in reversed(self._made):  # deleting a namespace takes its veth ends, so the pairs, along
            ip("netns", "delete", ns, check=False)
        self._made.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()
