"""What the producer and the consumer share: a thread that owns their ZeroMQ sockets, CurveZMQ
set-up, and the socket monitor that reports failed handshakes."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections import Counter
from collections.abc import Callable

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from cachegen_vllm.transport.config import TransportConfig

log = logging.getLogger("cachegen_vllm.transport")

HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class IOThread:
    """Polls sockets in a daemon thread. ZeroMQ sockets are not thread-safe, so only this
    thread touches them; other threads queue callables with `call` and wake it through a socketpair.
    """

    POLL_MS = 100  # timer resolution: leases, heartbeats, deadlines

    def __init__(self, name: str):
        self.stats: Counter[str] = Counter()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.poller = zmq.Poller()  # subclasses register their sockets
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def call(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        with contextlib.suppress(OSError):  # closed: the IO thread is gone and the command is moot
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        while not self._stopping.is_set():
            try:
                ready = dict(self.poller.poll(timeout=self.POLL_MS))
                if self._wake_r.fileno() in ready:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        self._commands.get_nowait()()
                    except queue.Empty:
                        break
                self.on_ready(ready)
                self.tick()
            except Exception:  # never let one bad event kill the transport
                self.stats["internal_errors"] += 1
                log.exception("transport IO thread error")

    def on_ready(self, ready: dict) -> None:
        """Handle the sockets `poll` found readable (overridden)."""

    def tick(self) -> None:
        """Timers, and sending what became sendable (overridden)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.call(lambda: None)
        self._thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()


def load_keys(path: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def secure_server(sock: zmq.Socket, context: zmq.Context, config: TransportConfig):
    """Make ``sock`` a CURVE server that accepts only the configured consumers' keys."""
    if config.curve_secret_key_file is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_keys(config.curve_secret_key_file)
    auth = ThreadAuthenticator(context)
    auth.start()
    if config.curve_authorized_keys_dir:
        auth.configure_curve(domain="*", location=config.curve_authorized_keys_dir)
    else:  # encryption without client authentication
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def secure_client(sock: zmq.Socket, config: TransportConfig) -> None:
    if config.curve_secret_key_file is None:
        return
    if config.curve_server_public_key_file is None:  # FrameConsumer refuses such a config first
        raise ValueError("a CURVE consumer needs the producer's public certificate")
    public, secret = load_keys(config.curve_secret_key_file)
    server_public, _ = zmq.auth.load_certificate(config.curve_server_public_key_file)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public


def recv_bounded(sock: zmq.Socket, max_parts: int) -> tuple[list[bytes], zmq.Frame | None, bool] | None:
    """The next message, read part by part: the bytes of its first ``max_parts`` parts, its second
    part as a frame too (what carries the connection's properties, e.g. its CURVE key; None for a
    message of one part), and whether that was all of it. Parts past those are read and dropped
    one by one, so a message of many parts costs this process what ZeroMQ held of it, not a copy
    of it all. None when no message waits."""
    try:
        parts = [sock.recv(zmq.NOBLOCK)]
    except zmq.Again:
        return None
    second: zmq.Frame | None = None
    whole = True
    while sock.getsockopt(zmq.RCVMORE):  # a message's parts arrive together: the rest is there
        if second is None:
            second = sock.recv(copy=False)
            parts.append(second.bytes)
        elif len(parts) < max_parts:
            parts.append(sock.recv())
        else:
            sock.recv()
            whole = False
    return parts, second, whole


def handshake_failed(monitor: zmq.Socket) -> bool:
    """Drain one monitor event; True if it was a failed (e.g. unauthenticated) handshake."""
    event = recv_monitor_message(monitor, zmq.NOBLOCK)
    return bool(event["event"] & HANDSHAKE_FAILURES)
