"""The transport's options, the same dataclass on both sides; `cachegen_vllm.config` parses and
validates them from a connector's ``kv_connector_extra_config``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransportConfig:
    """Options of the ZeroMQ transport (cachegen_vllm.transport), the same on both sides."""

    bind: str = "tcp://127.0.0.1:0"  # producer: where to listen; loopback unless told otherwise
    max_buffer_bytes: int = 2 << 30  # producer: frames held for consumers, all transfers together
    max_frame_bytes: int = 64 << 20  # larger frames are refused by the producer and the consumer
    credit_frames: int = 16  # consumer: frames a transfer may have in flight or unread
    ttl_s: float = 60.0  # producer: a transfer no consumer has pulled is evicted after this
    lease_s: float = (
        15.0  # producer: a pulled transfer whose consumer stops renewing it (heartbeats) is evicted after this
    )
    heartbeat_s: float = 1.0  # consumer: how often it pings the producers it waits on
    peer_timeout_s: float = 10.0  # consumer: silence after which a producer counts as gone
    # CurveZMQ (zmq.auth certificate files). Producer: its secret certificate and a directory of
    # the consumers' public certificates it accepts. Consumer: its secret certificate and the
    # producer's public certificate. All unset: no encryption, any peer that reaches the port is
    # served (keep `bind` on loopback or a private network then).
    curve_secret_key_file: str | None = None
    curve_server_public_key_file: str | None = None
    curve_authorized_keys_dir: str | None = None

    @property
    def curve(self) -> bool:
        return self.curve_secret_key_file is not None
