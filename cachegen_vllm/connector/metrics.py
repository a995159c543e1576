"""Transfer metrics through vLLM's KVConnectorStats, exported on vLLM's /metrics.

Workers count per event and sample per transfer (`Counters`); vLLM ships the stats to its logger process,
gathers them across workers and ranks (`aggregate`), logs a summary (`reduce`) and feeds
Prometheus (`CacheGenPromMetrics`): ``vllm:cachegen_<counter>_total``, the histograms
``vllm:cachegen_<name>_seconds`` and ``vllm:cachegen_failures_total{kind=...}``."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS = {
    "raw_bytes": "KV bytes, in the cache's dtype, of the tokens sent (prefill) or loaded (decode)",
    "wire_bytes": "Bytes of the compressed frames sent (prefill) or received (decode)",
    "window_raw_bytes": "Of raw_bytes, the sliding-window layers' (each sends its last window only)",
    "window_wire_bytes": "Of wire_bytes, the sliding-window layers' frames",
    "state_bytes": "Bytes of SSM layers' states sent (prefill) or loaded (decode), each one whole at the prompt's end; "
    "not in raw_bytes, in wire_bytes",
    "encode_seconds": "Seconds spent gathering and encoding KV",
    "decode_seconds": "Seconds spent decoding and scattering KV",
    "transfer_seconds": "Seconds from asking for a transfer to having all of it (decode)",
    "transfers": "Transfers completed",
    # prefill only: queued minus freed is what its send buffer holds now
    "queued_bytes": "Bytes of frames put in the prefill's send buffer",
    "freed_bytes": "Bytes of frames released from the prefill's send buffer (collected, cancelled or evicted)",
    "evicted": "Transfers the prefill dropped because no decode pulled them within ttl_s or renewed its lease",
    "strangers": "Messages the prefill ignored or refused: a PULL without the transfer's secret, or a credit, done or "
    "cancel from a connection that reads no part of the transfer",
    "released": "Prefill requests whose blocks were held until their frames were sealed, then released",
    "declined": "Requests whose KV the decode recomputed instead: the link was slower than its own prefill",
    "bases_fetched": "Calibrated bases the decode fetched from a producer (frames coded in a basis it lacked)",
    "params_refused": "Requests whose kv_transfer_params the decode refused (bad, or not an allowed producer)",
}
PRODUCER_COUNTERS = {
    "queued_bytes": "bytes_queued",
    "freed_bytes": "bytes_freed",
    "evicted": "evicted",
    "strangers": "strangers",
}  # metric: transport stat
FAILURE_PREFIX = "failed_"  # + an error kind: timeout, peer_gone, corrupt, refused, buffer_full, internal, ...
LEVEL_PREFIX = "level_"  # + a profile's name: layers of requests a producer coded at that level
# The latest value seen (one rank's), on the prefill: what adaptation and the decode's fallback read.
GAUGES = {
    "link_bytes_per_second": "Goodput of the link to the decodes as the prefill estimates it (bytes/s)",
    "production_bytes_per_second": "Raw KV bytes the prefill's forward pass makes per second",
    "kv_tokens_per_second": "Prompt tokens per second at which the prefill's KV reaches a decode (made and carried)",
}
# Per-transfer durations, one sample each: histograms beside the counters' sums.
HISTOGRAMS = {
    "transfer_duration": "Seconds from asking for a transfer to having all of it, per transfer (decode)",
    "decode_duration": "Seconds spent decoding and scattering one transfer's KV (decode)",
    "encode_duration": "Seconds spent gathering and encoding one transfer's KV, all layers (prefill)",
}
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class CacheGenStats(KVConnectorStats):
    """Counters (``data[name]``: a number, summed) and per-transfer samples (``data[name]``: a list,
    for the `HISTOGRAMS`), as plain data: vLLM ships them between processes."""

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.data[name] = self.data.get(name, 0) + amount

    def sample(self, **values: float) -> None:
        for name, value in values.items():
            self.data.setdefault(name, []).append(value)

    def gauge(self, **values: float) -> None:
        self.data.update(values)

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> CacheGenStats:
        """Another worker's stats (another rank's, or a later interval's) into these."""
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(name, []).extend(value)
            elif name in GAUGES:
                self.data[name] = value
            else:
                self.add(**{name: value})
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {name: value for name, value in self.data.items() if not isinstance(value, list)}
        for name, values in self.data.items():
            if isinstance(values, list) and values:
                out[f"{name}_mean_s"] = round(sum(values) / len(values), 4)
        if self.data.get("wire_bytes"):
            out["compression_ratio"] = round(self.data.get("raw_bytes", 0) / self.data["wire_bytes"], 2)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class Counters:
    """A worker's counters, gauges and samples since the last report (`take`), from any of its
    threads: the forward pass's, the sealer, the transport's and the loads'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = CacheGenStats()

    def count(self, **amounts: float) -> None:
        with self._lock:
            self._stats.add(**amounts)

    def gauge(self, **values: float) -> None:
        with self._lock:
            self._stats.gauge(**values)

    def sample(self, **values: float) -> None:
        with self._lock:
            self._stats.sample(**values)

    def take(self) -> CacheGenStats | None:
        """What was counted since the last call, or None if nothing was."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, CacheGenStats()
        return stats


class CacheGenPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # vLLM types its metric classes as any Prometheus metric; these are counters and histograms
        self._counters: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"vllm:cachegen_{name}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        histogram_cls: Any = self._histogram_cls  # a Histogram class (vLLM types it as any metric class)
        self._histograms: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                histogram_cls(
                    name=f"vllm:cachegen_{name}_seconds",
                    documentation=doc,
                    buckets=SECONDS_BUCKETS,
                    labelnames=labelnames,
                ),
                per_engine_labelvalues,
            )
            for name, doc in HISTOGRAMS.items()
        }
        self._failures: Any = self._counter_cls(
            name="vllm:cachegen_failures",
            documentation="Transfers that failed, by kind",
            labelnames=[*labelnames, "kind"],
        )
        self._levels: Any = self._counter_cls(
            name="vllm:cachegen_levels",
            documentation="Layers of requests the prefill coded at each level of its ladder (profile)",
            labelnames=[*labelnames, "level"],
        )
        self._gauges: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                self._gauge_cls(name=f"vllm:cachegen_{name}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, amount in transfer_stats_data.items():
            if name in self._histograms:
                for value in amount:
                    self._histograms[name][engine_idx].observe(value)
            elif name in self._counters and amount:
                self._counters[name][engine_idx].inc(amount)
            elif name in self._gauges:
                self._gauges[name][engine_idx].set(amount)
            elif name.startswith(FAILURE_PREFIX) and amount:
                labels = self.per_engine_labelvalues[engine_idx]
                self._failures.labels(*labels, name[len(FAILURE_PREFIX) :]).inc(amount)
            elif name.startswith(LEVEL_PREFIX) and amount:
                labels = self.per_engine_labelvalues[engine_idx]
                self._levels.labels(*labels, name[len(LEVEL_PREFIX) :]).inc(amount)
