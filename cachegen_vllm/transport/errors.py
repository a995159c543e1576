"""Typed transport errors, so that the connector can choose what to do (e.g. recompute)."""


class TransportError(Exception):
    """Base of every transport failure. ``kind`` names it in metrics."""

    kind = "transport"


class TransportTimeout(TransportError):
    """The deadline passed before the transfer completed."""

    kind = "timeout"


class PeerGone(TransportError):
    """The producer stopped answering heartbeats, or restarted and lost the transfer."""

    kind = "peer_gone"


class CorruptFrame(TransportError):
    """A frame failed to read: its length, checksum or a header field is wrong."""

    kind = "corrupt"


class TransferRefused(TransportError):
    """The producer will not serve the transfer: cancelled, evicted, too large, or not authorized."""

    kind = "refused"


class BufferFull(TransportError):
    """The producer's frame buffer is at its limit."""

    kind = "buffer_full"
