"""ZeroMQ streaming of compressed KV frames from prefill (producer) to decode (consumer).

Independent of vLLM. Frames are the codec's (docs/FORMAT.md); the consumer reads each once as it
arrives (checksum and header, `codec.read_frame`) and hands it on read, but never decodes it. See
`protocol` for the messages.
"""

from cachegen_vllm.transport.consumer import FrameConsumer, TransferStream
from cachegen_vllm.transport.errors import (
    BufferFull,
    CorruptFrame,
    PeerGone,
    TransferRefused,
    TransportError,
    TransportTimeout,
)
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
