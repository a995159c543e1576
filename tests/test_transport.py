"""The ZeroMQ transport over loopback: streaming, flow control, faults, security, accounting.

Every test ends by checking that no buffer is left on either side (the `endpoints` fixture)."""

import hashlib
import random
import threading
import time

import pytest
import torch
import zmq
import zmq.auth
from conftest import wait_until

from cachegen_vllm.codec import KVGeometry, encode_layer
from cachegen_vllm.config import ConfigError, profile_from_dict, transport_config_from_dict
from cachegen_vllm.testing.ports import free_ports
from cachegen_vllm.transport import (
    BufferFull,
    CorruptFrame,
    FrameConsumer,
    FrameProducer,
    PeerGone,
    TransferRefused,
    TransportTimeout,
)
from cachegen_vllm.transport import protocol as P
from cachegen_vllm.transport.config import TransportConfig
from cachegen_vllm.transport.producer import PROBE_MAX

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
PROFILE = profile_from_dict({"chunk_tokens": 32, "group_tokens": 8, "bits": {"key": 4, "value": 4}}, "t")
FAST = TransportConfig(credit_frames=4, ttl_s=1.5, lease_s=1.0, heartbeat_s=0.1, peer_timeout_s=0.8)


def make_frames(count: int, seed: int = 0) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(32 * count, 2, 16, generator=g).bfloat16()
    v = torch.randn(32 * count, 2, 16, generator=g).bfloat16()
    return encode_layer(k, v, geometry=GEOMETRY, profile=PROFILE, layer=seed % 2)


def received(stream) -> list[bytes]:
    """The bytes of every frame a stream hands over (each read as it arrived)."""
    return [bytes(frame.data) for frame in stream]


def assert_no_leaks(producer, consumer):
    assert wait_until(lambda: producer.transfers == 0 and producer.buffered_bytes == 0), (
        producer.transfers,
        producer.buffered_bytes,
    )
    assert wait_until(lambda: consumer.open_streams == 0 and consumer.buffered_bytes == 0), (
        consumer.open_streams,
        consumer.buffered_bytes,
    )


@pytest.fixture
def endpoints():
    made = []

    def make(config=FAST, producer=True, consumer=True):
        pair = (FrameProducer(config) if producer else None, FrameConsumer(config) if consumer else None)
        made.append(pair)
        return pair

    yield make
    for producer, consumer in made:
        if producer and consumer:
            assert_no_leaks(producer, consumer)
        for side in (producer, consumer):
            if side:
                side.close()


def secret_of(tid: str) -> bytes:
    """The tests' transfers each have a secret of their own."""
    return hashlib.blake2b(tid.encode(), digest_size=16).digest()


def produce(producer, tid, frames, delay=0.0):
    producer.open(tid, secret_of(tid))
    for f in frames:
        time.sleep(delay)
        producer.put(tid, f)
    producer.finish(tid)


def test_streams_frames_in_order_as_they_are_produced(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(6)
    stream = consumer.fetch(
        producer.endpoint, "req-1", secret_of("req-1"), timeout_s=10
    )  # asked before anything exists
    threading.Thread(target=produce, args=(producer, "req-1", frames, 0.1)).start()
    arrivals = []
    for frame in stream:
        arrivals.append(time.monotonic())
        assert bytes(frame.data) == frames[len(arrivals) - 1]
    assert len(arrivals) == 6 and stream.frames_received == 6
    assert arrivals[-1] - arrivals[0] > 0.3  # each frame was handed over as it came, not at the end


def test_frames_may_be_views_of_one_buffer(endpoints):
    """The GPU encoder seals frames in place in one host buffer and hands over views of it."""
    producer, consumer = endpoints()
    frames = make_frames(3)
    shared = bytearray(b"".join(frames))
    offsets = [sum(map(len, frames[:i])) for i in range(len(frames))]
    views = [memoryview(shared)[o : o + len(f)] for o, f in zip(offsets, frames)]
    stream = consumer.fetch(producer.endpoint, "req-views", secret_of("req-views"), timeout_s=10)
    produce(producer, "req-views", views)
    assert received(stream) == frames
    assert producer.stats["bytes_queued"] == sum(map(len, frames))


def test_several_readers_each_get_every_frame_and_the_last_one_frees_them(endpoints):
    """A decode with more tensor-parallel ranks than the prefill has several ranks pulling one
    transfer: each reads all of it, at its own pace, and the frames stay until the last is done."""
    producer, first = endpoints()
    _, second = endpoints(producer=False)
    _, third = endpoints(producer=False)
    frames = make_frames(6)
    streams = [
        c.fetch(producer.endpoint, "req-tp", secret_of("req-tp"), timeout_s=10, reader=(i, 3))
        for i, c in enumerate((first, second, third))
    ]
    produce(producer, "req-tp", frames)
    assert received(streams[0]) == frames and received(streams[1]) == frames
    time.sleep(0.2)  # two readers are done: the third's frames are still there
    assert producer.transfers == 1 and producer.buffered_bytes == sum(map(len, frames))
    assert received(streams[2]) == frames
    assert wait_until(lambda: producer.transfers == 0 and producer.buffered_bytes == 0)
    assert producer.stats["frames_sent"] == 18


def test_one_reader_giving_up_leaves_the_others_their_frames(endpoints):
    producer, first = endpoints()
    _, second = endpoints(producer=False)
    frames = make_frames(4)
    gone = first.fetch(producer.endpoint, "req-half", secret_of("req-half"), timeout_s=10, reader=(0, 2))
    stays = second.fetch(producer.endpoint, "req-half", secret_of("req-half"), timeout_s=10, reader=(1, 2))
    producer.open("req-half", secret_of("req-half"))
    producer.put("req-half", frames[0])
    assert bytes(next(gone).data) == frames[0]
    gone.cancel()
    for f in frames[1:]:
        producer.put("req-half", f)
    producer.finish("req-half")
    assert received(stays) == frames  # all of them, although the other reader cancelled
    assert wait_until(lambda: producer.transfers == 0)


def test_a_pull_with_another_reader_count_is_refused(endpoints):
    producer, first = endpoints()
    _, second = endpoints(producer=False)
    frames = make_frames(2)
    ok = first.fetch(producer.endpoint, "req-n", secret_of("req-n"), timeout_s=10, reader=(0, 1))
    wait_until(lambda: producer.transfers == 1)
    wrong = second.fetch(producer.endpoint, "req-n", secret_of("req-n"), timeout_s=10, reader=(1, 2))
    time.sleep(0.2)  # both wait for the transfer; the first PULL's count holds once it is made
    produce(producer, "req-n", frames)
    with pytest.raises(TransferRefused, match="has 1 readers, not 2"):
        list(wrong)
    assert received(ok) == frames
    with pytest.raises(ValueError, match="reader must be"):
        first.fetch(producer.endpoint, "req-x", secret_of("req-x"), timeout_s=1, reader=(2, 2))


def test_many_concurrent_transfers_produced_out_of_order(endpoints):
    producer, consumer = endpoints()
    transfers = {f"req-{i}": make_frames(5, seed=i) for i in range(16)}
    streams = {tid: consumer.fetch(producer.endpoint, tid, secret_of(tid), timeout_s=20) for tid in transfers}
    work = [(tid, f) for tid, frames in transfers.items() for f in frames]
    rng = random.Random(7)
    rng.shuffle(work)  # transfers interleave in random order; each keeps its own frame order
    work.sort(key=lambda item: transfers[item[0]].index(item[1]))
    rng.shuffle(work[: len(work) // 2])

    def run():
        for tid in transfers:
            producer.open(tid, secret_of(tid))
        order = {tid: 0 for tid in transfers}
        pending = list(work)
        while pending:
            for item in list(pending):
                tid, frame = item
                if transfers[tid][order[tid]] is frame:
                    producer.put(tid, frame)
                    order[tid] += 1
                    pending.remove(item)
                    if order[tid] == len(transfers[tid]):
                        producer.finish(tid)

    threading.Thread(target=run).start()
    results = {}
    readers = [threading.Thread(target=lambda t=tid: results.__setitem__(t, received(streams[t]))) for tid in transfers]
    for r in readers:
        r.start()
    for r in readers:
        r.join(30)
    assert results == transfers


def test_one_consumer_many_producers(endpoints):
    _, consumer = endpoints(producer=False)
    producers = [endpoints(consumer=False)[0] for _ in range(3)]
    transfers = {(i, f"req-{j}"): make_frames(3, seed=10 * i + j) for i in range(3) for j in range(2)}
    streams = {
        key: consumer.fetch(producers[key[0]].endpoint, key[1], secret_of(key[1]), timeout_s=10) for key in transfers
    }
    for (i, tid), frames in transfers.items():  # the same transfer id on different producers is no clash
        threading.Thread(target=produce, args=(producers[i], tid, frames, 0.01)).start()
    assert {key: received(stream) for key, stream in streams.items()} == transfers
    for producer in producers:
        assert_no_leaks(producer, consumer)


def test_credits_bound_what_is_in_flight(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(40)
    stream = consumer.fetch(producer.endpoint, "slow-reader", secret_of("slow-reader"), timeout_s=20)
    produce(producer, "slow-reader", frames)
    time.sleep(0.5)
    assert producer.stats["frames_sent"] == FAST.credit_frames  # the window, not everything
    assert consumer.buffered_bytes <= FAST.credit_frames * max(map(len, frames))
    assert received(stream) == frames


def test_consumer_cancel_mid_stream_frees_both_sides(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(10)
    produce(producer, "cancel-me", frames[:5])
    with consumer.fetch(producer.endpoint, "cancel-me", secret_of("cancel-me"), timeout_s=10) as stream:
        assert bytes(next(stream).data) == frames[0]
    assert wait_until(lambda: producer.transfers == 0)
    with pytest.raises(TransferRefused, match="cancelled by the consumer"):
        producer.put("cancel-me", frames[5])  # the producer learns to stop


def test_cancel_from_another_thread_wakes_a_blocked_reader(endpoints):
    producer, consumer = endpoints()
    stream = consumer.fetch(
        producer.endpoint, "abandoned", secret_of("abandoned"), timeout_s=30
    )  # nothing is ever produced
    threading.Timer(0.3, stream.cancel).start()
    started = time.monotonic()
    assert received(stream) == []
    assert time.monotonic() - started < 2
    assert wait_until(lambda: producer.transfers == 0)  # the PULL made it; the CANC ended it


def test_producer_abort_reaches_the_consumer(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(4)
    producer.open("abort-me", secret_of("abort-me"))
    producer.put("abort-me", frames[0])
    stream = consumer.fetch(producer.endpoint, "abort-me", secret_of("abort-me"), timeout_s=10)
    assert bytes(next(stream).data) == frames[0]
    producer.abort("abort-me", "prefill failed")
    with pytest.raises(TransferRefused, match="prefill failed"):
        next(stream)


def test_deadline_gives_a_timeout_and_frees_both_sides(endpoints):
    producer, consumer = endpoints()
    producer.open("never-finished", secret_of("never-finished"))
    producer.put("never-finished", make_frames(1)[0])
    stream = consumer.fetch(producer.endpoint, "never-finished", secret_of("never-finished"), timeout_s=0.5)
    next(stream)
    started = time.monotonic()
    with pytest.raises(TransportTimeout):
        next(stream)
    assert time.monotonic() - started < 2


def test_ttl_evicts_what_nobody_collects(endpoints):
    producer, consumer = endpoints()
    produce(producer, "orphan", make_frames(3))
    assert producer.buffered_bytes > 0
    assert wait_until(lambda: producer.transfers == 0, timeout=FAST.ttl_s + 2)
    assert producer.buffered_bytes == 0 and producer.stats["evicted"] == 1
    with pytest.raises(TransferRefused, match="evicted"):
        received(consumer.fetch(producer.endpoint, "orphan", secret_of("orphan"), timeout_s=5))


def test_a_reading_consumer_renews_its_lease(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(3)
    producer.open("long", secret_of("long"))
    producer.put("long", frames[0])
    stream = consumer.fetch(producer.endpoint, "long", secret_of("long"), timeout_s=10)
    assert bytes(next(stream).data) == frames[0]
    time.sleep(FAST.ttl_s * 2)  # heartbeats keep it alive although nothing is produced
    produce(producer, "long", frames[1:])
    assert received(stream) == frames[1:]


def test_a_consumer_that_dies_mid_transfer_stops_pinning_the_buffer(endpoints):
    producer, consumer = endpoints()
    produce(producer, "dropped", make_frames(5))
    crashed = FrameConsumer(FAST)
    assert next(crashed.fetch(producer.endpoint, "dropped", secret_of("dropped"), timeout_s=10))
    crashed.close()  # dies without cancelling: only its lease lapsing frees the frames
    assert producer.transfers == 1
    assert wait_until(lambda: producer.transfers == 0, timeout=FAST.lease_s + 1)
    assert producer.stats["evicted"] == 1 and producer.stats["bytes_freed"] == producer.stats["bytes_queued"]
    with pytest.raises(TransferRefused, match="stopped renewing"):
        received(consumer.fetch(producer.endpoint, "dropped", secret_of("dropped"), timeout_s=5))


def test_pull_from_a_token_skips_the_frames_the_consumer_holds(endpoints):
    producer, consumer = endpoints()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 150, 2, 16, generator=g).bfloat16()  # chunks [0,32) [32,64) [64,96) [96,128) [128,150)
    layers = [encode_layer(k, v, geometry=GEOMETRY, profile=PROFILE, layer=layer) for layer in range(2)]
    produce(producer, "turn2", [f for frames in layers for f in frames])
    stream = consumer.fetch(producer.endpoint, "turn2", secret_of("turn2"), timeout_s=10, from_token=70)
    wanted = [f for frames in layers for f in frames[2:]]  # frames holding tokens >= 70
    assert received(stream) == wanted
    assert stream.bytes_received == producer.stats["bytes_sent"] == sum(map(len, wanted))


def test_producer_dies(endpoints):
    _, consumer = endpoints(producer=False)
    dead = FrameProducer(FAST)
    stream = consumer.fetch(dead.endpoint, "lost", secret_of("lost"), timeout_s=30)
    dead.open("lost", secret_of("lost"))
    dead.put("lost", make_frames(1)[0])
    assert next(stream)
    dead.close()
    started = time.monotonic()
    with pytest.raises(PeerGone, match=r"answered none of \d+ pings .* \(no connection\)"):
        next(stream)
    assert time.monotonic() - started < FAST.peer_timeout_s + 1.5
    assert wait_until(lambda: consumer.open_streams == 0 and consumer.buffered_bytes == 0)


def test_a_stalled_consumer_thread_does_not_count_its_own_silence(endpoints):
    """A consumer's IO thread that could not run (a starved process, a held GIL) sent no pings; the
    producer's silence meanwhile is no sign of its death."""
    config = TransportConfig(**{**FAST.__dict__, "lease_s": 10.0})  # the producer waits out the stall
    producer, consumer = endpoints(config)
    frames = make_frames(2)
    producer.open("stalled", secret_of("stalled"))
    producer.put("stalled", frames[0])
    stream = consumer.fetch(producer.endpoint, "stalled", secret_of("stalled"), timeout_s=30)
    assert bytes(next(stream).data) == frames[0]
    consumer.call(lambda: time.sleep(config.peer_timeout_s * 3))
    time.sleep(config.peer_timeout_s * 3 + 0.5)
    produce(producer, "stalled", frames[1:])
    assert received(stream) == frames[1:]
    assert consumer.stats["failed_peer_gone"] == 0


def test_a_stalled_producer_thread_reads_the_heartbeats_before_it_evicts(endpoints):
    """The pings that queued while the producer's IO thread could not run renew the lease before it
    judges the transfer abandoned."""
    config = TransportConfig(**{**FAST.__dict__, "lease_s": 0.5, "peer_timeout_s": 5.0})  # the consumer waits
    producer, consumer = endpoints(config)
    frames = make_frames(2)
    producer.open("stalled", secret_of("stalled"))
    producer.put("stalled", frames[0])
    stream = consumer.fetch(producer.endpoint, "stalled", secret_of("stalled"), timeout_s=30)
    assert bytes(next(stream).data) == frames[0]
    producer.call(lambda: time.sleep(config.lease_s * 3))
    time.sleep(config.lease_s * 3 + 0.3)
    produce(producer, "stalled", frames[1:])
    assert received(stream) == frames[1:]
    assert producer.stats["evicted"] == 0


def test_producer_restart_is_detected_and_new_transfers_work(endpoints):
    _, consumer = endpoints(producer=False)
    first = FrameProducer(FAST)
    endpoint = first.endpoint
    frames = make_frames(3)
    first.open("before", secret_of("before"))
    first.put("before", frames[0])
    stream = consumer.fetch(endpoint, "before", secret_of("before"), timeout_s=30)
    assert bytes(next(stream).data) == frames[0]
    first.close()
    second = None
    while second is None:  # ZeroMQ releases the port asynchronously after close
        try:
            second = FrameProducer(TransportConfig(**{**FAST.__dict__, "bind": endpoint}))
        except zmq.ZMQError:
            time.sleep(0.05)
    try:
        with pytest.raises(PeerGone):
            next(stream)
        produce(second, "after", frames)
        assert received(consumer.fetch(endpoint, "after", secret_of("after"), timeout_s=10)) == frames
        assert_no_leaks(second, consumer)
    finally:
        second.close()


def test_consumer_restart_pulls_again_from_the_start(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(5)
    produce(producer, "resume", frames)
    crashed = FrameConsumer(FAST)
    assert bytes(next(crashed.fetch(producer.endpoint, "resume", secret_of("resume"), timeout_s=10)).data) == frames[0]
    crashed.close()  # dies without cancelling
    assert producer.transfers == 1  # the frames wait for the consumer to come back
    assert received(consumer.fetch(producer.endpoint, "resume", secret_of("resume"), timeout_s=10)) == frames


def test_corrupted_frame_is_caught_by_the_checksum(endpoints):
    producer, consumer = endpoints()
    frames = make_frames(3)
    damaged = bytearray(frames[1])
    damaged[len(damaged) // 2] ^= 0x10
    # all queued first: a consumer that met the damaged frame cancels the transfer, and a put after
    # that is refused (under load the test's own puts lost that race)
    produce(producer, "bitrot", [frames[0], bytes(damaged), frames[2]])
    stream = consumer.fetch(producer.endpoint, "bitrot", secret_of("bitrot"), timeout_s=10)
    got = []
    with pytest.raises(CorruptFrame, match="frame 1 of transfer bitrot: checksum"):
        for frame in stream:
            got.append(bytes(frame.data))
    assert got in ([], frames[:1])  # a failed transfer may drop what was not yet read; never a bad frame
    assert consumer.stats["failed_corrupt"] == 1


def test_oversized_frames_are_refused_on_both_sides(endpoints):
    small = TransportConfig(**{**FAST.__dict__, "max_frame_bytes": 1024})
    frames = make_frames(2)
    assert min(map(len, frames)) > 1024
    producer, _ = endpoints(consumer=False)
    _, consumer = endpoints(config=small, producer=False)
    produce(producer, "big", frames)
    with pytest.raises(TransferRefused, match="over the consumer's limit"):
        received(consumer.fetch(producer.endpoint, "big", secret_of("big"), timeout_s=10))
    assert wait_until(lambda: producer.transfers == 0 and consumer.open_streams == 0)
    strict, _ = endpoints(config=small, consumer=False)
    strict.open("big", secret_of("big"))
    with pytest.raises(TransferRefused, match="exceeds max_frame_bytes=1024"):
        strict.put("big", frames[0])
    assert strict.buffered_bytes == 0


def test_buffer_limit(endpoints):
    frames = make_frames(4)
    producer, _ = endpoints(
        config=TransportConfig(**{**FAST.__dict__, "max_buffer_bytes": 2 * len(frames[0])}), consumer=False
    )
    producer.open("a", secret_of("a"))
    producer.put("a", frames[0])
    producer.open("b", secret_of("b"))
    producer.put("b", frames[0])
    with pytest.raises(BufferFull):
        producer.open("c", secret_of("c"))
        producer.put("c", frames[0])
    producer.abort("a")
    producer.abort("b")
    assert wait_until(lambda: producer.buffered_bytes == 0 and producer.transfers == 0)


def test_malformed_messages_are_dropped_and_counted(endpoints):
    producer, consumer = endpoints()
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.linger = 0
    rogue.connect(producer.endpoint)
    for parts in (
        [b"XXXX", b"id"],
        [P.PULL],
        [P.PULL, b"id", b"short"],
        [P.CRED, b"x" * 200, P.U32.pack(1)],  # a transfer id longer than any
        [P.PING, b"extra"],
    ):
        rogue.send_multipart(parts)
    rogue.send_multipart([P.PULL, b"id", b"\0" * 5000])  # over MAX_CONTROL_PART: the link is cut
    assert wait_until(lambda: producer.stats["malformed"] >= 5)
    rogue.close()
    frames = make_frames(2)
    produce(producer, "still-works", frames)
    assert received(consumer.fetch(producer.endpoint, "still-works", secret_of("still-works"), timeout_s=10)) == frames
    assert producer.stats["internal_errors"] == 0


@pytest.fixture
def certificates(tmp_path):
    for name in ("server", "client", "stranger"):
        zmq.auth.create_certificates(tmp_path, name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((tmp_path / "client.key").read_bytes())
    return tmp_path


def _curve(certs, client: str) -> tuple[TransportConfig, TransportConfig]:
    server = transport_config_from_dict(
        {
            "heartbeat_s": 0.1,
            "peer_timeout_s": 0.8,
            "curve_secret_key_file": str(certs / "server.key_secret"),
            "curve_authorized_keys_dir": str(certs / "authorized"),
        }
    )
    consumer = transport_config_from_dict(
        {
            "heartbeat_s": 0.1,
            "peer_timeout_s": 0.8,
            "curve_secret_key_file": str(certs / f"{client}.key_secret"),
            "curve_server_public_key_file": str(certs / "server.key"),
        }
    )
    return server, consumer


def test_curve_serves_an_authorized_consumer(endpoints, certificates):
    server, client = _curve(certificates, "client")
    producer, _ = endpoints(config=server, consumer=False)
    _, consumer = endpoints(config=client, producer=False)
    frames = make_frames(3)
    produce(producer, "secret", frames)
    assert received(consumer.fetch(producer.endpoint, "secret", secret_of("secret"), timeout_s=10)) == frames
    assert wait_until(lambda: producer.transfers == 0)


@pytest.mark.parametrize("who", ["stranger", "plaintext"])
def test_curve_refuses_an_unauthorized_consumer(endpoints, certificates, who):
    server, client = _curve(certificates, "stranger")
    producer, _ = endpoints(config=server, consumer=False)
    _, consumer = endpoints(config=client if who == "stranger" else FAST, producer=False)
    frames = make_frames(2)
    produce(producer, "secret", frames)
    with pytest.raises((TransferRefused, PeerGone)):
        received(consumer.fetch(producer.endpoint, "secret", secret_of("secret"), timeout_s=10))
    assert producer.stats["frames_sent"] == 0
    assert wait_until(lambda: producer.stats["unauthenticated"] >= 1)
    producer.abort("secret")
    assert wait_until(lambda: producer.transfers == 0 and consumer.open_streams == 0)


@pytest.mark.parametrize(
    "data,field",
    [
        ({"bind": "127.0.0.1:5555"}, "transport.bind"),
        ({"credit_frames": 0}, "transport.credit_frames"),
        ({"ttl_s": -1}, "transport.ttl_s"),
        ({"heartbeat_s": 5, "peer_timeout_s": 2}, "transport.peer_timeout_s"),
        ({"curve_secret_key_file": "/nonexistent/key"}, "transport.curve_secret_key_file"),
        ({"curve_authorized_keys_dir": "/tmp"}, "transport.curve_secret_key_file"),
        ({"max_frame_byte": 1}, "transport.max_frame_byte"),
    ],
)
def test_transport_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        transport_config_from_dict(data, prefix="transport.")
    assert e.value.field == field


def test_credits_measure_the_goodput_while_the_reader_paces_the_transfer(endpoints):
    """A reader that takes 20 ms per frame is what a 20 ms-per-frame link looks like from the
    producer: the credits it returns while the producer waits for them measure that rate; and the
    backlog is every byte not yet credited back."""
    producer, consumer = endpoints()
    frames = make_frames(24)
    produce(producer, "paced", frames)
    assert producer.goodput_bytes_per_s is None and producer.backlog_bytes == sum(map(len, frames))
    for _ in consumer.fetch(producer.endpoint, "paced", secret_of("paced"), timeout_s=30):
        time.sleep(0.02)
    rate = len(frames[0]) / 0.02
    assert producer.goodput_bytes_per_s is not None
    assert 0.5 * rate < producer.goodput_bytes_per_s < 1.2 * rate, (producer.goodput_bytes_per_s, rate)
    assert wait_until(lambda: producer.backlog_bytes == 0)


def test_a_link_that_got_faster_raises_the_goodput_estimate(endpoints):
    """Frames that a slow reader paced set a low estimate; later frames are made slower than the
    reader takes them (nothing waits for credits, so nothing measures the link), and each credit
    raises the estimate a step."""
    producer, consumer = endpoints()
    produce(producer, "slow", make_frames(24))
    for _ in consumer.fetch(producer.endpoint, "slow", secret_of("slow"), timeout_s=30):
        time.sleep(0.02)
    slow = producer.goodput_bytes_per_s
    assert slow is not None
    for i in range(3):  # frames made slower than they are read: the producer never waits for credits
        stream = consumer.fetch(producer.endpoint, f"fast-{i}", secret_of(f"fast-{i}"), timeout_s=30)
        making = threading.Thread(target=produce, args=(producer, f"fast-{i}", make_frames(24, seed=i), 0.01))
        making.start()
        assert len(received(stream)) == 24
        making.join()
    assert 2 * slow < producer.goodput_bytes_per_s <= PROBE_MAX * slow, (slow, producer.goodput_bytes_per_s)


def test_a_consumer_fetches_a_published_basis_by_its_digest(endpoints):
    """What a decode does with frames coded in a basis it never had: ask their producer."""
    producer, consumer = endpoints()
    data = bytes(range(256)) * 1000
    producer.publish_basis(0x1234, data)
    assert consumer.fetch_basis(producer.endpoint, 0x1234, timeout_s=5) == data
    with pytest.raises(TransferRefused, match="no basis 0000000000005678 here"):
        consumer.fetch_basis(producer.endpoint, 0x5678, timeout_s=5)
    assert producer.stats["bases_sent"] == 1 and producer.stats["bases_refused"] == 1
    with pytest.raises(ValueError, match="exceeds max_frame_bytes"):
        producer.publish_basis(1, bytes(FAST.max_frame_bytes + 1))


def test_a_basis_fetch_from_a_silent_producer_times_out(endpoints):
    _, consumer = endpoints(producer=False)
    with pytest.raises(TransportTimeout, match=r"sent no basis 0000000000000007 in 0.5 s"):
        consumer.fetch_basis(f"tcp://127.0.0.1:{free_ports()}", 7, timeout_s=0.5)
