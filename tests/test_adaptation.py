"""The level choice as a unit: given measured rates, it picks what its model says."""

import math

import pytest

from cachegen_vllm.adaptation import (
    SLACK,
    Adapter,
    Conditions,
    Ewma,
    Level,
    choose,
    finish_seconds,
    kv_tokens_per_s,
    should_recompute,
)

MB = 1e6
LAYER = 768 * 1024  # raw bytes of one layer of a 1K-token prompt on the embedded model (3 KV heads)
# ratios and encode rates of the shape measured on the embedded model's CPU prefill
LADDER = [
    Level("raw", 1.0, math.inf),
    Level("high-quality", 0.53, 200 * MB),
    Level("default", 0.29, 100 * MB),
    Level("basis", 0.17, 20 * MB),
]


def link(mbit_per_s: float, backlog: float = 0.0, production: float = 25 * MB, cpu: bool = True) -> Conditions:
    return Conditions(mbit_per_s * 1e6 / 8, backlog, production, cpu)


def picked(now: Conditions, layers_left: int = 30) -> str:
    return LADDER[choose(LADDER, LAYER, layers_left, now)[0]].name


def test_a_fast_link_sends_raw():
    assert picked(link(10_000)) == "raw"
    assert picked(link(math.inf)) == "raw"  # a link not measured yet counts as fast


def test_a_very_slow_link_sends_the_floor():
    assert picked(link(1)) == "basis"
    assert picked(link(1), layers_left=1) == "basis"


def test_between_them_the_middle_levels():
    assert picked(link(100)) == "high-quality"  # CPU: encoding holds the forward pass
    assert picked(link(50)) == "default"


def test_encoding_that_holds_the_forward_pass_costs_more_than_on_its_own_stream():
    """On a GPU the encoder overlaps the prefill: at 180 Mbit/s compression pays there, not on a CPU."""
    assert picked(link(180, cpu=True)) == "raw"
    assert picked(link(180, cpu=False)) == "high-quality"


def test_bytes_already_queued_push_towards_smaller_frames():
    assert picked(link(1000)) == "raw"
    assert picked(link(1000, backlog=200 * MB)) != "raw"


def test_the_estimate_is_the_slower_of_production_and_link():
    level, now = LADDER[2], link(100)
    encode, wire = LAYER / level.encode_bytes_per_s, LAYER * level.wire_ratio / now.link_bytes_per_s
    make = LAYER / now.production_bytes_per_s
    production = 9 * (make + encode) + encode + wire
    link_bound = encode + 10 * wire
    assert finish_seconds(level, LAYER, 10, now) == pytest.approx(max(production, link_bound))


def test_a_more_compressed_level_must_win_by_more_than_the_slack():
    same = [Level("a", 1.0, math.inf), Level("b", 1.0, math.inf)]
    assert choose(same, LAYER, 5, link(100))[0] == 0
    index, (raw, hq, default, _) = choose(LADDER, LAYER, 30, link(180, cpu=False))
    assert default < hq < default * (1 + SLACK[0]) < raw  # default is best, high-quality as good: taken
    assert LADDER[index].name == "high-quality"
    tiny = 1024  # a few tokens on an unmeasured link: every level is over within the absolute slack
    assert choose(LADDER, tiny, 1, link(math.inf))[0] == 0


def test_choose_refuses_nothing_to_choose_from():
    with pytest.raises(ValueError, match="layers_left"):
        choose(LADDER, LAYER, 0, link(100))


def test_recompute_when_the_link_brings_tokens_slower_than_the_decode_computes_them():
    assert should_recompute(kv_tokens_per_s=400, prefill_tokens_per_s=1500)
    assert not should_recompute(kv_tokens_per_s=4000, prefill_tokens_per_s=1500)


def test_ewma_ignores_samples_that_say_nothing():
    mean = Ewma(weight=0.5)
    assert mean.value is None
    mean.update(0.0)
    mean.update(math.inf)
    assert mean.value is None
    mean.update(10.0)
    mean.update(20.0)
    assert mean.value == 15.0


def test_the_adapter_starts_from_its_priors_and_follows_its_measurements():
    adapter = Adapter(["raw", "default"], [(math.inf, 1.0), (100 * MB, 0.3)], encode_holds_compute=True)
    assert [lv.wire_ratio for lv in adapter.levels()] == [1.0, 0.3]
    adapter.encoded(1, raw_bytes=LAYER, wire_bytes=LAYER // 2, seconds=LAYER / (10 * MB))
    # one slow sample moves the start-up estimate 30% of the way, it does not replace it
    assert adapter.levels()[1] == Level("default", pytest.approx(0.36), pytest.approx(73 * MB))
    for _ in range(30):
        adapter.encoded(1, raw_bytes=LAYER, wire_bytes=LAYER // 2, seconds=LAYER / (10 * MB))
    assert adapter.levels()[1] == Level("default", pytest.approx(0.5, rel=1e-3), pytest.approx(10 * MB, rel=1e-3))
    adapter.encoded(0, raw_bytes=LAYER, wire_bytes=LAYER, seconds=LAYER / (500 * MB))
    assert adapter.levels()[0].encode_bytes_per_s == pytest.approx(500 * MB)  # no finite prior: measured
    now = adapter.conditions(None, 0)
    assert now.link_bytes_per_s == math.inf and now.production_bytes_per_s == math.inf
    adapter.produced(LAYER, 0.01)
    assert adapter.conditions(5 * MB, 0).production_bytes_per_s == pytest.approx(LAYER / 0.01)
    assert adapter.conditions(5 * MB, 0).link_bytes_per_s == 5 * MB
    fixed = Adapter(["raw"], [(math.inf, 1.0)], False, fixed_link_bytes_per_s=1 * MB)
    assert fixed.conditions(5 * MB, 0).link_bytes_per_s == 1 * MB  # configured: the measurement is ignored


def test_kv_arrives_at_the_slower_of_its_making_and_its_crossing():
    # link: 1000 B/s over 10 wire bytes per token = 100 tokens/s; prefill: 5000 B/s over 20 raw = 250
    assert kv_tokens_per_s(1000.0, 10.0, 5000.0, 20.0) == 100.0
    assert kv_tokens_per_s(None, 10.0, 5000.0, 20.0) == 250.0  # the link not measured yet
    assert kv_tokens_per_s(None, 10.0, None, 20.0) is None


def test_a_levels_start_up_rate_is_its_fastest_encode_not_one_slowed_by_a_neighbour(monkeypatch):
    """The priors are measured while other processes start on the same cores: one run that loses
    a time slice made raw look slower than quantizing on a 100 Gbit/s link, for good (a level
    never picked is never measured again). The fastest of several runs is the rate."""
    import time

    import torch

    from cachegen_vllm.codec import KVGeometry
    from cachegen_vllm.config import load_profile
    from cachegen_vllm.paged import PagedCaches, encoding

    geometry = KVGeometry(1, 2, 64, torch.bfloat16)
    cache = torch.zeros(2, 2, 64, 128, dtype=torch.bfloat16)
    real, calls = encoding.encode, []

    def first_run_stalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode", first_run_stalled)
    seconds, wire = encoding.time_encode(PagedCaches({0: cache}, None, geometry), load_profile("raw"), 64)
    assert len(calls) >= 3 and seconds < 0.025
    assert wire > geometry.layer_bytes(64)  # raw: the tokens' bytes and a header
