"""Producer side (the prefill instance): holds each transfer's frames in a bounded host buffer and
streams them to the consumers that pull the transfer, as they are produced, under credit-based
flow control. A transfer has as many readers as its first PULL says (the decode's tensor-parallel
ranks that need this producer's heads), each with its own position and credits; its frames stay
until every reader confirms them (DONE) or gives up (CANC). A transfer nobody pulls is evicted
after `ttl_s`, and one whose consumers stop renewing its lease (heartbeats) after `lease_s`, so a
decode that never comes or dies pins nothing. A consumer that already holds a prefix of the tokens
pulls from a token on, and only the frames holding later tokens cross the wire.

The consumers' credits are acknowledgements too: while a reader waits for credits, the link (or
the reader) is what paces the transfer, and the bytes acknowledged per second then are its
goodput (`goodput_bytes_per_s`), which bandwidth adaptation reads with `backlog_bytes`. While
nothing waits, the link carries all it is given: each credit then raises the estimate a step
(`PROBE`, up to `PROBE_MAX` times the measured goodput), so that a link that got faster is found
again once smaller frames no longer fill it; the next paced sample replaces the raised value."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import zmq

from cachegen_vllm.adaptation import Ewma
from cachegen_vllm.codec.format import frame_tokens
from cachegen_vllm.params import MAX_TRANSFER_ID
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport._io import (
    HANDSHAKE_FAILURES,
    IOThread,
    handshake_failed,
    log,
    secure_server,
)
from cachegen_vllm.transport.config import TransportConfig
from cachegen_vllm.transport.errors import BufferFull, TransferRefused

TOMBSTONES = 4096  # ended transfers remembered, so a late PULL is refused instead of parked
PROBE = 1.1  # the goodput estimate's rise per credit that came while no reader waited for one
# at most this many times the measured goodput: enough to go down the whole ladder (raw to the
# basis profile is 6x in size); where a prefill is slower than the link nothing ever waits, and
# the estimate would rise without bound
PROBE_MAX = 8.0


@dataclass
class _Reader:
    """One consumer's pull of a transfer; a new PULL by the same reader starts it over."""

    consumer: bytes | None  # its routing id; None while it is disconnected
    from_token: int  # frames holding only earlier tokens are skipped
    credits: int
    max_frame_bytes: int
    next_frame: int = 0  # index in the transfer's frames of the next one to consider
    sent: int = 0  # DATA messages of this PULL, the next one's seq
    end_sent: bool = False
    unacked: deque[int] = field(default_factory=deque)  # sizes of the frames sent and not credited back
    done_bytes: int = 0  # of the transfer's frames: credited back, or skipped (held by the consumer)

    def acknowledge(self, count: int) -> int:
        """The bytes of the next ``count`` frames sent, now credited back."""
        acked = sum(self.unacked.popleft() for _ in range(min(count, len(self.unacked))))
        self.done_bytes += acked
        return acked


@dataclass
class _Transfer:
    expires: float
    frames: list[bytes | memoryview] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)  # of each frame: one past its last token
    nbytes: int = 0
    finished: bool = False
    pulled: bool = False  # from the first PULL on, the consumers' lease applies instead of the TTL
    readers: int = 0  # how many will read it, as its first PULL said
    pulling: dict[int, _Reader] = field(default_factory=dict)  # by reader index
    done: set[int] = field(default_factory=set)  # readers that confirmed or gave up
    cancelled: bool = False  # a reader gave up

    def reader_of(self, consumer: bytes) -> int | None:
        return next((i for i, r in self.pulling.items() if r.consumer == consumer), None)


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
        self._goodput = Ewma()  # of the paced samples
        self._probe = 1.0  # the estimate over the measured goodput, raised while nothing waits
        self._paced_since: float | None = None  # since when a reader has waited for credits
        self._published: dict[int, bytes] = {}  # calibrated bases by digest, for consumers that lack one
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

    def publish_basis(self, digest: int, data: bytes) -> None:
        """Serve this basis file to any consumer that asks for it by digest (BGET): one whose frames
        name a basis it was never given fetches it once."""
        if len(data) > self.config.max_frame_bytes:
            raise ValueError(f"a basis of {len(data)} bytes exceeds max_frame_bytes={self.config.max_frame_bytes}")
        with self._lock:
            self._published[digest] = data

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

    @property
    def goodput_bytes_per_s(self) -> float | None:
        """Bytes per second the consumers acknowledged while the link paced a transfer (a moving
        mean; None before the first such time), raised while the link keeps up with all it gets."""
        return None if self._goodput.value is None else self._goodput.value * self._probe

    @property
    def backlog_bytes(self) -> int:
        """Bytes of frames some reader has still to acknowledge (all of a transfer nobody pulls yet)."""
        with self._lock:
            return sum(
                t.nbytes - min((r.done_bytes for r in t.pulling.values()), default=0) for t in self._transfers.values()
            )

    def close(self) -> None:
        self.stop()
        if self._monitor is not None:
            self._sock.disable_monitor()  # first: else later sockets of the context never connected
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
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
        if code != P.COMPLETED:
            for reader in t.pulling.values():
                if reader.consumer is not None:
                    self._send(reader.consumer, [P.ERR, tid, P.ERR_CODE.pack(code), reason.encode()])

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
                    for reader in t.pulling.values():
                        if reader.consumer == consumer:
                            reader.consumer = None
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
                    if t.reader_of(consumer) is not None:
                        self._renew(t)
            self._send(consumer, [P.PONG, self.epoch])
            return
        if kind == P.BGET and len(args) == 1 and len(args[0]) == P.U64.size:
            with self._lock:
                data = self._published.get(P.U64.unpack(args[0])[0])
            self.stats["bases_sent" if data is not None else "bases_refused"] += 1
            if data is not None:
                self._send(consumer, [P.BSET, args[0], data])
            else:
                self._send(consumer, [P.BERR, args[0], f"no basis {P.U64.unpack(args[0])[0]:016x} here".encode()])
            return
        if not args or not 0 < len(args[0]) <= MAX_TRANSFER_ID:
            return self._malformed(f"{kind[:8]!r} without a valid transfer id")
        tid = args[0]
        if kind == P.PULL and len(args) == 2 and len(args[1]) == P.PULL_ARGS.size:
            from_token, credits, max_frame, reader, readers = P.PULL_ARGS.unpack(args[1])
            if not reader < readers:
                return self._malformed(f"PULL as reader {reader} of {readers}")
            refused = None
            with self._lock:
                refused = self._ended.get(tid)
                if refused is None:
                    t = self._transfer(tid)
                    if t.readers not in (0, readers):
                        refused = (
                            P.REFUSED,
                            f"transfer {tid.decode(errors='replace')} has {t.readers} readers, not {readers}",
                        )
                    elif reader in t.done:
                        refused = (P.REFUSED, f"reader {reader} of transfer {tid.decode(errors='replace')} is done")
                    else:
                        t.pulled, t.readers = True, readers
                        self._renew(t)
                        t.pulling[reader] = _Reader(consumer, from_token, credits, max_frame)
            if refused is not None:
                self._send(consumer, [P.ERR, tid, P.ERR_CODE.pack(refused[0]), refused[1].encode()])
        elif kind == P.CRED and len(args) == 2 and len(args[1]) == P.U32.size:
            with self._lock:
                credited = self._transfers.get(tid)
                index = credited.reader_of(consumer) if credited is not None else None
                if credited is not None and index is not None:
                    reader = credited.pulling[index]
                    count = P.U32.unpack(args[1])[0]
                    reader.credits += count
                    acked = reader.acknowledge(count)
                    self._renew(credited)
            if credited is not None and index is not None:
                self._acknowledged(acked)
        elif kind in (P.DONE, P.CANC) and len(args) == 1:
            self._reader_done(tid, consumer, cancelled=kind == P.CANC)
        else:
            self._malformed(f"unknown or ill-formed {kind[:8]!r}")

    def _reader_done(self, tid: bytes, consumer: bytes, cancelled: bool) -> None:
        """A reader read all (DONE) or gave up (CANC); the transfer ends with its last reader."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is None:
                return
            index = t.reader_of(consumer)
            if index is not None:
                del t.pulling[index]
                t.done.add(index)
            t.cancelled |= cancelled
            last = len(t.done) >= t.readers
        if last:
            if t.cancelled:
                self._end(tid, P.CANCELLED, "cancelled by the consumer")
            else:
                self._end(tid, P.COMPLETED, "completed")

    def _acknowledged(self, nbytes: int) -> None:
        """``nbytes`` credited back: while a reader waited for credits, they measure the goodput;
        otherwise the link kept up, and the estimate rises a step."""
        now = time.monotonic()
        if self._paced_since is not None and now > self._paced_since:
            self._goodput.update(nbytes / (now - self._paced_since))
            self._paced_since, self._probe = now, 1.0
        else:
            self._probe = min(PROBE_MAX, self._probe * PROBE)

    def tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            expiring = any(t.expires < now for t in self._transfers.values())
        if expiring:  # the heartbeats that came while this thread was not running renew first
            self.on_ready({self._sock: zmq.POLLIN})
        with self._lock:
            expired = [(tid, t.pulled) for tid, t in self._transfers.items() if t.expires < now]
            sendable = [(tid, t, r) for tid, t in self._transfers.items() for r in t.pulling.values() if r.consumer]
        for tid, pulled in expired:
            self.stats["evicted"] += 1
            why = (
                f"its consumer stopped renewing it for lease_s={self.config.lease_s}"
                if pulled
                else f"nobody pulled it within ttl_s={self.config.ttl_s}"
            )
            self._end(tid, P.EVICTED, "evicted: " + why)
        for tid, t, reader in sendable:
            if tid in self._transfers:  # not ended by another reader's pump this tick
                self._pump(tid, t, reader)
        paced = any(r.credits == 0 and r.next_frame < len(t.frames) for _, t, r in sendable)
        if not paced:
            self._paced_since = None
        elif self._paced_since is None:
            self._paced_since = now

    def _pump(self, tid: bytes, t: _Transfer, r: _Reader) -> None:
        while r.consumer is not None and r.credits > 0 and r.next_frame < len(t.frames):
            if t.token_ends[r.next_frame] <= r.from_token:  # the consumer holds these tokens
                r.done_bytes += len(t.frames[r.next_frame])
                r.next_frame += 1
                continue
            frame = t.frames[r.next_frame]
            if len(frame) > r.max_frame_bytes:
                return self._end(
                    tid, P.TOO_LARGE, f"frame {r.next_frame} is {len(frame)} bytes, over the consumer's limit"
                )
            if not self._send(r.consumer, [P.DATA, tid, P.U32.pack(r.sent), frame]):
                return
            r.next_frame += 1
            r.sent += 1
            r.credits -= 1
            r.unacked.append(len(frame))
            self.stats["frames_sent"] += 1
            self.stats["bytes_sent"] += len(frame)
        if r.consumer is not None and t.finished and not r.end_sent and r.next_frame == len(t.frames):
            r.end_sent = self._send(r.consumer, [P.END, tid, P.U32.pack(r.sent)])
