"""CacheGenConnector: vLLM's V1 KV connector for disaggregated prefill/decode with compressed KV.

A thin facade, as vLLM's own NixlConnector: vLLM makes one instance per role, and each forwards
to its side, `CacheGenScheduler` (request state, in the engine core) or `CacheGenWorker` (caches,
saving and loading, in each worker). The configuration is validated in both, so a bad option stops
start-up with the field's name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from cachegen_vllm.config import connector_config_from_dict
from cachegen_vllm.connector.metadata import CacheGenMetadata
from cachegen_vllm.connector.metrics import CacheGenPromMetrics, CacheGenStats
from cachegen_vllm.connector.ranks import Placement
from cachegen_vllm.connector.scheduler import CacheGenScheduler
from cachegen_vllm.connector.support import check_supported, layer_groups, state_layers
from cachegen_vllm.connector.worker import CacheGenWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


def manager_block_size(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> int:
    """The tokens of a block of vLLM's block manager: the KV cache group's (vLLM 0.33 sets the
    cache config's afterwards, from the groups), else the cache config's."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups:
        return int(groups[0].kv_cache_spec.block_size)
    return int(vllm_config.cache_config.block_size)


class CacheGenConnector(KVConnectorBase_V1, SupportsHMA):
    """``SupportsHMA``: vLLM keeps its hybrid KV cache manager on, so a sliding-window layer holds
    (and sends) its window only; the scheduler side tracks each KV cache group's blocks."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None  # vLLM makes a connector only from a kv_transfer_config
        config = connector_config_from_dict(transfer.kv_role, dict(transfer.kv_connector_extra_config or {}))
        check_supported(vllm_config, kv_cache_config)
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        placement = Placement(parallel.tensor_parallel_size, 0, parallel.data_parallel_index)
        scheduler = role == KVConnectorRole.SCHEDULER
        # an MLA latent is one head on every rank (vLLM's model config counts the query heads)
        total_kv_heads = 1 if getattr(model, "use_mla", False) else model.get_total_num_kv_heads()
        states = state_layers(kv_cache_config)
        self._scheduler = CacheGenScheduler(config, placement, total_kv_heads, bool(states)) if scheduler else None
        self._worker = None
        if role == KVConnectorRole.WORKER:
            if parallel.tensor_parallel_size > 1:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                placement = dataclasses.replace(placement, tp_rank=get_tensor_model_parallel_rank())
            name = str(model.served_model_name or model.model)
            cache = vllm_config.cache_config
            self._worker = CacheGenWorker(
                config,
                name,
                placement,
                total_kv_heads,
                manager_block_size(vllm_config, kv_cache_config),
                str(cache.cache_dtype),
                str(model.model),
                vllm_config.scheduler_config.max_num_batched_tokens,
                layer_groups(kv_cache_config),
                latent=bool(getattr(model, "use_mla", False)),
                state_layers=states,
            )

    @property
    def scheduler(self) -> CacheGenScheduler:
        assert self._scheduler is not None, "a scheduler-side call on the worker's connector"
        return self._scheduler

    @property
    def worker(self) -> CacheGenWorker:
        assert self._worker is not None, "a worker-side call on the scheduler's connector"
        return self._worker

    # ---- scheduler side -----------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """None: vLLM zeroes every block it allocates for a load (before the step's loads start,
        `Loading.start`), since a load writes its tokens only, and attention reads a partly filled
        block whole (stale NaN bytes in its tail would spoil it; an SSM layer's old state bytes
        in a block an attention layer takes over did)."""
        return ()

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        stats = connector_output.kv_connector_stats
        self.scheduler.update_connector_output(stats if isinstance(stats, CacheGenStats) else None)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return None  # any: kernels follow the strides; the CPU page order is probed (paged.layout)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """A sending instance encodes in save_kv_layer, which a full CUDA graph's replay skips; a
        decode-only one (no ``bind``) keeps full graphs."""
        return bool((extra_config or {}).get("bind"))

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM 0.33 asks: the workers hold the caches they were given, so sleeping would pull
        them away under a transfer."""
        return False

    # ---- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches, self._vllm_config)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """The step's start, before its forward pass (vLLM 0.32 starts loads after it)."""
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, CacheGenMetadata):
            self.worker.begin_step(connector_metadata)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before a step whose forward pass may overwrite the blocks of requests just preempted
        (vLLM 0.32 and 0.33 call it before binding the step's metadata)."""
        if isinstance(kv_connector_metadata, CacheGenMetadata):
            self.worker.preempted(kv_connector_metadata.preempted)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.worker.save_kv_layer(layer_name)  # the bound cache: vLLM passes the registered tensor

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, CacheGenMetadata)
            self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once its whole transfer is in

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, loaded = self.worker.get_finished(finished_req_ids)
        return sent or None, loaded or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """What get_finished says, and the requests whose loads failed on a model of several KV
        cache groups (vLLM takes their failures by request, not by block)."""
        sent, loaded = self.worker.get_finished(finished_req_ids)
        return KVConnectorTransferResults(
            finished_sending=sent, finished_recving=loaded, failed_recving=self.worker.get_failed_loads()
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.worker.get_stats() if self._worker is not None else self.scheduler.get_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return CacheGenStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> CacheGenPromMetrics:
        return CacheGenPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
