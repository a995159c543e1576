"""Producer side (the prefill instance): holds each transfer's frames in a bounded host buffer and
streams them to the consumer that pulls the transfer, as they are produced, under credit-based
flow control. Frames stay until the consumer confirms them (DONE) or cancels; a transfer nobody
pulls is evicted after `ttl_s`, and one whose consumer stops renewing its lease (heartbeats) after
`lease_s`, so a decode that never comes or dies pins nothing. A consumer that already holds a prefix
of the tokens pulls from a token on, and only the frames holding later tokens cross the wire."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from cachegen_vllm.codec.format import frame_tokens
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport._io import HANDSHAKE_FAILURES, IOThread, handshake_failed, log, secure_server
from cachegen_vllm.transport.config import TransportConfig
from cachegen_vllm.transport.errors import BufferFull, TransferRefused

TOMBSTONES = 4096  # ended transfers remembered, so a late PULL is refused instead of parked


@dataclass
class _Transfer:
    expires: float
    frames: list[bytes | memoryview] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)  # of each frame: one past its last token
    nbytes: int = 0
    finished: bool = False
    pulled: bool = False  # from the first PULL on, the consumer's lease applies instead of the TTL
    consumer: bytes | None = None  # routing id of the consumer pulling it
    from_token: int = 0  # frames holding only earlier tokens are skipped
    next_frame: int = 0  # index in frames of the next one to consider
    sent: int = 0  # DATA messages of the current PULL, the next one's seq
    credits: int = 0
    max_frame_bytes: int = 0
    end_sent: bool = False


class FrameProducer(IOThread):
    def __init__(self, config: TransportConfig, context: zmq.Context | None = None):
        super().__init__("cachegen-producer")
        self.config = config
        self.epoch = os.urandom(16)
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._transfers: dict[bytes, _Transfer] = {}
        self._ended: OrderedDict[bytes, tuple[int, str]] = OrderedDict()
        self._buffered = 0
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to a vanished consumer fail instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_CONTROL_MESSAGE)  # consumers send only small control parts
        self._auth = secure_server(sock, self._context, config)
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES) if config.curve else None
        sock.bind(config.bind)
        self._sock = sock
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            self.poller.register(self._monitor, zmq.POLLIN)
        self.start()

    # ---- API for the producing threads -------------------------------------------------------

    def put(self, transfer_id: str, frame: bytes | memoryview) -> None:
        """Queue one frame of a transfer. Raises BufferFull or TransferRefused (too large, or the
        consumer cancelled it): the caller stops producing it."""
        tid = transfer_id.encode()
        token_start, token_count = frame_tokens(frame)
        if len(frame) > self.config.max_frame_bytes:
            raise TransferRefused(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.config.max_frame_bytes}")
        with self._lock:
            if tid in self._ended:
                raise TransferRefused(f"transfer {transfer_id} ended: {self._ended[tid][1]}")
            t = self._transfer(tid)
            if t.finished:
                raise ValueError(f"transfer {transfer_id} is finished; no more frames may be added")
            if self._buffered + len(frame) > self.config.max_buffer_bytes:
                raise BufferFull(f"{self._buffered} bytes buffered, max_buffer_bytes={self.config.max_buffer_bytes}")
            t.frames.append(frame)
            t.token_ends.append(token_start + token_count)
            t.nbytes += len(frame)
            self._buffered += len(frame)
            self.stats["bytes_queued"] += len(frame)
        self.call(lambda: None)

    def finish(self, transfer_id: str) -> None:
        """No more frames for this transfer."""
        with self._lock:
            tid = transfer_id.encode()
            if tid not in self._ended:
                self._transfer(tid).finished = True
        self.call(lambda: None)

    def abort(self, transfer_id: str, reason: str = "aborted by the producer") -> None:
        """Drop a transfer and its frames; a consumer pulling it gets TransferRefused."""
        self.call(lambda: self._end(transfer_id.encode(), P.CANCELLED, reason))

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def transfers(self) -> int:
        return len(self._transfers)

    def close(self) -> None:
        self.stop()
        self._sock.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        with self._lock:
            self._transfers.clear()
            self._buffered = 0

    # ---- IO thread ------------------------------------------------------------------------------

    def _transfer(self, tid: bytes) -> _Transfer:
        """The transfer, created if new; its lease is renewed. Caller holds the lock."""
        t = self._transfers.get(tid)
        if t is None:
            t = self._transfers[tid] = _Transfer(expires=0.0)
        self._renew(t)
        return t

    def _renew(self, t: _Transfer) -> None:
        t.expires = time.monotonic() + (self.config.lease_s if t.pulled else self.config.ttl_s)

    def _end(self, tid: bytes, code: int, reason: str) -> None:
        with self._lock:
            t = self._transfers.pop(tid, None)
            self._ended[tid] = (code, reason)
            while len(self._ended) > TOMBSTONES:
                self._ended.popitem(last=False)
            if t is None:
                return
            self._buffered -= t.nbytes
            self.stats["bytes_freed"] += t.nbytes
        if t.consumer is not None and code != P.COMPLETED:
            self._send(t.consumer, [P.ERR, tid, P.ERR_CODE.pack(code), reason.encode()])

    def _send(self, consumer: bytes, parts: list) -> bool:
        try:
            self._sock.send_multipart([consumer, *parts], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # the consumer's pipe is full; try again on the next tick
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.stats["consumer_gone"] += 1  # it disconnected; a PULL after reconnecting resumes
            with self._lock:
                for t in self._transfers.values():
                    if t.consumer == consumer:
                        t.consumer = None
            return False

    def on_ready(self, ready: dict) -> None:
        if self._sock in ready:
            while True:
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(parts)
        if self._monitor is not None and self._monitor in ready:
            while self._monitor.poll(0):
                if handshake_failed(self._monitor):
                    self.stats["unauthenticated"] += 1
                    log.warning("refused a consumer: CURVE handshake failed")

    def _malformed(self, why: str) -> None:
        self.stats["malformed"] += 1
        log.warning("dropped a malformed message: %s", why)

    def _handle(self, parts: list[bytes]) -> None:
        if len(parts) < 2:
            return self._malformed("no message kind")
        consumer, kind, args = parts[0], parts[1], parts[2:]
        if kind == P.PING and not args:
            with self._lock:
                for t in self._transfers.values():
                    if t.consumer == consumer:
                        self._renew(t)
            self._send(consumer, [P.PONG, self.epoch])
            return
        if not args or not 0 < len(args[0]) <= P.MAX_TRANSFER_ID:
            return self._malformed(f"{kind[:8]!r} without a valid transfer id")
        tid = args[0]
        if kind == P.PULL and len(args) == 2 and len(args[1]) == P.PULL_ARGS.size:
            from_token, credits, max_frame = P.PULL_ARGS.unpack(args[1])
            with self._lock:
                ended = self._ended.get(tid)
                if ended is None:
                    t = self._transfer(tid)
                    t.pulled = True
                    self._renew(t)
                    t.consumer, t.from_token, t.credits, t.max_frame_bytes = consumer, from_token, credits, max_frame
                    t.next_frame, t.sent, t.end_sent = 0, 0, False
            if ended is not None:
                self._send(consumer, [P.ERR, tid, P.ERR_CODE.pack(ended[0]), ended[1].encode()])
        elif kind == P.CRED and len(args) == 2 and len(args[1]) == P.U32.size:
            with self._lock:
                credited = self._transfers.get(tid)
                if credited is not None and credited.consumer == consumer:
                    credited.credits += P.U32.unpack(args[1])[0]
                    self._renew(credited)
        elif kind == P.DONE and len(args) == 1:
            self._end(tid, P.COMPLETED, "completed")
        elif kind == P.CANC and len(args) == 1:
            self._end(tid, P.CANCELLED, "cancelled by the consumer")
        else:
            self._malformed(f"unknown or ill-formed {kind[:8]!r}")

    def tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(tid, t.pulled) for tid, t in self._transfers.items() if t.expires < now]
            sendable = [(tid, t) for tid, t in self._transfers.items() if t.consumer is not None]
        for tid, pulled in expired:
            self.stats["evicted"] += 1
            why = (
                f"its consumer stopped renewing it for lease_s={self.config.lease_s}"
                if pulled
                else f"nobody pulled it within ttl_s={self.config.ttl_s}"
            )
            self._end(tid, P.EVICTED, "evicted: " + why)
        for tid, t in sendable:
            self._pump(tid, t)

    def _pump(self, tid: bytes, t: _Transfer) -> None:
        while t.consumer is not None and t.credits > 0 and t.next_frame < len(t.frames):
            if t.token_ends[t.next_frame] <= t.from_token:  # the consumer holds these tokens
                t.next_frame += 1
                continue
            frame = t.frames[t.next_frame]
            if len(frame) > t.max_frame_bytes:
                return self._end(
                    tid, P.TOO_LARGE, f"frame {t.next_frame} is {len(frame)} bytes, over the consumer's limit"
                )
            if not self._send(t.consumer, [P.DATA, tid, P.U32.pack(t.sent), frame]):
                return
            t.next_frame += 1
            t.sent += 1
            t.credits -= 1
            self.stats["frames_sent"] += 1
            self.stats["bytes_sent"] += len(frame)
        if t.consumer is not None and t.finished and not t.end_sent and t.next_frame == len(t.frames):
            t.end_sent = self._send(t.consumer, [P.END, tid, P.U32.pack(t.sent)])
