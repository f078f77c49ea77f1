"""Hosts on this machine: Linux network namespaces, each with its own address on a bridge, so that processes
reach each other only over the network (and a host's link can be cut).

Created and removed by the test that uses them; names and a /24 chosen so as not to meet anything on the machine.
Needs root and `ip` (iproute2): `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"tlprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str  # the namespace
    address: str
    link: str  # the veth end on the bridge's side: down cuts the host off

    @property
    def launcher(self) -> tuple[str, ...]:
        """The prefix that runs a command on this host."""
        return ("ip", "netns", "exec", self.name)

    def link_down(self) -> None:
        _ip("link", "set", self.link, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.link, "up")


class Network:
    """A bridge with the test process's own address on it, and hosts added to it."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)  # interface names hold 15 characters
        self.bridge = f"tl{self.tag}br"
        self.subnet = _free_subnet()
        self.hosts: dict[str, Host] = {}
        self._addresses = self.subnet.hosts()
        gateway = next(self._addresses)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        index = len(self.hosts)
        namespace, outer, inner = f"tl{self.tag}{name}", f"tl{self.tag}v{index}", f"tl{self.tag}p{index}"
        address = str(next(self._addresses))
        _ip("netns", "add", namespace)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", namespace)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        for command in (("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner),
                        ("link", "set", inner, "up"), ("link", "set", "lo", "up")):
            _ip("-n", namespace, *command)
        host = Host(namespace, address, outer)
        self.hosts[name] = host
        return host

    def remove(self) -> None:
        """Every namespace and link made (processes still inside keep theirs until they exit)."""
        for host in self.hosts.values():
            _ip("netns", "del", host.name, check=False)
            _ip("link", "del", host.link, check=False)
        _ip("link", "del", self.bridge, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.x.0/24 no address or route on this machine falls in."""
    taken = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    used = [ipaddress.ip_network(word, strict=False) for word in taken.split()
            if word[:1].isdigit() and word.count(".") == 3 and "/" in word]
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.231.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free 10.231.x.0/24 on this machine")
