"""The ``kv_transfer_params`` contract between whatever routes requests (our proxy, a P/D router)
and the connector, in plain Python: the proxy and the connector both read and write it here.

- To a prefill instance, ``{"do_remote_decode": true, "transfer_id": ID, "transfer_secret": S}``
  (`RemoteDecode`): save this request's KV under ID, for readers that know S. Without them (what
  vLLM's P/D routers send, the NixlConnector's convention) the prefill makes them up
  (`new_transfer_id`, `new_transfer_secret`): an id unique across instances and restarts, 128
  random bits of secret.
- From it, and then to a decode instance, ``{"do_remote_prefill": true, "transfer_id": ID,
  "transfer_secret": S, "producer": ENDPOINT, "producer_tp": P, "num_tokens": N,
  "kv_tokens_per_s": R}`` (`RemotePrefill`): load the KV of the prompt's first N tokens from the P
  tensor-parallel ranks whose first listens at ENDPOINT (``producer_tp`` absent: 1), proving S.
  ``num_tokens`` is absent when the proxy starts the decode leg before the prefill has answered
  (overlapped legs); frames then carry what was computed. ``kv_tokens_per_s``: the producer's
  estimate of the prompt tokens per second its KV reaches a decode at, which a decode compares
  with its own prefill rate.

Transfers are keyed by ``transfer_id``, never by vLLM's request ids, which differ per instance. The
secret is what binds a transfer to its readers (`transport.protocol`): whoever holds only an id
reads and ends nothing. Every field is checked here, where the params enter: a bad one is a
`ParamsError` naming it, and the request is recomputed.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

MAX_TRANSFER_ID = 128  # bytes of a transfer id, in params and on the wire
SECRET_HEX = 32  # a transfer secret's hex digits: 16 bytes on the wire
MAX_PRODUCER_TP = 1024
# what a producer may be: tcp://HOST:PORT (a name, IPv4, or [IPv6]) or ipc://PATH; nothing else
# ZeroMQ would read (a source address, wildcards)
TCP_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})")
IPC_ENDPOINT = re.compile(r"ipc://[^\x00;*]{1,200}")


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


def _secret(params: dict[str, Any]) -> str:
    value = params.get("transfer_secret")
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{SECRET_HEX}}}", value):
        raise ParamsError(f"kv_transfer_params.transfer_secret must be {SECRET_HEX} lowercase hex digits")
    return value


def check_producer(endpoint: Any, ranks: int) -> str:
    """``endpoint`` if ZeroMQ can connect to it and ``ranks`` ranks can follow it (the next ports:
    `connector.ranks`); ParamsError naming the field otherwise."""
    if isinstance(endpoint, str) and IPC_ENDPOINT.fullmatch(endpoint):
        return endpoint
    match = TCP_ENDPOINT.fullmatch(endpoint) if isinstance(endpoint, str) else None
    if match is None:
        raise ParamsError(
            f"kv_transfer_params.producer must be a ZeroMQ endpoint like tcp://HOST:PORT; got {endpoint!r}"
        )
    port = int(match.group(2))
    if not 0 < port <= 65536 - ranks:
        raise ParamsError(f"kv_transfer_params.producer: port {port} has no room for {ranks} ranks' ports")
    return endpoint


def new_transfer_id() -> str:
    """A transfer id no other request of any instance, before or after a restart, has: 122 random bits."""
    return f"cg-{uuid.uuid4().hex}"


def new_transfer_secret() -> str:
    """What a transfer's readers prove (hex): 128 random bits."""
    return secrets.token_hex(SECRET_HEX // 2)


@dataclass(frozen=True)
class RemoteDecode:
    """A prefill request whose KV a decode instance will load."""

    transfer_id: str | None  # None: the router left it to the prefill (`new_transfer_id`)
    secret: str | None = None  # None: the prefill makes one up (`new_transfer_secret`)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RemoteDecode | None:
        """None unless the params ask for a remote decode; ParamsError if they cannot."""
        if not params or not params.get("do_remote_decode"):
            return None
        transfer_id = _transfer_id(params) if params.get("transfer_id") is not None else None
        secret = _secret(params) if params.get("transfer_secret") is not None else None
        return cls(transfer_id, secret)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"do_remote_decode": True}
        if self.transfer_id is not None:
            params["transfer_id"] = self.transfer_id
        if self.secret is not None:
            params["transfer_secret"] = self.secret
        return params


@dataclass(frozen=True)
class RemotePrefill:
    """A decode request whose prompt's KV waits at a producer."""

    transfer_id: str
    secret: str  # hex: what its readers prove to the producer
    producer: str  # the ZeroMQ endpoint of the producer's first tensor-parallel rank
    num_tokens: int | None  # the prompt's tokens the producer has; None: not known yet
    producer_tp: int = 1  # the producer's tensor-parallel ranks
    kv_tokens_per_s: float | None = None  # the producer's estimate: prompt tokens/s its KV reaches a decode at

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RemotePrefill | None:
        """None unless the params ask for a remote prefill; ParamsError if they cannot."""
        if not params or not params.get("do_remote_prefill"):
            return None
        num_tokens = params.get("num_tokens")
        if num_tokens is not None and not _positive(num_tokens):
            raise ParamsError(f"kv_transfer_params.num_tokens must be a positive integer; got {num_tokens!r}")
        producer_tp = params.get("producer_tp", 1)
        if not _positive(producer_tp) or producer_tp > MAX_PRODUCER_TP:
            raise ParamsError(
                f"kv_transfer_params.producer_tp must be an integer in 1..{MAX_PRODUCER_TP}; got {producer_tp!r}"
            )
        producer = check_producer(params.get("producer"), producer_tp)
        link = params.get("kv_tokens_per_s")
        if link is not None and (
            isinstance(link, bool) or not isinstance(link, (int, float)) or not 0 < link < float("inf")
        ):
            raise ParamsError(f"kv_transfer_params.kv_tokens_per_s must be a positive number; got {link!r}")
        return cls(_transfer_id(params), _secret(params), producer, num_tokens, producer_tp, link)

    @property
    def place(self) -> tuple[str, int]:
        """Where the KV waits: the producer's first rank and its tensor-parallel size."""
        return self.producer, self.producer_tp

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "transfer_id": self.transfer_id,
            "transfer_secret": self.secret,
            "producer": self.producer,
            "producer_tp": self.producer_tp,
        }
        if self.num_tokens is not None:
            params["num_tokens"] = self.num_tokens
        if self.kv_tokens_per_s is not None:
            params["kv_tokens_per_s"] = self.kv_tokens_per_s
        return params
