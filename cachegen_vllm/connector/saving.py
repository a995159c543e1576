"""The connector's saving side (prefill, the producer): each layer's KV is encoded as the forward
pass writes it, and its frames are queued for the decodes that pull them.

`begin_step` runs when vLLM binds a step's metadata, before the forward pass: it notes the requests
the step saves, opens their transfers to the readers that prove their secrets, puts their block
tables on the device and drops the transfers whose prefill request was aborted. `save_layer` runs
right after a layer's attention has written its cache: it marks that point on the compute stream
and, for each save of the step, enqueues the layer's encoding on the encode stream (the kernels,
and their output's copy to pinned host memory) and a job for the sealer, which waits for the
copy, makes the frames and queues them in the transport's send buffer. `wait_for_save` orders the
compute stream after the encode stream on the device. A finished request's blocks are freed only
once every encode job of it is sealed: the scheduler holds them
(`CacheGenScheduler.request_finished`) and `finished` reports the request's sends done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from vllm.logger import init_logger

from cachegen_vllm.adaptation import Adapter, kv_tokens_per_s
from cachegen_vllm.codec.format import write_state_frame
from cachegen_vllm.codec.profile import ConfigError, Profile
from cachegen_vllm.config import EXTRA, ConnectorConfig
from cachegen_vllm.connector.metadata import CacheGenMetadata, SaveRequest
from cachegen_vllm.connector.metrics import FAILURE_PREFIX, LEVEL_PREFIX, PRODUCER_COUNTERS, Counters
from cachegen_vllm.connector.ranks import Placement, first_holder, rank_endpoint
from cachegen_vllm.device import Event
from cachegen_vllm.paged import EncodeStep, LayerEncode, PagedCaches, SaveRange, time_encode
from cachegen_vllm.transport import FrameProducer, TransportError

log = init_logger("vllm.cachegen_vllm.connector")
DROPPED_REMEMBERED = 1024  # dropped transfers whose later layers are skipped (a request's span at most)


@dataclass
class _GroupSaves:
    """What one KV cache group's layers send of the step's saves (a sliding window's layers the
    tokens of its last window only: ``start`` moved on, saves before the window left out), and
    their encoding from the group's blocks."""

    saves: list[SaveRequest]
    encoding: EncodeStep
    layer_bytes: int  # raw bytes each of the group's layers sends this step


@dataclass
class _Step:
    """The saves of the step being computed, their encoding by KV cache group (none: no saves, or
    a replica rank), and when the last layer's save returned (the forward pass's pace, for
    adaptation)."""

    saves: list[SaveRequest]
    groups: dict[int, _GroupSaves] = dataclasses.field(default_factory=dict)
    layer_end: float | None = None


class Saving:
    """The producer side of one rank: its ``levels`` (the profile, or an adaptive ladder, with any
    "auto" basis fitted already) coded from ``caches``. A rank holding a replica of another rank's
    heads sends nothing (``producer`` None) but tracks and reports its saves as every rank must."""

    def __init__(
        self,
        config: ConnectorConfig,
        levels: tuple[Profile, ...],
        caches: PagedCaches,
        placement: Placement,
        counters: Counters,
    ):
        self.config, self.levels, self.caches, self.counters = config, levels, caches, counters
        # requests (transfers, durations) are counted once per engine, by its first rank; bytes
        # and seconds by every rank, as each moves its own
        self._counts_requests = placement.tp_rank == 0
        self._lock = threading.Condition()  # the bookkeeping below, shared with the sealer
        self._unsealed: dict[str, int] = {}  # steps whose encode jobs are not all sealed, by request
        self._finished: set[str] = set()  # of those, the requests vLLM finished
        self._step = _Step([])
        self._encoding: dict[str, float] = {}  # seconds spent encoding each transfer so far
        self._dropped: OrderedDict[str, None] = OrderedDict()  # failed or aborted transfers: encode no more
        self._sent = (0, 0)  # raw and wire bytes this rank has sent, all transfers
        self._reported: dict[str, int] = {}  # the transport's counters already reported
        self.adapter = self._start_adapter()
        self.producer = self._start_producer(placement)

    def _start_adapter(self) -> Adapter:
        """The producer's rates: with a fixed profile only measured (for the decodes' fallback), for
        a ladder also each level's encode rate and size on one chunk, measured now: the choices'
        first guesses."""
        holds_compute = self.caches.runtime.encode_holds_compute
        if not self.config.adaptive:
            return Adapter([self.levels[0].name], [(math.inf, 1.0)], holds_compute)
        priors = []
        for profile in self.levels:
            seconds, wire = time_encode(self.caches, profile, profile.chunk_tokens)
            raw = self.caches.geometry.layer_bytes(profile.chunk_tokens)
            priors.append((raw / max(seconds, 1e-9), wire / raw))
        link_mbps = self.config.link_mbps
        fixed = link_mbps * 1e6 / 8 if link_mbps else None
        adapter = Adapter([p.name for p in self.levels], priors, holds_compute, fixed)
        levels = (f"{v.name} {v.wire_ratio:.2f}x at {v.encode_bytes_per_s / 1e6:.0f} MB/s" for v in adapter.levels())
        link = f"fixed at {link_mbps} Mbit/s" if fixed else "measured"
        log.info("CacheGenConnector adapts: %s; link %s", ", ".join(levels), link)
        return adapter

    def _start_producer(self, placement: Placement) -> FrameProducer | None:
        """This rank's producer, at the rank's endpoint, serving the bases it codes in to decodes
        that lack them; None where the rank holds a replica (decodes read those heads from the
        first rank holding them)."""
        geometry = self.caches.geometry
        if first_holder(geometry.head_start, geometry.total_kv_heads, placement.tp_size) != placement.tp_rank:
            log.info(
                "CacheGenConnector: rank %d holds a replica of KV head %d; sends nothing",
                placement.tp_rank,
                geometry.head_start,
            )
            return None
        try:
            bind = rank_endpoint(self.config.transport.bind, placement.offset)
        except ValueError as e:
            raise ConfigError(EXTRA + "bind", str(e)) from None
        producer = FrameProducer(dataclasses.replace(self.config.transport, bind=bind))
        for profile in self.levels:
            basis = self.caches.check_profile(profile)
            if basis is not None and profile.basis is not None:
                try:  # one message carries it: the limit must let it through
                    producer.publish_basis(basis.digest, Path(profile.basis).read_bytes())
                except ValueError as e:
                    producer.close()
                    raise ConfigError(EXTRA + "max_frame_bytes", f"the basis {profile.basis}: {e}") from None
        log.info(
            "CacheGenConnector sends KV heads [%d, %d) from %s (%s %s)",
            geometry.head_start,
            geometry.heads.stop,
            producer.endpoint,
            "levels" if self.config.adaptive else "profile",
            ", ".join(p.name for p in self.levels),
        )
        return producer

    # ---- the forward pass's thread -------------------------------------------------------------

    def begin_step(self, meta: CacheGenMetadata) -> None:
        """The step's start: track the requests it saves until their sends are reported done, put
        their block tables on the device (on the encode stream), and drop aborted transfers."""
        if self._step.saves:  # the last step was never ended (vLLM ends each in wait_for_save)
            self.wait_for_save()
        with self._lock:
            for save in meta.saves:
                self._unsealed[save.req_id] = self._unsealed.get(save.req_id, 0) + (self.producer is not None)
        self._step = _Step(meta.saves)
        if self.producer is None:
            return
        runtime = self.caches.runtime
        for save in meta.saves:  # decodes that prove its secret may read it (again: nothing changes)
            self.producer.open(save.transfer_id, bytes.fromhex(save.secret))
        with runtime.encoding():
            self._step.groups = self._group_saves(meta.saves)
        for transfer_id in meta.aborted:  # after the encode jobs already queued; its decode is refused at once
            runtime.submit(functools.partial(self._drop, transfer_id, "its prefill request was aborted"))

    def _group_saves(self, saves: list[SaveRequest]) -> dict[int, _GroupSaves]:
        """The step's saves by KV cache group, each group's block table on the device."""
        caches, geometry = self.caches, self.caches.geometry
        first_layer = {group: layer for layer, group in sorted(caches.groups.items(), reverse=True)}
        groups = {}
        for group, layer in sorted(first_layer.items()):
            sent = [  # a decode holding the prompt less its last token reads the layer from window_start
                dataclasses.replace(s, start=max(s.start, geometry.window_start(layer, s.total - 1))) for s in saves
            ]
            sent = [s for s in sent if s.start < s.end]
            if sent:
                ranges = [SaveRange(s.block_ids[group], s.start, s.end, s.total) for s in sent]
                sent_bytes = sum(geometry.layer_bytes(s.end - s.start) for s in sent)
                groups[group] = _GroupSaves(sent, EncodeStep(caches, ranges), sent_bytes)
        return groups

    def save_layer(self, layer: int) -> None:
        """Enqueue the layer's encoding of the step's saves, and a job for the sealer; nothing here
        waits for it (unless the sealer holds more than the runtime's staging allows)."""
        step = self._step
        group = step.groups.get(self.caches.groups[layer])
        if group is None:
            return
        runtime, geometry = self.caches.runtime, self.caches.geometry
        arrived = time.perf_counter()
        if step.layer_end is not None:  # the forward pass since the last layer
            self.adapter.produced(group.layer_bytes, arrived - step.layer_end)
        # the layers left send what their groups do (a sliding window's less): their mean, each
        left = [step.groups.get(self.caches.groups[i]) for i in range(layer, geometry.num_layers)]
        level = self._level(sum(g.layer_bytes for g in left if g is not None) / len(left), layer)
        written = runtime.mark()  # the layer's cache as the attention left it
        with runtime.encoding(after=written):
            try:
                encoding = group.encoding.start(layer, self.levels[level])
            except Exception:  # a bug must not stop the forward pass: the step's transfers are dropped
                log.exception("encoding layer %d failed; the decodes of %d requests recompute", layer, len(step.saves))
                for save in step.saves:
                    runtime.submit(functools.partial(self._drop_failed, save.transfer_id))
                step.groups.clear()
                return
        enqueued = time.perf_counter() - arrived
        runtime.submit(functools.partial(self._seal, group.saves, layer, level, encoding, written, enqueued))
        step.layer_end = time.perf_counter()

    def _level(self, layer_bytes: float, layer: int) -> int:
        """The ladder's level for this layer of the step's saves: the only one, or the adapter's
        choice (one for all: they share the link), for ``layer_bytes`` raw bytes in each layer left."""
        if not self.config.adaptive:
            return 0
        assert self.producer is not None
        geometry = self.caches.geometry
        now = self.adapter.conditions(self.producer.goodput_bytes_per_s, self.producer.backlog_bytes)
        level = self.adapter.choose(layer_bytes, geometry.num_layers - layer, now)
        rates = {
            "link_bytes_per_second": now.link_bytes_per_s,
            "production_bytes_per_second": now.production_bytes_per_s,
        }
        self.counters.gauge(**{name: rate for name, rate in rates.items() if math.isfinite(rate)})  # inf: unknown
        return level

    def wait_for_save(self) -> None:
        """The step's end: the compute stream waits for the encode stream on the device (a
        request's blocks stay allocated until its frames are sealed anyway); the sealer, after the
        step's jobs, ends the transfers of the saves that end their prompts (an SSM hybrid's
        states, which the whole forward pass leaves, go first) and counts the step's saves sealed."""
        step, self._step = self._step, _Step([])  # a forward pass without a step of ours saves nothing
        if self.producer is None:
            return
        runtime = self.caches.runtime
        if step.saves:
            ending = [save for save in step.saves if save.end == save.total]
            if ending:
                runtime.submit(functools.partial(self._complete, ending, self._read_states(ending)))
            runtime.submit(functools.partial(self._sealed, [save.req_id for save in step.saves]))
        runtime.join_encodes()

    def _read_states(self, saves: list[SaveRequest]) -> dict[str, list[bytes]]:
        """Each save's SSM states after its prompt, as the forward pass left them (none for a model
        without SSM layers); a save whose states cannot be read is dropped (its decode recomputes)."""
        states = self.caches.states
        if states is None:
            return {}
        read = {}
        for save in saves:
            try:
                read[save.req_id] = states.read(save.block_ids, save.total)
            except Exception:  # a bug must not stop the forward pass
                log.exception("transfer %s: reading its SSM states failed; the decode recomputes", save.transfer_id)
                self.caches.runtime.submit(functools.partial(self._drop_failed, save.transfer_id))
        return read

    def preempted(self, req_ids: set[str]) -> None:
        """vLLM preempted these requests and frees their blocks before the next forward pass: return
        once nothing of ours reads them any more (the sealer's jobs for them are done)."""
        with self._lock:
            self._lock.wait_for(lambda: all(self._unsealed.get(r, 0) == 0 for r in req_ids))

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """The requests whose sends are done since the last call: finished (``finished_req_ids``,
        now or before) with every encode job sealed; their blocks were held until then."""
        with self._lock:
            self._finished.update(r for r in finished_req_ids if r in self._unsealed)
            sent = {r for r in self._finished if self._unsealed[r] == 0}
            for req_id in sent:
                del self._unsealed[req_id]
            self._finished -= sent
        if sent and self._counts_requests:
            self.counters.count(released=len(sent))
        return sent

    def report(self) -> None:
        """Count what the transport's IO thread did since the last report, and the estimate a
        decode's fallback compares with its own prefill rate."""
        if self.producer is None:
            return
        for metric, stat in PRODUCER_COUNTERS.items():
            total = self.producer.stats[stat]
            self.counters.count(**{metric: total - self._reported.get(metric, 0)})
            self._reported[metric] = total
        geometry = self.caches.geometry
        with self._lock:
            raw, wire = self._sent
        # what one more prompt token costs: a sliding layer's bytes stop at its window
        growing = sum(1 for layer in range(geometry.num_layers) if not geometry.window(layer))
        raw_per_token = geometry.layer_bytes(1) * (growing or geometry.num_layers)
        arrives = kv_tokens_per_s(
            self.adapter.fixed_link_bytes_per_s or self.producer.goodput_bytes_per_s,
            raw_per_token * (wire / raw if raw else 1.0),
            self.adapter.production_bytes_per_s,
            raw_per_token,
        )
        if arrives is not None:
            self.counters.gauge(kv_tokens_per_second=arrives)

    def close(self) -> None:
        """After the runtime: the sealer's queued jobs put into the producer."""
        if self.producer is not None:
            self.producer.close()

    # ---- the sealer -----------------------------------------------------------------------------

    def _seal(
        self, saves: list[SaveRequest], layer: int, level: int, encoding: LayerEncode, written: Event, enqueued: float
    ) -> None:
        """The sealer's job for one layer of a step: make each save's frames, queue them for its
        decode. A save that fails is dropped (its decode recomputes); the others go on."""
        runtime = self.caches.runtime
        try:
            with runtime.encoding(after=written):  # waits for the kernels' copy, or runs the torch codec
                for i, save in enumerate(saves):
                    try:
                        self._send(save, layer, level, encoding, i, enqueued / len(saves))
                    except Exception:  # a bug: the transfer is dropped, the prefill goes on
                        log.exception(
                            "transfer %s: encoding layer %d failed; the decode recomputes", save.transfer_id, layer
                        )
                        self._drop_failed(save.transfer_id)
        finally:
            encoding.close()

    def _sealed(self, req_ids: list[str]) -> None:
        """After a step's jobs: its saves' requests have one step less unsealed."""
        with self._lock:
            for req_id in req_ids:
                self._unsealed[req_id] -= 1
            self._lock.notify_all()

    def _send(self, save: SaveRequest, layer: int, level: int, encoding: LayerEncode, i: int, enqueued: float) -> None:
        geometry = self.caches.geometry
        if save.transfer_id in self._dropped:  # nobody will read the rest: spare the work
            return
        started = time.perf_counter()
        frames = encoding.frames(i)
        if not self._put(save.transfer_id, frames):
            return
        seconds = enqueued + time.perf_counter() - started
        self._encoding[save.transfer_id] = self._encoding.get(save.transfer_id, 0.0) + seconds
        raw, wire = geometry.layer_bytes(save.end - save.start), sum(map(len, frames))
        window = bool(geometry.window(layer))
        self.counters.count(
            raw_bytes=raw,
            wire_bytes=wire,
            window_raw_bytes=raw * window,
            window_wire_bytes=wire * window,
            encode_seconds=seconds,
            **{LEVEL_PREFIX + self.levels[level].name: 1},
        )
        self.adapter.encoded(level, raw, wire, seconds)
        with self._lock:
            self._sent = (self._sent[0] + raw, self._sent[1] + wire)

    def _put(self, transfer_id: str, frames: list[bytes], finish: bool = False) -> bool:
        """Queue frames of a transfer (and end it), or drop it on a transport error (its decode
        recomputes; the prefill goes on): whether it went."""
        assert self.producer is not None
        try:
            for frame in frames:
                self.producer.put(transfer_id, frame)
            if finish:
                self.producer.finish(transfer_id)
        except TransportError as e:
            log.warning("transfer %s not sent: %s", transfer_id, e)
            self._drop(transfer_id, str(e))
            self.counters.count(**{FAILURE_PREFIX + e.kind: 1})
            return False
        return True

    def _complete(self, saves: list[SaveRequest], states: dict[str, list[bytes]]) -> None:
        """The sealer's job after a step's layers: each save that ends its prompt sends its SSM
        states, if the model has any (STATE frames: the decode's state after the same tokens), and
        ends its transfer."""
        geometry = self.caches.geometry
        for save in saves:
            if save.transfer_id in self._dropped:
                continue
            started = time.perf_counter()
            read = states.get(save.req_id, [])
            try:
                frames = [write_state_frame(geometry, i, save.total, state) for i, state in enumerate(read)]
            except Exception:  # a bug: the transfer is dropped, the prefill goes on
                log.exception("transfer %s: sealing its SSM states failed; the decode recomputes", save.transfer_id)
                self._drop_failed(save.transfer_id)
                continue
            if not self._put(save.transfer_id, frames, finish=True):
                continue
            encoding_s = self._encoding.pop(save.transfer_id, 0.0) + time.perf_counter() - started
            self.counters.count(
                state_bytes=sum(map(len, read)),
                wire_bytes=sum(map(len, frames)),
                transfers=int(self._counts_requests),
            )
            if self._counts_requests:
                self.counters.sample(encode_duration=encoding_s)

    def _drop_failed(self, transfer_id: str) -> None:
        """Encoding failed on an unexpected error: the transfer is dropped, and a decode pulling it
        is refused and recomputes."""
        if transfer_id not in self._dropped:
            self._drop(transfer_id, "the prefill failed to encode it")
            self.counters.count(**{FAILURE_PREFIX + "internal": 1})

    def _drop(self, transfer_id: str, why: str) -> None:
        """Drop a transfer's frames and encode no more of it. On the sealer, in order with its jobs."""
        assert self.producer is not None
        self.producer.abort(transfer_id, why)
        self._encoding.pop(transfer_id, None)
        self._dropped[transfer_id] = None
        if len(self._dropped) > DROPPED_REMEMBERED:
            self._dropped.popitem(last=False)
