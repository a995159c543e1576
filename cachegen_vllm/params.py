"""The ``kv_transfer_params`` contract between whatever routes requests (our proxy, a P/D router)
and the connector, in plain Python: the proxy and the connector both read and write it here.

- To a prefill instance, ``{"do_remote_decode": true, "transfer_id": ID}`` (`RemoteDecode`): save
  this request's KV under ID. Without a ``transfer_id`` (what vLLM's P/D routers send, the
  NixlConnector's convention) the prefill makes one up (`new_transfer_id`), unique across
  instances and restarts.
- From it, and then to a decode instance, ``{"do_remote_prefill": true, "transfer_id": ID,
  "producer": ENDPOINT, "producer_tp": P, "num_tokens": N, "kv_tokens_per_s": R}``
  (`RemotePrefill`): load the KV of the prompt's first N tokens from the P tensor-parallel ranks
  whose first listens at ENDPOINT (``producer_tp`` absent: 1). ``num_tokens`` is absent when the
  proxy starts the decode leg before the prefill has answered (overlapped legs); frames then carry
  what was computed. ``kv_tokens_per_s``: the producer's estimate of the prompt tokens per second
  its KV reaches a decode at, which a decode compares with its own prefill rate.

Transfers are keyed by ``transfer_id``, never by vLLM's request ids, which differ per instance.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

MAX_TRANSFER_ID = 128  # bytes of a transfer id, in params and on the wire


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


def new_transfer_id() -> str:
    """A transfer id no other request of any instance, before or after a restart, has: 122 random bits."""
    return f"cg-{uuid.uuid4().hex}"


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

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"do_remote_decode": True}
        if self.transfer_id is not None:
            params["transfer_id"] = self.transfer_id
        return params


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

    @property
    def place(self) -> tuple[str, int]:
        """Where the KV waits: the producer's first rank and its tensor-parallel size."""
        return self.producer, self.producer_tp

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
