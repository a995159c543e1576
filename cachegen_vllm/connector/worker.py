"""The connector's worker side, in each of vLLM's workers: it binds vLLM's caches once
(`PagedCaches`: layers, page order, geometry, device runtime, bases, fp8 scales), warms up every
code path its profiles take, and dispatches each of vLLM's calls to the side it concerns: saving
(`saving.Saving`, a prefill's) and loading (`loading.Loading`, a decode's); ``kv_both`` has both.
Device work goes through a `device.Runtime` (streams, events, pinned memory and the sealer thread
on a GPU; the same calls, done at once, on a CPU), so the code paths are the same on both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from vllm.logger import init_logger

from cachegen_vllm.codec import KVGeometry
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.codec.profile import AUTO_BASIS
from cachegen_vllm.config import ConnectorConfig
from cachegen_vllm.connector.loading import Loading
from cachegen_vllm.connector.metadata import CacheGenMetadata
from cachegen_vllm.connector.metrics import CacheGenStats, Counters
from cachegen_vllm.connector.ranks import Placement
from cachegen_vllm.connector.saving import Saving
from cachegen_vllm.connector.support import check_latent_levels
from cachegen_vllm.device import Runtime, runtime_for
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.paged import FP8_CACHE_DTYPES, PagedCaches, PageOrder, StateLayers, probe_page_order, warm_up

log = init_logger("vllm.cachegen_vllm.connector")


class CacheGenWorker:
    """``total_kv_heads``: the model's (None: the caches hold them all); ``block_size``: vLLM's block
    manager's (None: the caches'); ``kv_cache_dtype``: vLLM's setting (an fp8 one stores uint8
    pages of that format); ``model_path``: the checkpoint an "auto" basis is fitted on;
    ``step_tokens``: the most tokens a step computes (vLLM's ``max_num_batched_tokens``), for which
    a layer's frame buffer is allocated at start-up; ``layer_groups``: each layer's (KV cache
    group, sliding window) by name (`support.layer_groups`; None: one group of full attention);
    ``latent``: the caches hold MLA latents (`KVGeometry.latent`); ``state_layers``: an SSM
    hybrid's state layers' (KV cache group, state bytes, tokens per block) by name
    (`support.state_layers`)."""

    def __init__(
        self,
        config: ConnectorConfig,
        model_name: str,
        placement: Placement | None = None,
        total_kv_heads: int | None = None,
        block_size: int | None = None,
        kv_cache_dtype: str = "auto",
        model_path: str | None = None,
        step_tokens: int = 8192,
        layer_groups: dict[str, tuple[int, int]] | None = None,
        latent: bool = False,
        state_layers: dict[str, tuple[int, int, int]] | None = None,
    ):
        self.config = config
        self.model_name = model_name
        self.model_path = model_path or model_name
        self.placement = placement or Placement()
        self.total_kv_heads = total_kv_heads
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.step_tokens = step_tokens
        self.layer_groups = layer_groups or {}
        self.latent = latent
        self.state_layers = state_layers or {}
        self.counters = Counters()
        self._caches: PagedCaches | None = None
        self._names: dict[str, int] = {}  # layer name: layer index
        self._unknown: set[str] = set()  # layers saved that were never registered
        self.saving: Saving | None = None
        self.loading: Loading | None = None
        self._idle = False  # the bound step computes nothing

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], vllm_config: Any) -> None:
        """vLLM's caches, one per layer: on a GPU, views whose strides are the layout; on vLLM's
        CPU backend, pages whose order is probed. Attention layers are numbered in model order,
        an SSM hybrid's state layers apart from them."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        given = kv_caches
        states = sorted((name for name in given if name in self.state_layers), key=extract_layer_index)
        names = sorted((name for name in given if name not in self.state_layers), key=extract_layer_index)
        kv_caches = {name: given[name] for name in names}
        if self.latent:  # an MLA cache without a head axis ([blocks, block, width]) is one head's
            kv_caches = {name: t if t.dim() == 4 else t.unsqueeze(1) for name, t in kv_caches.items()}
        first = kv_caches[names[0]]
        attention = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, names)  # type: ignore[type-abstract]
        if current_platform.is_cpu() and not self.latent:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            _, _, block_size, width = first.shape
            dtype = vllm_config.model_config.dtype  # what vLLM's cache writer is given
            isa = _get_attn_isa(dtype, block_size, width // 2, self.kv_cache_dtype)
            order = probe_page_order(isa, dtype, block_size, width // 2, self.kv_cache_dtype)
        elif current_platform.is_cuda_alike() or current_platform.is_cpu():  # an MLA page is rows of latents
            order = None
        else:
            raise RuntimeError(
                f"CacheGenConnector runs on vLLM's CUDA and CPU backends, not {current_platform.device_name}"
            )
        modules = [attention[name] for name in names]

        def scales(layer: int) -> tuple[float, float]:  # read at each use: vLLM may calibrate them at first
            module = modules[layer]
            return float(module._k_scale_float), float(module._v_scale_float)  # type: ignore[attr-defined]

        self.bind_caches(
            {name: (i, kv_caches[name]) for i, name in enumerate(names)},
            order,
            scales=scales if self.kv_cache_dtype.startswith("fp8") else None,
            states=[(name, given[name]) for name in states],
        )

    def bind_caches(
        self,
        layers: dict[str, tuple[int, torch.Tensor]],
        order: PageOrder | None,
        runtime: Runtime | None = None,
        scales: Callable[[int], tuple[float, float]] | None = None,
        states: list[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        """Start on these caches (layer name: (layer index, cache)) in this page order (None: the
        tensors' strides are the layout): bind them, fit an "auto" basis if a profile asks, check
        and warm up every profile, start saving and loading as the role asks. ``scales``: an fp8
        cache's (key, value) scales of a layer (vLLM's ``k_scale``, ``v_scale``); ``states``: an SSM
        hybrid's state layers' caches by name, in model order."""
        first = next(iter(layers.values()))[1]
        _, heads, kernel_block, width = first.shape
        if self.block_size is not None and self.block_size % kernel_block:
            raise RuntimeError(f"vLLM's block size {self.block_size} is not a multiple of the caches' {kernel_block}")
        total = self.total_kv_heads or heads
        head_start, count = rank_heads(total, self.placement.tp_size, self.placement.tp_rank)
        if count != heads:
            raise RuntimeError(
                f"the caches hold {heads} KV heads; tensor-parallel rank {self.placement.tp_rank} "
                f"of {self.placement.tp_size} should hold {count} of the model's {total}"
            )
        state_layers = None
        if states:
            info = [self.state_layers[name] for name, _ in states]
            nbytes, state_groups = [n for _, n, _ in info], [g for g, _, _ in info]
            state_layers = StateLayers.bind([cache for _, cache in states], nbytes, state_groups, info[0][2])
        indices = {name: index for name, (index, _) in layers.items()}
        groups = {indices[name]: group for name, (group, _) in self.layer_groups.items() if name in indices}
        windows = {indices[name]: window for name, (_, window) in self.layer_groups.items() if name in indices}
        geometry = KVGeometry(
            len(layers),
            heads,
            width // 2,
            FP8_CACHE_DTYPES.get(self.kv_cache_dtype, first.dtype),
            model=self.model_name,
            head_start=head_start,
            total_kv_heads=total,
            windows=tuple(windows.get(i, 0) for i in range(len(layers))) if any(windows.values()) else (),
            latent=self.latent,
            states=state_layers.nbytes if state_layers is not None else (),
        )
        self._names = indices
        self._caches = caches = PagedCaches(
            {index: cache for index, cache in layers.values()},
            order,
            geometry,
            runtime=runtime or runtime_for(first.device, self.config.max_encode_inflight_bytes),
            scales=scales,
            per_block=(self.block_size or kernel_block) // kernel_block,
            groups=groups,
            states=state_layers,
        )
        if self.config.sends:  # an "auto" basis is fitted to the model now (or read from its cache)
            # a layer's frames of a whole step: at most raw KV's size, give or take their headers
            caches.runtime.reserve_frames(geometry.layer_bytes(self.step_tokens) * 9 // 8 + (1 << 20))
            profiles = tuple(autobasis.resolve(p, self.model_path, log.info) for p in self.config.ladder)
            if self.latent:
                check_latent_levels(profiles)
        else:  # a decode codes nothing: its profiles' "auto" bases are never fitted
            profiles = tuple(p for p in self.config.ladder if p.basis != AUTO_BASIS)
        started = time.perf_counter()
        for profile in profiles:  # a decode reads frames in its own profiles' bases too
            caches.check_profile(profile)
            warm_up(caches, profile)
        log.info(
            "CacheGenConnector warmed up on %s in %.1f s (%s); encodes %s",
            first.device,
            time.perf_counter() - started,
            ", ".join(p.name for p in profiles),
            "on the forward pass's thread" if caches.runtime.encode_holds_compute else "beside the forward pass",
        )
        if self.config.sends:
            self.saving = Saving(self.config, profiles, caches, self.placement, self.counters)
        if self.config.receives:
            self.loading = Loading(self.config, caches, self.placement, self.counters)

    @property
    def caches(self) -> PagedCaches:
        if self._caches is None:
            raise RuntimeError("the connector's worker has no KV caches yet (register_kv_caches)")
        return self._caches

    def begin_step(self, meta: CacheGenMetadata) -> None:
        """vLLM bound the step's metadata: its forward pass comes next."""
        self._idle = meta.idle
        if self.saving is not None:
            self.saving.begin_step(meta)

    def preempted(self, req_ids: list[str]) -> None:
        """vLLM frees these requests' blocks before the next forward pass: return once nothing of
        ours reads them."""
        if self.saving is not None and req_ids:
            self.saving.preempted(set(req_ids))

    def save_kv_layer(self, layer_name: str) -> None:
        """A layer's attention has written its cache (one it was not given saves nothing: logged
        once, never an error in the forward pass)."""
        if self.saving is None:
            return
        layer = self._names.get(layer_name)
        if layer is None:
            if layer_name not in self._unknown:
                self._unknown.add(layer_name)
                log.warning("CacheGenConnector: no cache of layer %s was registered; it is not sent", layer_name)
            return
        self.saving.save_layer(layer)

    def wait_for_save(self) -> None:
        if self.saving is not None:
            self.saving.wait_for_save()

    def start_load_kv(self, meta: CacheGenMetadata) -> None:
        if self.loading is not None:
            self.loading.start(meta)

    def get_finished(self, finished_req_ids: set[str] | None = None) -> tuple[set[str], set[str]]:
        """(requests whose sends are done, requests whose loads ended) since the last call."""
        sent = self.saving.finished(finished_req_ids or set()) if self.saving is not None else set()
        loaded = self.loading.finished(wait=self._idle and not sent) if self.loading is not None else set()
        return sent, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.loading.failed_blocks() if self.loading is not None else set()

    def get_failed_loads(self) -> set[str]:
        """Requests whose loads failed, of a hybrid model (`Loading.failed_requests`)."""
        return self.loading.failed_requests() if self.loading is not None else set()

    def get_stats(self) -> CacheGenStats | None:
        """The counters since the last call, or None if nothing happened."""
        if self.saving is not None:
            self.saving.report()
        return self.counters.take()

    def shutdown(self) -> None:
        if self._caches is not None:  # the sealer's queued jobs first: they put into the producer
            self._caches.runtime.close()
        for side in (self.saving, self.loading):
            if side is not None:
                side.close()
