"""What the connector's scheduler side tells its worker side each step (`CacheGenMetadata`): the
ranges of prompts to save, the loads to start, and what to cancel or drop. The
``kv_transfer_params`` these come from are `cachegen_vllm.params`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class SaveRequest:
    """Tokens ``[start, end)`` of a prompt of ``total`` tokens were computed this step: send them.
    ``block_ids``: the request's blocks in each KV cache group (vLLM's ``get_block_ids()``)."""

    req_id: str
    transfer_id: str
    secret: str  # hex: what the transfer's readers prove
    block_ids: tuple[list[int], ...]
    start: int
    end: int
    total: int


@dataclass(frozen=True)
class LoadRequest:
    """Fetch tokens ``[start, start + count)`` of a transfer into these blocks (per KV cache group;
    a sliding window's blocks before its window are vLLM's null block, never written)."""

    req_id: str
    transfer_id: str
    secret: str  # hex: what this reader proves to the producer
    producer: str
    block_ids: tuple[list[int], ...]
    start: int
    count: int
    producer_tp: int = 1


@dataclass
class CacheGenMetadata(KVConnectorMetadata):
    saves: list[SaveRequest] = field(default_factory=list)
    loads: list[LoadRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # requests aborted while their KV was loading
    aborted: list[str] = field(default_factory=list)  # transfers whose prefill request was aborted: drop them
    declined: list[LoadRequest] = field(default_factory=list)  # transfers the decode recomputes instead: cancel
    preempted: list[str] = field(default_factory=list)  # requests whose blocks vLLM frees before this step
    idle: bool = False  # the step computes no token: the engine only waits, for loads among other things
