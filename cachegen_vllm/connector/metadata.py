"""What the connector's scheduler side tells its worker side each step (`CacheGenMetadata`), and
the two shapes of a request's ``kv_transfer_params`` that it reads and writes.

``kv_transfer_params`` is the contract with whatever routes requests (our proxy, a P/D router):

- to a prefill instance, ``{"do_remote_decode": true, "transfer_id": ID}`` (`RemoteDecode`): save
  this request's KV under ID. Without a ``transfer_id`` (what vLLM's P/D routers send, the
  NixlConnector's convention) the prefill makes one up, unique across instances and restarts;
- from it, and then to a decode instance, ``{"do_remote_prefill": true, "transfer_id": ID,
  "producer": ENDPOINT, "producer_tp": P, "num_tokens": N}`` (`RemotePrefill`): load the KV of the
  prompt's first N tokens from the P tensor-parallel ranks whose first listens at ENDPOINT
  (`connector.ranks`; ``producer_tp`` absent: 1). ``num_tokens`` is absent when the proxy starts
  the decode leg before the prefill has answered (overlapped legs); frames then carry what was
  computed.

Transfers are keyed by ``transfer_id``, never by vLLM's request ids, which differ per instance.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from cachegen_vllm.transport.protocol import MAX_TRANSFER_ID


class ParamsError(ValueError):
    """A request's ``kv_transfer_params`` ask for a transfer but cannot describe one; the message
    names the field."""


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _transfer_id(params: dict[str, Any]) -> str:
    value = params.get("transfer_id")
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_TRANSFER_ID:
        raise ParamsError(
            f"kv_transfer_params.transfer_id must be a string of 1..{MAX_TRANSFER_ID} bytes; got {value!r}"
        )
    return value


@dataclass(frozen=True)
class RemoteDecode:
    """A prefill request whose KV a decode instance will load."""

    transfer_id: str | None  # None: the router left it to the prefill (`new_transfer_id`)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RemoteDecode | None:
        """None unless the params ask for a remote decode; ParamsError if they cannot."""
        if not params or not params.get("do_remote_decode"):
            return None
        return cls(_transfer_id(params) if params.get("transfer_id") is not None else None)


def new_transfer_id() -> str:
    """A transfer id no other request of any instance, before or after a restart, has: 122 random bits."""
    return f"cg-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class RemotePrefill:
    """A decode request whose prompt's KV waits at a producer."""

    transfer_id: str
    producer: str  # the ZeroMQ endpoint of the producer's first tensor-parallel rank
    num_tokens: int | None  # the prompt's tokens the producer has; None: not known yet
    producer_tp: int = 1  # the producer's tensor-parallel ranks
    kv_tokens_per_s: float | None = None  # the producer's estimate: prompt tokens/s its KV reaches a decode at

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RemotePrefill | None:
        """None unless the params ask for a remote prefill; ParamsError if they cannot."""
        if not params or not params.get("do_remote_prefill"):
            return None
        producer = params.get("producer")
        if not isinstance(producer, str) or not producer.startswith(("tcp://", "ipc://")):
            raise ParamsError(
                f"kv_transfer_params.producer must be a ZeroMQ endpoint like tcp://HOST:PORT; got {producer!r}"
            )
        num_tokens = params.get("num_tokens")
        if num_tokens is not None and not _positive(num_tokens):
            raise ParamsError(f"kv_transfer_params.num_tokens must be a positive integer; got {num_tokens!r}")
        producer_tp = params.get("producer_tp", 1)
        if not _positive(producer_tp) or producer_tp > 1024:
            raise ParamsError(f"kv_transfer_params.producer_tp must be an integer in 1..1024; got {producer_tp!r}")
        link = params.get("kv_tokens_per_s")
        if link is not None and (isinstance(link, bool) or not isinstance(link, (int, float)) or not link > 0):
            raise ParamsError(f"kv_transfer_params.kv_tokens_per_s must be a positive number; got {link!r}")
        return cls(_transfer_id(params), producer, num_tokens, producer_tp, link)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "transfer_id": self.transfer_id,
            "producer": self.producer,
            "producer_tp": self.producer_tp,
        }
        if self.num_tokens is not None:
            params["num_tokens"] = self.num_tokens
        if self.kv_tokens_per_s is not None:
            params["kv_tokens_per_s"] = self.kv_tokens_per_s
        return params


@dataclass(frozen=True)
class SaveRequest:
    """Tokens ``[start, end)`` of a prompt of ``total`` tokens were computed this step: send them."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    start: int
    end: int
    total: int


@dataclass(frozen=True)
class LoadRequest:
    """Fetch tokens ``[start, start + count)`` of a transfer into these blocks."""

    req_id: str
    transfer_id: str
    producer: str
    block_ids: list[int]
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
