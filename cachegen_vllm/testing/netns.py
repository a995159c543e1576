"""Shaped network links between two network namespaces, for tests and benchmarks of what crosses a
real network (TCP, queues, delay) on one machine. Needs root and iproute2; `unavailable()` says why
not where it cannot work, so that tests can skip with the reason. The namespaces and links are the
caller's own, made and removed here; no other address is ever touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace

NEAR_IP, FAR_IP = "10.231.0.1", "10.231.0.2"  # the test hosts' own addresses, inside the namespaces


@dataclass(frozen=True)
class Link:
    near: str  # namespace names
    far: str
    near_ip: str
    far_ip: str
    rate: str
    delay_ms: float  # one-way delay actually applied (0 where the kernel has no netem)
    near_dev: str = ""  # the veth ends, one in each namespace (set by `shaped_link`)
    far_dev: str = ""

    def command(self, side: str, argv: list[str]) -> list[str]:
        """argv run inside the ``near`` or ``far`` namespace."""
        return ["ip", "netns", "exec", getattr(self, side), *argv]

    def set_rate(self, rate: str) -> Link:
        """Reshape both directions to ``rate`` in place (``tc qdisc replace``: the namespaces, the
        addresses and every open connection stay), with the same delay; returns the link as it is
        now. Works from any namespace (``tc -n``)."""
        if not (self.near_dev and self.far_dev):
            raise ValueError("set_rate needs a Link made by shaped_link (it knows the devices)")
        applied = min(_shape(ns, dev, rate, self.delay_ms, "replace") for ns, dev in self._ends())
        return replace(self, rate=rate, delay_ms=applied)

    def _ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return ((self.near, self.near_dev), (self.far, self.far_dev))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"cgprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"'ip netns add' failed: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _bits_per_second(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate must look like 100mbit, 1gbit, ...; got {rate!r}")


def _shape(ns: str, dev: str, rate: str, delay_ms: float, verb: str = "add") -> float:
    """Shape one direction (``verb``: tc's "add" a first time, "replace" to change it); returns the
    delay that could be applied. netem gives rate and delay; where the kernel lacks it (seen: a
    sandbox kernel without sch_netem), tbf gives the rate alone."""
    _bits_per_second(rate)  # a bad rate fails here, not as tc's error
    tc = ["tc", "-n", ns, "qdisc", verb, "dev", dev, "root"]
    netem = subprocess.run(
        [*tc, "netem", "delay", f"{delay_ms}ms", "rate", rate, "limit", "100000"],
        check=False,
        capture_output=True,
        text=True,
    )
    if netem.returncode == 0:
        return delay_ms
    burst = max(32 * 1024, int(_bits_per_second(rate) / 8 / 250))  # 4 ms of the rate
    subprocess.run(
        [*tc, "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"], check=True, capture_output=True, text=True
    )
    return 0.0


@contextmanager
def shaped_link(rate: str, delay_ms: float):
    """Two namespaces joined by a veth pair, each direction shaped to ``rate`` (tc syntax, e.g.
    "1gbit") with ``delay_ms`` one-way delay where the kernel has netem (`Link.delay_ms` says what
    was applied); `Link.set_rate` changes the rate later. Removed on exit, also on error."""
    tag = uuid.uuid4().hex[:6]
    near, far = f"cgn{tag}", f"cgf{tag}"
    try:
        _ip("netns", "add", near)
        _ip("netns", "add", far)
        _ip("link", "add", f"vn{tag}", "type", "veth", "peer", "name", f"vf{tag}")
        applied = []
        for ns, dev, ip in ((near, f"vn{tag}", NEAR_IP), (far, f"vf{tag}", FAR_IP)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            applied.append(_shape(ns, dev, rate, delay_ms))
        yield Link(near, far, NEAR_IP, FAR_IP, rate, min(applied), f"vn{tag}", f"vf{tag}")
    finally:
        for ns in (near, far):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
