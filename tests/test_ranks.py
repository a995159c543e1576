"""Tensor parallelism's arithmetic: the heads a rank holds, the producer ranks a decode rank reads
and its place among their readers, and each rank's endpoint."""

import pytest
import torch

from cachegen_vllm.codec import KVGeometry
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.connector.ranks import Placement, Source, rank_endpoint, sources


def test_ranks_hold_consecutive_heads_or_share_one():
    assert [rank_heads(3, 3, r) for r in range(3)] == [(0, 1), (1, 1), (2, 1)]
    assert rank_heads(3, 1, 0) == (0, 3)
    assert [rank_heads(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [rank_heads(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]  # replicated, as vLLM does
    with pytest.raises(ValueError, match="cannot hold a share of 3"):
        rank_heads(3, 2, 0)


@pytest.mark.parametrize(
    "heads,producer_tp,decode_tp,expected",
    [
        (3, 1, 3, [[Source(0, 0, 3)], [Source(0, 1, 3)], [Source(0, 2, 3)]]),  # all read the one producer
        (3, 3, 1, [[Source(0, 0, 1), Source(1, 0, 1), Source(2, 0, 1)]]),  # one decode reads them all
        (3, 3, 3, [[Source(r, 0, 1)] for r in range(3)]),  # like to like
        (4, 2, 4, [[Source(0, 0, 2)], [Source(0, 1, 2)], [Source(1, 0, 2)], [Source(1, 1, 2)]]),
        (2, 4, 1, [[Source(0, 0, 1), Source(2, 0, 1)]]),  # replicated heads are read from their first holder
        (2, 1, 4, [[Source(0, i, 4)] for i in range(4)]),  # and a replicated decode rank still reads its own
    ],
)
def test_each_decode_rank_reads_the_producer_ranks_that_hold_its_heads(heads, producer_tp, decode_tp, expected):
    assert [sources(heads, producer_tp, decode_tp, r) for r in range(decode_tp)] == expected


def test_a_producer_split_the_model_cannot_have_is_refused():
    with pytest.raises(ValueError, match="cannot hold a share of 3"):
        sources(3, 2, 1, 0)


def test_each_rank_of_each_engine_has_its_own_endpoint():
    assert Placement(tp_size=3, tp_rank=2, dp_index=1).offset == 5
    assert rank_endpoint("tcp://10.0.0.5:5601", 5) == "tcp://10.0.0.5:5606"
    assert rank_endpoint("tcp://[::1]:5601", 1) == "tcp://[::1]:5602"
    assert rank_endpoint("ipc:///tmp/cachegen", 2) == "ipc:///tmp/cachegen.2"
    assert rank_endpoint("tcp://h:5601", 0) == "tcp://h:5601"
    with pytest.raises(ValueError, match="no port"):
        rank_endpoint("tcp://h:65535", 1)


def test_a_share_of_the_heads_is_the_same_model():
    whole = KVGeometry(30, 3, 64, torch.bfloat16, model="m")
    rank = whole.shard(2, 1)
    assert rank.fingerprint == whole.fingerprint and rank.total_kv_heads == 3 and rank.channels == 64
    assert rank.heads == slice(2, 3)
    with pytest.raises(ValueError, match=r"heads \[2, 4\) are not a share of the model's 3"):
        whole.shard(2, 2)
