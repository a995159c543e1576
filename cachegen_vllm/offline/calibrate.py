"""Calibration: per-layer widths for keys and values that meet a quality target with the fewest bits.

1. **Sensitivity.** For each layer and tensor (K, V), the KL(exact || compressed) of the next-token
   distributions along the sample's continuations when only that tensor of that layer is quantized,
   at ``PROBE_BITS`` and at one bit less, and everything else stays exact.
2. **Allocation.** Above the probe each added bit quarters the squared quantization error, so the
   KL of a tensor at width w is estimated as ``KL_probe * 4 ** (PROBE_BITS - w)``; below it, by the
   ratio the two probes measured (`estimated_kl`); the KLs of small, independent errors add up.
   Starting from every tensor at the widest width, the tensor whose next step down costs the least
   estimated KL per bit saved is lowered, while the estimated total stays within the budget.
3. **Verification.** Each candidate is measured whole (every byte, dNLL and KL) on the same
   windows; it meets the target if its dNLL does and its KL is within `KL_SHARE` of it. A geometric
   search over the KL budget (from half the target) finds the largest budget whose profile meets
   it; the profile with the fewest bits among those that met it wins.

The base profile gives everything but the per-layer widths (chunks, groups, rotation, value axis,
sink and recent tiers); ``cachegen-vllm calibrate`` writes the result as a profile file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import xxhash

from cachegen_vllm.codec.basis import BasisRegistry
from cachegen_vllm.codec.basis import load as load_basis
from cachegen_vllm.codec.profile import EXACT_BITS, MAX_BASIS_BITS, LayerBits, Profile
from cachegen_vllm.offline.quality import Harness, QualityResult

PROBE_BITS = 3
PROBES = 4  # per layer: keys and values, each at PROBE_BITS and one bit less
BUDGET_ROUNDS = 7  # whole-profile measurements in the search for the budget
# dNLL over a sample of a few windows swings widely; KL, far steadier, runs below dNLL on every
# profile measured (docs/JOURNAL.md, "Calibration"). A profile must meet both dNLL <= target and
# KL <= this share of it, or a lucky sample passes a profile that misses the target elsewhere.
KL_SHARE = 0.8


@dataclass(frozen=True)
class Calibration:
    profile: Profile
    measured: QualityResult
    target_dnll: float


def _isolated(base: Profile, layer: int, tensor: str, bits: int) -> Profile:
    """Only one tensor of one layer quantized, with the base's sink and recent tiers as the
    calibrated profile will have them: a probe that quantized the attention sinks would measure
    damage the profile never does, and the allocation would spend bits against it."""
    key, value = (bits, EXACT_BITS) if tensor == "key" else (EXACT_BITS, bits)
    return replace(
        base,
        name=f"probe {tensor} {layer}",
        key_bits=EXACT_BITS,
        value_bits=EXACT_BITS,
        layers=(LayerBits(layer, layer, key, value),),
    )


Probes = tuple[float, float]  # KL of a tensor quantized alone at PROBE_BITS and at PROBE_BITS - 1


def sensitivity(
    harness: Harness, base: Profile, progress=None, cache: Path | None = None
) -> dict[tuple[int, str], Probes]:
    """KL of each (layer, tensor) quantized alone at PROBE_BITS and at one bit less. With ``cache``
    (a JSON file), the probes of an identical setting (model, windows, base profile) are read from
    it, and new ones written to it: calibrating several targets then probes once."""
    basis = load_basis(base.basis).digest if base.basis else None  # the file's contents, not just its path
    setting = (harness.geometry, [w.tolist() for w in harness.windows], base, basis, PROBE_BITS, "tiers kept")
    key = xxhash.xxh3_64_hexdigest(repr(setting).encode())
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("setting") == key:
            if progress is not None:
                progress.update(PROBES * harness.geometry.num_layers)
            return {(int(layer), tensor): (high, low) for layer, tensor, high, low in stored["probes"]}
    out = {}
    for layer in range(harness.geometry.num_layers):
        for tensor in ("key", "value"):
            kls = []
            for bits in (PROBE_BITS, PROBE_BITS - 1):
                kls.append(max(harness.evaluate(_isolated(base, layer, tensor, bits)).kl, 0.0))
                if progress is not None:
                    progress.update(1)
            out[(layer, tensor)] = (kls[0], kls[1])
    if cache is not None:
        probes = [[layer, tensor, *kls] for (layer, tensor), kls in out.items()]
        cache.write_text(json.dumps({"setting": key, "probes": probes}) + "\n")
    return out


def estimated_kl(probes: Probes, bits: int) -> float:
    """KL of a tensor at ``bits``: from the probe, each bit more quarters it (the squared error's
    rate); below it, each bit less multiplies it by the measured ratio of the two probes (at least
    2, so that fewer bits never look cheaper). Coarse widths cost more than a quartering says: on
    the entropy-coded quantizer 3 -> 2 bits multiplied the whole model's KL by 6.4, not 4."""
    high, low = probes
    if bits >= PROBE_BITS:
        return high * 4.0 ** (PROBE_BITS - bits)
    ratio = max(low / high, 2.0) if high > 0 else 4.0
    return max(low, 2.0 * high) * ratio ** (PROBE_BITS - 1 - bits)


def allocate(
    sens: dict[tuple[int, str], Probes], budget_kl: float, min_bits: int, max_bits: int
) -> dict[tuple[int, str], int]:
    """Fewest bits whose estimated total KL stays within ``budget_kl`` (greedy, one bit at a time)."""
    widths = {item: max_bits for item in sens}
    total = sum(estimated_kl(sens[item], max_bits) for item in sens)
    while True:
        steps = [
            (estimated_kl(sens[i], w - 1) - estimated_kl(sens[i], w), i) for i, w in widths.items() if w > min_bits
        ]
        if not steps:
            return widths
        extra, item = min(steps)
        if total + extra > budget_kl:
            return widths
        widths[item] -= 1
        total += extra


def as_profile(base: Profile, widths: dict[tuple[int, str], int], name: str) -> Profile:
    """The base profile with these per-layer widths (runs of equal layers merged)."""
    layers: list[LayerBits] = []
    for layer in range(max(i for i, _ in widths) + 1):
        key, value = widths[(layer, "key")], widths[(layer, "value")]
        if layers and (layers[-1].key, layers[-1].value) == (key, value) and layers[-1].last == layer - 1:
            layers[-1] = replace(layers[-1], last=layer)
        else:
            layers.append(LayerBits(layer, layer, key, value))
    # the base widths are those of the most layers, so that the file lists only the exceptions
    common = max(
        {(r.key, r.value) for r in layers},
        key=lambda kv: sum(r.last - r.first + 1 for r in layers if (r.key, r.value) == kv),
    )
    return replace(
        base,
        name=name,
        key_bits=common[0],
        value_bits=common[1],
        layers=tuple(r for r in layers if (r.key, r.value) != common),
    )


def calibrate(
    harness: Harness,
    base: Profile,
    target_dnll: float,
    name: str,
    min_bits: int = 2,
    max_bits: int = 8,
    progress=None,
    log=None,
    sensitivity_cache: Path | None = None,
) -> Calibration:
    """The profile with the fewest bits whose measured dNLL on the harness's windows is at most
    ``target_dnll`` (and KL at most ``KL_SHARE`` of it); ValueError if no candidate is. ``log``
    (a callable) hears one line per measured candidate."""
    sens = sensitivity(harness, base, progress, sensitivity_cache)
    if base.rotation == "basis":  # wider codes would clip a basis's largest coefficients (config.MAX_BASIS_BITS)
        max_bits = min(max_bits, MAX_BASIS_BITS)
    best, passed, failed, budget = None, None, None, target_dnll / 2
    for round_ in range(BUDGET_ROUNDS):  # a geometric search for the largest KL budget that meets the target
        profile = as_profile(base, allocate(sens, budget, min_bits, max_bits), name)
        measured = harness.evaluate(profile)
        meets = measured.delta_nll <= target_dnll and measured.kl <= target_dnll * KL_SHARE
        if log is not None:
            log(
                f"candidate {round_ + 1}/{BUDGET_ROUNDS}: KL budget {budget:.3g} -> "
                f"{measured.bits_per_element:.3f} bits, "
                f"dNLL {measured.delta_nll:+.4f}, KL {measured.kl:.4f}: {'meets' if meets else 'misses'} the target"
            )
        if meets:
            if best is None or measured.bits_per_element < best.measured.bits_per_element:
                best = Calibration(profile, measured, target_dnll)
            passed = budget
        else:
            failed = budget
        if passed is None:
            budget /= 4
        elif failed is None:
            budget *= 4
        else:
            budget = math.sqrt(passed * failed)
    if best is None:
        raise ValueError(
            f"no allocation met dNLL <= {target_dnll} (the last: {measured.delta_nll:+.4f} at {budget:.2g} KL)"
        )
    return best


def profile_toml(calibration: Calibration, base_name: str, sample: str, out_dir: Path) -> str:
    """A profile file: the base profile's settings, the calibrated widths, and how they were found."""
    p, m = calibration.profile, calibration.measured
    lines = [
        f'# cachegen-vllm profile "{p.name}": calibrated by `cachegen-vllm calibrate` from "{base_name}"',
        f"# for dNLL <= {calibration.target_dnll} nats/token, on {sample}:",
        f"# {m.bits_per_element:.3f} bits per KV element on the wire ({m.ratio_vs_bf16:.2f}x smaller than bf16) at",
        f"# dNLL {m.delta_nll:+.4f} ({m.perplexity_change_pct:+.2f}% perplexity), KL {m.kl:.5f}.",
        "# configs/default.toml documents every field.",
        "",
        f"chunk_tokens = {p.chunk_tokens}",
        f"group_tokens = {p.group_tokens}",
        f'rotation = "{p.rotation}"',
        *([f'basis = "{Path(os.path.relpath(p.basis, out_dir)).as_posix()}"'] if p.basis else []),
        f'value_axis = "{p.value_axis}"',
        f'coding = "{p.coding}"',
        f"lane_symbols = {p.lane_symbols}",
        "",
        "[bits]",
        f"key = {p.key_bits}",
        f"value = {p.value_bits}",
    ]
    for rule in p.layers:
        lines += [
            "",
            "[[bits.layers]]",
            f"first = {rule.first}",
            f"last = {rule.last}",
            f"key = {rule.key}",
            f"value = {rule.value}",
        ]
    for field, tiers in (("sink", p.sink), ("recent", p.recent)):
        for tier in tiers:
            lines += ["", f"[[bits.{field}]]", f"tokens = {tier.tokens}", f"key = {tier.key}", f"value = {tier.value}"]
    return "\n".join(lines) + "\n"


def run(
    model_dir: Path,
    text: Path | None,
    target_dnll: float,
    out: Path,
    base_name: str,
    windows: int,
    context_tokens: int,
    continuation_tokens: int,
    min_bits: int = 2,
    sensitivity_cache: Path | None = None,
) -> Calibration:
    from tqdm import tqdm

    from cachegen_vllm.config import load_profile
    from cachegen_vllm.fitting import auto as autobasis

    if not (target_dnll > 0 and math.isfinite(target_dnll)):
        raise ValueError(f"--target-dnll must be a positive number of nats/token, got {target_dnll}")
    base = autobasis.resolve(load_profile(base_name), str(model_dir))  # "auto": this model's fitted basis
    corpus = text.read_text() if text else None
    harness = Harness(model_dir, windows, context_tokens, continuation_tokens, 0, corpus=corpus)
    base.check_geometry(harness.geometry.num_layers)
    BasisRegistry().for_profile(base, harness.geometry)
    with tqdm(total=PROBES * harness.geometry.num_layers, desc="layer sensitivity", unit="probe") as bar:
        calibration = calibrate(
            harness,
            base,
            target_dnll,
            out.stem,
            min_bits=min_bits,
            progress=bar,
            log=bar.write,
            sensitivity_cache=sensitivity_cache,
        )
    sample = f"{windows} windows of {context_tokens}+{continuation_tokens} tokens of " + (
        text.name if text else "the CPython language reference"
    )
    out.write_text(profile_toml(calibration, base_name, sample, out.parent))
    load_profile(out)  # what was written must load: a ConfigError here is a calibration bug, not the user's
    return calibration
