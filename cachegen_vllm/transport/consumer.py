"""Consumer side (the decode instance): pulls a transfer's frames from the producer named in the
request and hands them over in order, each as soon as it arrives, so that layer L can be decoded
while layer L+1 is still on the wire. One DEALER socket per producer carries every transfer from
that producer; heartbeats tell a dead or restarted producer from a slow one. A producer counts as
gone when it has answered none of our pings for `peer_timeout_s`: silence while this thread could
not run (a starved process, a long-held GIL) sent no pings, and does not count against it.

The consumer trusts no producer further than it must: a producer that sends beyond the credits it
was granted is disconnected (it could fill this process's memory), messages of more parts than
the protocol's are dropped. A connection that was reset reconnects by itself; the consumer then
pulls each of its transfers again from the first frame it lacks. A producer endpoint nothing has
used for `IDLE_CLOSE_S` is closed (producers come and go with prefill instances)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from cachegen_vllm.codec.format import FrameError, ParsedFrame, read_frame
from cachegen_vllm.codec.profile import ConfigError
from cachegen_vllm.params import MAX_TRANSFER_ID
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport._io import HANDSHAKE_FAILURES, IOThread, log, recv_bounded, secure_client
from cachegen_vllm.transport.config import TransportConfig
from cachegen_vllm.transport.errors import CorruptFrame, PeerGone, TransferRefused, TransportError, TransportTimeout

_END = object()
IDLE_CLOSE_S = 60.0  # a producer endpoint with no transfer and no basis asked for this long is closed

CONNECTION_EVENTS = HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


@dataclass
class _Peer:
    sock: zmq.Socket
    monitor: zmq.Socket
    last_ping: float = 0.0
    unanswered_since: float | None = None  # our first ping since the producer last said anything
    pings: int = 0  # sent since then
    connected: bool = False  # a handshake succeeded and no disconnection since
    lost: bool = False  # disconnected after a handshake: a reconnection pulls again
    idle_since: float = field(default_factory=time.monotonic)  # with no streams and no basis asked
    epoch: bytes | None = None
    streams: dict[bytes, TransferStream] = field(default_factory=dict)
    bases: dict[int, list[queue.SimpleQueue]] = field(default_factory=dict)  # BGETs waiting, by digest


class TransferStream:
    """The frames of one transfer, in order, each read once as it arrived (`codec.read_frame`: its
    checksum and header checked, the header kept with its bytes). Iterate it (blocking, up to the
    deadline); use it as a context manager so that an abandoned transfer is cancelled on both
    sides."""

    def __init__(
        self,
        consumer: FrameConsumer,
        endpoint: str,
        transfer_id: str,
        secret: bytes,
        deadline: float,
        from_token: int,
        reader: tuple[int, int],
    ):
        self.endpoint, self.transfer_id, self.deadline, self.from_token = endpoint, transfer_id, deadline, from_token
        self.reader = reader
        self.frames_received = 0
        self.bytes_received = 0
        self.cancelled = threading.Event()  # set once the stream is abandoned, from any thread
        self._consumer = consumer
        self._tid = transfer_id.encode()
        self._secret = secret
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._next_seq = 0  # IO thread: the next DATA expected
        self._granted = consumer.config.credit_frames  # IO thread: DATA the producer may have sent
        self._read = 0  # reader: frames handed out since the last credit
        self._closed = False
        self._epoch: bytes | None = None

    def __iter__(self):
        return self

    def __next__(self) -> ParsedFrame:
        if self._closed:
            raise StopIteration
        try:
            item = self._items.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            self._fail_and_cancel()
            raise TransportTimeout(f"transfer {self.transfer_id} from {self.endpoint} missed its deadline") from None
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, TransportError):
            self._closed = True
            raise item
        self._consumer._unbuffer(len(item.data))
        self._read += 1
        if self._read >= max(1, self._consumer.config.credit_frames // 2):
            credits, self._read = self._read, 0
            self._consumer.call(lambda: self._consumer._credit(self, credits))
        return item

    def cancel(self) -> None:
        """Abandon the transfer: the producer frees its frames, and so do we. Safe from any
        thread; a reader blocked on the stream stops (StopIteration)."""
        if not self._closed:
            self._fail_and_cancel()

    def _fail_and_cancel(self) -> None:
        self._closed = True
        self.cancelled.set()

        def drop():
            self._consumer._drop(self, cancel=True)
            self._items.put(_END)  # after the drop, which empties the queue: wakes a blocked reader

        self._consumer.call(drop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


class FrameConsumer(IOThread):
    def __init__(self, config: TransportConfig, context: zmq.Context | None = None):
        super().__init__("cachegen-consumer")
        if config.curve and not config.curve_server_public_key_file:
            raise ConfigError("curve_server_public_key_file", "is required on a consumer when CURVE is on")
        self.config = config
        self._context = context or zmq.Context.instance()
        self._peers: dict[str, _Peer] = {}
        self._buffered = 0
        self._buffer_lock = threading.Lock()
        self.start()

    def fetch(
        self,
        endpoint: str,
        transfer_id: str,
        secret: bytes,
        timeout_s: float,
        from_token: int = 0,
        reader: tuple[int, int] = (0, 1),
    ) -> TransferStream:
        """Start pulling a transfer, with its secret; frames stream as the producer makes them.
        With ``from_token``, only the frames that hold tokens at or after it come (the earlier ones
        are held here). ``reader`` = (i, n): this is reader i of the n that read the transfer (the
        producer keeps it until all n are done)."""
        tid = transfer_id.encode()
        if not 0 < len(tid) <= MAX_TRANSFER_ID:
            raise ValueError(f"transfer id must be 1..{MAX_TRANSFER_ID} bytes")
        if not 0 <= reader[0] < reader[1] <= 0xFFFF:
            raise ValueError(f"reader must be (i, n) with 0 <= i < n <= 65535; got {reader}")
        if len(secret) != P.SECRET_BYTES:
            raise ValueError(f"a transfer's secret is {P.SECRET_BYTES} bytes, got {len(secret)}")
        stream = TransferStream(self, endpoint, transfer_id, secret, time.monotonic() + timeout_s, from_token, reader)
        self.call(lambda: self._open(stream))
        return stream

    def decline(self, endpoint: str, transfer_id: str, secret: bytes, reader: tuple[int, int] = (0, 1)) -> None:
        """Tell the producer that this reader will not read the transfer (the decode recomputes the
        prompt instead): it frees the frames once all its readers are done, not after ``ttl_s``."""
        tid = transfer_id.encode()
        args = P.PULL_ARGS.pack(0, 0, self.config.max_frame_bytes, *reader, 0)  # no credit: nothing is sent

        def send() -> None:
            self._peer(endpoint)
            self._send(endpoint, [P.PULL, tid, args, secret])
            self._send(endpoint, [P.CANC, tid])

        self.call(send)

    def fetch_basis(
        self, endpoint: str, digest: int, timeout_s: float, cancelled: threading.Event | None = None
    ) -> bytes:
        """The basis file a producer published under ``digest`` (`FrameProducer.publish_basis`):
        for frames coded in a basis this decode was never given. TransferRefused if the producer
        has none or ``cancelled`` is set first, TransportTimeout if no answer comes in time."""
        answer: queue.SimpleQueue = queue.SimpleQueue()

        def ask() -> None:
            peer = self._peer(endpoint)
            peer.bases.setdefault(digest, []).append(answer)
            self._send(endpoint, [P.BGET, P.U64.pack(digest)])

        self.call(ask)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got = answer.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                break
            except queue.Empty:
                if cancelled is not None and cancelled.is_set():
                    raise TransferRefused(f"basis {digest:016x} no longer needed: its transfer stopped") from None
                if time.monotonic() >= deadline:
                    raise TransportTimeout(
                        f"producer {endpoint} sent no basis {digest:016x} in {timeout_s:.1f} s"
                    ) from None
        if isinstance(got, TransportError):
            raise got
        return got

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet read, over all transfers."""
        return self._buffered

    @property
    def open_streams(self) -> int:
        return sum(len(p.streams) for p in list(self._peers.values()))

    @property
    def endpoints(self) -> int:
        """Producer endpoints with a socket open."""
        return len(self._peers)

    def close(self) -> None:
        self.stop()
        for peer in self._peers.values():
            for stream in list(peer.streams.values()):
                stream._items.put(PeerGone("the consumer was closed"))
            self._close_sockets(peer)
        self._peers.clear()
        self._buffered = 0

    # ---- IO thread ------------------------------------------------------------------------------

    def _unbuffer(self, n: int) -> None:
        with self._buffer_lock:  # the reader thread and the IO thread both change it
            self._buffered -= n

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = self._context.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes + 4096)
            secure_client(sock, self.config)
            monitor = sock.get_monitor_socket(CONNECTION_EVENTS)  # says whether a silent peer is reachable
            sock.connect(endpoint)
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(monitor, zmq.POLLIN)
            peer = self._peers[endpoint] = _Peer(sock, monitor)
        return peer

    def _close_sockets(self, peer: _Peer) -> None:
        for sock in (peer.sock, peer.monitor):
            with contextlib.suppress(KeyError):
                self.poller.unregister(sock)
        peer.sock.disable_monitor()  # first: else later sockets of the context never connected
        peer.monitor.close(linger=0)
        peer.sock.close(linger=0)

    def _send(self, endpoint: str, parts: list) -> None:
        peer = self._peers.get(endpoint)
        if peer is None:
            return
        try:
            peer.sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # not connected yet and the queue is full; heartbeats catch a dead peer
            self.stats["send_dropped"] += 1

    def _pull(self, stream: TransferStream) -> None:
        """PULL the stream's transfer from the first frame it lacks, with the credits it has left."""
        args = P.PULL_ARGS.pack(
            stream.from_token,
            max(0, stream._granted - stream._next_seq),
            self.config.max_frame_bytes,
            *stream.reader,
            stream._next_seq,
        )
        self._send(stream.endpoint, [P.PULL, stream._tid, args, stream._secret])

    def _credit(self, stream: TransferStream, credits: int) -> None:
        if stream._closed:
            return
        stream._granted += credits
        self._send(stream.endpoint, [P.CRED, stream._tid, P.U32.pack(credits)])

    def _open(self, stream: TransferStream) -> None:
        if stream._closed:
            return
        peer = self._peer(stream.endpoint)
        if not peer.streams:  # silence is counted from the next ping, not from the last transfer
            peer.unanswered_since, peer.pings = None, 0
        old = peer.streams.get(stream._tid)
        if old is not None:
            self._fail(old, TransferRefused(f"transfer {stream.transfer_id} was fetched again"), cancel=False)
        peer.streams[stream._tid] = stream
        stream._epoch = peer.epoch
        self._pull(stream)

    def _drop(self, stream: TransferStream, cancel: bool) -> None:
        """Forget a stream, free what it buffered, and tell the producer if asked."""
        peer = self._peers.get(stream.endpoint)
        if peer is None or peer.streams.get(stream._tid) is not stream:
            return
        del peer.streams[stream._tid]
        if not peer.streams:
            peer.idle_since = time.monotonic()
        while True:
            try:
                item = stream._items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, ParsedFrame):
                self._unbuffer(len(item.data))
        if cancel:
            self._send(stream.endpoint, [P.CANC, stream._tid])

    def _fail(self, stream: TransferStream, error: TransportError, cancel: bool = True) -> None:
        self.stats[f"failed_{error.kind}"] += 1
        self._drop(stream, cancel)
        stream._items.put(error)

    def _disconnect(self, endpoint: str, peer: _Peer, error: TransportError) -> None:
        """Fail every transfer of a producer that broke the protocol, and close its connection."""
        for stream in list(peer.streams.values()):
            self._fail(stream, error, cancel=False)
        for waiters in peer.bases.values():
            for waiter in waiters:
                waiter.put(error)
        self._close_sockets(peer)
        del self._peers[endpoint]

    def on_ready(self, ready: dict) -> None:
        for endpoint, peer in list(self._peers.items()):
            if peer.sock in ready:
                self._receive(endpoint, peer)
            if peer.monitor in ready and endpoint in self._peers:
                self._watch(endpoint, peer)

    def _receive(self, endpoint: str, peer: _Peer) -> None:
        while endpoint in self._peers and (message := recv_bounded(peer.sock, 4)) is not None:
            parts, _, whole = message
            if not whole:
                self.stats["oversized"] += 1
                log.warning("dropped a message of too many parts from %s", endpoint)
                continue
            self._handle(endpoint, peer, parts)

    def _watch(self, endpoint: str, peer: _Peer) -> None:
        while peer.monitor.poll(0):
            event = recv_monitor_message(peer.monitor, zmq.NOBLOCK)["event"]
            if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.connected = True
                if peer.lost:  # a reset connection came back: what was in flight is lost
                    peer.lost = False
                    self.stats["resumed"] += len(peer.streams)
                    for stream in peer.streams.values():
                        self._pull(stream)
            elif event & zmq.EVENT_DISCONNECTED:
                peer.lost = peer.lost or peer.connected
                peer.connected = False
            elif event & HANDSHAKE_FAILURES:
                self.stats["unauthenticated"] += 1
                log.warning("CURVE handshake with %s failed", endpoint)
                for stream in list(peer.streams.values()):
                    self._fail(stream, TransferRefused(f"CURVE handshake with {endpoint} failed"), cancel=False)

    def _handle(self, endpoint: str, peer: _Peer, parts: list[bytes]) -> None:
        peer.unanswered_since, peer.pings = None, 0
        kind = parts[0]
        if kind == P.PONG and len(parts) == 2:
            if peer.epoch is not None and parts[1] != peer.epoch:
                for lost in list(peer.streams.values()):
                    if lost._epoch is not None and lost._epoch != parts[1]:
                        self._fail(
                            lost,
                            PeerGone(f"producer {endpoint} restarted and lost transfer {lost.transfer_id}"),
                            cancel=False,
                        )
            peer.epoch = parts[1]
            for waiting in peer.streams.values():
                waiting._epoch = waiting._epoch or parts[1]
            return
        if kind in (P.BSET, P.BERR) and len(parts) == 3 and len(parts[1]) == P.U64.size:
            digest = P.U64.unpack(parts[1])[0]
            answer = parts[2] if kind == P.BSET else TransferRefused(parts[2].decode(errors="replace"))
            for waiter in peer.bases.pop(digest, []):
                waiter.put(answer)
            if not peer.streams and not peer.bases:
                peer.idle_since = time.monotonic()
            return
        stream = peer.streams.get(parts[1]) if len(parts) >= 2 else None
        if stream is None:
            self.stats["unexpected"] += 1  # e.g. frames of a transfer we just cancelled
            return
        if kind == P.DATA and len(parts) == 4 and len(parts[2]) == P.U32.size:
            seq, frame = P.U32.unpack(parts[2])[0], parts[3]
            if seq != stream._next_seq:
                self.stats["out_of_order"] += 1
                return
            if stream._next_seq >= stream._granted:
                self.stats["credit_violations"] += 1
                log.warning("producer %s sent beyond the credits it was granted; disconnected", endpoint)
                return self._disconnect(
                    endpoint, peer, TransferRefused(f"producer {endpoint} sent beyond the credits it was granted")
                )
            try:
                parsed = read_frame(frame)
            except FrameError as e:
                return self._fail(stream, CorruptFrame(f"frame {seq} of transfer {stream.transfer_id}: {e}"))
            stream._next_seq += 1
            stream.frames_received += 1
            stream.bytes_received += len(frame)
            self._unbuffer(-len(frame))
            stream._items.put(parsed)
        elif kind == P.END and len(parts) == 3 and len(parts[2]) == P.U32.size:
            if P.U32.unpack(parts[2])[0] != stream._next_seq:
                return self._fail(
                    stream,
                    CorruptFrame(
                        f"transfer {stream.transfer_id} ended after {P.U32.unpack(parts[2])[0]} frames, "
                        f"{stream._next_seq} arrived"
                    ),
                )
            del peer.streams[stream._tid]
            if not peer.streams:
                peer.idle_since = time.monotonic()
            self._send(endpoint, [P.DONE, stream._tid])
            stream._items.put(_END)
        elif kind == P.ERR and len(parts) == 4:
            self._fail(stream, TransferRefused(parts[3].decode(errors="replace")), cancel=False)
        else:
            self.stats["malformed"] += 1
            log.warning("dropped a malformed message from %s", endpoint)

    def tick(self) -> None:
        now = time.monotonic()
        for endpoint, peer in list(self._peers.items()):
            if not peer.streams:
                if not peer.bases and now - peer.idle_since > IDLE_CLOSE_S:
                    self._close_sockets(peer)
                    del self._peers[endpoint]
                    self.stats["endpoints_closed"] += 1
                continue
            if peer.unanswered_since is not None and now - peer.unanswered_since > self.config.peer_timeout_s:
                self._receive(endpoint, peer)  # answers that came while this thread was not running count
                if endpoint not in self._peers:
                    continue
                self._watch(endpoint, peer)
                if peer.unanswered_since is not None:
                    self._give_up(endpoint, peer, now - peer.unanswered_since)
            elif now - peer.last_ping >= self.config.heartbeat_s:
                peer.last_ping = now
                peer.pings += 1
                if peer.unanswered_since is None:
                    peer.unanswered_since = now
                self._send(endpoint, [P.PING])

    def _give_up(self, endpoint: str, peer: _Peer, silence_s: float) -> None:
        connection = "connected" if peer.connected else "no connection"
        why = f"producer {endpoint} answered none of {peer.pings} pings in {silence_s:.1f} s"
        for stream in list(peer.streams.values()):
            self._fail(stream, PeerGone(f"{why} ({connection})"))
