"""The connector's worker side: the KV caches, saving (encode and send) and loading (receive and
decode), and the counters of both.

Prefill (producer): `save_kv_layer` runs right after a layer's attention has written its cache;
each `SaveRequest` of the step has that layer's tokens encoded from the request's blocks and queued
in the transport's send buffer, so the blocks can be freed as soon as the request finishes.

Decode (consumer): each `LoadRequest` pulls the frames from the first token the request lacks, from
every producer rank that holds heads of this rank (`connector.ranks`), a thread per producer rank;
each frame is decoded and its heads of this rank scattered into the allocated blocks while other
requests run. Whatever ends a load (all tokens in, a transport or frame error, a cancel, or a
bug), the request is reported finished once all its threads are; if any failed, its blocks are
reported as load errors and vLLM's ``kv_load_failure_policy`` decides (``recompute`` recomputes
the prompt; ``fail`` fails it). With tensor parallelism every rank reports, and vLLM waits for all.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch
from vllm.logger import init_logger

from cachegen_vllm.codec import FrameError, KVGeometry
from cachegen_vllm.codec import basis as bases
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.codec.profile import ConfigError
from cachegen_vllm.config import EXTRA, ConnectorConfig
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.metrics import FAILURE_PREFIX, PRODUCER_COUNTERS, CacheGenStats
from cachegen_vllm.connector.ranks import Placement, first_holder, rank_endpoint, sources
from cachegen_vllm.paged import PageOrder, decode_into_blocks, encode_blocks, probe_page_order
from cachegen_vllm.transport import FrameConsumer, FrameProducer, TransferStream, TransportError

log = init_logger("vllm.cachegen_vllm.connector")


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
    ):
        self.config = config
        self.model_name = model_name
        self.placement = placement or Placement()
        self.total_kv_heads = total_kv_heads  # None: the caches hold all the model's heads
        # requests (transfers, durations) are counted once per engine, by its first rank; bytes
        # and seconds by every rank, as each moves its own
        self._counts_requests = self.placement.tp_rank == 0
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # layer name: (index, cache)
        self._order: PageOrder | None = None
        self._block_size = 0
        self._geometry: KVGeometry | None = None
        self._bases: tuple[bases.Basis, ...] = ()
        self._producer: FrameProducer | None = None
        self._consumer: FrameConsumer | None = None
        self._lock = threading.Lock()
        self._done_loading: set[str] = set()
        self._loads: dict[str, _Load] = {}  # loads in flight, by request id
        self._cancelled: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._stats = CacheGenStats()
        self._producer_reported: dict[str, int] = {}  # transport counters already in the stats
        self._encoding: dict[str, float] = {}  # seconds spent encoding each transfer so far

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's caches, one per attention layer. vLLM's CPU backend only, so far: the Triton
        kernels read and write GPU pages, but encoding in `save_kv_layer` would wait on the forward
        pass's stream each layer, and the GPU side needs a stream of its own first."""
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError("CacheGenConnector runs on vLLM's CPU backend only so far (docs/DESIGN.md)")
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        first = next(iter(kv_caches.values()))
        _, _, block_size, width = first.shape
        order = probe_page_order(
            _get_attn_isa(first.dtype, block_size, width // 2), first.dtype, block_size, width // 2
        )
        self.bind_caches({name: (extract_layer_index(name), t) for name, t in kv_caches.items()}, order)

    def bind_caches(self, layers: dict[str, tuple[int, torch.Tensor]], order: PageOrder | None) -> None:
        """Start on these caches (layer name: (layer index, cache)) in this page order (None: the
        tensors' strides are the layout), and open the transport."""
        first = next(iter(layers.values()))[1]
        _, heads, self._block_size, width = first.shape
        self._layers, self._order = layers, order
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
            first.dtype,
            model=self.model_name,
            head_start=head_start,
            total_kv_heads=total,
        )
        profile = self.config.profile
        profile.check_geometry(self._geometry.num_layers, self._geometry.head_dim, total)
        # a consumer reads frames coded in its own profile's basis too, not only in the shipped ones
        self._bases = (bases.load(profile.basis),) if profile.basis else ()
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
            log.info(
                "CacheGenConnector sends KV heads [%d, %d) from %s (profile %s)",
                head_start,
                head_start + heads,
                self._producer.endpoint,
                profile.name,
            )
        if self.config.receives:
            self._consumer = FrameConsumer(self.config.transport)
            log.info("CacheGenConnector receives (the profile of each transfer is in its frames)")

    @property
    def geometry(self) -> KVGeometry:
        if self._geometry is None:
            raise RuntimeError("the connector's worker has no KV caches yet (register_kv_caches)")
        return self._geometry

    # ---- prefill ------------------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: CacheGenMetadata) -> None:
        if self._producer is None:
            return
        layer, _ = self._layers[layer_name]
        for save in meta.saves:
            self._save(save, layer, kv_layer, self._producer)

    def _drop_aborted(self, meta: CacheGenMetadata) -> None:
        """Transfers whose prefill request was aborted: their frames go, and a decode pulling one is
        refused at once (it recomputes) instead of waiting for frames that will not come."""
        if self._producer is None:
            return
        for transfer_id in meta.aborted:
            self._producer.abort(transfer_id, "its prefill request was aborted")
            self._encoding.pop(transfer_id, None)

    def _save(self, save: SaveRequest, layer: int, kv_layer: torch.Tensor, producer: FrameProducer) -> None:
        started = time.perf_counter()
        frames = encode_blocks(
            kv_layer,
            self._order,
            torch.tensor(save.block_ids, device=kv_layer.device),
            geometry=self.geometry,
            profile=self.config.profile,
            layer=layer,
            token_start=save.start,
            count=save.end - save.start,
            total_tokens=save.total,
        )
        last = save.end == save.total and layer == self.geometry.num_layers - 1
        try:
            for frame in frames:
                producer.put(save.transfer_id, frame)
            if last:
                producer.finish(save.transfer_id)
        except TransportError as e:  # the decode side recomputes; the prefill goes on
            log.warning("transfer %s not sent: %s", save.transfer_id, e)
            producer.abort(save.transfer_id, str(e))
            self._encoding.pop(save.transfer_id, None)
            self._count(**{FAILURE_PREFIX + e.kind: 1})
            return
        seconds = time.perf_counter() - started
        self._encoding[save.transfer_id] = self._encoding.get(save.transfer_id, 0.0) + seconds
        self._count(
            raw_bytes=self.geometry.layer_bytes(save.end - save.start),
            wire_bytes=sum(map(len, frames)),
            encode_seconds=seconds,
            transfers=int(last and self._counts_requests),
        )
        if last:
            encoding = self._encoding.pop(save.transfer_id)
            if self._counts_requests:
                self._sample(encode_duration=encoding)

    # ---- decode -------------------------------------------------------------------------------

    def start_load_kv(self, meta: CacheGenMetadata) -> None:
        """The step's start: drops aborted sends, starts new loads, cancels aborted ones."""
        self._drop_aborted(meta)
        if self._consumer is None:
            return
        for load in meta.loads:  # before the cancels: a request may be aborted in the step its load begins
            self._start_load(load, self._consumer)
        for req_id in meta.cancels:
            with self._lock:  # a load already over has left _loads: nothing to stop
                cancelled = self._loads.get(req_id)
                if cancelled is not None:
                    self._cancelled.add(req_id)
            if cancelled is not None:
                for stream in cancelled.streams:
                    stream.cancel()

    def _start_load(self, request: LoadRequest, consumer: FrameConsumer) -> None:
        try:
            plan = sources(
                self.geometry.total_kv_heads, request.producer_tp, self.placement.tp_size, self.placement.tp_rank
            )
        except ValueError as e:  # a producer split another way than the model can be: nothing to pull
            log.warning("transfer %s cannot be loaded: %s; kv_load_failure_policy applies", request.transfer_id, e)
            plan = []
        streams = [
            consumer.fetch(
                rank_endpoint(request.producer, source.producer_rank),
                request.transfer_id,
                self.config.load_timeout_s,
                from_token=request.start,
                reader=(source.reader, source.readers),
            )
            for source in plan
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
                    request.block_ids[request.start // self._block_size : -(-end // self._block_size)]
                )
            self._done_loading.add(request.req_id)

    def _receive(self, load: _Load, fetch: TransferStream) -> None:
        request = load.request
        layers = {index: tensor for index, tensor in self._layers.values()}
        blocks = torch.tensor(request.block_ids, device=next(iter(layers.values())).device)
        end = request.start + request.count
        loaded = dict.fromkeys(layers, 0)
        decoding = 0.0
        with fetch as stream:
            for frame in stream:
                t0 = time.perf_counter()
                layer, written = decode_into_blocks(
                    frame,
                    layers,
                    self._order,
                    blocks,
                    geometry=self.geometry,
                    write_start=request.start,
                    write_end=end,
                    bases=self._bases,
                )
                loaded[layer] += written
                decoding += time.perf_counter() - t0
        short = [layer for layer, n in loaded.items() if n != request.count]
        if short:
            raise FrameError(f"transfer ended without all tokens: {len(short)} layers short")
        with self._lock:
            load.wire_bytes += stream.bytes_received
            load.decode_seconds += decoding

    def get_finished(self) -> set[str]:
        """Requests whose loads ended since the last call."""
        with self._lock:
            done, self._done_loading = self._done_loading, set()
        return done

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ---- both ---------------------------------------------------------------------------------

    def _count(self, **amounts: float) -> None:
        with self._lock:
            self._stats.add(**amounts)

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
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, CacheGenStats()
        return stats

    def shutdown(self) -> None:
        for side in (self._producer, self._consumer):
            if side is not None:
                side.close()
