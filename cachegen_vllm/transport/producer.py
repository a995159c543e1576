"""Producer side (the prefill instance): holds each transfer's frames in a bounded host buffer and
streams them to the consumers that pull the transfer, as they are produced, under credit-based
flow control. A transfer has as many readers as its first PULL says (the decode's tensor-parallel
ranks that need this producer's heads), each with its own position and credits; its frames stay
until every reader confirms them (DONE) or gives up (CANC). A transfer nobody pulls is evicted
after `ttl_s`, and one whose consumers stop renewing its lease (heartbeats) after `lease_s`, so a
decode that never comes or dies pins nothing. A consumer that already holds a prefix of the tokens
pulls from a token on, and only the frames holding later tokens cross the wire.

Transfers are bound to their readers (`protocol`): the producer opens each with its secret
(`open`), a PULL without it changes nothing, and only a reader's own connection moves it on. A
PULL may come before the transfer is opened (a decode's leg overlapping the prefill): it is parked
until then, at most `MAX_PARKED_PER_CONSUMER` per connection and `MAX_PARKED` in all, and refused
after `ttl_s` if the transfer never comes; pings do not keep it. Every timer and send is kept in
structures ordered by when they are due, so an IO tick's cost follows what is due, not how many
transfers exist.

The consumers' credits are acknowledgements too: while a reader waits for credits, the link (or
the reader) is what paces the transfer, and the bytes acknowledged per second then are its
goodput (`goodput_bytes_per_s`), which bandwidth adaptation reads with `backlog_bytes`. While
nothing waits, the link carries all it is given: each credit then raises the estimate a step
(`PROBE`, up to `PROBE_MAX` times the measured goodput), so that a link that got faster is found
again once smaller frames no longer fill it; the next paced sample replaces the raised value."""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import zmq

from cachegen_vllm.adaptation import Ewma
from cachegen_vllm.codec.format import Frame, frame_tokens
from cachegen_vllm.params import MAX_TRANSFER_ID
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport._io import (
    HANDSHAKE_FAILURES,
    IOThread,
    handshake_failed,
    log,
    recv_bounded,
    secure_server,
)
from cachegen_vllm.transport.config import TransportConfig
from cachegen_vllm.transport.errors import BufferFull, TransferRefused

TOMBSTONES = 65536  # ended transfers remembered, so a late PULL is refused at once instead of parked
MAX_PARKED_PER_CONSUMER = 1024  # PULLs of transfers not opened yet, per connection
MAX_PARKED = 8192  # ... and in all
UNDELIVERED = 4096  # ERRs the consumer's full pipe refused, sent again on the next ticks
PROBE = 1.1  # the goodput estimate's rise per credit that came while no reader waited for one
# at most this many times the measured goodput: enough to go down the whole ladder (raw to the
# basis profile is 6x in size); where a prefill is slower than the link nothing ever waits, and
# the estimate would rise without bound
PROBE_MAX = 8.0
TTL, LEASE, PARKED = "ttl", "lease", "parked"  # which timer a transfer is on


@dataclass
class _Reader:
    """One consumer's pull of a transfer, bound to its connection (and CURVE key)."""

    consumer: bytes | None  # its routing id; None while it is disconnected
    owner: str | None  # the CURVE public key it pulled with (None without CURVE)
    from_token: int  # frames holding only earlier tokens are skipped
    credits: int
    max_frame_bytes: int
    next_frame: int = 0  # index in the transfer's frames of the next one to consider
    sent: int = 0  # DATA messages to this reader so far, the next one's seq
    end_sent: bool = False
    unacked: deque[int] = field(default_factory=deque)  # sizes of the frames sent and not credited back
    done_bytes: int = 0  # of the transfer's frames: credited back, or skipped (held by the consumer)

    def acknowledge(self, count: int) -> int:
        """The bytes of the next ``count`` frames sent, now credited back."""
        acked = sum(self.unacked.popleft() for _ in range(min(count, len(self.unacked))))
        self.done_bytes += acked
        return acked


@dataclass
class _Claim:
    """A PULL of a transfer not opened yet: checked against its secret when it is opened."""

    consumer: bytes
    owner: str | None
    index: int
    readers: int
    secret: bytes
    args: tuple[int, int, int, int]  # from_token, credits, max_frame_bytes, resume
    cancelled: bool = False  # its consumer gave up (CANC) before the transfer was opened


@dataclass
class _Transfer:
    secret: bytes | None  # None: parked, pulled before the producer opened it
    timer: str = TTL
    expires: float = 0.0
    frames: list[Frame] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)  # of each frame: one past its last token
    nbytes: int = 0
    finished: bool = False
    readers: int = 0  # how many will read it, as its first PULL said
    pulling: dict[int, _Reader] = field(default_factory=dict)  # by reader index
    done: set[int] = field(default_factory=set)  # readers that confirmed or gave up
    cancelled: bool = False  # a reader gave up
    claims: list[_Claim] = field(default_factory=list)  # while parked: the PULLs waiting for it

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
        self._timers: dict[str, OrderedDict[bytes, None]] = {
            TTL: OrderedDict(),
            LEASE: OrderedDict(),
            PARKED: OrderedDict(),
        }
        self._ended: OrderedDict[bytes, tuple[int, str]] = OrderedDict()
        self._by_consumer: dict[bytes, set[bytes]] = {}  # the transfers a connection reads
        self._claims: dict[bytes, int] = {}  # parked PULLs, by connection
        self._claimed = 0  # ... in all
        self._active: set[tuple[bytes, int]] = set()  # readers with something to send, maybe
        self._starved: set[tuple[bytes, int]] = set()  # readers with frames waiting for credits
        self._undelivered: deque[tuple[bytes, list]] = deque(maxlen=UNDELIVERED)
        self._buffered = 0
        self._goodput = Ewma()  # of the paced samples
        self._probe = 1.0  # the estimate over the measured goodput, raised while nothing waits
        self._paced_since: float | None = None  # since when a reader has waited for credits
        self._published: dict[int, bytes] = {}  # calibrated bases by digest, for consumers that lack one
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to a vanished consumer fail instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_CONTROL_PART)  # a larger part disconnects its sender
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

    def open(self, transfer_id: str, secret: bytes) -> None:
        """Make a transfer that PULLs carrying ``secret`` may read (again: nothing changes). PULLs
        parked for it are bound now if they carry the secret, and refused if not."""
        if len(secret) != P.SECRET_BYTES:
            raise ValueError(f"a transfer's secret is {P.SECRET_BYTES} bytes, got {len(secret)}")
        tid = transfer_id.encode()
        refused: list[tuple[bytes, tuple[int, str]]] = []
        ended = False
        with self._lock:
            if tid in self._ended:
                return
            t = self._transfers.get(tid)
            if t is None:
                t = self._transfers[tid] = _Transfer(secret)
                self._schedule(tid, t, TTL)
            elif t.secret is None:
                t.secret = secret
                self._schedule(tid, t, TTL)
                claims, t.claims = t.claims, []
                for claim in claims:
                    self._unclaim(claim.consumer)
                    if not hmac.compare_digest(claim.secret, secret):
                        self.stats["strangers"] += 1
                        refused.append((claim.consumer, (P.REFUSED, f"transfer {transfer_id}: not its secret")))
                    elif claim.cancelled:  # a decode that gave up before the frames came (declined)
                        t.readers, t.cancelled = claim.readers, True
                        t.done.add(claim.index)
                    else:
                        why = self._bind(
                            tid, t, claim.consumer, claim.owner, claim.index, claim.readers, *claim.args, secret
                        )
                        if why is not None:
                            refused.append((claim.consumer, why))
                ended = t.readers > 0 and len(t.done) >= t.readers

        def answer() -> None:  # on the IO thread, the sockets' only user
            for consumer, why in refused:
                self._send_err(consumer, tid, *why)
            if ended:
                self._end(tid, P.CANCELLED, "cancelled by the consumer")

        self.call(answer)

    def put(self, transfer_id: str, frame: Frame) -> None:
        """Queue one frame of an opened transfer. Raises BufferFull or TransferRefused (too large,
        or the consumer cancelled it): the caller stops producing it."""
        tid = transfer_id.encode()
        token_start, token_count = frame_tokens(frame)
        if len(frame) > self.config.max_frame_bytes:
            raise TransferRefused(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.config.max_frame_bytes}")
        with self._lock:
            if tid in self._ended:
                raise TransferRefused(f"transfer {transfer_id} ended: {self._ended[tid][1]}")
            t = self._transfers.get(tid)
            if t is None or t.secret is None:
                raise ValueError(f"transfer {transfer_id} was not opened (FrameProducer.open)")
            if t.finished:
                raise ValueError(f"transfer {transfer_id} is finished; no more frames may be added")
            if self._buffered + len(frame) > self.config.max_buffer_bytes:
                raise BufferFull(f"{self._buffered} bytes buffered, max_buffer_bytes={self.config.max_buffer_bytes}")
            t.frames.append(frame)
            t.token_ends.append(token_start + token_count)
            t.nbytes += len(frame)
            self._buffered += len(frame)
            self.stats["bytes_queued"] += len(frame)
            self._schedule(tid, t, t.timer)
            self._active.update((tid, i) for i in t.pulling)
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
            t = self._transfers.get(tid)
            if t is not None and t.secret is not None:
                t.finished = True
                self._active.update((tid, i) for i in t.pulling)
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

    # ---- bookkeeping, under the lock ------------------------------------------------------------

    def _schedule(self, tid: bytes, t: _Transfer, timer: str) -> None:
        """Put the transfer on ``timer``, due after its duration from now (a renewal, if it was on
        it already): each timer's transfers stay in the order they are due."""
        self._timers[t.timer].pop(tid, None)
        t.timer = timer
        t.expires = time.monotonic() + (self.config.lease_s if timer == LEASE else self.config.ttl_s)
        self._timers[timer][tid] = None

    def _unclaim(self, consumer: bytes) -> None:
        self._claimed -= 1
        count = self._claims.get(consumer, 0) - 1
        if count > 0:
            self._claims[consumer] = count
        else:
            self._claims.pop(consumer, None)

    def _forget(self, consumer: bytes, tid: bytes) -> None:
        tids = self._by_consumer.get(consumer)
        if tids is not None:
            tids.discard(tid)
            if not tids:
                del self._by_consumer[consumer]

    # ---- IO thread ------------------------------------------------------------------------------

    def _end(self, tid: bytes, code: int, reason: str) -> None:
        with self._lock:
            t = self._transfers.pop(tid, None)
            self._ended[tid] = (code, reason)
            while len(self._ended) > TOMBSTONES:
                self._ended.popitem(last=False)
            if t is None:
                return
            self._timers[t.timer].pop(tid, None)
            for claim in t.claims:
                self._unclaim(claim.consumer)
            for index, reader in t.pulling.items():
                self._active.discard((tid, index))
                self._starved.discard((tid, index))
                if reader.consumer is not None:
                    self._forget(reader.consumer, tid)
            self._buffered -= t.nbytes
            self.stats["bytes_freed"] += t.nbytes
        if code != P.COMPLETED:
            waiting = [r.consumer for r in t.pulling.values()] + [claim.consumer for claim in t.claims]
            for consumer in dict.fromkeys(c for c in waiting if c is not None):
                self._send_err(consumer, tid, code, reason)

    def _send(self, consumer: bytes, parts: list) -> bool | None:
        """True: sent; False: the consumer's pipe is full (try again on a later tick); None: the
        consumer is gone."""
        try:
            self._sock.send_multipart([consumer, *parts], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.stats["consumer_gone"] += 1  # it disconnected; a PULL after reconnecting resumes
            with self._lock:
                for tid in self._by_consumer.pop(consumer, set()):
                    t = self._transfers.get(tid)
                    for reader in t.pulling.values() if t is not None else ():
                        if reader.consumer == consumer:
                            reader.consumer = None
            return None

    def _send_err(self, consumer: bytes, tid: bytes, code: int, reason: str) -> None:
        """An ERR reaches its consumer even past a full pipe: sent again on the next ticks."""
        parts = [P.ERR, tid, P.ERR_CODE.pack(code), reason.encode()]
        if self._send(consumer, parts) is False:
            self._undelivered.append((consumer, parts))

    def on_ready(self, ready: dict) -> None:
        if self._sock in ready:
            while (message := recv_bounded(self._sock, P.MAX_PARTS)) is not None:
                parts, kind, whole = message
                if not whole:
                    self.stats["oversized"] += 1
                    continue
                owner = None
                if self.config.curve and kind is not None:
                    try:  # the consumer's public key, as the CURVE handshake authenticated it
                        owner = str(kind.get("User-Id"))
                    except zmq.ZMQError:
                        owner = None
                self._handle(parts, owner)
        if self._monitor is not None and self._monitor in ready:
            while self._monitor.poll(0):
                if handshake_failed(self._monitor):
                    self.stats["unauthenticated"] += 1
                    log.warning("refused a consumer: CURVE handshake failed")

    def _malformed(self, why: str) -> None:
        self.stats["malformed"] += 1
        log.warning("dropped a malformed message: %s", why)

    def _handle(self, parts: list[bytes], owner: str | None = None) -> None:
        if len(parts) < 2:
            return self._malformed("no message kind")
        consumer, kind, args = parts[0], parts[1], parts[2:]
        if kind == P.PING and not args:
            with self._lock:
                reads = False
                for tid in self._by_consumer.get(consumer, ()):
                    t = self._transfers[tid]
                    if t.timer == LEASE and t.reader_of(consumer) is not None:
                        self._schedule(tid, t, LEASE)
                        reads = True
            if not reads:
                self.stats["pings_unbound"] += 1  # renews nothing: a parked PULL's consumer, or a stranger
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
        if kind == P.PULL and len(args) == 3 and len(args[1]) == P.PULL_ARGS.size and len(args[2]) == P.SECRET_BYTES:
            self._pull(consumer, owner, tid, args[1], args[2])
        elif kind == P.CRED and len(args) == 2 and len(args[1]) == P.U32.size:
            self._credit(consumer, tid, P.U32.unpack(args[1])[0])
        elif kind in (P.DONE, P.CANC) and len(args) == 1:
            self._reader_done(tid, consumer, cancelled=kind == P.CANC)
        else:
            self._malformed(f"unknown or ill-formed {kind[:8]!r}")

    def _pull(self, consumer: bytes, owner: str | None, tid: bytes, args: bytes, secret: bytes) -> None:
        """A reader's PULL: binds it, moves it to this connection, or parks it until the transfer
        is opened; refused (and nothing changes) without the transfer's secret."""
        from_token, credits, max_frame, index, readers, resume = P.PULL_ARGS.unpack(args)
        if not index < readers:
            return self._malformed(f"PULL as reader {index} of {readers}")
        with self._lock:
            refused = self._ended.get(tid)
            t = self._transfers.get(tid)
            if refused is None and (t is None or t.secret is None):  # not opened yet: park it, within the caps
                if self._claimed >= MAX_PARKED or self._claims.get(consumer, 0) >= MAX_PARKED_PER_CONSUMER:
                    refused = (
                        P.REFUSED,
                        f"transfer {tid.decode(errors='replace')}: too many pulls of transfers not made yet",
                    )
                    self.stats["parked_refused"] += 1
                else:
                    if t is None:
                        t = self._transfers[tid] = _Transfer(None)
                        self._schedule(tid, t, PARKED)
                    for again in [c for c in t.claims if (c.consumer, c.index) == (consumer, index)]:
                        t.claims.remove(again)
                        self._unclaim(consumer)
                    pulled = (from_token, credits, max_frame, resume)
                    t.claims.append(_Claim(consumer, owner, index, readers, secret, pulled))
                    self._claims[consumer] = self._claims.get(consumer, 0) + 1
                    self._claimed += 1
            elif refused is None and t is not None:
                refused = self._bind(
                    tid, t, consumer, owner, index, readers, from_token, credits, max_frame, resume, secret
                )
        if refused is not None:
            self._send_err(consumer, tid, *refused)

    def _bind(
        self,
        tid: bytes,
        t: _Transfer,
        consumer: bytes,
        owner: str | None,
        index: int,
        readers: int,
        from_token: int,
        credits: int,
        max_frame: int,
        resume: int,
        secret: bytes,
    ) -> tuple[int, str] | None:
        """Bind reader ``index`` of an opened transfer to this connection, resuming after the
        frames it holds; the refusal (code, reason) if it may not be. Caller holds the lock."""
        name = tid.decode(errors="replace")
        assert t.secret is not None
        if not hmac.compare_digest(t.secret, secret):
            self.stats["strangers"] += 1
            return (P.REFUSED, f"transfer {name}: not its secret")
        if t.readers not in (0, readers):
            return (P.REFUSED, f"transfer {name} has {t.readers} readers, not {readers}")
        if index in t.done:
            return (P.REFUSED, f"reader {index} of transfer {name} is done")
        old = t.pulling.get(index)
        if old is not None and old.owner != owner:
            self.stats["strangers"] += 1
            return (P.REFUSED, f"reader {index} of transfer {name} is bound to another key")
        if old is not None and old.consumer not in (None, consumer):
            self._forget(old.consumer, tid)
            self.stats["readers_moved"] += 1
        reader = _Reader(consumer, owner, from_token, credits, max_frame, sent=resume)
        held = 0  # the frames it holds already: the first `resume` it would be sent
        while held < resume and reader.next_frame < len(t.frames):
            if t.token_ends[reader.next_frame] > from_token:
                held += 1
            reader.done_bytes += len(t.frames[reader.next_frame])
            reader.next_frame += 1
        t.readers = readers
        t.pulling[index] = reader
        self._by_consumer.setdefault(consumer, set()).add(tid)
        self._schedule(tid, t, LEASE)
        self._active.add((tid, index))
        return None

    def _credit(self, consumer: bytes, tid: bytes, count: int) -> None:
        with self._lock:
            t = self._transfers.get(tid)
            index = t.reader_of(consumer) if t is not None else None
            if t is None or index is None:
                self.stats["strangers"] += 1  # only a reader's own connection credits it
                return
            reader = t.pulling[index]
            reader.credits += count
            acked = reader.acknowledge(count)
            if t.secret is not None:
                self._schedule(tid, t, LEASE)
            self._active.add((tid, index))
            self._starved.discard((tid, index))
        self._acknowledged(acked)

    def _reader_done(self, tid: bytes, consumer: bytes, cancelled: bool) -> None:
        """A reader read all (DONE) or gave up (CANC); the transfer ends with its last reader.
        From a connection that reads no part of it, nothing changes."""
        with self._lock:
            t = self._transfers.get(tid)
            if t is not None and t.secret is None and cancelled:  # parked: judged when it is opened
                for claim in t.claims:
                    claim.cancelled |= claim.consumer == consumer
                return
            index = t.reader_of(consumer) if t is not None else None
            if t is None or index is None:
                self.stats["strangers"] += 1
                return
            del t.pulling[index]
            self._active.discard((tid, index))
            self._starved.discard((tid, index))
            self._forget(consumer, tid)
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
        if self._due(now):  # the heartbeats that came while this thread was not running renew first
            self.on_ready({self._sock: zmq.POLLIN})
        for tid, t in self._due(now):
            self.stats["evicted"] += 1
            if t.timer == PARKED:
                why = f"no transfer of this id was made within ttl_s={self.config.ttl_s}"
            elif t.timer == LEASE:
                why = f"its consumer stopped renewing it for lease_s={self.config.lease_s}"
            else:
                why = f"nobody pulled it within ttl_s={self.config.ttl_s}"
            self._end(tid, P.EVICTED, "evicted: " + why)
        for _ in range(len(self._undelivered)):
            consumer, parts = self._undelivered.popleft()
            if self._send(consumer, parts) is False:
                self._undelivered.append((consumer, parts))
        with self._lock:
            active = [(tid, index) for tid, index in self._active]
        for tid, index in active:
            self._pump(tid, index)
        if not self._starved:
            self._paced_since = None
        elif self._paced_since is None:
            self._paced_since = now

    def _due(self, now: float) -> list[tuple[bytes, _Transfer]]:
        """The transfers whose timer has run out, from the front of each timer's order."""
        due = []
        with self._lock:
            for timer in self._timers.values():
                for tid in timer:
                    t = self._transfers[tid]
                    if t.expires >= now:
                        break
                    due.append((tid, t))
        return due

    def _pump(self, tid: bytes, index: int) -> None:
        """Send a reader what its credits allow; it leaves the active readers once it waits for
        credits or frames."""
        with self._lock:
            t = self._transfers.get(tid)
            r = t.pulling.get(index) if t is not None else None
            if t is None or r is None:
                self._active.discard((tid, index))
                return
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
                return  # stays active: tried again on the next tick
            r.next_frame += 1
            r.sent += 1
            r.credits -= 1
            r.unacked.append(len(frame))
            self.stats["frames_sent"] += 1
            self.stats["bytes_sent"] += len(frame)
        if r.consumer is not None and t.finished and not r.end_sent and r.next_frame == len(t.frames):
            r.end_sent = bool(self._send(r.consumer, [P.END, tid, P.U32.pack(r.sent)]))
            if not r.end_sent:
                return
        with self._lock:
            self._active.discard((tid, index))
            if r.credits == 0 and r.next_frame < len(t.frames):
                self._starved.add((tid, index))
            else:
                self._starved.discard((tid, index))
