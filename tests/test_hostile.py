"""The transport against peers that do not play by its rules, on loopback: strangers who know a
transfer id, floods, a message of a million parts, a producer that ignores its credits, a
connection reset mid-transfer, late pulls, and endpoints a decode was pointed at once. Each test
is an attack or a fault the transport must refuse or bound, with the legitimate transfer beside
it still served."""

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq
from conftest import wait_until
from test_transport import FAST, make_frames, produce, received, secret_of

from cachegen_vllm.transport import FrameConsumer, FrameProducer, PeerGone, TransferRefused, TransportTimeout
from cachegen_vllm.transport import consumer as consumer_module
from cachegen_vllm.transport import producer as producer_module
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport.config import TransportConfig


@pytest.fixture
def pair():
    producer, consumer = FrameProducer(FAST), FrameConsumer(FAST)
    yield producer, consumer
    consumer.close()
    producer.close()


class Rogue:
    """A DEALER that speaks the protocol by hand: what a stranger on the producer's port can send."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def pull(self, tid: str, secret: bytes, reader=(0, 1), credits=16, resume=0) -> None:
        args = P.PULL_ARGS.pack(0, credits, 1 << 26, *reader, resume)
        self.sock.send_multipart([P.PULL, tid.encode(), args, secret])

    def send(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def answers(self, timeout_s: float = 0.5) -> list[list[bytes]]:
        out, end = [], time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.sock.poll(50):
                out.append(self.sock.recv_multipart())
        return out

    def close(self) -> None:
        self.sock.close()


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


# ---- a transfer is read and ended by its readers only ------------------------------------------


def test_a_stranger_cannot_end_or_claim_a_transfer_nobody_has_pulled(pair):
    producer, consumer = pair
    frames = make_frames(4)
    produce(producer, "pending", frames)
    rogue = Rogue(producer.endpoint)
    try:
        rogue.send(P.DONE, b"pending")  # before the decode pulls: once, `0 >= 0 readers` ended it
        rogue.send(P.CANC, b"pending")
        rogue.pull("pending", os.urandom(P.SECRET_BYTES), reader=(0, 65535))  # would block the real reader
        answers = rogue.answers()
        assert [a[0] for a in answers if a[0] != P.PONG] == [P.ERR] and b"not its secret" in answers[-1][3]
        assert producer.transfers == 1 and producer.stats["strangers"] >= 3
        stream = consumer.fetch(producer.endpoint, "pending", secret_of("pending"), timeout_s=10)
        assert received(stream) == frames  # the decode reads all of it, as the only reader
    finally:
        rogue.close()


def test_a_stranger_cannot_read_take_over_or_end_a_live_transfer(pair):
    producer, consumer = pair
    frames = make_frames(6)
    producer.open("live", secret_of("live"))
    producer.put("live", frames[0])
    stream = consumer.fetch(producer.endpoint, "live", secret_of("live"), timeout_s=10)
    assert bytes(next(stream).data) == frames[0]
    rogue = Rogue(producer.endpoint)
    try:
        rogue.pull("live", os.urandom(P.SECRET_BYTES))  # a PULL once replaced the reader
        rogue.send(P.CRED, b"live", P.U32.pack(100))
        rogue.send(P.CANC, b"live")
        rogue.send(P.DONE, b"live")
        assert all(a[0] in (P.ERR, P.PONG) for a in rogue.answers())  # not a frame of it
        for frame in frames[1:]:
            producer.put("live", frame)
        producer.finish("live")
        assert received(stream) == frames[1:]
        assert producer.stats["strangers"] >= 4
    finally:
        rogue.close()


def test_a_parked_pull_without_the_secret_is_refused_when_the_transfer_comes(pair):
    """A decode's leg may pull before the prefill has the request; a stranger's pull of the same id
    waits beside it, and is refused once the producer knows the secret."""
    producer, consumer = pair
    rogue = Rogue(producer.endpoint)
    try:
        rogue.pull("early", os.urandom(P.SECRET_BYTES), reader=(0, 65535))
        rogue.send(P.CANC, b"early")  # a cancel of its own parked pull ends nothing
        stream = consumer.fetch(producer.endpoint, "early", secret_of("early"), timeout_s=10)
        time.sleep(0.2)
        frames = make_frames(3)
        produce(producer, "early", frames)
        assert received(stream) == frames
        assert any(a[0] == P.ERR and b"not its secret" in a[3] for a in rogue.answers())
    finally:
        rogue.close()


# ---- floods ------------------------------------------------------------------------------------


def test_a_flood_of_pulls_for_made_up_ids_is_bounded(pair):
    """20,000 PULLs of ids nobody made, from one connection that keeps pinging: at most
    MAX_PARKED_PER_CONSUMER wait, none past ttl_s, and a real transfer beside them is served."""
    producer, consumer = pair
    rogue = Rogue(producer.endpoint)
    before = rss_mib()
    try:
        for i in range(20000):
            rogue.pull(f"made-up-{i}", os.urandom(P.SECRET_BYTES))
        assert wait_until(lambda: producer.stats["parked_refused"] > 0, timeout=20)
        assert wait_until(lambda: producer.transfers == producer_module.MAX_PARKED_PER_CONSUMER, timeout=20)
        frames = make_frames(40)
        produce(producer, "real", frames)
        assert received(consumer.fetch(producer.endpoint, "real", secret_of("real"), timeout_s=10)) == frames
        deadline = time.monotonic() + FAST.ttl_s + 2
        while time.monotonic() < deadline and producer.transfers:  # its pings renew none of them
            rogue.send(P.PING)
            time.sleep(0.1)
        assert producer.transfers == 0
        assert rss_mib() - before < 64
    finally:
        rogue.close()


# A producer in a process of its own, whose memory the test reads: "report" answers its peak RSS
# and its stats; "serve ID SECRET FILE" opens a transfer and queues the frames pickled in FILE.
PRODUCER = """
import json, pickle, resource, sys
from cachegen_vllm.transport import FrameProducer
from cachegen_vllm.transport.config import TransportConfig
producer = FrameProducer(TransportConfig())
print(producer.endpoint, flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "serve":
        producer.open(words[1], bytes.fromhex(words[2]))
        for frame in pickle.loads(open(words[3], "rb").read()):
            producer.put(words[1], frame)
        producer.finish(words[1])
    report = {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **producer.stats}
    print(json.dumps(report), flush=True)
"""


def test_a_message_of_many_parts_costs_a_producer_only_what_zeromq_held_of_it(tmp_path):
    """ZeroMQ hands a message over only once all its parts came, so it holds the message whole;
    the producer then reads its parts one at a time and drops them past the protocol's five, instead
    of copying them all into a list (docs/RESULTS.md). A real transfer after it is served."""
    child = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(line: str) -> dict:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    rogue = None
    try:
        endpoint = child.stdout.readline().strip()
        before = ask("report")["peak_mib"]
        rogue = Rogue(endpoint)
        rogue.send(*[b"x" * 200] * 400_000)
        assert wait_until(lambda: ask("report").get("oversized") == 1, timeout=60, interval=0.5)
        assert ask("report")["peak_mib"] - before < 200
        frames = make_frames(3)
        (tmp_path / "frames").write_bytes(pickle.dumps(frames))
        ask(f"serve after-the-bomb {secret_of('after-the-bomb').hex()} {tmp_path / 'frames'}")
        consumer = FrameConsumer(FAST)
        try:
            stream = consumer.fetch(endpoint, "after-the-bomb", secret_of("after-the-bomb"), timeout_s=10)
            assert received(stream) == frames
        finally:
            consumer.close()
    finally:
        if rogue is not None:
            rogue.close()
        child.kill()
        child.wait()


def test_a_producer_that_ignores_the_credits_is_disconnected():
    """A fake producer answers a PULL of 4 credits with 400 frames: the consumer takes 4, drops the
    producer, and holds no more than it granted."""
    config = TransportConfig(**{**FAST.__dict__, "credit_frames": 4})
    consumer = FrameConsumer(config)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    frame = make_frames(1)[0]
    try:
        stream = consumer.fetch(f"tcp://127.0.0.1:{port}", "greedy", secret_of("greedy"), timeout_s=10)
        identity, kind, tid, *_ = router.recv_multipart()
        assert kind == P.PULL
        for seq in range(400):
            router.send_multipart([identity, P.DATA, tid, P.U32.pack(seq), frame])
        with pytest.raises(TransferRefused, match="beyond the credits"):
            list(stream)
        assert consumer.stats["credit_violations"] == 1
        assert consumer.buffered_bytes <= 4 * len(frame)
        assert wait_until(lambda: consumer.endpoints == 0)  # its connection is closed
    finally:
        router.close()
        consumer.close()


# ---- faults: resets, late pulls, lost errors, endpoints that come and go -----------------------


class ResettingRelay:
    """A loopback TCP relay in front of a producer that can reset every connection through it (an
    RST, both ends still alive) and accepts the reconnection."""

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.connections: list[socket.socket] = []
        self.relayed = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self.connections += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src, dst, back):
        try:
            while data := src.recv(1 << 16):
                if back:
                    self.relayed += len(data)
                dst.sendall(data)
        except OSError:
            pass

    def reset(self):
        for s in self.connections:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        self.connections = []

    def close(self):
        self._listener.close()
        self.reset()


def test_a_reset_connection_resumes_the_transfer_without_waiting_for_the_timeout():
    producer = FrameProducer(FAST)
    consumer = FrameConsumer(TransportConfig(**{**FAST.__dict__, "credit_frames": 2}))
    relay = ResettingRelay(int(producer.endpoint.rsplit(":", 1)[1]))
    frames = make_frames(8)
    try:
        produce(producer, "reset", frames)
        stream = consumer.fetch(relay.endpoint, "reset", secret_of("reset"), timeout_s=30)
        got = [bytes(next(stream).data) for _ in range(2)]
        started = time.monotonic()
        relay.reset()  # two frames read, more in flight: both processes alive, the connection gone
        got += received(stream)
        assert got == frames and time.monotonic() - started < 10  # the deadline was 30 s away
        assert consumer.stats["resumed"] == 1 and producer.stats["readers_moved"] == 1
        assert wait_until(lambda: producer.transfers == 0)
    finally:
        relay.close()
        consumer.close()
        producer.close()


def test_a_late_pull_of_a_long_ended_transfer_is_refused_at_once(pair):
    producer, consumer = pair
    for i in range(5000):  # more than the 4096 ended transfers once remembered
        producer.open(f"aborted-{i}", secret_of(f"aborted-{i}"))
        producer.abort(f"aborted-{i}")
    assert wait_until(lambda: producer.transfers == 0)
    started = time.monotonic()
    with pytest.raises(TransferRefused, match="aborted by the producer"):
        received(consumer.fetch(producer.endpoint, "aborted-0", secret_of("aborted-0"), timeout_s=30))
    assert time.monotonic() - started < 5


def test_a_pull_of_a_transfer_never_made_is_refused_after_ttl_not_at_its_deadline(pair):
    """Its consumer pings all along: parked pulls are not renewed by pings."""
    producer, consumer = pair
    started = time.monotonic()
    with pytest.raises(TransferRefused, match="no transfer of this id was made"):
        received(consumer.fetch(producer.endpoint, "never", secret_of("never"), timeout_s=30))
    assert time.monotonic() - started < FAST.ttl_s + 5


def test_an_error_the_consumers_full_pipe_refused_is_sent_again(pair, monkeypatch):
    producer, consumer = pair
    producer.open("lost-err", secret_of("lost-err"))
    producer.put("lost-err", make_frames(1)[0])  # more to come: the decode waits
    stream = consumer.fetch(producer.endpoint, "lost-err", secret_of("lost-err"), timeout_s=30)
    assert next(stream)
    send, dropped = producer._send, []

    def full_once(consumer_id, parts):
        if parts[0] == P.ERR and not dropped:
            dropped.append(parts)
            return False  # the high-water mark: once, this ERR went nowhere
        return send(consumer_id, parts)

    monkeypatch.setattr(producer, "_send", full_once)
    started = time.monotonic()
    producer.abort("lost-err")
    with pytest.raises(TransferRefused, match="aborted by the producer"):
        received(stream)
    assert dropped and time.monotonic() - started < 5


def test_endpoints_nothing_uses_are_closed(monkeypatch):
    """A decode pointed at 50 one-off producers (pods that came and went) keeps no socket open."""
    monkeypatch.setattr(consumer_module, "IDLE_CLOSE_S", 0.5)
    consumer = FrameConsumer(TransportConfig(**{**FAST.__dict__, "peer_timeout_s": 0.5, "heartbeat_s": 0.1}))
    try:
        dead = [socket.create_server(("127.0.0.1", 0)) for _ in range(50)]
        ports = [s.getsockname()[1] for s in dead]
        for s in dead:
            s.close()
        streams = [consumer.fetch(f"tcp://127.0.0.1:{p}", "gone", secret_of("gone"), timeout_s=5) for p in ports]
        for stream in streams:
            with pytest.raises((PeerGone, TransportTimeout)):  # nobody listens there
                list(stream)
        assert wait_until(lambda: consumer.endpoints == 0, timeout=5)
        assert consumer.stats["endpoints_closed"] == 50
    finally:
        consumer.close()
