"""The Triton kernels against the reference codec: on a GPU, or in Triton's interpreter on the CPU
(TRITON_INTERPRET=1, which conftest.py sets where there is no GPU).

Every output is poisoned first, so a byte the kernel should write and does not, or writes wrong,
fails the comparison; bytes it must not touch are checked to keep their poison.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py before Triton is imported
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no GPU, and Triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

from cachegen_vllm.codec import KVGeometry, decode_chunk, encode_layer, parse_frame, read_frame  # noqa: E402
from cachegen_vllm.codec.format import payload_arrays  # noqa: E402
from cachegen_vllm.codec.profile import EXACT_BITS  # noqa: E402
from cachegen_vllm.config import load_profile, profile_from_dict  # noqa: E402
from cachegen_vllm.device import Runtime  # noqa: E402
from cachegen_vllm.kernels import plans, tile_kernels  # noqa: E402
from cachegen_vllm.paged import EncodeStep, PagedCaches, SaveRange, encode, gather  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
NUM_BLOCKS, BLOCK_SIZE = 12, 16


def _profile(bits=(4, 4), value_axis="token", rotation="hadamard", group=16, chunk=32, recent=(), sink=()):
    return profile_from_dict(
        {
            "chunk_tokens": chunk,
            "group_tokens": group,
            "rotation": rotation,
            "value_axis": value_axis,
            "bits": {
                "key": bits[0],
                "value": bits[1],
                "recent": [{"tokens": t, "key": k, "value": v} for t, k, v in recent],
                "sink": [{"tokens": t, "key": k, "value": v} for t, k, v in sink],
            },
        },
        "test",
    )


def _cache(layout: str, heads: int, head_dim: int, dtype, seed: int):
    """A poisoned layer cache in the logical [blocks, heads, block_size, 2*head_dim] view, physically
    ordered as ``layout`` (NHD: token-major pages as FlashAttention; HND: head-major)."""
    physical = (
        (NUM_BLOCKS, BLOCK_SIZE, heads, 2 * head_dim)
        if layout == "NHD"
        else (NUM_BLOCKS, heads, BLOCK_SIZE, 2 * head_dim)
    )
    store = torch.randn(physical, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    return store.permute(0, 2, 1, 3) if layout == "NHD" else store


BLOCKS = torch.tensor([7, 2, 9, 0, 11, 4, 5, 1, 3], dtype=torch.int32)  # shuffled, non-contiguous


def _encode(cache, table, geometry, profile, layer, start, count, total, kernels: bool) -> list[bytes]:
    """A layer's frames from the request in ``table``'s blocks of ``cache``, by the kernels (in
    Triton's interpreter on a CPU) or the reference codec."""
    caches = PagedCaches({layer: cache}, None, geometry, kernels=kernels)
    return encode(caches, layer, profile, SaveRange(table.tolist(), start, start + count, total))


def _geometry(heads, head_dim, dtype):
    return KVGeometry(num_layers=2, num_kv_heads=heads, head_dim=head_dim, dtype=dtype, model="test")


CASES = [
    # (layout, heads, head_dim, dtype, profile kwargs, token_start, count, total)
    ("NHD", 2, 32, torch.bfloat16, dict(), 0, 100, 100),
    ("HND", 3, 64, torch.float16, dict(value_axis="channel", rotation="none", group=8, chunk=48), 5, 90, 101),
    ("NHD", 1, 16, torch.float32, dict(sink=[(3, EXACT_BITS, EXACT_BITS)], recent=[(20, 8, 6)]), 0, 77, 77),
    ("HND", 2, 128, torch.bfloat16, dict(group=32, chunk=64, recent=[(9, EXACT_BITS, 7)]), 33, 70, 110),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[1]}-d{c[2]}-{str(c[3])[6:]}")
@pytest.mark.parametrize("bits", [(1, 2), (3, 5), (4, 4), (6, 7), (8, 8)], ids=lambda b: f"k{b[0]}v{b[1]}")
def test_encode_matches_reference_bytes(case, bits):
    layout, heads, head_dim, dtype, kw, start, count, total = case
    cache = _cache(layout, heads, head_dim, dtype, seed=sum(bits))
    geometry, profile = _geometry(heads, head_dim, dtype), _profile(bits, **kw)
    table = BLOCKS.to(DEVICE)
    frames = _encode(cache, table, geometry, profile, 1, start, count, total, kernels=True)
    key, value = gather(cache.cpu(), None, BLOCKS, start + count)
    expected = encode_layer(
        key[start:],
        value[start:],
        geometry=geometry,
        profile=profile,
        layer=1,
        token_start=start,
        total_tokens=total,
    )
    assert len(frames) == len(expected)
    for ours, theirs in zip(frames, expected):
        assert ours == theirs


def test_each_layer_gets_its_own_widths_and_header():
    """Layouts are shared between layers of equal widths (made once per save step); a layer with
    other widths gets its own, and every frame names its layer."""
    geometry = _geometry(2, 32, torch.float16)
    profile = profile_from_dict(
        {
            "chunk_tokens": 32,
            "group_tokens": 16,
            "rotation": "hadamard",
            "value_axis": "token",
            "bits": {"key": 4, "value": 2, "layers": [{"first": 1, "last": 1, "key": 6, "value": 3}]},
        },
        "layered",
    )
    cache = _cache("NHD", 2, 32, torch.float16, seed=6)
    key, value = gather(cache.cpu(), None, BLOCKS, 50)
    for layer in (0, 1, 0):
        frames = _encode(cache, BLOCKS.to(DEVICE), geometry, profile, layer, 0, 50, 50, kernels=True)
        assert frames == encode_layer(key, value, geometry=geometry, profile=profile, layer=layer)


def test_encode_writes_every_payload_byte(monkeypatch):
    """With the frame buffer poisoned instead of zeroed, every byte of every payload array still
    equals the reference's: none is left unwritten (only the padding between arrays keeps poison)."""
    layout, heads, head_dim, dtype, kw, start, count, total = CASES[2]
    geometry, profile = _geometry(heads, head_dim, dtype), _profile((3, 1), **kw)
    cache = _cache(layout, heads, head_dim, dtype, seed=9)
    monkeypatch.setattr(
        Runtime, "frame_buffer", lambda self, size: torch.full((size,), 0xA5, dtype=torch.uint8, device=self.device)
    )
    frames = _encode(cache, BLOCKS.to(DEVICE), geometry, profile, 0, start, count, total, kernels=True)
    key, value = gather(cache.cpu(), None, BLOCKS, start + count)
    expected = encode_layer(
        key[start:], value[start:], geometry=geometry, profile=profile, layer=0, token_start=start, total_tokens=total
    )
    widths = {b for f in expected for s in parse_frame(f, geometry).segments for b in (s.key_bits, s.value_bits)}
    assert widths == {EXACT_BITS, 8, 6, 3, 1}  # exact and quantized arrays both checked
    for ours, theirs in zip(frames, expected):
        for offset, n in [slot for seg in payload_arrays(parse_frame(theirs, geometry), geometry) for slot in seg]:
            assert ours[offset : offset + n] == theirs[offset : offset + n], f"array at {offset}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[1]}-d{c[2]}-{str(c[3])[6:]}")
@pytest.mark.parametrize("bits", [(1, 5), (2, 2), (4, 3), (6, 7), (8, 8)], ids=lambda b: f"k{b[0]}v{b[1]}")
def test_decode_matches_reference_and_writes_only_its_tokens(case, bits):
    layout, heads, head_dim, dtype, kw, start, count, total = case
    geometry, profile = _geometry(heads, head_dim, dtype), _profile(bits, **kw)
    source = _cache(layout, heads, head_dim, dtype, seed=1).cpu()
    key, value = gather(source, None, BLOCKS, start + count)
    frames = encode_layer(
        key[start:], value[start:], geometry=geometry, profile=profile, layer=0, token_start=start, total_tokens=total
    )
    write_start, write_end = start + 3, start + count - 2  # a prefix held already, a tail not wanted

    ours = torch.full_like(source, float("nan")).to(DEVICE)
    headers = plans.decode_frames_paged(
        [read_frame(f) for f in frames],
        {0: ours},
        BLOCKS.to(DEVICE),
        geometry=geometry,
        write_start=write_start,
        write_end=write_end,
    )
    assert [h.token_start for h in headers] == [parse_frame(f, geometry).token_start for f in frames]
    theirs = torch.full_like(source, float("nan"))  # on the CPU: the reference decodes and scatters
    for frame in frames:
        PagedCaches({0: theirs}, None, geometry, kernels=False).decode(
            [read_frame(frame)], BLOCKS, write_start, write_end
        )
    ours = ours.cpu()
    written = ~torch.isnan(theirs.float())
    assert torch.equal(written, ~torch.isnan(ours.float()))  # the same slots, none more, none fewer
    # The reference rounds codes * scale + min twice, a GPU fuses it into one FMA: one ulp of fp32,
    # which may flip a tie in the cast to the cache's dtype (one ulp of that), rarely.
    torch.testing.assert_close(ours[written].float(), theirs[written].float(), rtol=torch.finfo(dtype).eps, atol=1e-5)
    if dtype == torch.float32 or all(b == EXACT_BITS for b in bits):
        return
    exact_share = (ours[written] == theirs[written]).float().mean().item()
    assert exact_share > 0.99  # at most a rounding tie flips in the cast


def test_round_trip_through_both_paths():
    """A payload from the kernels decodes on the CPU path and back, into a CPU vLLM-style cache."""
    geometry, profile = _geometry(2, 64, torch.bfloat16), load_profile("default")
    cache = _cache("NHD", 2, 64, torch.bfloat16, seed=3)
    frames = _encode(cache, BLOCKS.to(DEVICE), geometry, profile, 0, 0, 130, 130, kernels=True)
    cpu = torch.zeros_like(cache).cpu()
    for frame in frames:
        PagedCaches({0: cpu}, None, geometry, kernels=False).decode([read_frame(frame)], BLOCKS, 0, 130)
    again = _encode(cpu, BLOCKS, geometry, profile, 0, 0, 130, 130, kernels=False)
    back = torch.zeros_like(cache)
    plans.decode_frames_paged([read_frame(f) for f in again], {0: back}, BLOCKS.to(DEVICE), geometry=geometry)
    k0, v0 = gather(cache.cpu(), None, BLOCKS, 130)
    k1, v1 = gather(back.cpu(), None, BLOCKS, 130)
    assert (k1 - k0).float().abs().mean() < 0.1 and (v1 - v0).float().abs().mean() < 0.1  # 4-bit error, not garbage


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e6])
def test_values_the_statistics_cannot_hold_travel_exact(poison):
    """inf, nan and values beyond float16 make the reference send the tensor exact; so do the kernels."""
    geometry, profile = _geometry(2, 32, torch.float32), _profile((4, 4), group=8, chunk=16)
    cache = _cache("HND", 2, 32, torch.float32, seed=4)
    cache[BLOCKS[1], 1, 5, 40] = poison  # token 21's value, head 1: the second frame
    frames = _encode(cache, BLOCKS.to(DEVICE), geometry, profile, 0, 0, 40, 40, kernels=True)
    key, value = gather(cache.cpu(), None, BLOCKS, 40)
    assert frames == encode_layer(key, value, geometry=geometry, profile=profile, layer=0)
    assert parse_frame(frames[1], geometry).segments[0].value_bits == EXACT_BITS


def test_a_steps_saves_are_coded_in_one_launch_per_pair_of_widths_whatever_their_number():
    """All the saves of a step, each in its own blocks, from its own first token to its own
    prompt's end, are coded by one launch per pair of widths per layer (each tile indexes its
    request's part of the step's block table): each save's frames are the reference's, and the
    host calls a layer makes on the forward pass's thread (launches, copies, events, buffers,
    counted by the device runtime) are the same for one save as for eight."""
    geometry, profile = _geometry(2, 32, torch.bfloat16), _profile((4, 2), recent=[(9, 8, 8)], chunk=32)
    store = _cache("NHD", 2, 32, torch.bfloat16, seed=12)  # 12 blocks of 16 tokens
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(1)).tolist()
    # two blocks each (32 tokens), some saves starting mid-prompt, some prompts longer than their save
    saves = [SaveRange(order[i : i + 2], i % 2 * 7, 8 + 3 * i, 8 + 3 * i + i % 3 * 5) for i in range(8)]
    calls = []
    for count in (1, 8):
        caches = PagedCaches({0: store, 1: store}, None, geometry, kernels=True)
        runtime = caches.runtime
        step = EncodeStep(caches, saves[-count:])  # the last alone has both pairs of widths
        step.start(0, profile).close()  # the step's plan for these widths is made at its first layer
        before = runtime.work.copy()
        encoding = step.start(1, profile)
        calls.append(dict(runtime.work - before))
        for i, save in enumerate(saves[-count:]):
            key, value = gather(store.cpu(), None, torch.tensor(save.block_ids), save.end, save.start)
            expected = encode_layer(
                key,
                value,
                geometry=geometry,
                profile=profile,
                layer=1,
                token_start=save.start,
                total_tokens=save.total,
            )
            assert encoding.frames(i) == expected, i
        encoding.close()
    assert calls[0] == calls[1] == {"launches": 2, "copies": 1, "events": 1, "buffers": 1}, calls


def test_unsupported_geometry_is_refused_by_name():
    with pytest.raises(ValueError, match="head_dim 96"):
        tile_kernels.check_supported(_geometry(2, 96, torch.float16), 64)
    with pytest.raises(ValueError, match="group_tokens 512"):
        tile_kernels.check_supported(_geometry(2, 64, torch.float16), 512)


def test_constant_groups_get_the_smallest_scale():
    """A group whose values are all equal has step 0; its scale is float16's smallest, as the reference's."""
    geometry, profile = _geometry(2, 32, torch.bfloat16), _profile((4, 2), value_axis="channel", group=8, chunk=16)
    cache = _cache("NHD", 2, 32, torch.bfloat16, seed=5)
    cache[BLOCKS[0]] = 0.5  # the first 16 tokens: every channel constant, before and after rotation
    frames = _encode(cache, BLOCKS.to(DEVICE), geometry, profile, 0, 0, 20, 20, kernels=True)
    key, value = gather(cache.cpu(), None, BLOCKS, 20)
    assert frames == encode_layer(key, value, geometry=geometry, profile=profile, layer=0)
    assert torch.equal(decode_chunk(frames[0], geometry).key, key[:16])  # the constant, not nan


ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (
        {"TRITON_INTERPRET": "1"} if interpret else {}
    )
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_kernels.py"), *args, "--json", str(out)],
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_kernels_compile_for_hopper_without_fused_multiply_adds(tmp_path):
    """The interpreter accepts code the compiler refuses (it did, twice), and never fuses a multiply
    and an add, which a GPU compiler does unless told not to (the reference rounds them apart, and
    an fma.rn.f32 changed 32 to 64 places per kernel when fusion was on): compile every variant the
    shipped bit-packed profiles launch, for sm_90a (H100, H200), and find no fp32 fma in their PTX
    and no spills but high-quality's 8-bit encode (a 128-token tile: 60 bytes, 256 with fusion)."""
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell").exists():
        pytest.skip("this triton wheel ships no ptxas")
    rows = _bench(tmp_path, "--ptxas", interpret=False)["rows"]
    variants = {(r["profile"], r["kernel"], r["key_bits"], r["value_bits"]) for r in rows}
    assert variants >= {
        ("default", "encode_kernel", 4, 4),
        ("default", "decode_kernel", 8, 8),  # the recent tokens' tier
        ("default", "encode_kernel", 16, 16),  # the sink's exact tokens
        ("aggressive", "decode_kernel", 3, 2),
        ("raw", "encode_kernel", 16, 16),
    }
    kernels = {r["kernel"] for r in rows}
    assert {"rans_coder.encode_kernel", "rans_coder.decode_kernel"} <= kernels
    assert {"lossless_fields.split_kernel", "lossless_fields.merge_kernel"} <= kernels
    assert all(r["fma_f32"] == 0 for r in rows), [r for r in rows if r["fma_f32"]]
    spills = {
        (r["profile"], r["kernel"], r["key_bits"]): r["spill_store_bytes"] for r in rows if r["spill_store_bytes"]
    }
    assert set(spills) <= {("high-quality", "encode_kernel", 8)} and max(spills.values(), default=0) <= 64, spills


def test_benchmark_checks_its_kernels_against_the_reference(tmp_path):
    """benchmarks/bench_kernels.py on the interpreter: a smoke run of the GPU benchmark's own checks."""
    result = _bench(tmp_path, "--device", "cpu", "--tokens", "300", "--reps", "1", interpret=True)
    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [300, 300]
    assert all(r["identical_to_reference"] and r["decode_agrees"] and r["ratio"] > 3 for r in rows)
    entropy_rows = result["entropy_rows"]
    assert [r["tokens"] for r in entropy_rows] == [300] and entropy_rows[0]["identical_to_cpu"]


# --- rANS lanes (entropy-coded frames) -------------------------------------------

from test_entropy import _trimmed  # noqa: E402

from cachegen_vllm.codec import entropy, rans  # noqa: E402
from cachegen_vllm.kernels import rans_coder  # noqa: E402


def _rans_grid(steps, lanes, alphabet, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(4):
        freq = torch.randint(1, 5000, (alphabet,), generator=g).double()
        freq = (freq / freq.sum() * (rans.PROB_SCALE - alphabet)).floor().long() + 1
        freq[-1] += rans.PROB_SCALE - freq.sum()
        rows.append(torch.nn.functional.pad(torch.cumsum(freq, 0), (1, 0)))
    cum = torch.stack(rows)
    row = torch.randint(0, 4, (steps, lanes), generator=g)
    symbols = torch.randint(0, alphabet, (steps, lanes), generator=g)
    active = torch.rand(steps, lanes, generator=g) < 0.97  # scattered padding steps
    lo, hi = cum[row, symbols], cum[row, symbols + 1]
    freq = torch.where(active, hi - lo, rans.PROB_SCALE)
    return freq, torch.where(active, lo, 0), cum, row, active, torch.where(active, symbols, 0)


@pytest.mark.parametrize("steps,lanes,alphabet", [(40, 3, 4), (70, 130, 33), (25, 9, 513)])
def test_triton_rans_lanes_match_the_torch_coder(steps, lanes, alphabet):
    freq, start, cum, row, active, symbols = _rans_grid(steps, lanes, alphabet, seed=lanes)
    want = _trimmed(rans.encode(freq, start))
    got = _trimmed(rans_coder.encode(freq.to(DEVICE), start.to(DEVICE)))
    for a, b in zip(want, got):
        assert torch.equal(a, b.cpu())
    args = (cum.reshape(-1), torch.arange(4) * (alphabet + 1), row, active)
    assert torch.equal(rans.decode(*want, *args), symbols)
    back = rans_coder.decode(*(t.to(DEVICE) for t in want), *(t.to(DEVICE) for t in args))
    assert torch.equal(back.cpu(), symbols)
    states, stream, lane_words = want
    bad = stream.clone()
    bad[len(bad) // 2] ^= 0x100
    with pytest.raises(rans.RansError):
        rans_coder.decode(*(t.to(DEVICE) for t in (states, bad, lane_words)), *(t.to(DEVICE) for t in args))


def test_rans_frames_are_the_same_bytes_from_either_coder(monkeypatch):
    """A frame whose lanes the Triton coder ran is byte for byte the torch coder's, and each side
    decodes the other's: a GPU producer and a CPU consumer interoperate."""
    geometry = _geometry(2, 32, torch.bfloat16)
    profile = dataclasses.replace(
        _profile(bits=(3, 2), recent=[(8, 6, 6)], sink=[(2, 16, 16)]), coding="rans", lane_symbols=300
    )
    g = torch.Generator().manual_seed(3)
    key = (torch.randn(90, 2, 32, generator=g) * 2).bfloat16()
    value = torch.randn(90, 2, 32, generator=g).bfloat16()
    torch_frames = encode_layer(key, value, geometry=geometry, profile=profile, layer=1)
    monkeypatch.setitem(entropy._CODERS, "cpu", entropy.RansCoder(rans_coder.encode, rans_coder.decode))
    triton_frames = encode_layer(key, value, geometry=geometry, profile=profile, layer=1)
    assert triton_frames == torch_frames
    from cachegen_vllm.codec import decode_frames

    by_triton = decode_frames(torch_frames, geometry)
    monkeypatch.undo()
    by_torch = decode_frames(torch_frames, geometry)
    assert all(torch.equal(a.key, b.key) and torch.equal(a.value, b.value) for a, b in zip(by_triton, by_torch))
