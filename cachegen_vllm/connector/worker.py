"""The connector's worker side: the KV caches, saving (encode and send) and loading (receive and
decode), and the counters of both.

Prefill (producer): `save_kv_layer` runs right after a layer's attention has written its cache;
each `SaveRequest` of the step has that layer's tokens encoded from the request's blocks and queued
in the transport's send buffer, so the blocks can be freed as soon as the request finishes.

Decode (consumer): each `LoadRequest` gets a thread that pulls the frames from the first token the
request lacks, decodes each and scatters it into the allocated blocks while other requests run.
Whatever ends a load (all tokens in, a transport or frame error, a cancel, or a bug), the request
is reported finished; if the load failed, its blocks are reported as load errors and vLLM's
``kv_load_failure_policy`` decides (``recompute`` recomputes the prompt; ``fail`` fails it).
"""

from __future__ import annotations

import threading
import time

import torch
from vllm.logger import init_logger

from cachegen_vllm.codec import FrameError, KVGeometry
from cachegen_vllm.codec import basis as bases
from cachegen_vllm.config import ConnectorConfig
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.metrics import FAILURE_PREFIX, PRODUCER_COUNTERS, CacheGenStats
from cachegen_vllm.paged import PageOrder, decode_into_blocks, encode_blocks, probe_page_order
from cachegen_vllm.transport import FrameConsumer, FrameProducer, TransferStream, TransportError

log = init_logger("vllm.cachegen_vllm.connector")


class CacheGenWorker:
    def __init__(self, config: ConnectorConfig, model_name: str):
        self.config = config
        self.model_name = model_name
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # layer name: (index, cache)
        self._order: PageOrder | None = None
        self._block_size = 0
        self._geometry: KVGeometry | None = None
        self._bases: tuple[bases.Basis, ...] = ()
        self._producer: FrameProducer | None = None
        self._consumer: FrameConsumer | None = None
        self._lock = threading.Lock()
        self._done_loading: set[str] = set()
        self._streams: dict[str, TransferStream] = {}  # loads in flight, by request id
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
        self._geometry = KVGeometry(len(layers), heads, width // 2, first.dtype, model=self.model_name)
        profile = self.config.profile
        profile.check_geometry(self._geometry.num_layers, self._geometry.head_dim, self._geometry.num_kv_heads)
        # a consumer reads frames coded in its own profile's basis too, not only in the shipped ones
        self._bases = (bases.load(profile.basis),) if profile.basis else ()
        if self.config.sends:
            self._producer = FrameProducer(self.config.transport)
            log.info("CacheGenConnector sends from %s (profile %s)", self._producer.endpoint, profile.name)
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
            transfers=int(last),
        )
        if last:
            self._sample(encode_duration=self._encoding.pop(save.transfer_id))

    # ---- decode -------------------------------------------------------------------------------

    def start_load_kv(self, meta: CacheGenMetadata) -> None:
        """The step's start: drops aborted sends, starts new loads, cancels aborted ones."""
        self._drop_aborted(meta)
        if self._consumer is None:
            return
        for load in meta.loads:  # before the cancels: a request may be aborted in the step its load begins
            stream = self._consumer.fetch(
                load.producer, load.transfer_id, self.config.load_timeout_s, from_token=load.start
            )
            with self._lock:
                self._streams[load.req_id] = stream
            name = f"cachegen-load-{load.transfer_id}"
            threading.Thread(target=self._load, args=(load, stream), name=name, daemon=True).start()
        for req_id in meta.cancels:
            with self._lock:  # a load already over has left _streams: nothing to stop
                cancelled = self._streams.get(req_id)
                if cancelled is not None:
                    self._cancelled.add(req_id)
            if cancelled is not None:
                cancelled.cancel()

    def _load(self, load: LoadRequest, fetch: TransferStream) -> None:
        """Fetch, decode and scatter one transfer; report it finished, with its blocks as load
        errors if anything failed."""
        failed = False
        try:
            self._receive(load, fetch)
        except Exception as e:  # whatever it is, vLLM must not wait for this request forever
            failed = load.req_id not in self._cancelled  # an aborted request's blocks are simply freed
            if not failed:
                log.info("transfer %s stopped: its request was aborted", load.transfer_id)
            elif isinstance(e, (TransportError, FrameError)):
                log.warning(
                    "transfer %s failed (%s: %s); kv_load_failure_policy applies", load.transfer_id, type(e).__name__, e
                )
                self._count(**{FAILURE_PREFIX + getattr(e, "kind", "corrupt"): 1})
            else:
                log.exception(
                    "transfer %s failed on an unexpected error; kv_load_failure_policy applies", load.transfer_id
                )
                self._count(**{FAILURE_PREFIX + "internal": 1})
        with self._lock:  # both at once: vLLM wants the errors no later than the finish
            self._streams.pop(load.req_id, None)
            self._cancelled.discard(load.req_id)
            if failed:
                end = load.start + load.count
                self._failed_blocks.update(load.block_ids[load.start // self._block_size : -(-end // self._block_size)])
            self._done_loading.add(load.req_id)

    def _receive(self, load: LoadRequest, fetch: TransferStream) -> None:
        layers = {index: tensor for index, tensor in self._layers.values()}
        blocks = torch.tensor(load.block_ids, device=next(iter(layers.values())).device)
        end = load.start + load.count
        loaded = dict.fromkeys(layers, 0)
        started, decoding = time.perf_counter(), 0.0
        with fetch as stream:
            for frame in stream:
                t0 = time.perf_counter()
                layer, written = decode_into_blocks(
                    frame,
                    layers,
                    self._order,
                    blocks,
                    geometry=self.geometry,
                    write_start=load.start,
                    write_end=end,
                    bases=self._bases,
                )
                loaded[layer] += written
                decoding += time.perf_counter() - t0
        short = [layer for layer, n in loaded.items() if n != load.count]
        if short:
            raise FrameError(f"transfer ended without all tokens: {len(short)} layers short")
        transfer = time.perf_counter() - started
        self._count(
            raw_bytes=self.geometry.layer_bytes(load.count) * self.geometry.num_layers,
            wire_bytes=stream.bytes_received,
            decode_seconds=decoding,
            transfer_seconds=transfer,
            transfers=1,
        )
        self._sample(transfer_duration=transfer, decode_duration=decoding)

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
