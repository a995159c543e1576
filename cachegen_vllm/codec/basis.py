"""Calibrated per-head bases (profile ``rotation = "basis"``, entropy-coded profiles only).

Why: with entropy coding and one quantization step per tensor, the bits follow the variance, so a
basis that puts the variance into few components costs fewer bits at the same error (the codes of
quiet components are almost all zero: bits are allocated per component, as NVIDIA's KVTC does with
its PCA). A Hadamard rotation does the opposite (it evens the variances out), which is what a
min/max quantizer wants, not an entropy coder. And the error that matters is not the same in every
direction: a key's error reaches the model as ``q . dk``, a value's as ``W_o dv``. So for each
(layer, K or V, KV head) the basis is fitted in the model's metric ``M``: the second moment of the
queries that read that head (after RoPE, its query heads together) for keys, ``W_o^T W_o`` of its
output projection for values, each scaled to a mean eigenvalue of 1 plus `REGULARIZATION` (so no
direction is free). With ``S`` the tensor's covariance (centred per chunk, as the quantizer is),

    y = U^T M^(1/2) x,    U: eigenvectors of M^(1/2) S M^(1/2),

equal squared error on ``y`` is equal damage to logits / attention outputs to first order, and the
components of ``y`` are uncorrelated (research/basis_study.py measures what it saves).

Exactness, because a GPU producer and a CPU producer must write the same bytes: the stored matrix
is integer (fixed point, ``2**-FRACTION_BITS``), ``x`` is rounded to fixed point as the entropy
statistics are (``max|x|`` in [2**15, 2**16); keys turned back by RoPE stay below 2**16.5), and
``y`` is their integer product (below 2**53 for heads up to 2**12 wide, so float64 holds every
partial sum exactly whatever the summation order: torch on a CPU and cuBLAS on a GPU give the same
``y``). The decoder's inverse only makes values, not bytes: float64 at load.

A basis may also undo RoPE on the keys before its matrix and redo it after its inverse
(`codec.rope`): its ``rope`` holds each layer's rotary frequencies, and the keys' statistics and
metric it was fitted on are those before RoPE. Values never turn.

A basis file is safetensors: ``forward`` int32 [layers, 2 (K, V), kv heads, dim, dim], and
``rope`` float64 [layers, rotary pairs] for a basis that undoes RoPE; frames name it by
`Basis.digest`, the xxh3-64 of those arrays (shapes and bytes), so a decoder never applies another
basis than the producer's, nor turns keys by other angles.
"""

from __future__ import annotations

import importlib.resources
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import xxhash

from cachegen_vllm.codec.geometry import KV, KVGeometry
from cachegen_vllm.codec.profile import AUTO_BASIS, ConfigError, Profile
from cachegen_vllm.codec.quant import fixed_point_exponent, power_of_two
from cachegen_vllm.codec.rope import turn, unturn_fixed

FRACTION_BITS = 16
MAX_ENTRY = 1 << 24  # |forward| below this keeps every product sum under 2**16.5 * 2**24 * dim < 2**53
# Added to the metric's eigenvalues (mean 1); 0.01 and 1 trade bits for KL (research/basis_study.py).
REGULARIZATION = 0.1


@dataclass(frozen=True, eq=False)
class Basis:
    """A model's bases: ``forward`` int32 [layers, 2, heads, dim, dim] and, if it undoes RoPE, the
    float64 frequencies ``rope`` [layers, pairs] (what the file holds and the digest covers), the
    forward integers in float64 (what `apply` multiplies by, converted once), and the float64
    inverse."""

    forward: torch.Tensor
    weights: torch.Tensor
    inverse: torch.Tensor
    digest: int
    rope: torch.Tensor | None = None
    copies: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_forward(cls, forward: torch.Tensor, rope: torch.Tensor | None = None) -> Basis:
        if (
            forward.dtype != torch.int32
            or forward.dim() != 5
            or forward.shape[1] != 2
            or forward.shape[3] != forward.shape[4]
        ):
            raise ValueError(
                f"a basis is int32 [layers, 2, heads, dim, dim], got {forward.dtype} {list(forward.shape)}"
            )
        if int(forward.abs().max()) >= MAX_ENTRY:
            raise ValueError(f"a basis entry reaches {int(forward.abs().max())}, the format allows below {MAX_ENTRY}")
        matrices = forward.double() * 2.0**-FRACTION_BITS
        condition = torch.linalg.cond(matrices)
        if not bool((torch.isfinite(condition) & (condition < 1e8)).all()):
            raise ValueError("a basis matrix is singular or nearly so")
        hashed = str(list(forward.shape)).encode() + forward.contiguous().numpy().tobytes()
        if rope is not None:
            if (
                rope.dtype != torch.float64
                or rope.dim() != 2
                or rope.shape[0] != forward.shape[0]
                or not 1 <= 2 * rope.shape[1] <= forward.shape[3]
            ):
                raise ValueError(
                    f"a basis's rope is float64 [layers, pairs], pairs at most dim / 2, got {rope.dtype} "
                    f"{list(rope.shape)} beside forward {list(forward.shape)}"
                )
            if not bool((torch.isfinite(rope) & (rope >= 0)).all()):
                raise ValueError("a basis's rope frequencies are not all finite and non-negative")
            rope = rope.contiguous()
            hashed += b"|rope" + str(list(rope.shape)).encode() + rope.numpy().tobytes()
        digest = xxhash.xxh3_64_intdigest(hashed)
        # matrix by matrix: MKL's batched inverse never returns for some batches of 256-wide ones
        # on two threads ([18, 2, 1, 256, 256]: "Parameter 6 was incorrect on entry to DLASWP")
        inverse = torch.stack([torch.linalg.inv(m) for m in matrices.reshape(-1, *matrices.shape[-2:])])
        return cls(forward.contiguous(), forward.double(), inverse.reshape(matrices.shape), digest, rope)

    def _on(self, device: torch.device, name: str) -> torch.Tensor:
        """``weights`` or ``inverse`` on ``device``, copied there once."""
        key = (name, str(device))
        if key not in self.copies:
            self.copies[key] = getattr(self, name).to(device)
        return self.copies[key]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the model it was fitted on."""
        return self.forward.shape[0], self.forward.shape[2], self.forward.shape[3]

    def _turns(self, tensor: KV) -> bool:
        return self.rope is not None and tensor == KV.KEY

    def apply(
        self, x: torch.Tensor, layer: int, tensor: KV, heads: slice = slice(None), token_start: int = 0
    ) -> torch.Tensor:
        """Coefficients fp32 [T, H, D] of fp32 ``x`` [T, H, D] holding the model's ``heads`` at
        positions ``token_start..``, with no host read. Bit-identical on any device (module
        docstring); all NaN where ``x`` is not finite."""
        e = fixed_point_exponent(x)
        fixed = torch.round(x.double() * power_of_two(e))
        if self._turns(tensor):
            fixed = unturn_fixed(fixed, self.rope[layer], token_start)  # type: ignore[index]
        y = torch.einsum("thd,hjd->thj", fixed, self._on(x.device, "weights")[layer, tensor, heads])
        y = (y * power_of_two(-(e + FRACTION_BITS))).float()
        return torch.where(torch.isfinite(x).all(), y, float("nan")).contiguous()

    def invert(
        self, y: torch.Tensor, layer: int, tensor: KV, heads: slice = slice(None), token_start: int = 0
    ) -> torch.Tensor:
        """fp32 [T, H, D] values back from `apply`'s coefficients."""
        inverse = self._on(y.device, "inverse")[layer, tensor, heads]
        x = torch.einsum("thj,hdj->thd", y.double(), inverse)
        if self._turns(tensor):
            x = turn(x, self.rope[layer], token_start)  # type: ignore[index]
        return x.float().contiguous()


def fit(
    covariance: torch.Tensor,
    metric: torch.Tensor,
    regularization: float = REGULARIZATION,
    rope: torch.Tensor | None = None,
) -> Basis:
    """The basis of the module docstring from per-head statistics, float64 [layers, 2, heads, dim,
    dim] each: the tensors' covariance and the model's metric (any scale; normalized here); with
    ``rope`` (the model's frequencies), both measured on keys and queries before RoPE."""
    dim = metric.shape[-1]
    mean_eigenvalue = metric.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / dim
    eigenvalues, vectors = torch.linalg.eigh(metric / mean_eigenvalue)
    root = (vectors * (eigenvalues.clamp_min(0) + regularization).sqrt()[..., None, :]) @ vectors.mT
    _, u = torch.linalg.eigh(root @ covariance @ root)
    u = u.flip(-1)  # components by decreasing variance
    forward = torch.round((u.mT @ root) * 2.0**FRACTION_BITS).to(torch.int32)
    return Basis.from_forward(forward, rope)


def save(basis: Basis, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {"forward": basis.forward} if basis.rope is None else {"forward": basis.forward, "rope": basis.rope}
    save_file(tensors, str(path), metadata=metadata or {})


@cache
def load(path: str) -> Basis:
    """The basis in a safetensors file (cached per path). ValueError if it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return from_bytes(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def from_bytes(data: bytes, shape: tuple[int, ...] | None = None) -> Basis:
    """The basis a basis file's bytes hold (what a producer sends a consumer that lacks it).
    ValueError if they are not one, or not of ``shape`` (checked before any matrix is inverted)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"not a readable safetensors file ({e})") from None
    if set(tensors) - {"rope"} != {"forward"}:
        raise ValueError(f"a basis file holds 'forward' and, if it undoes RoPE, 'rope'; found {sorted(tensors)}")
    if shape is not None and tuple(tensors["forward"].shape) != shape:
        raise ValueError(f"a basis of shape {list(tensors['forward'].shape)}, this model's is {list(shape)}")
    return Basis.from_forward(tensors["forward"], tensors.get("rope"))


@cache
def shipped() -> dict[int, Basis]:
    """The basis files shipped in configs/, by digest: listed and loaded once per process."""
    root = importlib.resources.files("cachegen_vllm.configs")
    bases = (load(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".safetensors"))
    return {b.digest: b for b in bases}


class BasisRegistry:
    """The bases a worker or a tool codes and decodes in, by digest: the shipped ones, and those a
    profile names, a producer fitted or a decode fetched, added as they come (from any thread).
    Encoding finds a profile's basis here (`for_profile`), decoding a frame's by the digest it
    names (`get`)."""

    def __init__(self, *bases: Basis):
        self._lock = threading.Lock()
        self._bases = dict(shipped())
        for basis in bases:
            self.add(basis)

    def add(self, basis: Basis) -> Basis:
        """Keep ``basis``; the one kept under its digest is returned."""
        with self._lock:
            return self._bases.setdefault(basis.digest, basis)

    def get(self, digest: int) -> Basis | None:
        return self._bases.get(digest)

    def for_profile(self, profile: Profile, geometry: KVGeometry | None = None) -> Basis | None:
        """The basis a profile codes in (None: it codes in none), loaded from its file and kept;
        ConfigError naming ``basis`` if the file is not a basis, or was fitted on another shape than
        ``geometry``'s."""
        if profile.rotation != "basis":
            return None
        if profile.basis == AUTO_BASIS or profile.basis is None:
            raise ConfigError("basis", '"auto" is fitted to a model first (fitting.auto.resolve)')
        try:
            basis = self.add(load(profile.basis))
        except ValueError as e:
            raise ConfigError("basis", str(e)) from None
        want = geometry and (geometry.num_layers, geometry.total_kv_heads, geometry.head_dim)
        if want and basis.shape != want:
            raise ConfigError(
                "basis",
                f"{profile.basis} was fitted on (layers, kv heads, head dim) {basis.shape}, this model has {want}",
            )
        return basis
