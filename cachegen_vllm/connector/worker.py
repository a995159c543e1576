"""The connector's worker side: the KV caches, saving (encode and send) and loading (receive and
decode), and the counters of both. Device work goes through a `device.Runtime` (streams, events,
pinned memory and the sealer thread on a GPU; the same calls, done at once, on a CPU), so the
code paths here are the same on both.

Prefill (producer): `save_kv_layer` runs right after a layer's attention has written its cache. It
marks that point on the compute stream and, for each `SaveRequest` of the step, enqueues the
layer's encoding on the encode stream (the kernels, and their output's copy to pinned host memory)
and a job for the sealer, which waits for the copy, makes the frames and queues them in the
transport's send buffer. `wait_for_save` orders the compute stream after the encode stream on the
device. A finished request's blocks are freed only once every encode job of it is sealed: the
scheduler delays the free (`request_finished`) and `get_finished` reports the request's sends
done.

Decode (consumer): each `LoadRequest` pulls the frames from the first token the request lacks, from
every producer rank that holds heads of this rank (`connector.ranks`), a thread per producer rank;
each layer's frames are decoded in one batch on the decode stream, their heads of this rank
written into the allocated blocks while other requests run. Whatever ends a load (all tokens in, a
transport or frame error, a cancel, or a bug), the request is reported finished once all its
threads are, and its decoding has completed on the device; if any failed, its blocks are reported
as load errors and vLLM's ``kv_load_failure_policy`` decides (``recompute`` recomputes the prompt;
``fail`` fails it). With tensor parallelism every rank reports, and vLLM waits for all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

from cachegen_vllm.adaptation import Adapter, kv_tokens_per_s
from cachegen_vllm.codec import FrameError, KVGeometry
from cachegen_vllm.codec import basis as bases
from cachegen_vllm.codec.format import frame_basis, frame_layer
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.codec.profile import AUTO_BASIS, ConfigError
from cachegen_vllm.config import EXTRA, ConnectorConfig
from cachegen_vllm.connector import autobasis
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.metrics import FAILURE_PREFIX, LEVEL_PREFIX, PRODUCER_COUNTERS, CacheGenStats
from cachegen_vllm.connector.ranks import Placement, Source, first_holder, rank_endpoint, sources
from cachegen_vllm.device import Event, Runtime, runtime_for
from cachegen_vllm.paged import (
    FP8_CACHE_DTYPES,
    PageOrder,
    PendingEncode,
    decode_frames_into_blocks,
    kernel_block_ids,
    probe_page_order,
    start_encode,
    time_encode,
    warm_up,
)
from cachegen_vllm.transport import FrameConsumer, FrameProducer, TransferStream, TransportError

log = init_logger("vllm.cachegen_vllm.connector")
DROPPED_REMEMBERED = 1024  # dropped transfers whose later layers are skipped (a request's span at most)


@dataclasses.dataclass
class _Load:
    """A request's load: one stream per producer rank it reads, each read by a thread of its own."""

    request: LoadRequest
    streams: list[TransferStream]
    started: float
    pending: int
    failed: bool = False
    wire_bytes: int = 0
    decode_seconds: float = 0.0


class CacheGenWorker:
    def __init__(
        self,
        config: ConnectorConfig,
        model_name: str,
        placement: Placement | None = None,
        total_kv_heads: int | None = None,
        block_size: int | None = None,
        kv_cache_dtype: str = "auto",
        model_path: str | None = None,
    ):
        self.config = config
        self.model_path = model_path or model_name  # the checkpoint: an "auto" basis is fitted on it
        self.kv_cache_dtype = kv_cache_dtype  # vLLM's setting: an fp8 one stores uint8 pages of this format
        self.model_name = model_name
        self.placement = placement or Placement()
        self.total_kv_heads = total_kv_heads  # None: the caches hold all the model's heads
        self.block_size = block_size  # vLLM's (the block manager's); None: the caches'
        # requests (transfers, durations) are counted once per engine, by its first rank; bytes
        # and seconds by every rank, as each moves its own
        self._counts_requests = self.placement.tp_rank == 0
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # layer name: (index, cache)
        self._scales: Callable[[int], tuple[float, float]] | None = None  # an fp8 cache's, by layer
        self._order: PageOrder | None = None
        self._kernel_blocks = 1  # the caches' blocks per vLLM block
        self._block_tokens = 0  # tokens per vLLM block
        self._geometry: KVGeometry | None = None
        self._bases: tuple[bases.Basis, ...] = ()  # besides the shipped ones: the profiles', and fetched ones
        self._basis_lock = threading.Lock()
        self._runtime: Runtime | None = None
        self._producer: FrameProducer | None = None
        self._consumer: FrameConsumer | None = None
        self._lock = threading.Lock()
        # saving: encode jobs not sealed yet of each request this rank saves (every rank tracks the
        # requests of the step's saves, replicas too: the scheduler waits for each rank's report)
        self._unsealed: dict[str, int] = {}
        self._finished_saving: set[str] = set()  # of those, the ones whose request finished
        self._step_tables: tuple[CacheGenMetadata | None, dict[str, torch.Tensor]] = (None, {})
        self._encoding: dict[str, float] = {}  # seconds spent encoding each transfer so far
        self._dropped: OrderedDict[str, None] = OrderedDict()  # failed or aborted transfers: encode no more
        # loading
        self._done_loading: set[str] = set()
        self._loads: dict[str, _Load] = {}  # loads in flight, by request id
        self._cancelled: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._stats = CacheGenStats()
        self._adapter: Adapter | None = None  # a producer's measured rates, and an adaptive one's choices
        self._sent = (0, 0)  # raw and wire bytes this rank has sent, all transfers
        self._last_layer: tuple[CacheGenMetadata | None, float] = (None, 0.0)  # the step and end of the last save
        self._producer_reported: dict[str, int] = {}  # transport counters already in the stats

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], vllm_config: Any) -> None:
        """vLLM's caches, one per attention layer: on a GPU, views whose strides are the layout; on
        vLLM's CPU backend, pages whose order is probed."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        first = next(iter(kv_caches.values()))
        attention = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, list(kv_caches))  # type: ignore[type-abstract]
        if current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            _, _, block_size, width = first.shape
            dtype = vllm_config.model_config.dtype  # what vLLM's cache writer is given
            isa = _get_attn_isa(dtype, block_size, width // 2, self.kv_cache_dtype)
            order = probe_page_order(isa, dtype, block_size, width // 2, self.kv_cache_dtype)
        elif current_platform.is_cuda_alike():
            order = None
        else:
            raise RuntimeError(
                f"CacheGenConnector runs on vLLM's CUDA and CPU backends, not {current_platform.device_name}"
            )
        by_index = {extract_layer_index(name): layer for name, layer in attention.items()}

        def scales(layer: int) -> tuple[float, float]:  # read at each use: vLLM may calibrate them at first
            module = by_index[layer]
            return float(module._k_scale_float), float(module._v_scale_float)  # type: ignore[attr-defined]

        self.bind_caches(
            {name: (extract_layer_index(name), t) for name, t in kv_caches.items()},
            order,
            scales=scales if self.kv_cache_dtype.startswith("fp8") else None,
        )

    def bind_caches(
        self,
        layers: dict[str, tuple[int, torch.Tensor]],
        order: PageOrder | None,
        runtime: Runtime | None = None,
        scales: Callable[[int], tuple[float, float]] | None = None,
    ) -> None:
        """Start on these caches (layer name: (layer index, cache)) in this page order (None: the
        tensors' strides are the layout), warm every code path up, and open the transport.
        ``scales``: an fp8 cache's (key, value) scales of a layer (vLLM's ``k_scale``, ``v_scale``)."""
        first = next(iter(layers.values()))[1]
        _, heads, kernel_block, width = first.shape
        self._layers, self._order, self._scales = layers, order, scales
        self._runtime = runtime or runtime_for(first.device)
        if self.block_size is not None:
            if self.block_size % kernel_block:
                raise RuntimeError(
                    f"vLLM's block size {self.block_size} is not a multiple of the caches' {kernel_block}"
                )
            self._kernel_blocks = self.block_size // kernel_block
        self._block_tokens = self.block_size or kernel_block
        total = self.total_kv_heads or heads
        head_start, count = rank_heads(total, self.placement.tp_size, self.placement.tp_rank)
        if count != heads:
            raise RuntimeError(
                f"the caches hold {heads} KV heads; tensor-parallel rank {self.placement.tp_rank} "
                f"of {self.placement.tp_size} should hold {count} of the model's {total}"
            )
        self._geometry = KVGeometry(
            len(layers),
            heads,
            width // 2,
            FP8_CACHE_DTYPES.get(self.kv_cache_dtype, first.dtype),
            model=self.model_name,
            head_start=head_start,
            total_kv_heads=total,
        )
        if self.config.sends:  # a basis "auto" is fitted to the model now (or read from its cache)
            ladder = tuple(autobasis.resolve(p, self.model_path, log.info) for p in self.config.ladder)
            self.config = dataclasses.replace(self.config, ladder=ladder)
        # a decode that sends nothing codes nothing: its profiles' "auto" bases are never fitted
        ladder = tuple(p for p in self.config.ladder if p.basis != AUTO_BASIS)
        for profile in ladder:
            profile.check_geometry(self._geometry.num_layers, self._geometry.head_dim, total)
        # a consumer reads frames coded in its own profiles' bases too, not only in the shipped ones
        self._bases = tuple(bases.load(p.basis) for p in ladder if p.basis)
        started = time.perf_counter()
        caches = {index: cache for index, cache in layers.values()}
        for profile in ladder:
            warm_up(caches, order, geometry=self._geometry, profile=profile, runtime=self._runtime, bases=self._bases)
        names = ", ".join(p.name for p in ladder)
        log.info(
            "CacheGenConnector warmed up on %s in %.1f s (%s); encodes %s",
            first.device,
            time.perf_counter() - started,
            names,
            "on the forward pass's thread" if self.runtime.encode_holds_compute else "beside the forward pass",
        )
        if self.config.sends:
            self._adapter = self._start_adapter(caches[0], order)
        replica = first_holder(head_start, total, self.placement.tp_size) != self.placement.tp_rank
        if self.config.sends and replica:  # decodes read these heads from the first rank holding them
            log.info(
                "CacheGenConnector: rank %d holds a replica of KV head %d; sends nothing",
                self.placement.tp_rank,
                head_start,
            )
        elif self.config.sends:
            try:
                bind = rank_endpoint(self.config.transport.bind, self.placement.offset)
            except ValueError as e:
                raise ConfigError(EXTRA + "bind", str(e)) from None
            transport = dataclasses.replace(self.config.transport, bind=bind)
            self._producer = FrameProducer(transport)
            for profile in ladder:  # a decode that lacks a basis of ours fetches it from here
                if profile.basis:
                    try:
                        self._producer.publish_basis(bases.load(profile.basis).digest, Path(profile.basis).read_bytes())
                    except ValueError as e:  # one message carries it: the limit must let it through
                        raise ConfigError(EXTRA + "max_frame_bytes", f"the basis {profile.basis}: {e}") from None
            log.info(
                "CacheGenConnector sends KV heads [%d, %d) from %s (%s %s)",
                head_start,
                head_start + heads,
                self._producer.endpoint,
                "levels" if self.config.adaptive else "profile",
                names,
            )
        if self.config.receives:
            self._consumer = FrameConsumer(self.config.transport)
            log.info("CacheGenConnector receives (the profile of each transfer is in its frames)")

    def _start_adapter(self, layer_cache: torch.Tensor, order: PageOrder | None) -> Adapter:
        """The producer's rates: with a fixed profile only measured (for the decodes' fallback), for
        a ladder also each level's encode rate and size on one chunk, measured now: the choices'
        first guesses."""
        if not self.config.adaptive:
            return Adapter([self.config.ladder[0].name], [(math.inf, 1.0)], self.runtime.encode_holds_compute)
        priors = []
        for profile in self.config.ladder:
            tokens = profile.chunk_tokens
            seconds, wire = time_encode(
                layer_cache, order, geometry=self.geometry, profile=profile, runtime=self.runtime, tokens=tokens
            )
            raw = self.geometry.layer_bytes(tokens)
            priors.append((raw / max(seconds, 1e-9), wire / raw))
        fixed = self.config.link_mbps * 1e6 / 8 if self.config.link_mbps else None
        adapter = Adapter([p.name for p in self.config.ladder], priors, self.runtime.encode_holds_compute, fixed)
        levels = (f"{v.name} {v.wire_ratio:.2f}x at {v.encode_bytes_per_s / 1e6:.0f} MB/s" for v in adapter.levels())
        log.info(
            "CacheGenConnector adapts: %s; link %s",
            ", ".join(levels),
            f"fixed at {self.config.link_mbps} Mbit/s" if fixed else "measured",
        )
        return adapter

    @property
    def geometry(self) -> KVGeometry:
        if self._geometry is None:
            raise RuntimeError("the connector's worker has no KV caches yet (register_kv_caches)")
        return self._geometry

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the connector's worker has no KV caches yet (register_kv_caches)")
        return self._runtime

    def _layer_scales(self, layer: int) -> tuple[float, float]:
        return self._scales(layer) if self._scales is not None else (1.0, 1.0)

    def _block_table(self, block_ids: list[int]) -> torch.Tensor:
        """A request's blocks as the caches index them, on the device (current stream)."""
        return self.runtime.to_device(np.array(kernel_block_ids(block_ids, self._kernel_blocks), dtype=np.int64))

    # ---- prefill ------------------------------------------------------------------------------

    def _note_saves(self, meta: CacheGenMetadata) -> None:
        """Track the requests this step saves, until their sends are reported done."""
        with self._lock:
            for save in meta.saves:
                self._unsealed.setdefault(save.req_id, 0)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: CacheGenMetadata) -> None:
        """Enqueue the layer's encoding for each save of the step; nothing here waits for it."""
        self._note_saves(meta)
        if self._producer is None or not meta.saves:
            return
        layer, _ = self._layers[layer_name]
        runtime = self.runtime
        arrived = time.perf_counter()
        if self._adapter is not None and self._last_layer[0] is meta:  # the forward pass since the last layer
            saved = sum(self.geometry.layer_bytes(save.end - save.start) for save in meta.saves)
            self._adapter.produced(saved, arrived - self._last_layer[1])
        written = runtime.mark()  # the layer's cache as the attention left it
        with runtime.encoding(after=written):
            if self._step_tables[0] is not meta:  # the step's first layer: its block tables, once
                self._step_tables = (meta, {save.transfer_id: self._block_table(save.block_ids) for save in meta.saves})
            tables = self._step_tables[1]
            for save in meta.saves:
                level = self._level(save, layer)
                started = time.perf_counter()
                try:
                    pending = start_encode(
                        kv_layer,
                        self._order,
                        tables[save.transfer_id],
                        geometry=self.geometry,
                        profile=self.config.ladder[level],
                        layer=layer,
                        token_start=save.start,
                        count=save.end - save.start,
                        total_tokens=save.total,
                        runtime=runtime,
                        scales=self._layer_scales(layer),
                    )
                except Exception:  # a bug must not stop the forward pass: the transfer is dropped
                    log.exception(
                        "transfer %s: encoding layer %d failed; the decode recomputes", save.transfer_id, layer
                    )
                    runtime.submit(functools.partial(self._drop_failed, save.transfer_id))
                    continue
                enqueued = time.perf_counter() - started
                with self._lock:
                    self._unsealed[save.req_id] += 1
                runtime.submit(functools.partial(self._seal, save, layer, level, pending, written, enqueued))
        self._last_layer = (meta, time.perf_counter())

    def _level(self, save: SaveRequest, layer: int) -> int:
        """The ladder's level for this layer of this save: the only one, or the adapter's choice."""
        if self._adapter is None or not self.config.adaptive:
            return 0
        assert self._producer is not None
        now = self._adapter.conditions(self._producer.goodput_bytes_per_s, self._producer.backlog_bytes)
        level = self._adapter.choose(
            self.geometry.layer_bytes(save.end - save.start), self.geometry.num_layers - layer, now
        )
        rates = {
            "link_bytes_per_second": now.link_bytes_per_s,
            "production_bytes_per_second": now.production_bytes_per_s,
        }
        self._gauge(**{name: rate for name, rate in rates.items() if math.isfinite(rate)})  # inf: not measured yet
        return level

    def wait_for_save(self) -> None:
        """The step's end: the compute stream waits for the encode stream on the device (a
        request's blocks stay allocated until its frames are sealed anyway)."""
        if self._producer is not None:
            self.runtime.join_encodes()

    def _seal(
        self, save: SaveRequest, layer: int, level: int, pending: PendingEncode, written: Event, enqueued: float
    ) -> None:
        """The sealer's job for one save of one layer: make the frames, queue them for the decode."""
        producer = self._producer
        assert producer is not None
        try:
            self._send(save, layer, level, pending, written, enqueued, producer)
        except Exception:  # a bug: the transfer is dropped (its decode recomputes), the prefill goes on
            log.exception("transfer %s: encoding layer %d failed; the decode recomputes", save.transfer_id, layer)
            self._drop_failed(save.transfer_id)
        finally:
            with self._lock:
                self._unsealed[save.req_id] -= 1

    def _drop_failed(self, transfer_id: str) -> None:
        """Encoding failed on an unexpected error: the transfer is dropped, and a decode pulling it
        is refused and recomputes."""
        if transfer_id not in self._dropped:
            self._drop(transfer_id, "the prefill failed to encode it")
            self._count(**{FAILURE_PREFIX + "internal": 1})

    def _drop(self, transfer_id: str, why: str) -> None:
        """Drop a transfer's frames and encode no more of it. On the sealer, in order with its jobs."""
        assert self._producer is not None
        self._producer.abort(transfer_id, why)
        self._encoding.pop(transfer_id, None)
        self._dropped[transfer_id] = None
        if len(self._dropped) > DROPPED_REMEMBERED:
            self._dropped.popitem(last=False)

    def _send(
        self,
        save: SaveRequest,
        layer: int,
        level: int,
        pending: PendingEncode,
        written: Event,
        enqueued: float,
        producer: FrameProducer,
    ) -> None:
        if save.transfer_id in self._dropped:  # nobody will read the rest: spare the work
            return
        runtime = self.runtime
        started = time.perf_counter()
        with runtime.encoding(after=written):  # waits for the kernels' copy, or runs the torch codec
            frames = pending.finish()
        last = save.end == save.total and layer == self.geometry.num_layers - 1
        try:
            for frame in frames:
                producer.put(save.transfer_id, frame)
            if last:
                producer.finish(save.transfer_id)
        except TransportError as e:  # the decode side recomputes; the prefill goes on
            log.warning("transfer %s not sent: %s", save.transfer_id, e)
            self._drop(save.transfer_id, str(e))
            self._count(**{FAILURE_PREFIX + e.kind: 1})
            return
        seconds = enqueued + time.perf_counter() - started
        self._encoding[save.transfer_id] = self._encoding.get(save.transfer_id, 0.0) + seconds
        raw, wire = self.geometry.layer_bytes(save.end - save.start), sum(map(len, frames))
        self._count(
            raw_bytes=raw,
            wire_bytes=wire,
            encode_seconds=seconds,
            transfers=int(last and self._counts_requests),
            **{LEVEL_PREFIX + self.config.ladder[level].name: 1},
        )
        if self._adapter is not None:
            self._adapter.encoded(level, raw, wire, seconds)
        with self._lock:
            self._sent = (self._sent[0] + raw, self._sent[1] + wire)
        if last:
            encoding = self._encoding.pop(save.transfer_id)
            if self._counts_requests:
                self._sample(encode_duration=encoding)

    def _drop_aborted(self, meta: CacheGenMetadata) -> None:
        """Transfers whose prefill request was aborted: their frames go, after the encode jobs
        already queued, and a decode pulling one is refused at once (it recomputes) instead of
        waiting for frames that will not come."""
        if self._producer is None:
            return
        for transfer_id in meta.aborted:
            self.runtime.submit(functools.partial(self._drop, transfer_id, "its prefill request was aborted"))

    # ---- decode -------------------------------------------------------------------------------

    def start_load_kv(self, meta: CacheGenMetadata) -> None:
        """The step's start: notes its saves, drops aborted sends, starts new loads, cancels aborted
        ones."""
        self._note_saves(meta)
        self._drop_aborted(meta)
        if self._consumer is None:
            return
        for load in meta.loads:  # before the cancels: a request may be aborted in the step its load begins
            self._start_load(load, self._consumer)
        for declined in meta.declined:  # recomputed here: the producer frees the frames at once
            for source in self._plan(declined):
                endpoint = rank_endpoint(declined.producer, source.producer_rank)
                self._consumer.decline(endpoint, declined.transfer_id, (source.reader, source.readers))
        for req_id in meta.cancels:
            with self._lock:  # a load already over has left _loads: nothing to stop
                cancelled = self._loads.get(req_id)
                if cancelled is not None:
                    self._cancelled.add(req_id)
            if cancelled is not None:
                for stream in cancelled.streams:
                    stream.cancel()

    def _plan(self, request: LoadRequest) -> list[Source]:
        """The producer ranks this rank reads the transfer from."""
        try:
            return sources(
                self.geometry.total_kv_heads, request.producer_tp, self.placement.tp_size, self.placement.tp_rank
            )
        except ValueError as e:  # a producer split another way than the model can be: nothing to pull
            log.warning("transfer %s cannot be loaded: %s; kv_load_failure_policy applies", request.transfer_id, e)
            return []

    def _start_load(self, request: LoadRequest, consumer: FrameConsumer) -> None:
        streams = [
            consumer.fetch(
                rank_endpoint(request.producer, source.producer_rank),
                request.transfer_id,
                self.config.load_timeout_s,
                from_token=request.start,
                reader=(source.reader, source.readers),
            )
            for source in self._plan(request)
        ]
        load = _Load(request, streams, time.perf_counter(), pending=len(streams), failed=not streams)
        with self._lock:
            self._loads[request.req_id] = load
        if not streams:
            self._count(**{FAILURE_PREFIX + "refused": 1})
            self._finish(load)
        for stream in streams:
            name = f"cachegen-load-{request.transfer_id}"
            threading.Thread(target=self._load, args=(load, stream), name=name, daemon=True).start()

    def _load(self, load: _Load, fetch: TransferStream) -> None:
        """Fetch, decode and scatter one producer rank's frames of a transfer; the last of a
        request's threads reports it finished, with its blocks as load errors if any failed."""
        request, failed = load.request, False
        try:
            self._receive(load, fetch)
        except Exception as e:  # whatever it is, vLLM must not wait for this request forever
            failed = request.req_id not in self._cancelled  # an aborted request's blocks are simply freed
            if not failed:
                log.info("transfer %s stopped: its request was aborted", request.transfer_id)
            elif isinstance(e, (TransportError, FrameError)):
                log.warning(
                    "transfer %s from %s failed (%s: %s); kv_load_failure_policy applies",
                    request.transfer_id,
                    fetch.endpoint,
                    type(e).__name__,
                    e,
                )
                self._count(**{FAILURE_PREFIX + getattr(e, "kind", "corrupt"): 1})
            else:
                log.exception(
                    "transfer %s failed on an unexpected error; kv_load_failure_policy applies", request.transfer_id
                )
                self._count(**{FAILURE_PREFIX + "internal": 1})
            for sibling in load.streams:  # the request recomputes: the other ranks' frames are of no use
                if sibling is not fetch:
                    sibling.cancel()
        with self._lock:
            load.failed |= failed
            load.pending -= 1
            last = load.pending == 0
        if last:
            self._finish(load)

    def _finish(self, load: _Load) -> None:
        request = load.request
        if not load.failed and request.req_id not in self._cancelled:
            transfer = time.perf_counter() - load.started
            self._count(
                raw_bytes=self.geometry.layer_bytes(request.count) * self.geometry.num_layers,
                wire_bytes=load.wire_bytes,
                decode_seconds=load.decode_seconds,
                transfer_seconds=transfer,
                transfers=int(self._counts_requests),
            )
            if self._counts_requests:
                self._sample(transfer_duration=transfer, decode_duration=load.decode_seconds)
        with self._lock:  # both at once: vLLM wants the errors no later than the finish
            self._loads.pop(request.req_id, None)
            self._cancelled.discard(request.req_id)
            if load.failed:
                end = request.start + request.count
                self._failed_blocks.update(
                    request.block_ids[request.start // self._block_tokens : -(-end // self._block_tokens)]
                )
            self._done_loading.add(request.req_id)

    def _receive(self, load: _Load, fetch: TransferStream) -> None:
        """Pull one producer rank's frames and decode them, a layer's frames at a time, on the decode
        stream; return once the device has written them all."""
        request, runtime = load.request, self.runtime
        layers = {index: tensor for index, tensor in self._layers.values()}
        end = request.start + request.count
        loaded = dict.fromkeys(layers, 0)
        batch: list[bytes | memoryview] = []
        decoding = 0.0
        with runtime.decoding():
            blocks = self._block_table(request.block_ids)

        def decode_batch() -> None:
            nonlocal decoding
            t0 = time.perf_counter()
            with runtime.decoding():
                decoded = decode_frames_into_blocks(
                    batch,
                    layers,
                    self._order,
                    blocks,
                    geometry=self.geometry,
                    write_start=request.start,
                    write_end=end,
                    bases=self._bases,
                    runtime=runtime,
                    cache_scales=self._scales,
                )
            for layer, written in decoded:
                loaded[layer] += written
            batch.clear()
            decoding += time.perf_counter() - t0

        with fetch as stream:
            for frame in stream:
                if batch and frame_layer(frame) != frame_layer(batch[0]):
                    decode_batch()
                self._have_basis(frame_basis(frame), stream)
                batch.append(frame)
            if batch:
                decode_batch()
        with runtime.decoding():
            decoded_all = runtime.mark()
        runtime.wait(decoded_all)  # reported loaded only once the device has written the KV
        short = [layer for layer, n in loaded.items() if n != request.count]
        if short:
            raise FrameError(f"transfer ended without all tokens: {len(short)} layers short")
        with self._lock:
            load.wire_bytes += stream.bytes_received
            load.decode_seconds += decoding

    def _have_basis(self, digest: int, stream: TransferStream) -> None:
        """Fetch the basis a frame is coded in from its producer, once, if this decode has none of
        that digest (a producer's automatic basis): the frames' own producer serves it."""
        if not digest or bases.find(digest, self._bases) is not None:
            return
        with self._basis_lock:  # one fetch per digest, however many loads need it at once
            if bases.find(digest, self._bases) is not None:
                return
            data = self._consumer_or_fail().fetch_basis(
                stream.endpoint, digest, max(1.0, stream.deadline - time.monotonic())
            )
            try:
                basis = bases.from_bytes(data)
            except ValueError as e:
                raise FrameError(f"the basis {digest:016x} that {stream.endpoint} sent is not one: {e}") from None
            if basis.digest != digest:
                raise FrameError(f"{stream.endpoint} sent basis {basis.digest:016x} for {digest:016x}")
            self._bases = (*self._bases, basis)
            self._count(bases_fetched=1)
            log.info("CacheGenConnector fetched basis %016x %s from %s", digest, basis.shape, stream.endpoint)

    def _consumer_or_fail(self) -> FrameConsumer:
        if self._consumer is None:
            raise RuntimeError("this instance receives no KV")
        return self._consumer

    def get_finished(self, finished_req_ids: set[str] | None = None) -> tuple[set[str], set[str]]:
        """(requests whose sends are done, requests whose loads ended) since the last call. A send is
        done once its request finished (``finished_req_ids``, now or before) and every encode job of
        it is sealed; its blocks were held until then (`CacheGenScheduler.request_finished`)."""
        with self._lock:
            self._finished_saving.update(r for r in finished_req_ids or () if r in self._unsealed)
            sent = {r for r in self._finished_saving if self._unsealed[r] == 0}
            for req_id in sent:
                del self._unsealed[req_id]
            self._finished_saving -= sent
            loaded, self._done_loading = self._done_loading, set()
        if sent and self._counts_requests:
            self._count(released=len(sent))
        return sent, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ---- both ---------------------------------------------------------------------------------

    def _count(self, **amounts: float) -> None:
        with self._lock:
            self._stats.add(**amounts)

    def _gauge(self, **values: float) -> None:
        with self._lock:
            self._stats.gauge(**values)

    def _sample(self, **values: float) -> None:
        with self._lock:
            self._stats.sample(**values)

    def get_stats(self) -> CacheGenStats | None:
        """The counters since the last call, or None if nothing happened."""
        if self._producer is not None:  # what the transport's IO thread did since the last report
            for metric, stat in PRODUCER_COUNTERS.items():
                total = self._producer.stats[stat]
                self._count(**{metric: total - self._producer_reported.get(metric, 0)})
                self._producer_reported[metric] = total
            assert self._adapter is not None
            raw, wire = self._sent
            raw_per_token = self.geometry.layer_bytes(1) * self.geometry.num_layers
            arrives = kv_tokens_per_s(  # what a decode's fallback compares with its own prefill rate
                self._adapter.fixed_link_bytes_per_s or self._producer.goodput_bytes_per_s,
                raw_per_token * (wire / raw if raw else 1.0),
                self._adapter.production_bytes_per_s,
                raw_per_token,
            )
            if arrives is not None:
                self._gauge(kv_tokens_per_second=arrives)
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, CacheGenStats()
        return stats

    def shutdown(self) -> None:
        if self._runtime is not None:  # the sealer's queued jobs first: they put into the producer
            self._runtime.close()
        for side in (self._producer, self._consumer):
            if side is not None:
                side.close()
