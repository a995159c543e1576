import itertools

from cachegen_vllm.codec import Segment, chunk_bounds, plan_segments
from cachegen_vllm.codec.allocation import token_widths
from cachegen_vllm.config import profile_from_dict

PROFILE = profile_from_dict(
    {
        "chunk_tokens": 100,
        "group_tokens": 10,
        "bits": {
            "key": 3,
            "value": 2,
            "layers": [{"first": 0, "last": 1, "key": 6, "value": 5}],
            "recent": [{"tokens": 50, "key": 4, "value": 4}, {"tokens": 5, "key": 16, "value": 16}],
            "sink": [{"tokens": 2, "key": 16, "value": 8}],
        },
    },
    "test",
)


def test_layer_overrides_and_recent_tiers():
    assert token_widths(PROFILE, 5, 10, 1000) == (3, 2)
    assert token_widths(PROFILE, 0, 10, 1000) == (6, 5)
    assert token_widths(PROFILE, 5, 950, 1000) == (4, 4)  # 49 tokens from the end
    assert token_widths(PROFILE, 5, 949, 1000) == (3, 2)  # 50 tokens from the end
    assert token_widths(PROFILE, 0, 960, 1000) == (6, 5)  # the tier never lowers a layer's width
    assert token_widths(PROFILE, 5, 995, 1000) == (16, 16)
    assert token_widths(PROFILE, 5, 999, 1000) == (16, 16)
    assert token_widths(PROFILE, 5, 1, 1000) == (16, 8)  # a sink token
    assert token_widths(PROFILE, 5, 2, 1000) == (3, 2)
    assert token_widths(PROFILE, 5, 1, 3) == (16, 16)  # sink and recent at once: the wider of both


def test_segments_split_at_tier_boundaries_and_cover_the_range():
    assert plan_segments(PROFILE, 5, 900, 100, 1000) == [Segment(50, 3, 2), Segment(45, 4, 4), Segment(5, 16, 16)]
    assert plan_segments(PROFILE, 5, 0, 100, 1000) == [Segment(2, 16, 8), Segment(98, 3, 2)]
    assert plan_segments(PROFILE, 5, 100, 100, 1000) == [Segment(100, 3, 2)]
    # layer 0 keeps 6/5 bits until the exact tier; equal runs merge
    assert plan_segments(PROFILE, 0, 900, 100, 1000) == [Segment(95, 6, 5), Segment(5, 16, 16)]
    for start, count, total in [(0, 1000, 1000), (993, 7, 1000), (123, 456, 1000), (0, 4, 4), (1, 30, 31)]:
        for layer in range(3):
            segments = plan_segments(PROFILE, layer, start, count, total)
            assert sum(s.tokens for s in segments) == count
            widths = [w for s in segments for w in [(s.key_bits, s.value_bits)] * s.tokens]
            assert widths == [token_widths(PROFILE, layer, p, total) for p in range(start, start + count)]
            runs = [(s.key_bits, s.value_bits) for s in segments]
            assert all(a != b for a, b in itertools.pairwise(runs))


def test_chunks_align_to_absolute_positions():
    assert chunk_bounds(PROFILE, 0, 250) == [(0, 100), (100, 100), (200, 50)]
    assert chunk_bounds(PROFILE, 130, 100) == [(130, 70), (200, 30)]
    assert chunk_bounds(PROFILE, 5, 0) == []
