"""ZeroMQ streaming of compressed KV frames from prefill (producer) to decode (consumer).

Independent of vLLM. Frames are the codec's (docs/FORMAT.md); the consumer reads each once as it
arrives (checksum and header, `codec.read_frame`) and hands it on read, but never decodes it. See
`protocol` for the messages.

The producer and the consumer are imported when first named, so that the transport's options
(`config`) and errors load where pyzmq is not installed (a GPU box that runs the kernels' checks).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from cachegen_vllm.transport.errors import (
    BufferFull,
    CorruptFrame,
    PeerGone,
    TransferRefused,
    TransportError,
    TransportTimeout,
)

if TYPE_CHECKING:
    from cachegen_vllm.transport.consumer import FrameConsumer, TransferStream
    from cachegen_vllm.transport.producer import FrameProducer

__all__ = [
    "BufferFull",
    "CorruptFrame",
    "FrameConsumer",
    "FrameProducer",
    "PeerGone",
    "TransferRefused",
    "TransferStream",
    "TransportError",
    "TransportTimeout",
]
_LAZY = {"FrameConsumer": "consumer", "TransferStream": "consumer", "FrameProducer": "producer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
