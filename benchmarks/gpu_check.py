"""The GPU code paths checked on a real GPU in one command: the connector's kernels, runtime and
pipeline, without vLLM or ZeroMQ, on a bare machine (torch, Triton, numba, xxhash, safetensors;
nothing it imports needs pyzmq or vLLM).

    python3 benchmarks/gpu_check.py --out gpu_check.json            # on a GPU: sections capped at 450 s in all
    python3 benchmarks/gpu_check.py --smoke --out gpu_check.json    # on a CPU: Triton's interpreter, tiny shapes

Each section has a time cap, checked between cases and inside long ones (cases it stops are
listed as skipped), and writes its rows to the JSON as they come, so that a failure or a cap in
one keeps the others. Cheap and decisive first:

0. versions; the fp32 fused multiply-adds in the encode and decode PTX, one geometry per profile
   (none may be there);
1. byte identity at 4K tokens, every profile: caches made as vLLM allocates them (one int8 buffer,
   LBNHC or LBHNC views), a Llama-3-8B-like and the embedded model's geometry, saves starting
   mid-block, inf/nan/1e6/-0.0 in the KV, and what models vary: block sizes 32 and 64, manager
   blocks of several kernel blocks, one KV head, a tensor-parallel rank's heads, fp16, a step with
   several saves (one launch for all); differing bytes per array against the CPU reference;
   decoding into a NaN-poisoned cache (ulps against the reference's values, and every slot
   outside the range untouched);
2. every kernel variant of every shipped profile compiled (a warm-up, as at start-up, timed);
3. byte identity at 32K tokens;
4. throughput: the device-to-device copy; the encode and decode kernels per layer; the whole
   encode call; the rANS coder; host synchronizations per layer; the host calls of a layer's
   encoding with 1 and 16 saves in the step (they must not grow);
5. the pipeline: a simulated forward pass (slot-mapped cache writes and a matmul per layer) on the
   compute stream, encoding on the encode stream, frames through a queue to a consumer decoding on
   its own stream into a second cache whose first 1,024 tokens must stay untouched; the
   producer's overhead on the compute stream, and equality with the reference.

    python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton decides when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402

from cachegen_vllm.codec import KVGeometry, decode_frames, encode_layer, read_frame  # noqa: E402
from cachegen_vllm.codec.format import parse_frame, payload_arrays  # noqa: E402
from cachegen_vllm.codec.geometry import rank_heads  # noqa: E402
from cachegen_vllm.config import load_profile  # noqa: E402
from cachegen_vllm.device import counting_host_syncs, runtime_for  # noqa: E402
from cachegen_vllm.paged import (  # noqa: E402
    EncodeStep,
    PagedCaches,
    SaveRange,
    encode,
    gather,
    kernel_block_ids,
    warm_up,
)

PACKED = ("raw", "high-quality", "default", "aggressive")
LLAMA = dict(layers=32, heads=8, head_dim=128, model="llama-3-8b-like")
SMOLLM2 = dict(layers=30, heads=3, head_dim=64, model="SmolLM2-135M-Instruct")  # the shipped basis's
BLOCK = 16


class Report:
    """The JSON of results, rewritten whole after each row."""

    def __init__(self, path: Path, smoke: bool):
        self.path, self.data = path, {"smoke": smoke, "sections": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def section(self, name: str, cap_s: float) -> Iterator[Section]:
        entry: dict = {"status": "running", "cap_s": cap_s, "rows": [], "skipped": []}
        self.data["sections"][name] = entry
        started = time.monotonic()
        print(f"== {name} (cap {cap_s:.0f} s)", flush=True)
        try:
            yield Section(self, entry, started + cap_s)
            entry["status"] = "capped" if entry["skipped"] else "ok"
        except Exception:
            entry["status"] = "error"
            entry["error"] = traceback.format_exc()[-6000:]
            print(entry["error"], flush=True)
        finally:
            entry["seconds"] = round(time.monotonic() - started, 1)
            self.save()


class Capped(Exception):
    """The section's cap was reached inside a case."""


class Section:
    def __init__(self, report: Report, entry: dict, deadline: float):
        self.report, self.entry, self.deadline = report, entry, deadline

    def check(self, case: str) -> None:
        """Inside a long case, between its stages: stop it if the cap is reached (listed as skipped)."""
        if time.monotonic() >= self.deadline:
            raise Capped(case)

    def has_time(self, case: str) -> bool:
        """Whether the cap leaves time for ``case``; if not, it is listed as skipped."""
        if time.monotonic() < self.deadline:
            return True
        self.entry["skipped"].append(case)
        return False

    def row(self, **values) -> None:
        self.entry["rows"].append(values)
        print("  " + json.dumps(values, default=str), flush=True)
        self.report.save()

    def run(self, case: str, fn: Callable[[], dict]) -> None:
        """One case: its row, or its error, and the section goes on."""
        if not self.has_time(case):
            return
        started = time.monotonic()
        try:
            self.row(case=case, **fn(), seconds=round(time.monotonic() - started, 2))
        except Capped:
            self.entry["skipped"].append(f"{case} (cap reached inside it)")
        except Exception:
            self.row(case=case, error=traceback.format_exc()[-3000:])


# ---- caches as vLLM allocates them ---------------------------------------------------------------

LAYOUT_ORDER = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4)}  # physical order of [L, B, H, N, C]


def vllm_caches(
    layers: int, blocks: int, heads: int, head_dim: int, layout: str, device, block: int = 16, dtype=torch.bfloat16
) -> list[torch.Tensor]:
    """One [blocks, heads, block, 2 * head_dim] view per layer over one int8 buffer, strided as the
    layout says (vLLM's `create_kv_cache_views`)."""
    item = torch.empty(0, dtype=dtype).element_size()
    shape = (layers, blocks, heads, block, 2 * head_dim * item)  # C in bytes
    strides, step = [0] * 5, 1
    for dim in reversed(LAYOUT_ORDER[layout]):
        strides[dim], step = step, step * shape[dim]
    raw = torch.zeros(step, dtype=torch.int8, device=device)
    view = torch.as_strided(raw, shape, strides)
    return [view[layer].view(dtype) for layer in range(layers)]


def fill(cache: torch.Tensor, table: torch.Tensor, tokens: int, seed: int, special: bool = False) -> None:
    """KV-like values (a few outlier channels) in the request's first ``tokens`` slots (``table``:
    the cache's blocks); with ``special``, inf, nan, 1e6 and -0.0 in four of its tokens."""
    g = torch.Generator().manual_seed(seed)
    heads, block, width = cache.shape[1], cache.shape[2], cache.shape[3]
    values = torch.randn(tokens, heads, width, generator=g)
    values[..., :: max(1, width // 8)] *= 8  # outlier channels
    if special:
        for i, v in enumerate((float("inf"), float("nan"), 1e6, -0.0)):
            values[(i + 1) * tokens // 6, 0, i] = v
    positions = torch.arange(tokens)
    blocks = table.cpu().long()[positions // block]
    cache[blocks.to(cache.device), :, (positions % block).to(cache.device)] = values.to(cache.device, cache.dtype)


def geometry_of(spec: dict, dtype=torch.bfloat16, tp: tuple[int, int] = (1, 0)) -> KVGeometry:
    """The spec's geometry, of one rank's heads where ``tp`` (size, rank) splits them."""
    head_start, heads = rank_heads(spec["heads"], *tp)
    return KVGeometry(
        spec["layers"],
        heads,
        spec["head_dim"],
        dtype,
        model=spec["model"],
        head_start=head_start,
        total_kv_heads=spec["heads"],
    )


# ---- comparisons ---------------------------------------------------------------------------------


def byte_diff(got: list[bytes], want: list[bytes], geometry: KVGeometry) -> dict:
    """Frames compared array by array: how many frames differ, and the differing bytes by array."""
    if len(got) != len(want):
        return {"frames": len(got), "reference_frames": len(want), "identical": False}
    by_array: dict[str, int] = {}
    differ = 0
    for a, b in zip(got, want):
        if a == b:
            continue
        differ += 1
        header = parse_frame(b, geometry)
        for s, slots in enumerate(payload_arrays(header, geometry)):  # K's arrays, then V's (FORMAT.md)
            for i, (offset, n) in enumerate(slots):
                name = f"array{i}"
                count = int(
                    np.count_nonzero(np.frombuffer(a, np.uint8, n, offset) != np.frombuffer(b, np.uint8, n, offset))
                )
                if count:
                    by_array[f"segment{s}.{name}"] = by_array.get(f"segment{s}.{name}", 0) + count
    return {"frames": len(got), "frames_differing": differ, "bytes_differing": by_array, "identical": differ == 0}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between two bf16 tensors (NaN: -1)."""
    if bool(torch.isnan(a.float()).any() or torch.isnan(b.float()).any()):
        return -1
    ordered = [t.contiguous().view(torch.int16).long() for t in (a, b)]
    ordered = [torch.where(o < 0, -32768 - o, o) for o in ordered]  # sign-magnitude to ordered
    return int((ordered[0] - ordered[1]).abs().max()) if a.numel() else 0


# ---- sections 0 and 2: versions, PTX, compilation ------------------------------------------------


def versions(device: torch.device) -> dict:
    import numba
    import triton
    import xxhash

    out = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        numba=numba.__version__,
        xxhash=xxhash.VERSION,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    return out


def compile_all(section: Section, device: torch.device, smoke: bool) -> None:
    """Every variant each shipped profile launches, through the start-up warm-up, per geometry."""
    from cachegen_vllm.config import shipped_profiles

    specs = [dict(SMOLLM2, layers=2)] if smoke else [LLAMA, SMOLLM2]
    for spec in specs:
        geometry = geometry_of(spec)
        caches = vllm_caches(geometry.num_layers, 64, geometry.num_kv_heads, geometry.head_dim, "LBNHC", device)
        for name in shipped_profiles():
            if name.startswith("smollm2") and spec["model"] != SMOLLM2["model"]:
                continue
            if smoke and name != "default":
                continue
            if load_profile(name).basis == "auto":  # fitted on a checkpoint, which this run has none of
                continue

            def case(name=name, caches=caches, geometry=geometry) -> dict:
                runtime = runtime_for(device)
                warm_up(PagedCaches(dict(enumerate(caches)), None, geometry, runtime=runtime), load_profile(name))
                runtime.close()
                return {}

            section.run(f"warm up {name} on {spec['model']}", case)


def fma_report(section: Section) -> None:
    from bench_kernels import kernel_profiles, ptxas_report

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled
        section.row(case="sm_90a PTX", note="not under Triton's interpreter (tests/test_kernels.py compiles them)")
        return
    geometry = geometry_of(LLAMA)  # one geometry per profile: fusion is the compiler's, not the shape's
    for name in kernel_profiles():

        def case(name=name) -> dict:
            rows = ptxas_report(name, geometry)
            return dict(
                variants=len(rows),
                fma_f32=sum(r["fma_f32"] for r in rows),
                spill_store_bytes=max(r["spill_store_bytes"] for r in rows),
                registers=max(r["registers"] for r in rows),
            )

        section.run(f"sm_90a PTX of {name} on {geometry.model}", case)


# ---- sections 1 and 3: byte identity -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One byte-identity case: a step's ``saves`` requests (the first of ``tokens`` tokens, each
    next a fifth shorter; each saved from a third of the way in, mid-block), of one layer's caches
    as vLLM allocates them (``layout``, ``block`` tokens per kernel block, ``per_block`` kernel
    blocks per block of the manager, ``dtype``, the heads of rank ``tp[1]`` of ``tp[0]``)."""

    spec: dict
    tokens: int
    profile: str = "default"
    layout: str = "LBNHC"
    special: bool = False
    block: int = BLOCK
    per_block: int = 1
    dtype: torch.dtype = torch.bfloat16
    tp: tuple[int, int] = (1, 0)
    saves: int = 1

    def name(self) -> str:
        parts = [self.profile, self.spec["model"], self.layout, f"{self.tokens} tokens"]
        parts += ["specials"] * self.special
        parts += ["one KV head"] * (self.spec["heads"] == 1)
        parts += [f"block {self.block}"] * (self.block != BLOCK)
        parts += [f"{self.per_block} kernel blocks per manager block"] * (self.per_block != 1)
        parts += [str(self.dtype)[6:]] * (self.dtype != torch.bfloat16)
        parts += [f"TP rank {self.tp[1]} of {self.tp[0]}"] * (self.tp != (1, 0))
        parts += [f"{self.saves} saves in the step"] * (self.saves != 1)
        return ", ".join(parts)


def identity_case(case: Case, section: Section, device) -> dict:
    """Encode the step's saves on the device (`paged.encoding.EncodeStep`: the connector's calls),
    compare each save's frames with the CPU reference's, and decode the first save's into a
    NaN-poisoned cache: the range written as the reference decodes it, nothing else."""
    name = case.name()
    geometry = geometry_of(case.spec, case.dtype, case.tp)
    profile = load_profile(case.profile)
    lengths = [case.tokens - i * (case.tokens // 5) for i in range(case.saves)]
    manager_tokens = case.block * case.per_block
    manager_blocks = [-(-n // manager_tokens) for n in lengths]
    pool = sum(manager_blocks) + 4
    g = torch.Generator().manual_seed(case.tokens + case.saves)
    order = torch.randperm(pool, generator=g).tolist()
    ids, at = [], 0
    for n in manager_blocks:  # each request's blocks of the manager, shuffled, disjoint
        ids.append(order[at : at + n])
        at += n
    caches = vllm_caches(
        2, pool * case.per_block, geometry.num_kv_heads, geometry.head_dim, case.layout, device, case.block, case.dtype
    )
    layer = 1
    tables = [torch.tensor(kernel_block_ids(i, case.per_block)) for i in ids]  # the cache's blocks
    for i, (table, n) in enumerate(zip(tables, lengths)):
        fill(caches[layer], table, n, seed=n + i, special=case.special and i == 0)
    starts = [n // 3 + 5 for n in lengths]
    runtime = runtime_for(device)
    bound = PagedCaches({layer: caches[layer]}, None, geometry, runtime=runtime, kernels=True, per_block=case.per_block)
    bound.check_profile(profile)
    ranges = [SaveRange(i, start, n, n) for i, start, n in zip(ids, starts, lengths)]
    with runtime.encoding(after=runtime.mark()):
        encoding = EncodeStep(bound, ranges).start(layer, profile)
    got = [encoding.frames(i) for i in range(case.saves)]
    encoding.close()
    section.check(name)
    want = []
    for table, start, n in zip(tables, starts, lengths):
        key, value = gather(caches[layer].cpu(), None, table, n, start)
        want.append(
            encode_layer(key, value, geometry=geometry, profile=profile, layer=layer, token_start=start, total_tokens=n)
        )
        section.check(name)
    rows = [byte_diff(a, b, geometry) for a, b in zip(got, want)]
    row = dict(rows[0], identical=all(r["identical"] for r in rows))
    if case.saves > 1:
        row["per_save"] = rows
    # decode the first save into a NaN-poisoned cache
    start, tokens, table = starts[0], lengths[0], tables[0]
    target = vllm_caches(
        2, pool * case.per_block, geometry.num_kv_heads, geometry.head_dim, case.layout, device, case.block, case.dtype
    )[layer]
    target.fill_(float("nan"))
    write_start, write_end = start + 7, tokens - 3
    with runtime.decoding():
        into = PagedCaches({layer: target}, None, geometry, runtime=runtime, kernels=True, per_block=case.per_block)
        into.check_profile(profile)
        into.decode([read_frame(f) for f in want[0]], into.block_table(ids[0]), write_start, write_end)
        runtime.wait(runtime.mark())
    runtime.close()
    section.check(name)
    chunks = decode_frames(want[0], geometry, bases=into.bases)
    ref_key = torch.cat([c.key for c in chunks])[write_start - start : write_end - start]
    ref_value = torch.cat([c.value for c in chunks])[write_start - start : write_end - start]
    got_key, got_value = gather(target.cpu(), None, table, tokens)
    outside = torch.ones(target.shape[0], target.shape[2], dtype=torch.bool)  # (block, slot) never written
    positions = torch.arange(write_start, write_end)
    outside[table[positions // case.block], positions % case.block] = False
    untouched = bool(torch.isnan(target.cpu().float().permute(0, 2, 1, 3)[outside]).all())
    finite = torch.isfinite(ref_key.float()).all() and torch.isfinite(ref_value.float()).all()
    bits = torch.int16 if case.dtype.itemsize == 2 else torch.int32
    row.update(
        decode_ulps=max(
            ulps(got_key[write_start:write_end], ref_key), ulps(got_value[write_start:write_end], ref_value)
        )
        if finite and case.dtype == torch.bfloat16
        else "not measured"
        if finite
        else "non-finite input",
        decode_equal=bool(
            torch.equal(got_key[write_start:write_end].view(bits), ref_key.view(bits))
            and torch.equal(got_value[write_start:write_end].view(bits), ref_value.view(bits))
        ),
        outside_untouched=untouched,
    )
    return row


def identity_cases(smoke: bool, long: bool) -> list[Case]:
    """Every profile at 4K (and the vLLM layouts, block sizes, splits, heads and dtypes a model
    may have) first; the 32K cases (``long``) after. Smoke: the same variety at tiny shapes."""
    tiny = dict(SMOLLM2, layers=2)
    if smoke:
        if long:
            return []
        base = [Case(tiny, 70, special=True), Case(tiny, 70, "entropy", "LBHNC")]
        variety = [
            Case(tiny, 70, block=32),
            Case(tiny, 150, block=64, layout="LBHNC"),
            Case(tiny, 70, per_block=2),
            Case(dict(tiny, heads=1), 70),
            Case(dict(tiny, heads=4), 70, tp=(2, 1)),
            Case(tiny, 70, dtype=torch.float16),
            Case(tiny, 70, saves=3),
        ]
        return base + variety
    if long:
        return [Case(LLAMA, 32768, layout=layout) for layout in ("LBNHC", "LBHNC")] + [Case(LLAMA, 32768, "aggressive")]
    cases = [Case(LLAMA, 4096, special=True), Case(LLAMA, 4096, layout="LBHNC"), Case(LLAMA, 4096, "aggressive")]
    cases += [Case(SMOLLM2, 4096, p, special=p == "default") for p in PACKED]
    cases += [Case(SMOLLM2, 4096, p) for p in ("entropy", "smollm2-basis")]
    cases.append(Case(LLAMA, 4096, "entropy", special=True))
    cases += [
        Case(LLAMA, 4096, block=32),
        Case(LLAMA, 4096, block=64, layout="LBHNC"),
        Case(LLAMA, 4096, per_block=4),  # hybrid models: manager blocks of several kernel blocks
        Case(dict(LLAMA, heads=1), 4096),
        Case(LLAMA, 4096, tp=(4, 3)),
        Case(LLAMA, 4096, dtype=torch.float16),
        Case(LLAMA, 4096, saves=4),
    ]
    return cases


def byte_identity(section: Section, device: torch.device, smoke: bool, long: bool) -> None:
    for case in identity_cases(smoke, long):
        section.run(case.name(), lambda case=case: identity_case(case, section, device))


# ---- section 4: throughput -----------------------------------------------------------------------


def throughput(section: Section, device: torch.device, smoke: bool) -> None:
    from bench_kernels import copy_bandwidth, median_seconds

    from cachegen_vllm.codec import entropy
    from cachegen_vllm.kernels import plans as kernels

    reps = 2 if smoke else 20
    copy_bps = copy_bandwidth(device.type, (1 << 20) if smoke else (2 << 30), reps)
    section.row(case="device-to-device copy", gbps_read_plus_written=round(copy_bps / 1e9, 1))
    spec = dict(SMOLLM2, layers=2) if smoke else LLAMA
    geometry = geometry_of(spec)
    for tokens in (70,) if smoke else (4096, 16384, 32768):
        for name in ("default",) if smoke else ("default", "aggressive", "entropy"):

            def case(tokens=tokens, name=name) -> dict:
                profile = load_profile(name)
                blocks = -(-tokens // BLOCK)
                cache = vllm_caches(1, blocks, geometry.num_kv_heads, geometry.head_dim, "LBNHC", device)[0]
                table = torch.randperm(blocks).to(device)
                fill(cache, table, tokens, seed=tokens)
                raw = 2 * tokens * geometry.num_kv_heads * geometry.head_dim * 2  # one layer's K and V
                runtime = runtime_for(device)
                row: dict = {"raw_mib_per_layer": round(raw / 2**20, 1)}
                if profile.coding == "packed":
                    plan = kernels.plan_encode(geometry, profile, 0, [kernels.SaveSpan(0, 0, tokens, tokens)], device)
                    buffer = torch.zeros(plan.nbytes, dtype=torch.uint8, device=device)
                    encode_s = median_seconds(lambda: kernels.launch_encode(plan, cache, table, buffer), reps)
                    (sealed,) = kernels.finish_encode(plan, geometry, 0, buffer.cpu())
                    frames = [bytes(f) for f in sealed if f is not None]
                    target = torch.empty_like(cache)
                    decode_plan = kernels.plan_decode([read_frame(f) for f in frames], geometry, device, runtime)
                    decode_s = median_seconds(lambda: kernels.launch_decode(decode_plan, {0: target}, table), reps)
                    row.update(
                        encode_gbps=round(raw / encode_s / 1e9, 1),
                        encode_vs_copy=round(raw / encode_s / copy_bps * 2, 3),  # reads raw, writes little
                        decode_gbps=round(raw / decode_s / 1e9, 1),
                        decode_vs_copy=round(raw / decode_s / copy_bps * 2, 3),
                        ratio=round(raw / sum(map(len, frames)), 2),
                    )
                else:
                    key, value = gather(cache, None, table, tokens)
                    symbols = []
                    for x in (key, value):
                        s, _, _ = entropy.quantize(x.float().reshape(tokens, -1), 3)
                        symbols.append((s, entropy.choose_tables(s, 3), 3))
                    rans_s = median_seconds(lambda: entropy.encode(symbols, profile.lane_symbols), reps)
                    row.update(rans_encode_gbps_of_raw=round(raw / rans_s / 1e9, 2))
                before = runtime.host_syncs
                bound = PagedCaches({0: cache}, None, geometry, runtime=runtime)
                save = SaveRange(table.tolist(), 0, tokens, tokens)

                def call() -> None:
                    with counting_host_syncs(runtime):
                        encode(bound, 0, profile, save)

                wall = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    call()
                    wall.append(time.perf_counter() - t0)
                row.update(
                    whole_call_ms=round(statistics.median(wall) * 1e3, 2),
                    whole_call_gbps=round(raw / statistics.median(wall) / 1e9, 2),
                    host_syncs_per_call=(runtime.host_syncs - before) / 3,
                )
                runtime.close()
                return row

            section.run(f"{name} {tokens} tokens, one layer of {spec['model']}", case)
    for saves in (1, 16):
        name = f"host calls per layer, {saves} save{'s' * (saves > 1)} in the step"
        section.run(name, lambda saves=saves: host_work(saves, device, smoke))


def host_work(saves: int, device: torch.device, smoke: bool) -> dict:
    """What a layer's encoding costs the forward pass's thread with ``saves`` requests in the
    step (the device module's count of launches, copies, events and buffers; the wall time of the
    `EncodeStep.start` call): it must not grow with the requests."""
    spec = dict(SMOLLM2, layers=2) if smoke else LLAMA
    geometry, profile = geometry_of(spec), load_profile("default")
    tokens = 64 if smoke else 512
    blocks = -(-tokens // BLOCK)
    caches = vllm_caches(2, saves * blocks, geometry.num_kv_heads, geometry.head_dim, "LBNHC", device)
    runtime = runtime_for(device)
    bound = PagedCaches(dict(enumerate(caches)), None, geometry, runtime=runtime, kernels=True)
    ranges = [SaveRange(list(range(i * blocks, (i + 1) * blocks)), 0, tokens, tokens) for i in range(saves)]
    with runtime.encoding(after=runtime.mark()):
        step = EncodeStep(bound, ranges)
        step.start(0, profile).close()  # the step's plan for these widths is made here
        before, t0 = runtime.work.copy(), time.perf_counter()
        encoding = step.start(1, profile)
        host_s = time.perf_counter() - t0
    work = dict(runtime.work - before)
    frames = sum(len(encoding.frames(i)) for i in range(saves))
    encoding.close()
    runtime.close()
    return dict(calls=work, start_ms=round(host_s * 1e3, 3), frames=frames)


# ---- section 5: the pipeline ---------------------------------------------------------------------


def pipeline(section: Section, device: torch.device, smoke: bool) -> None:
    """A forward pass's layers on the compute stream, the producer's encoding beside it, and a
    consumer decoding on its own stream."""
    spec = dict(SMOLLM2, layers=2) if smoke else LLAMA
    geometry = geometry_of(spec)
    tokens, held = (70, 16) if smoke else (8192, 1024)
    profile = load_profile("default")
    blocks = -(-tokens // BLOCK)
    g = torch.Generator().manual_seed(7)
    source = vllm_caches(geometry.num_layers, blocks + 8, geometry.num_kv_heads, geometry.head_dim, "LBNHC", device)
    target = vllm_caches(geometry.num_layers, blocks + 8, geometry.num_kv_heads, geometry.head_dim, "LBNHC", device)
    table = torch.randperm(blocks + 8, generator=g)[:blocks].to(device)
    target_table = torch.randperm(blocks + 8, generator=g)[:blocks].to(device)
    positions = torch.arange(tokens, device=device)
    slots = table[positions // BLOCK], positions % BLOCK  # vLLM's slot mapping, as (block, row)
    kv = [torch.randn(tokens, geometry.num_kv_heads, 2 * geometry.head_dim, generator=g).to(device, torch.bfloat16)]
    hidden = 256 if smoke else 4096
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
    sentinel = torch.tensor(1.5, dtype=torch.bfloat16)
    for cache in target:
        cache.fill_(sentinel.item())
    runtime = runtime_for(device)
    sending = PagedCaches(dict(enumerate(source)), None, geometry, runtime=runtime, kernels=True)
    receiving = PagedCaches(dict(enumerate(target)), None, geometry, runtime=runtime, kernels=True)

    with runtime.encoding():
        step = EncodeStep(sending, [SaveRange(table.tolist(), 0, tokens, tokens)])

    def forward(encode: bool, frames: queue.Queue | None) -> float:
        """Seconds of the forward pass on the compute stream (events), encoding each layer if asked."""
        on_gpu = device.type == "cuda"
        start, end = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if on_gpu else (None, None)
        )
        t0 = time.perf_counter()
        if start is not None:
            start.record()
        for layer, cache in enumerate(source):
            cache[slots[0], :, slots[1]] = kv[0]  # the attention's cache write
            torch.matmul(x, w)  # the layer's compute
            if encode:
                written = runtime.mark()
                with runtime.encoding(after=written):
                    encoding = step.start(layer, profile)

                def seal(encoding=encoding, written=written) -> None:
                    with runtime.encoding(after=written):
                        for frame in encoding.frames(0):
                            frames.put(frame)
                    encoding.close()

                runtime.submit(seal)
        if encode:
            runtime.join_encodes()
        if end is not None:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0

    plain = [forward(False, None) for _ in range(3)]
    frames: queue.Queue = queue.Queue()
    forward(True, frames)  # the first: the step's plan is made
    runtime.drain()
    while not frames.empty():
        frames.get()
    with_encoding = forward(True, frames)
    runtime.drain()
    received: list[bytes] = []
    while not frames.empty():
        received.append(frames.get())

    def consume() -> None:
        batch: list = []
        layer = None
        for data in [*received, None]:
            frame = read_frame(data) if data is not None else None  # where a consumer reads it
            current = frame.header.layer if frame is not None else None
            if batch and current != layer:
                with runtime.decoding():
                    receiving.decode(batch, target_table, held, tokens)
                batch = []
            if frame is not None:
                batch.append(frame)
                layer = current
        with runtime.decoding():
            runtime.wait(runtime.mark())

    consumer = threading.Thread(target=consume)
    t0 = time.perf_counter()
    consumer.start()
    consumer.join()
    decode_s = time.perf_counter() - t0
    reference = [
        f
        for layer, cache in enumerate(source)
        for f in encode_layer(
            *gather(cache.cpu(), None, table.cpu(), tokens), geometry=geometry, profile=profile, layer=layer
        )
    ]
    loaded = [torch.cat(gather(cache.cpu(), None, target_table.cpu(), tokens), dim=-1) for cache in target]
    prefix_untouched = all(bool((kv[:held] == sentinel).all()) for kv in loaded)
    decoded = decode_frames(reference, geometry)
    equal = all(
        torch.equal(
            loaded[layer][held:],
            torch.cat([torch.cat([c.key, c.value], dim=-1) for c in decoded if c.layer == layer])[held:],
        )
        for layer in range(geometry.num_layers)
    )
    runtime.close()
    section.row(
        case=f"{spec['model']}, {geometry.num_layers} layers, {tokens} tokens, default profile",
        forward_s=round(statistics.median(plain), 4),
        forward_with_encoding_s=round(with_encoding, 4),
        producer_overhead=round(with_encoding / statistics.median(plain) - 1, 4),
        frames=len(received),
        frames_equal_reference=received == reference,
        consumer_decode_s=round(decode_s, 4),
        decoded_equal_reference=equal,
        held_prefix_untouched=prefix_untouched,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON of results (rewritten as they come)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    report = Report(args.out, args.smoke or device.type == "cpu")
    # cheap and decisive first: what the first minute of device time can show
    caps = (20, 120, 30, 20, 60, 60) if device.type == "cpu" else (60, 120, 90, 90, 50, 40)
    smoke = report.data["smoke"]
    with report.section("0 versions and PTX", caps[0]) as s:
        s.row(case="versions", **versions(device))
        fma_report(s)
    with report.section("1 byte identity at 4K", caps[1]) as s:
        byte_identity(s, device, smoke, long=False)
    with report.section("2 compilation", caps[2]) as s:
        compile_all(s, device, smoke)
    with report.section("3 byte identity at 32K", caps[3]) as s:
        byte_identity(s, device, smoke, long=True)
    with report.section("4 throughput", caps[4]) as s:
        throughput(s, device, smoke)
    with report.section("5 pipeline", caps[5]) as s:
        pipeline(s, device, smoke)
    statuses = {name: entry["status"] for name, entry in report.data["sections"].items()}
    print(json.dumps(statuses), flush=True)
    return 0 if all(v in ("ok", "capped") for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
