"""Free loopback ports for the tests' and benchmarks' servers and producers."""

from __future__ import annotations

import random
import socket

_HANDED_OUT: set[int] = set()


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive free loopback ports (a producer with tensor parallelism
    binds one per rank), below Linux's ephemeral range (32768-60999), never handed out twice by
    this process. A port the OS hands out for bind(0) is free now but not reserved: vLLM's servers
    bind their internal sockets to port 0 while they start, and one took a port chosen that way
    for a producer before its worker bound it ("Address already in use"). Below the range, only
    callers of this function pick ports; a random base keeps concurrent runs apart."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 32768 - count)
        ports = range(base, base + count)
        if any(port in _HANDED_OUT or not _bindable(port) for port in ports):
            continue
        _HANDED_OUT.update(ports)
        return base


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
