"""Offline KV tools (`cachegen-vllm kv ...`): the KV cache of a Hugging Face model for a text, as a
serving engine holds it, in a file; that file encoded into frames and back; and what a file's bytes
are. The two containers are in docs/FORMAT.md ("Files").

- KV file: safetensors, ``key.{layer}`` and ``value.{layer}`` [tokens, kv heads, head dim] in the
  cache's dtype (keys after RoPE, as the attention caches them), metadata `KV_KIND`, the model's
  name and, for fp8, the scales (vLLM's default 1: values cast as they are).
- Frames file: `FRAMES_MAGIC`, a u16 version, the model's name (u16 length, UTF-8), then frames
  back to back (each says its own length): the name completes the geometry the frames carry.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import torch

from cachegen_vllm.codec import KV, FrameError, KVGeometry, ParsedFrame, decode_frames, encode_layer, read_frame
from cachegen_vllm.codec.basis import Basis, BasisRegistry, load
from cachegen_vllm.codec.format import CHECKSUM, HEADER, SEGMENT, HeaderFields, tensor_arrays
from cachegen_vllm.codec.geometry import DTYPE_CODES
from cachegen_vllm.codec.profile import AUTO_BASIS, EXACT_BITS, LOSSLESS_BITS, Profile
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.paged import FP8_CACHE_DTYPES

KV_KIND = "cachegen-vllm kv 1"
FRAMES_MAGIC = b"CGKF"
FRAMES_VERSION = 1
PREAMBLE = struct.Struct("<4sHH")
# --dtype choices: vLLM's names for what a cache holds
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, **FP8_CACHE_DTYPES}


class KVFileError(ValueError):
    """A file is not what the tool expects; the message names the file and what is wrong."""


def extract(model_dir: Path, text: str, dtype: torch.dtype = torch.bfloat16, max_tokens: int | None = None):
    """(geometry, [(key, value)] per layer) of the model's prefill of ``text``: fp32 forward pass,
    the cache rounded to ``dtype`` (fp8 with scale 1, vLLM's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text).input_ids[:max_tokens])
    if ids.numel() == 0:
        raise KVFileError("the text has no tokens")
    cfg = model.config
    geometry = KVGeometry(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        dtype,
        model=Path(model_dir).name,
    )
    with torch.inference_mode():
        cache = model(ids[None], use_cache=True).past_key_values
    # [1, heads, tokens, dim] -> [tokens, heads, dim]; keys are cached after RoPE
    return geometry, [
        (_cast(c.keys[0].transpose(0, 1), dtype), _cast(c.values[0].transpose(0, 1), dtype)) for c in cache.layers
    ]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # saturate, as vLLM's fp8 writers do
        largest = torch.finfo(dtype).max
        x = x.clamp(-largest, largest)
    return x.to(dtype).contiguous()


def save_kv(path: Path, geometry: KVGeometry, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.{layer}": t for layer, pair in enumerate(kv) for name, t in zip(("key", "value"), pair)}
    save_file(tensors, str(path), metadata={"kind": KV_KIND, "model": geometry.model})


def load_kv(path: Path) -> tuple[KVGeometry, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A KV file's geometry and tensors. KVFileError if it is not one, naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise KVFileError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("kind") != KV_KIND:
        raise KVFileError(f"{path}: metadata 'kind' is {metadata.get('kind')!r}, a KV file's is {KV_KIND!r}")
    layers = len(tensors) // 2
    names = {f"{n}.{i}" for i in range(layers) for n in ("key", "value")}
    if set(tensors) != names:
        raise KVFileError(f"{path}: holds {sorted(set(tensors) ^ names)[:4]}..., not key.N and value.N for every layer")
    kv = [(tensors[f"key.{i}"], tensors[f"value.{i}"]) for i in range(layers)]
    first = kv[0][0]
    for i, (k, v) in enumerate(kv):
        if k.dim() != 3 or k.shape != first.shape or v.shape != first.shape or k.dtype != first.dtype != v.dtype:
            raise KVFileError(f"{path}: layer {i} is {list(k.shape)}/{list(v.shape)}, layer 0 {list(first.shape)}")
    if first.dtype not in DTYPE_CODES:
        raise KVFileError(f"{path}: dtype {first.dtype}; KV files hold {', '.join(map(str, DTYPE_CODES))}")
    return KVGeometry(layers, first.shape[1], first.shape[2], first.dtype, model=metadata.get("model", "")), kv


def encode(
    geometry: KVGeometry, kv: list[tuple[torch.Tensor, torch.Tensor]], profile: Profile, model: Path | None = None
) -> list[bytes]:
    """The frames of every layer; ``model``: the checkpoint an ``"auto"`` basis is fitted on (or
    read from the cache of fitted bases)."""
    if profile.basis == AUTO_BASIS:
        if model is None:
            raise KVFileError('--model: the profile\'s basis is "auto": give the checkpoint the KV comes from')
        profile = autobasis.resolve(profile, str(model))
    profile.check_geometry(geometry.num_layers)
    basis = BasisRegistry().for_profile(profile, geometry)
    return [
        f
        for layer, (k, v) in enumerate(kv)
        for f in encode_layer(k, v, geometry=geometry, profile=profile, layer=layer, basis=basis)
    ]


def save_frames(path: Path, model: str, frames: list[bytes]) -> None:
    name = model.encode()
    with open(path, "wb") as out:
        out.write(PREAMBLE.pack(FRAMES_MAGIC, FRAMES_VERSION, len(name)) + name)
        for frame in frames:
            out.write(frame)


def load_frames(path: Path) -> tuple[str, list[ParsedFrame]]:
    """The model's name and the frames of a frames file, cut by each frame's own length and read
    (`codec.read_frame`). KVFileError naming the byte where it goes wrong."""
    data = memoryview(Path(path).read_bytes())
    if len(data) < PREAMBLE.size:
        raise KVFileError(f"{path}: {len(data)} bytes, shorter than a frames file's preamble")
    magic, version, length = PREAMBLE.unpack_from(data)
    if magic != FRAMES_MAGIC or version != FRAMES_VERSION:
        raise KVFileError(f"{path}: starts {bytes(magic)!r} version {version}, not {FRAMES_MAGIC!r} {FRAMES_VERSION}")
    at = PREAMBLE.size + length
    model = bytes(data[PREAMBLE.size : at]).decode()
    frames = []
    while at < len(data):
        if len(data) - at < HEADER.size:
            raise KVFileError(f"{path}: byte {at}: {len(data) - at} bytes left, shorter than a frame header")
        size = HeaderFields.unpack(data[at:]).frame_bytes
        if size < HEADER.size or at + size > len(data):
            raise KVFileError(f"{path}: byte {at}: a frame of {size} bytes does not fit in the file")
        try:
            frames.append(read_frame(data[at : at + size]))
        except FrameError as e:
            raise KVFileError(f"{path}: byte {at}: {e}") from None
        at += size
    return model, frames


def frames_geometry(model: str, frame: ParsedFrame) -> KVGeometry:
    """The model's geometry as a frame says it, with the model's name: what its frames are checked
    against."""
    layers, heads, head_dim, dtype = frame.model_shape
    return KVGeometry(layers, heads, head_dim, dtype, model=model)


def decode(
    model: str, frames: list[ParsedFrame], known: tuple[Basis, ...] = ()
) -> tuple[KVGeometry, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every layer's K and V from a frames file's frames (all tokens from 0, every layer); frames
    may be coded in ``known`` bases, the shipped ones or those fitted here."""
    if not frames:
        raise KVFileError("the file holds no frames")
    bases = BasisRegistry(*known, *(load(str(p)) for p in autobasis.fitted_bases()))
    geometry = frames_geometry(model, frames[0])
    chunks: dict[int, list] = defaultdict(list)
    for chunk in decode_frames(frames, geometry, bases=bases):
        chunks[chunk.layer].append(chunk)
    kv = []
    for layer in range(geometry.num_layers):
        pieces = sorted(chunks.get(layer, []), key=lambda c: c.token_start)
        starts = [c.token_start for c in pieces]
        expected = [0] + [sum(c.key.shape[0] for c in pieces[: i + 1]) for i in range(len(pieces) - 1)]
        if not pieces or starts != expected:
            raise KVFileError(f"layer {layer}: frames start at tokens {starts}, not one run from token 0")
        kv.append((torch.cat([c.key for c in pieces]), torch.cat([c.value for c in pieces])))
    return geometry, kv


# what each array of a tensor is, by how the tensor is coded (docs/FORMAT.md, "Payload")
PARTS = {
    "exact": ("exact values",),
    "packed": ("statistics", "statistics", "codes"),
    "rans": ("statistics", "statistics", "statistics", "rans lanes", "rans lanes", "rans lanes"),
    "lossless": ("exponents", "exponents", "sign and mantissa", "sign and mantissa", "exponents"),
}


def parts(model: str, frames: list[ParsedFrame]) -> dict[str, int]:
    """Bytes of the frames by part: headers (with segment tables), each kind of array of K and of
    V, alignment padding and checksums. The parts add up to the frames' bytes."""
    out: dict[str, int] = defaultdict(int)
    for frame in frames:
        header = frame.header
        shard = frame.shard(frames_geometry(model, frame))
        out["headers"] += HEADER.size + SEGMENT.size * len(header.segments)
        used = HEADER.size + SEGMENT.size * len(header.segments) + CHECKSUM.size
        for seg, sizes in zip(header.segments, tensor_arrays(header, shard)):
            for tensor, arrays in zip(KV, sizes):
                bits = seg.bits(tensor)
                kind = "exact" if bits == EXACT_BITS else "lossless" if bits == LOSSLESS_BITS else header.coding
                for role, n in zip(PARTS[kind], arrays):
                    out[f"{tensor.name.lower()} {role}"] += n
                    used += n
        out["checksums"] += CHECKSUM.size
        out["padding"] += len(frame.data) - used
    return dict(out)
