"""Benchmark the Triton paged-cache codec against the device's copy bandwidth and plain torch.

On a CUDA GPU (carry xxhash as a wheel to a machine with no package registry):

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels.json

For a Llama-3-8B-like cache (32 layers, 8 KV heads, head_dim 128, block size 16, bf16, pages in
FlashAttention's order, shuffled block ids) at 4K, 16K and 32K tokens it times, per layer:
encode and decode kernels alone (CUDA events, median of --reps), the whole `paged.encode`
call (planning, kernels, copy to the host, headers, checksums), and the torch reference codec on the
same device; GB/s counts bytes read plus bytes written, and "of copy" divides by a device-to-device
copy measured in the same run.

Without a GPU, ``--ptxas`` compiles the kernels for sm_90a (H100/H200) and reports what ptxas
allocates: registers per thread, spills, shared memory. That is what decides occupancy, and it is
the one figure about the GPU path that can be measured on a CPU machine:

    python benchmarks/bench_kernels.py --ptxas --json benchmarks/results/kernels_ptxas.json

``--host`` times the encode's work on the host (the plan, once per step; sealing, per layer);
``--cpu-codec`` the reference codec (packed and rans) on this CPU, one layer of the embedded model.

The entropy-coded profile (``entropy``: rANS) is timed too: the rANS lane kernel
alone on one chunk, and whole ``encode_layer`` / ``decode_frames`` calls on the device (torch
quantization and tables, the Triton coder, frames on the host), in GB/s of raw KV, with a check that
the frames are byte for byte the CPU coder's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cachegen_vllm.codec import KVGeometry
from cachegen_vllm.config import load_profile

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
TOKENS = (4096, 16384, 32768)  # x 32 layers: up to 4 GiB of bf16 KV
HOST_REPS = 7
PROFILES = ("default", "aggressive")
GEOMETRY = KVGeometry(LAYERS, HEADS, HEAD_DIM, DTYPE, model="llama-3-8b-like")


def kernel_profiles() -> list[str]:
    """The shipped profiles whose frames the paged kernels code (bit-packed ones; a lossless width
    goes through the field coder, `_ptxas_lossless`)."""
    from cachegen_vllm.codec.profile import LOSSLESS_BITS
    from cachegen_vllm.config import shipped_profiles

    def coded(name: str) -> bool:
        profile = load_profile(name)
        return profile.coding == "packed" and LOSSLESS_BITS not in {w for _, w in profile.widths()}

    return [name for name in shipped_profiles() if coded(name)]


def ptxas_report(profile_name: str, geometry: KVGeometry = GEOMETRY) -> list[dict]:
    """Compile every (key bits, value bits) variant requests of the profile launch for sm_90a:
    ptxas's allocation and the fused multiply-adds in the PTX."""
    from cachegen_vllm.kernels.plans import profile_variants
    from cachegen_vllm.kernels.tile_kernels import decode_kernel, encode_kernel, kernel_constants

    profile = load_profile(profile_name)
    constants = kernel_constants(geometry, profile.group_tokens, profile.value_axis, profile.rotation == "hadamard")
    options = {name: constants.pop(name) for name in ("num_warps", "enable_fp_fusion")}
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[geometry.dtype]
    types = {
        "cache": f"*{dtype}",
        "block_table": "*i64",
        "tiles": "*i64",
        "out": "*u8",
        "src": "*u8",
        "out_f16": "*fp16",
        "src_f16": "*fp16",
        "out_raw": f"*{dtype}",
        "src_raw": f"*{dtype}",
        "bad_tiles": "*i32",
        "write_start": "i32",
        "write_end": "i64",
        "block_size": "i32",
        "stride_block": "i32",
        "stride_head": "i32",
        "stride_token": "i32",
    }
    # what a launch specializes: pointers from torch and integers that are multiples of 16 are
    # marked divisible by 16, and the unit channel stride is a constant
    divisible = {"block_size", "stride_block", "stride_head", "stride_token"}
    rows = []
    for key_bits, value_bits in profile_variants(geometry, profile):
        for kernel in (encode_kernel, decode_kernel):
            const = {**constants, "KEY_BITS": key_bits, "VALUE_BITS": value_bits, "stride_channel": 1}
            signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
            attrs = {
                (i,): [["tt.divisibility", 16]]
                for i, name in enumerate(kernel.arg_names)
                if signature[name].startswith("*") or name in divisible
            }
            rows.append(
                dict(
                    profile=profile_name,
                    kernel=kernel.__name__,
                    key_bits=key_bits,
                    value_bits=value_bits,
                    num_warps=options["num_warps"],
                    block_t=constants["BLOCK_T"],
                    **_sm90a(kernel, signature, const, attrs, options),
                )
            )
    return rows


def _sm90a(kernel, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile a kernel for the H100 and H200; ptxas's allocation and the fp32 fused multiply-adds in
    the PTX (``fma.rn.f32``: the reference rounds a multiply and an add apart)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the ptxas that reads the PTX version this Triton emits (3.9 ships a newer one beside its own)
    bin_dir = Path(triton.__file__).parent / "backends/nvidia/bin"
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        info = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr
    return dict(
        registers=int(info.split("Used ")[1].split(" registers")[0]),
        spill_store_bytes=int(info.split(" bytes spill stores")[0].rsplit(" ", 1)[1]),
        shared_bytes=compiled.metadata.shared,
        fma_f32=len(re.findall(r"\bfma\.[a-z.]*f32\b", compiled.asm["ptx"])),
    )


def _coder_row(profile: str, module: str, kernel, signature: dict, constexprs: dict, block_t: int) -> dict:
    """One of the data-driven coders' kernels (no bit widths among its constants) compiled for
    sm_90a with 4 warps, its pointers declared 16-byte aligned."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if signature[n].startswith("*")}
    return dict(
        profile=profile,
        kernel=f"{module}.{kernel.__name__}",
        key_bits=None,
        value_bits=None,
        num_warps=4,
        block_t=block_t,
        **_sm90a(kernel, signature, constexprs, attrs, {"num_warps": 4, "enable_fp_fusion": False}),
    )


def _ptxas_rans() -> list[dict]:
    """The rANS lane kernels for sm_90a (one variant each: bit widths are data, not constants)."""
    from cachegen_vllm.kernels import rans_coder

    rows = []
    for kernel, constexprs in ((rans_coder.encode_kernel, {}), (rans_coder.decode_kernel, {"SEARCH": 6})):
        signature = {
            name: "constexpr"
            if name in ("BLOCK", "SEARCH")
            else "i32"
            if name in ("steps", "lanes")
            else "*i8"
            if name in ("emitted", "active", "ok")
            else "*i64"
            for name in kernel.arg_names
        }
        constexprs = {**constexprs, "BLOCK": rans_coder.BLOCK_LANES}
        rows.append(_coder_row("entropy", "rans_coder", kernel, signature, constexprs, rans_coder.BLOCK_LANES))
    return rows


def _ptxas_lossless() -> list[dict]:
    """The lossless field coder's kernels for sm_90a, for bf16 (one variant per dtype's fields)."""
    from cachegen_vllm.codec import lossless
    from cachegen_vllm.kernels import lossless_fields as fields

    constexprs = dict(E=8, M=7, ESCAPE=lossless.ESCAPE, BLOCK_T=fields.BLOCK_TOKENS, BLOCK_C=fields.BLOCK_CHANNELS)
    rows = []
    for kernel in (fields.split_kernel, fields.merge_kernel):
        signature = {
            name: "constexpr" if name in constexprs else "i32" if name in ("tokens", "channels") else "*i64"
            for name in kernel.arg_names
        }
        rows.append(_coder_row("lossless", "lossless_fields", kernel, signature, constexprs, fields.BLOCK_TOKENS))
    return rows


def _host_rows(profile_name: str) -> list[dict]:
    """The encode's host work for a step of ``tokens`` tokens split among ``saves`` requests: the
    plan (once per step and widths, on the forward pass's thread: headers and tiles of every save),
    and sealing a layer's frames (headers, checksums) in one host buffer (on the sealer); medians
    of HOST_REPS."""
    from cachegen_vllm.device import Runtime
    from cachegen_vllm.kernels import plans

    profile, cpu, rows = load_profile(profile_name), torch.device("cpu"), []
    for saves in (1, 16):
        for tokens in TOKENS:
            per_save = tokens // saves
            spans = [plans.SaveSpan(i * -(-per_save // BLOCK_SIZE), 0, per_save, per_save) for i in range(saves)]
            planning, sealing = [], []
            for _ in range(HOST_REPS):
                t0 = time.perf_counter()
                plan = plans.plan_encode(GEOMETRY, profile, 0, spans, cpu, Runtime(cpu))
                planning.append(time.perf_counter() - t0)
                host = torch.empty(plan.nbytes, dtype=torch.uint8).fill_(0)  # touched, as the copy leaves it
                t0 = time.perf_counter()
                plans.finish_encode(plan, GEOMETRY, 1, host)
                sealing.append(time.perf_counter() - t0)
            rows.append(
                dict(
                    profile=profile_name,
                    saves=saves,
                    tokens=tokens,
                    wire_mib=round(plan.nbytes / 2**20, 1),
                    tiles=sum(len(members) for _, members, _ in plan.launches),
                    launches_per_layer=len(plan.launches),
                    plan_per_step_ms=round(statistics.median(planning) * 1e3, 2),
                    seal_per_layer_ms=round(statistics.median(sealing) * 1e3, 2),
                )
            )
    return rows


def median_seconds(fn, reps: int) -> float:
    """Median seconds of ``fn``: CUDA events on a GPU (device time of what it enqueues), wall time
    on the CPU (the interpreter smoke run)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(_wall(fn, 1, warm=False))
    return statistics.median(times)


def _wall(fn, reps: int, warm: bool = True) -> float:
    """Median wall seconds of ``fn`` until its device work is done: what a caller waits."""
    if warm:
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), reps)


def _timed_rows(profile_name: str, tokens: int, reps: int, copy_bps: float, device: str) -> dict:
    from cachegen_vllm.codec import decode_chunk, encode_layer, read_frame
    from cachegen_vllm.codec.bitpack import pack
    from cachegen_vllm.codec.quant import quantize
    from cachegen_vllm.kernels import plans as kernels
    from cachegen_vllm.paged import PagedCaches, SaveRange, encode, gather

    profile = load_profile(profile_name)
    blocks = -(-tokens // BLOCK_SIZE)
    generator = torch.Generator().manual_seed(tokens)
    # FlashAttention's page order (LBNHC): [blocks, block_size, heads, K|V], viewed as vLLM hands it over
    store = torch.randn(blocks + 64, BLOCK_SIZE, HEADS, 2 * HEAD_DIM, generator=generator).to(DTYPE).to(device)
    cache = store.permute(0, 2, 1, 3)
    table = torch.randperm(blocks + 64, generator=generator)[:blocks].to(device)
    raw = 2 * tokens * HEADS * HEAD_DIM * DTYPE.itemsize  # K and V of one layer

    plan = kernels.plan_encode(GEOMETRY, profile, 0, [kernels.SaveSpan(0, 0, tokens, tokens)], cache.device)
    wire = plan.nbytes
    buffer = torch.zeros(plan.nbytes, dtype=torch.uint8, device=device)
    encode_s = median_seconds(lambda: kernels.launch_encode(plan, cache, table, buffer), reps)
    (frames,) = kernels.finish_encode(plan, GEOMETRY, 0, buffer.cpu())
    caches = PagedCaches({0: cache}, None, GEOMETRY, kernels=True)
    save = SaveRange(table.tolist(), 0, tokens, tokens)
    api_s = _wall(lambda: encode(caches, 0, profile, save), max(3, reps // 4))
    dplan = kernels.plan_decode([read_frame(f) for f in frames], GEOMETRY, cache.device)
    target = torch.empty_like(store).permute(0, 2, 1, 3)
    decode_s = median_seconds(lambda: kernels.launch_decode(dplan, {0: target}, table), reps)

    key, value = gather(cache, None, table, tokens)
    torch_quant_s = median_seconds(
        lambda: [pack(quantize(t.float(), 4, "channel", 64)[0], 4) for t in (key, value)], reps
    )
    torch_encode_s = _wall(lambda: encode_layer(key, value, geometry=GEOMETRY, profile=profile, layer=0), 3)
    torch_decode_s = _wall(lambda: [decode_chunk(f, GEOMETRY, device=device) for f in frames], 3)
    # the kernels' frames are the reference's, byte for byte, and decode to what the reference decodes
    identical = frames == encode_layer(key, value, geometry=GEOMETRY, profile=profile, layer=0)
    chunks = [decode_chunk(f, GEOMETRY, device=device) for f in frames]
    expected = (torch.cat([c.key for c in chunks]), torch.cat([c.value for c in chunks]))
    decoded = gather(target, None, table, tokens)
    # one bfloat16 ulp where a fused multiply-add rounds differently; float errors, not wrong codes
    agree = all(torch.allclose(a.float(), b.float(), rtol=2**-7, atol=1e-3) for a, b in zip(decoded, expected))
    if not (identical and agree):
        raise SystemExit(
            f"{profile_name} at {tokens} tokens: frames identical to the reference's: {identical}; "
            f"decoded values equal to the reference's: {agree}"
        )

    def rate(seconds, moved):
        return dict(
            ms=round(seconds * 1e3, 3),
            gbps=round(moved / seconds / 1e9, 1),
            of_copy=round(moved / seconds / copy_bps, 3),
        )

    return dict(
        profile=profile_name,
        tokens=tokens,
        identical_to_reference=identical,
        decode_agrees=agree,
        raw_bytes=raw,
        wire_bytes=wire,
        ratio=round(raw / wire, 2),
        encode_kernel=rate(encode_s, raw + wire),
        decode_kernel=rate(decode_s, raw + wire),
        encode_api=rate(api_s, raw + wire),
        torch_quantize_pack=rate(torch_quant_s, raw + raw // 4),
        torch_encode=rate(torch_encode_s, raw + wire),
        torch_decode=rate(torch_decode_s, raw + wire),
        all_layers_encode_ms=round(encode_s * LAYERS * 1e3, 2),
        all_layers_decode_ms=round(decode_s * LAYERS * 1e3, 2),
    )


def _rans_rows(tokens: int, reps: int, copy_bps: float, device: str) -> dict:
    """The entropy profile on one layer: the coder kernels alone and whole encode/decode calls
    (quantize, tables, coder, frames), raw KV bytes per second; frames checked against the CPU's."""
    from cachegen_vllm.codec import decode_frames, encode_layer, entropy
    from cachegen_vllm.codec.quant import hadamard_
    from cachegen_vllm.kernels import rans_coder

    profile = load_profile("entropy")
    generator = torch.Generator().manual_seed(tokens)
    key, value = (torch.randn(tokens, HEADS, HEAD_DIM, generator=generator).to(DTYPE) for _ in range(2))
    raw = 2 * tokens * HEADS * HEAD_DIM * DTYPE.itemsize
    key_d, value_d = key.to(device), value.to(device)
    frames = encode_layer(key_d, value_d, geometry=GEOMETRY, profile=profile, layer=0)
    identical = frames == encode_layer(key, value, geometry=GEOMETRY, profile=profile, layer=0)  # the CPU's torch coder
    # the coder's input for one chunk at the base width (the sink and recent tiers aside)
    chunk = []
    for x in (key_d, value_d):
        symbols, _, _ = entropy.quantize(
            hadamard_(x[: profile.chunk_tokens].float()).view(-1, HEADS * HEAD_DIM), profile.key_bits
        )
        chunk.append((symbols, entropy.choose_tables(symbols, profile.key_bits), profile.key_bits))
    freq, start, _ = entropy.encode_grids(chunk, profile.lane_symbols)
    coder_encode_s = median_seconds(lambda: rans_coder.encode(freq, start), reps)
    encode_s = _wall(
        lambda: encode_layer(key_d, value_d, geometry=GEOMETRY, profile=profile, layer=0), max(3, reps // 4)
    )
    decode_s = _wall(lambda: decode_frames(frames, GEOMETRY, device=device), max(3, reps // 4))
    chunk_raw = 2 * chunk[0][0].numel() * DTYPE.itemsize

    def rate(seconds, moved):
        return dict(
            ms=round(seconds * 1e3, 3),
            gbps=round(moved / seconds / 1e9, 2),
            of_copy=round(moved / seconds / copy_bps, 4),
        )

    wire = sum(len(f) for f in frames)
    return dict(
        profile="entropy",
        tokens=tokens,
        identical_to_cpu=identical,
        raw_bytes=raw,
        wire_bytes=wire,
        ratio=round(raw / wire, 2),
        coder_encode_one_chunk=rate(coder_encode_s, chunk_raw),
        encode_layer=rate(encode_s, raw),
        decode_frames=rate(decode_s, raw),
    )


def _cpu_codec_rows(reps: int) -> list[dict]:
    """The codec on this CPU (the compiled rANS lanes for entropy-coded profiles): one layer of 128
    and of 1,024 random bf16 tokens, the embedded model's geometry, packed (default), entropy-coded
    (entropy), entropy-coded in the calibrated basis (smollm2-basis; "+ pre-rope": the same basis
    with the model's RoPE frequencies, keys coded before RoPE) and lossless profiles."""
    from cachegen_vllm.codec import decode_frames, encode_layer
    from cachegen_vllm.codec.basis import Basis, BasisRegistry

    geometry = KVGeometry(30, 3, 64, torch.bfloat16, model="SmolLM2-135M-Instruct")
    bases = BasisRegistry()
    shipped = bases.for_profile(load_profile("smollm2-basis"))
    assert shipped is not None
    frequencies = 100000.0 ** -(torch.arange(0, 64, 2, dtype=torch.float64) / 64)  # SmolLM2's rope_theta
    pre_rope = bases.add(Basis.from_forward(shipped.forward, frequencies.expand(30, -1).clone()))
    rows = []
    for tokens in (128, 1024):
        key, value = (torch.randn(tokens, 3, 64, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (1, 2))
        for name, basis in (
            ("default", None),
            ("entropy", None),
            ("smollm2-basis", shipped),
            ("smollm2-basis + pre-rope", pre_rope),
            ("lossless", None),
        ):
            profile = load_profile(name.split(" + ")[0])
            frames = encode_layer(key, value, geometry=geometry, profile=profile, layer=3, basis=basis)
            # each lambda runs before the loop moves on: binding the loop's variables late is right here
            encode_s = _wall(
                lambda: encode_layer(key, value, geometry=geometry, profile=profile, layer=3, basis=basis),  # noqa: B023
                reps,
            )
            decode_s = _wall(lambda: decode_frames(frames, geometry, bases=bases), reps)  # noqa: B023
            rows.append(
                dict(
                    profile=name, tokens=tokens, encode_ms=round(encode_s * 1e3, 1), decode_ms=round(decode_s * 1e3, 1)
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ptxas", action="store_true", help="compile for sm_90a and report ptxas's allocation (no GPU needed)"
    )
    parser.add_argument(
        "--host", action="store_true", help="time the encode's host work per step and layer (no GPU needed)"
    )
    parser.add_argument(
        "--cpu-codec", action="store_true", help="time the reference codec on this CPU, packed and rans"
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run under TRITON_INTERPRET=1"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.cpu_codec:
        rows = _cpu_codec_rows(max(3, args.reps // 4))
        for r in rows:
            print(
                f"{r['profile']:<14} encode {r['encode_ms']} ms, decode {r['decode_ms']} ms "
                f"per layer of {r['tokens']} tokens"
            )
        result = dict(machine="host CPU", torch=torch.__version__, rows=rows)
    elif args.host:
        rows = [row for name in PROFILES for row in _host_rows(name)]
        print(
            "| profile | saves | tokens in the step | wire MiB/layer | tiles/layer | launches/layer "
            "| plan, once per step (ms) | seal a layer's frames (ms) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['profile']} | {r['saves']} | {r['tokens']} | {r['wire_mib']} | {r['tiles']} | "
                f"{r['launches_per_layer']} | {r['plan_per_step_ms']} | {r['seal_per_layer_ms']} |"
            )
        result = dict(machine="host CPU", geometry=str(GEOMETRY), rows=rows)
    elif args.ptxas:
        rows = [row for name in kernel_profiles() for row in ptxas_report(name)] + _ptxas_rans() + _ptxas_lossless()
        print(
            f"{'profile':<13} {'kernel':<28} {'bits k/v':>8} {'warps':>5} {'tile':>5} "
            f"{'regs':>5} {'spill B':>7} {'smem B':>6} {'fma':>4}"
        )
        for r in rows:
            print(
                f"{r['profile']:<13} {r['kernel']:<28} "
                f"{r['key_bits'] or '-':>4}/{r['value_bits'] or '-':<3} {r['num_warps']:>5} "
                f"{r['block_t']:>5} {r['registers']:>5} {r['spill_store_bytes']:>7} {r['shared_bytes']:>6} "
                f"{r['fma_f32']:>4}"
            )
        result = dict(target="sm_90a", geometry=str(GEOMETRY), triton=__import__("triton").__version__, rows=rows)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU, or use --ptxas for what can be measured without one")
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit(
                "--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
                "(a smoke run, not a benchmark)"
            )
        copy_bps = copy_bandwidth(args.device, 1 << 30 if args.device == "cuda" else 1 << 24, args.reps)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
        print(f"device: {name}; device-to-device copy {copy_bps / 1e9:.0f} GB/s (read + written)")
        rows = [_timed_rows(p, tokens, args.reps, copy_bps, args.device) for p in PROFILES for tokens in args.tokens]
        print(
            f"{'profile':<11} {'tokens':>6} {'ratio':>5} | {'encode kernel':>22} | {'decode kernel':>22} | "
            f"{'encode call':>14} | {'torch quant+pack':>16} | {'torch encode':>12} | {'torch decode':>12}"
        )
        for r in rows:

            def cell(k, r=r, full=True):
                c = r[k]
                return f"{c['ms']:>7.3f} ms {c['gbps']:>6.0f} GB/s" + (f" {c['of_copy']:>4.0%}" if full else "")

            print(
                f"{r['profile']:<11} {r['tokens']:>6} {r['ratio']:>5} | "
                f"{cell('encode_kernel')} | {cell('decode_kernel')} | "
                f"{r['encode_api']['ms']:>11.2f} ms | {r['torch_quantize_pack']['gbps']:>11.0f} GB/s | "
                f"{r['torch_encode']['ms']:>9.1f} ms | {r['torch_decode']['ms']:>9.1f} ms"
            )
        entropy_rows = [_rans_rows(tokens, args.reps, copy_bps, args.device) for tokens in args.tokens]
        print("entropy profile (rans): raw KV GB/s of the coder kernel on one chunk, and of whole calls on a layer")
        for r in entropy_rows:
            print(
                f"{r['tokens']:>6} tokens, ratio {r['ratio']}: coder {r['coder_encode_one_chunk']['gbps']} GB/s, "
                f"encode_layer {r['encode_layer']['gbps']} GB/s, decode_frames {r['decode_frames']['gbps']} GB/s, "
                f"frames identical to the CPU's: {r['identical_to_cpu']}"
            )
        result = dict(
            device=name,
            torch=torch.__version__,
            triton=__import__("triton").__version__,
            copy_gbps=round(copy_bps / 1e9, 1),
            geometry=str(GEOMETRY),
            block_size=BLOCK_SIZE,
            rows=rows,
            entropy_rows=entropy_rows,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
