"""One worker's vLLM KV caches, bound once (`PagedCaches`), and the codec's way back into them:
frames into a request's blocks (`PagedCaches.decode`, a layer's frames in one batch). The way out,
a step's saves to frames, is `paged.encoding`.

The Triton kernels (`cachegen_vllm.kernels`) code bit-packed frames on a CUDA cache; the reference
codec does the rest: every frame on a CPU cache, entropy-coded frames on either, and a frame whose
values the kernels' float16 statistics cannot hold (sent exact, as the reference does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from cachegen_vllm.codec import FrameError, KVGeometry, ParsedFrame, Profile, decode_frames
from cachegen_vllm.codec.basis import Basis, BasisRegistry
from cachegen_vllm.codec.profile import LOSSLESS_BITS
from cachegen_vllm.device import Runtime
from cachegen_vllm.paged.layout import PageOrder, kernel_block_ids, scatter
from cachegen_vllm.paged.states import StateLayers


def _on_gpu(device: torch.device) -> bool:
    """Whether a cache is a CUDA one. The first time one is, this imports the Triton rANS coder and
    lossless field coder, which register themselves with the codec for CUDA tensors."""
    if device.type != "cuda":
        return False
    from cachegen_vllm.kernels import lossless_fields, rans_coder  # noqa: F401  (each registers itself)

    return True


def kernels_take(geometry: KVGeometry, group_tokens: int, widths: set[int]) -> bool:
    """Whether the Triton frame kernels code frames of these widths on this cache: bit-packed
    codes or exact, on what `check_supported` accepts (a power-of-two head, 16- or 32-bit floats);
    the reference codec, torch on the same device, takes the rest (lossless, fp8, other heads)."""
    from cachegen_vllm.kernels.tile_kernels import check_supported

    try:
        check_supported(geometry, group_tokens)
    except ValueError:
        return False
    return LOSSLESS_BITS not in widths


def _written(token_start: int, count: int, write_start: int, write_end: int) -> tuple[int, int]:
    """The tokens (or heads) of a frame's ``[token_start, token_start + count)`` that ``[write_start,
    write_end)`` lets through: ``[lo, hi)``, empty if ``hi <= lo``."""
    return max(token_start, write_start), min(token_start + count, write_end)


class PagedCaches:
    """A worker's caches, one per layer (``layers``: layer index -> cache), in vLLM's page layout
    (``order``: the CPU page order probed from vLLM; None where the tensors' strides are the
    layout), holding ``geometry``'s heads, with everything coding them needs: the device
    ``runtime`` (streams, pinned memory), the ``bases`` frames may be coded in, an fp8 cache's
    per-layer ``scales`` (vLLM's ``k_scale``, ``v_scale``, read at each use: vLLM may calibrate them
    at first), how many of the caches' blocks make one of vLLM's block manager's (``per_block``),
    and each layer's KV cache group (``groups``: layer index -> group, whose blocks a request's
    table lists; default 0: one group), an SSM hybrid's state layers (``states``: the geometry's
    ``states``, in groups of their own). ``kernels``: whether the Triton kernels code what they can
    (default: on a CUDA cache; True on a CPU runs them in Triton's interpreter, the same bytes)."""

    def __init__(
        self,
        layers: Mapping[int, torch.Tensor],
        order: PageOrder | None,
        geometry: KVGeometry,
        *,
        runtime: Runtime | None = None,
        bases: BasisRegistry | None = None,
        scales: Callable[[int], tuple[float, float]] | None = None,
        per_block: int = 1,
        kernels: bool | None = None,
        groups: Mapping[int, int] | None = None,
        states: StateLayers | None = None,
    ):
        first = next(iter(layers.values()))
        self.layers = dict(layers)
        self.order = order
        self.geometry = geometry
        self.device = first.device
        self.runtime = runtime or Runtime(first.device)
        self.bases = bases or BasisRegistry()
        self.per_block = per_block
        self.groups = {layer: (groups or {}).get(layer, 0) for layer in self.layers}
        self.states = states
        self.block_tokens = first.shape[2] * per_block  # tokens per block of vLLM's block manager
        self._scales = scales
        on_gpu = _on_gpu(self.device)  # registers the Triton coders for CUDA tensors
        self.kernels = on_gpu if kernels is None else kernels

    def scales(self, layer: int) -> tuple[float, float]:
        """A layer's (key, value) scales: what its stored numbers are multiplied by."""
        return self._scales(layer) if self._scales is not None else (1.0, 1.0)

    def block_tables(self, block_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """`block_table` of each KV cache group's blocks."""
        return [self.block_table(group) for group in block_ids]

    def block_table(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A request's blocks (vLLM's block manager's) as the caches index them, on the device
        (enqueued on the current stream)."""
        return self.runtime.to_device(np.array(kernel_block_ids(block_ids, self.per_block), dtype=np.int64))

    def check_profile(self, profile: Profile) -> Basis | None:
        """ConfigError naming the field unless ``profile`` can serve these caches' model; the basis
        it codes in (None: none), kept in `bases`."""
        profile.check_geometry(self.geometry.num_layers)
        return self.bases.for_profile(profile, self.geometry)

    def decode(
        self, frames: Sequence[ParsedFrame], blocks: torch.Tensor, write_start: int, write_end: int
    ) -> list[tuple[int, int]]:
        """Decode frames (read where they entered) into the request's blocks of their layers, on the
        current stream: the packed frames of the caches' own heads by the kernels in one batch of
        launches, the others through the reference codec (their rANS lanes in one pass). Writes
        only the tokens in ``[write_start, write_end)`` and the heads the caches hold (a frame may
        hold others). Returns (layer, tokens written) per frame; raises FrameError on a frame of
        another model or in a basis it lacks, before writing anything of the frames the kernels
        decode."""
        geometry = self.geometry
        own = (geometry.head_start, geometry.num_kv_heads)
        on_kernels = [
            self.kernels
            and f.header.coding == "packed"
            and (f.header.head_start, f.header.head_count) == own
            and kernels_take(geometry, 1, f.header.widths)  # any group size decodes: 1 passes its check
            for f in frames
        ]
        out: dict[int, tuple[int, int]] = {}
        kernel_frames = [f for f, k in zip(frames, on_kernels) if k]
        if kernel_frames:
            from cachegen_vllm.kernels import plans

            headers = plans.decode_frames_paged(
                kernel_frames,
                self.layers,
                blocks,
                geometry=geometry,
                write_start=write_start,
                write_end=write_end,
                runtime=self.runtime,
            )
            places = [i for i, k in enumerate(on_kernels) if k]
            for i, header in zip(places, headers):
                lo, hi = _written(header.token_start, header.token_count, write_start, write_end)
                out[i] = (header.layer, max(0, hi - lo))
        rest = [i for i, k in enumerate(on_kernels) if not k]
        chunks = (
            decode_frames(
                [frames[i] for i in rest], geometry, device=self.device, bases=self.bases, cache_scales=self._scales
            )
            if rest
            else []
        )
        for i, chunk in zip(rest, chunks):
            lo, hi = _written(chunk.token_start, chunk.key.shape[0], write_start, write_end)
            first, last = _written(chunk.head_start, chunk.key.shape[1], geometry.head_start, geometry.heads.stop)
            if lo >= hi or first >= last:
                out[i] = (chunk.layer, 0)
                continue
            rows = slice(lo - chunk.token_start, hi - chunk.token_start)
            heads = slice(first - chunk.head_start, last - chunk.head_start)
            cache = self.layers[chunk.layer]
            # fp8 values go into vLLM's uint8 pages as they are
            key, value = (t[rows, heads].view(cache.dtype) for t in (chunk.key, chunk.value))
            scatter(cache, self.order, blocks, lo, key, value, first_head=first - geometry.head_start)
            out[i] = (chunk.layer, hi - lo)
        return [out[i] for i in range(len(frames))]

    @property
    def num_groups(self) -> int:
        """The KV cache groups a request's block lists hold."""
        return 1 + max([*self.groups.values(), *(self.states.groups if self.states is not None else ())])

    def write_state(self, frame: ParsedFrame, block_ids: Sequence[Sequence[int]], tokens: int) -> int:
        """A STATE frame (read where it entered) into the request's block that holds the state
        after its first ``tokens`` tokens, on the current stream; FrameError on a state of another
        model or after other tokens. Returns its SSM layer."""
        frame.check(self.geometry, expect_token_start=tokens - 1)
        if self.states is None:  # the geometry has no states: check refused the frame already
            raise FrameError("a state frame for a model without SSM layers")
        self.states.write(frame.header.layer, block_ids, tokens, frame.state, self.runtime)
        return frame.header.layer
