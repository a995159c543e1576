"""CacheGenConnector: vLLM's V1 KV connector for disaggregated prefill/decode with compressed KV.

Composes the other modules and holds no math: `paged` turns a layer's tokens in vLLM's blocks into
frames and back (the Triton kernels on a CUDA cache, the reference codec on a CPU one), `transport`
streams the frames.

Prefill instance (``kv_role: kv_producer``): a request that carries
``kv_transfer_params={"do_remote_decode": true, "transfer_id": ...}`` (the proxy sets it) has each
layer's KV gathered, encoded and queued in `save_kv_layer`, as the forward pass produces it. Its
blocks are free as soon as the request finishes, since the frames are then in the host buffer;
`request_finished` hands back where they wait: ``{"do_remote_prefill": true, "transfer_id",
"producer", "num_tokens"}``.

Decode instance (``kv_role: kv_consumer``): such a request reports its prompt (less the last token,
which vLLM recomputes to sample from, and less any prefix it already holds in its prefix cache) as
loadable asynchronously; a worker thread pulls the frames from the first missing token on (so a
conversation's earlier turns do not cross the wire again), decodes each and scatters it into the
allocated blocks while other requests run. A failed transfer marks the blocks as load errors, and vLLM's
``kv_load_failure_policy`` decides (``recompute`` recomputes the prompt; ``fail`` fails the request).

Transfers are keyed by the proxy's ``transfer_id``, never by vLLM's request ids (which differ
between the two instances).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from cachegen_vllm.codec import FrameError, KVGeometry
from cachegen_vllm.codec.basis import load as load_basis
from cachegen_vllm.config import ConfigError, ConnectorConfig, connector_config_from_dict
from cachegen_vllm.metrics import FAILURE_PREFIX, PRODUCER_COUNTERS, CacheGenPromMetrics, CacheGenStats
from cachegen_vllm.paged import PageOrder, decode_into_blocks, encode_blocks, probe_page_order
from cachegen_vllm.transport import FrameConsumer, FrameProducer, TransferStream, TransportError
from cachegen_vllm.transport.protocol import MAX_TRANSFER_ID

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's logging configuration shows it beside vLLM's own lines.
log = init_logger("vllm.cachegen_vllm.connector")


@dataclass
class SaveRequest:
    """Tokens ``[start, end)`` of a prompt of ``total`` tokens were computed this step: send them."""

    transfer_id: str
    block_ids: list[int]
    start: int
    end: int
    total: int


@dataclass
class LoadRequest:
    """Fetch tokens ``[start, start + count)`` of a transfer into these blocks."""

    req_id: str
    transfer_id: str
    producer: str
    block_ids: list[int]
    start: int
    count: int


@dataclass
class CacheGenMetadata(KVConnectorMetadata):
    saves: list[SaveRequest] = field(default_factory=list)
    loads: list[LoadRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # requests aborted while their KV was loading


@dataclass
class _Saving:
    transfer_id: str
    total: int
    block_ids: list[int]
    saved: int = 0  # tokens already handed to the worker


def _config(vllm_config: "VllmConfig") -> tuple[ConnectorConfig, bool]:
    transfer = vllm_config.kv_transfer_config
    if transfer.kv_role not in ("kv_producer", "kv_consumer"):
        raise ConfigError("kv_role", f"CacheGenConnector is kv_producer (prefill) or kv_consumer (decode); got {transfer.kv_role!r}")
    producer = transfer.kv_role == "kv_producer"
    return connector_config_from_dict(dict(transfer.kv_connector_extra_config or {}), producer), producer


class CacheGenConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config, self.is_producer = _config(vllm_config)
        self.model_name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
        # scheduler side
        self._saving: dict[str, _Saving] = {}
        self._new_loads: list[LoadRequest] = []
        self._new_cancels: list[str] = []
        self._local_hits: dict[str, int] = {}
        self._loaded: set[str] = set()  # requests whose load was scheduled: never a second attempt
        # worker side
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}
        self._order: PageOrder | None = None
        self._block_size = 0
        self._geometry: KVGeometry | None = None
        self._producer: FrameProducer | None = None
        self._consumer: FrameConsumer | None = None
        self._lock = threading.Lock()
        self._done_loading: set[str] = set()
        self._streams: dict[str, TransferStream] = {}  # loads in flight, by request id
        self._cancelled: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._stats = CacheGenStats()
        self._producer_reported: dict[str, int] = {}  # transport counters already in stats

    # ---- scheduler side -------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if self.is_producer or not params.get("do_remote_prefill") or "transfer_id" not in params:
            return 0, False
        if not 0 < len(str(params["transfer_id"]).encode()) <= MAX_TRANSFER_ID:
            log.warning("request %s: transfer_id must be 1..%d bytes; recomputing", request.request_id, MAX_TRANSFER_ID)
            return 0, False
        if request.request_id in self._loaded:
            # Asked again only after a failed load (or a preemption): the producer has released or
            # lost the frames by then, so the prompt is recomputed.
            return 0, False
        # num_tokens (the prefill's prompt length) is absent when the proxy asks before the
        # prefill has answered; frames then carry what was computed, checked on arrival.
        prompt = len(request.prompt_token_ids or [])
        loadable = min(int(params.get("num_tokens", prompt)), prompt) - 1
        count = loadable - num_computed_tokens
        if count <= 0:
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        return count, True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        params = request.kv_transfer_params or {}
        if self.is_producer and params.get("do_remote_decode") and "transfer_id" in params:
            self._saving[request.request_id] = _Saving(str(params["transfer_id"]), len(request.prompt_token_ids or []), [])
        elif not self.is_producer and num_external_tokens > 0:
            self._loaded.add(request.request_id)
            self._new_loads.append(LoadRequest(
                req_id=request.request_id, transfer_id=str(params["transfer_id"]), producer=str(params["producer"]),
                block_ids=list(blocks.get_block_ids()[0]), start=self._local_hits.pop(request.request_id, 0),
                count=num_external_tokens,
            ))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = CacheGenMetadata(loads=self._new_loads, cancels=self._new_cancels)
        self._new_loads, self._new_cancels = [], []
        steps = [(r.req_id, r.block_ids[0], r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        steps += [
            (req_id, (cached.new_block_ids[i] or ([],))[0], cached.num_computed_tokens[i])
            for i, req_id in enumerate(cached.req_ids)
        ]
        for req_id, new_blocks, computed in steps:
            state = self._saving.get(req_id)
            if state is None:
                continue
            state.block_ids = state.block_ids + list(new_blocks)
            end = min(computed + scheduler_output.num_scheduled_tokens.get(req_id, 0), state.total)
            if end > state.saved:  # a prefix-cache hit is sent too: its blocks hold valid KV
                meta.saves.append(SaveRequest(state.transfer_id, state.block_ids, state.saved, end, state.total))
                state.saved = end
            if state.saved >= state.total:
                del self._saving[req_id]
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params or {}
        self._saving.pop(request.request_id, None)
        self._local_hits.pop(request.request_id, None)
        if request.request_id in self._loaded and request.status == RequestStatus.FINISHED_ABORTED:
            self._new_cancels.append(request.request_id)  # stop its transfer: vLLM frees the blocks once it ends
        self._loaded.discard(request.request_id)
        if not (self.is_producer and params.get("do_remote_decode") and "transfer_id" in params):
            return False, None
        return False, {
            "do_remote_prefill": True,
            "transfer_id": params["transfer_id"],
            "producer": self.config.advertise,
            "num_tokens": len(request.prompt_token_ids or []),
        }

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        return None  # any: the CPU page order is probed, see cachegen_vllm.paged

    # ---- worker side ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            # The Triton kernels read and write GPU pages (cachegen_vllm.kernels), but encoding in
            # save_kv_layer would wait on the forward pass's stream each layer: the GPU side needs
            # a stream of its own and asynchronous copies, and a run of vLLM on a GPU, first.
            raise NotImplementedError("CacheGenConnector runs on vLLM's CPU backend only so far; see NOTES.md, 'GPU path'")
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        first = next(iter(kv_caches.values()))
        _, heads, block_size, width = first.shape
        self._block_size = block_size
        self._layers = {name: (extract_layer_index(name), t) for name, t in kv_caches.items()}
        self._geometry = KVGeometry(len(kv_caches), heads, width // 2, first.dtype, model=str(self.model_name))
        self.config.profile.check_geometry(self._geometry.num_layers, self._geometry.head_dim, self._geometry.num_kv_heads)
        # a consumer reads frames coded in its own profile's basis too, not only in the shipped ones
        self._bases = (load_basis(self.config.profile.basis),) if self.config.profile.basis else ()
        self._order = probe_page_order(_get_attn_isa(first.dtype, block_size, width // 2), first.dtype, block_size, width // 2)
        if self.is_producer:
            self._producer = FrameProducer(self.config.transport)
            log.info("CacheGenConnector producer on %s (profile %s)", self._producer.endpoint, self.config.profile.name)
        else:
            self._consumer = FrameConsumer(self.config.transport)
            log.info("CacheGenConnector consumer (profile of each transfer is in its frames)")

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self._producer is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        layer, _ = self._layers[layer_name]
        for save in meta.saves:
            started = time.perf_counter()
            frames = encode_blocks(
                kv_layer, self._order, torch.tensor(save.block_ids, device=kv_layer.device), geometry=self._geometry,
                profile=self.config.profile, layer=layer, token_start=save.start, count=save.end - save.start,
                total_tokens=save.total,
            )
            last = save.end == save.total and layer == self._geometry.num_layers - 1
            try:
                for frame in frames:
                    self._producer.put(save.transfer_id, frame)
                if last:
                    self._producer.finish(save.transfer_id)
            except TransportError as e:  # the decode side recomputes; the prefill goes on
                log.warning("transfer %s not sent: %s", save.transfer_id, e)
                self._producer.abort(save.transfer_id, str(e))
                self._count(**{FAILURE_PREFIX + e.kind: 1})
                continue
            g = self._geometry
            self._count(
                raw_bytes=2 * (save.end - save.start) * g.channels * g.dtype.itemsize, wire_bytes=sum(map(len, frames)),
                encode_seconds=time.perf_counter() - started, transfers=int(last),
            )

    def wait_for_save(self):
        return  # frames are encoded synchronously in save_kv_layer

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._consumer is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        for load in meta.loads:  # before the cancels: a request may be aborted in the step its load begins
            stream = self._consumer.fetch(load.producer, load.transfer_id, self.config.load_timeout_s, from_token=load.start)
            with self._lock:
                self._streams[load.req_id] = stream
            threading.Thread(target=self._load, args=(load, stream), name=f"cachegen-load-{load.transfer_id}", daemon=True).start()
        for req_id in meta.cancels:
            with self._lock:  # a load already over has left _streams: nothing to stop
                stream = self._streams.get(req_id)
                if stream is not None:
                    self._cancelled.add(req_id)
            if stream is not None:
                stream.cancel()

    def _load(self, load: LoadRequest, fetch: TransferStream) -> None:
        """Fetch, decode and scatter one transfer; report it finished, with its blocks as load
        errors if anything failed."""
        layers = {index: tensor for index, tensor in self._layers.values()}
        blocks = torch.tensor(load.block_ids, device=next(iter(layers.values())).device)
        end = load.start + load.count
        loaded = {index: 0 for index in layers}
        started, decoding = time.perf_counter(), 0.0
        try:
            with fetch as stream:
                for frame in stream:
                    t0 = time.perf_counter()
                    layer, written = decode_into_blocks(
                        frame, layers, self._order, blocks, geometry=self._geometry, write_start=load.start, write_end=end,
                        bases=self._bases,
                    )
                    loaded[layer] += written
                    decoding += time.perf_counter() - t0
            missing = {layer: load.count - n for layer, n in loaded.items() if n != load.count}
            if missing:
                raise FrameError(f"transfer ended without all tokens: {len(missing)} layers short")
            failed = False
            g = self._geometry
            self._count(
                raw_bytes=2 * load.count * g.channels * g.dtype.itemsize * g.num_layers, wire_bytes=stream.bytes_received,
                decode_seconds=decoding, transfer_seconds=time.perf_counter() - started, transfers=1,
            )
        except (TransportError, FrameError) as e:
            failed = load.req_id not in self._cancelled  # an aborted request's blocks are simply freed
            if failed:
                log.warning("transfer %s failed (%s: %s); vLLM's kv_load_failure_policy applies", load.transfer_id, type(e).__name__, e)
                self._count(**{FAILURE_PREFIX + getattr(e, "kind", "corrupt"): 1})
            else:
                log.info("transfer %s stopped: its request was aborted", load.transfer_id)
        with self._lock:  # both at once: vLLM wants the errors no later than the finish
            self._streams.pop(load.req_id, None)
            self._cancelled.discard(load.req_id)
            if failed:
                self._failed_blocks.update(load.block_ids[load.start // self._block_size : -(-end // self._block_size)])
            self._done_loading.add(load.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once its whole transfer is in

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            done, self._done_loading = self._done_loading, set()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _count(self, **amounts: float) -> None:
        with self._lock:
            self._stats.add(**amounts)

    def get_kv_connector_stats(self) -> CacheGenStats | None:
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

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> CacheGenStats:
        return CacheGenStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> CacheGenPromMetrics:
        return CacheGenPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        for side in (self._producer, self._consumer):
            if side is not None:
                side.close()
