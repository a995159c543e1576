"""Tensor and data parallelism: where each rank's producer listens, and which producer ranks a
decode rank reads.

Every rank of a prefill instance holds its share of the KV heads (`codec.geometry.rank_heads`)
and sends it from a producer of its own, bound to the configured endpoint's port plus
``data_parallel_index * tp_size + tp_rank`` (an ``ipc://`` path gets that offset as a suffix),
the numbering NIXL's side channel uses for engines. Where there are more ranks than heads, a head
is sent only by the first rank that holds it. A finished prefill request's params name the
endpoint of its engine's first rank and the engine's ``tp_size``; a decode rank derives the
others, and pulls each head it holds from the first producer rank holding that head, as one of
the readers that producer rank expects for the transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachegen_vllm.codec.geometry import rank_heads


@dataclass(frozen=True)
class Placement:
    """This rank's place in its instance: vLLM's tensor-parallel size and rank, and its engine's
    data-parallel index."""

    tp_size: int = 1
    tp_rank: int = 0
    dp_index: int = 0

    @property
    def engine_offset(self) -> int:
        """The endpoint offset of this engine's first rank."""
        return self.dp_index * self.tp_size

    @property
    def offset(self) -> int:
        """This rank's endpoint offset."""
        return self.engine_offset + self.tp_rank


def rank_endpoint(endpoint: str, offset: int) -> str:
    """The endpoint ``offset`` ranks after ``endpoint``: the next ports for tcp, suffixed paths for ipc."""
    if offset == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint.rpartition(":")
        if not port.isdigit() or not 0 < int(port) + offset < 65536:
            raise ValueError(f"{endpoint} has no port that {offset} more ranks can follow")
        return f"{host}:{int(port) + offset}"
    return f"{endpoint}.{offset}"


def first_holder(head: int, total_kv_heads: int, tp_size: int) -> int:
    """The lowest rank of a ``tp_size`` instance that holds ``head``."""
    if tp_size <= total_kv_heads:
        return head // (total_kv_heads // tp_size)
    return head * (tp_size // total_kv_heads)


def _read_by(total_kv_heads: int, producer_tp: int, decode_tp: int, decode_rank: int) -> list[int]:
    start, count = rank_heads(total_kv_heads, decode_tp, decode_rank)
    return sorted({first_holder(h, total_kv_heads, producer_tp) for h in range(start, start + count)})


@dataclass(frozen=True)
class Source:
    """A producer rank a decode rank reads: it is reader ``reader`` of the ``readers`` that one has."""

    producer_rank: int
    reader: int
    readers: int


def sources(total_kv_heads: int, producer_tp: int, decode_tp: int, decode_rank: int) -> list[Source]:
    """The producer ranks that hold the heads of ``decode_rank``, and its place among their readers."""
    rank_heads(total_kv_heads, producer_tp, 0)  # raises if the model cannot be split that way
    readers: dict[int, list[int]] = {}
    for rank in range(decode_tp):
        for producer_rank in _read_by(total_kv_heads, producer_tp, decode_tp, rank):
            readers.setdefault(producer_rank, []).append(rank)
    return [
        Source(p, readers[p].index(decode_rank), len(readers[p]))
        for p in _read_by(total_kv_heads, producer_tp, decode_tp, decode_rank)
    ]
