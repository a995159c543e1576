"""Calibration: the allocation rule, and the command on the embedded model."""

from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from cachegen_vllm.codec import KVGeometry
from cachegen_vllm.config import load_profile
from cachegen_vllm.offline.calibrate import PROBE_BITS, allocate, as_profile, estimated_kl, run, sensitivity


def test_allocation_gives_sensitive_tensors_more_bits_and_spends_its_budget():
    # probes at 3 and 2 bits; these quadruple per bit, as the squared error does
    sens = {
        (0, "key"): (0.01, 0.04),
        (0, "value"): (0.0001, 0.0004),
        (1, "key"): (0.001, 0.004),
        (1, "value"): (0.0001, 0.0004),
    }
    tight, loose = allocate(sens, 0.001, 2, 8), allocate(sens, 0.01, 2, 8)
    assert tight[(0, "key")] > tight[(1, "key")] > tight[(0, "value")]  # in order of sensitivity
    assert sum(loose.values()) < sum(tight.values())  # a looser target costs fewer bits
    for widths, budget in ((tight, 0.001), (loose, 0.01)):
        estimate = sum(sens[i][0] * 4.0 ** (PROBE_BITS - w) for i, w in widths.items())
        assert estimate <= budget
        # greedy to the end: any further step down would break the budget
        assert all(w == 2 or estimate + sens[i][0] * 4.0 ** (PROBE_BITS - w) * 3 > budget for i, w in widths.items())
    assert allocate(sens, 1e-12, 2, 8) == {i: 8 for i in sens}  # nothing affordable: widest everywhere


def test_a_steep_probe_keeps_a_tensor_off_coarse_widths():
    """Two tensors alike at 3 bits; one loses 20x as much at 2 bits. The budget that takes one of
    them to 2 bits takes the other."""
    sens = {(0, "key"): (0.001, 0.004), (0, "value"): (0.001, 0.02)}
    widths = allocate(sens, 0.006, 2, 8)
    assert widths == {(0, "key"): 2, (0, "value"): 3}
    assert estimated_kl((0.001, 0.02), 1) == pytest.approx(0.02 * 20)  # below the probes, the measured ratio
    assert estimated_kl((0.001, 0.0005), 2) > estimated_kl((0.001, 0.0005), 3)  # noise never makes fewer bits cheaper


def test_sensitivity_cache_probes_a_setting_once(tmp_path):
    class Stub:  # a harness whose every probe costs a call
        geometry = KVGeometry(2, 1, 8, torch.bfloat16)
        windows: ClassVar = [torch.arange(5)]
        calls = 0

        def evaluate(self, profile):
            Stub.calls += 1
            return SimpleNamespace(kl=0.001 * Stub.calls)

    cache = tmp_path / "probes.json"
    first = sensitivity(Stub(), load_profile("entropy"), cache=cache)
    assert Stub.calls == 8 and len(first) == 4  # 2 layers x (K, V) x 2 widths
    assert sensitivity(Stub(), load_profile("entropy"), cache=cache) == first and Stub.calls == 8
    other = sensitivity(Stub(), load_profile("default"), cache=cache)  # another base profile: probed anew
    assert Stub.calls == 16 and other != first


def test_a_basis_profile_is_never_calibrated_past_its_widest_code():
    """A basis codes at most 5 bits (config.MAX_BASIS_BITS): calibration must not hand a sensitive
    tensor 6-8 bits there (it did, and wrote a profile that did not load)."""
    from cachegen_vllm.codec.profile import MAX_BASIS_BITS
    from cachegen_vllm.offline.calibrate import calibrate

    widest = []

    class Stub:  # probes say one tensor is very sensitive; every candidate meets any target
        geometry = KVGeometry(2, 1, 8, torch.bfloat16)
        windows: ClassVar = [torch.arange(5)]

        def evaluate(self, profile):
            bits = [w for r in profile.layers for w in (r.key, r.value)] + [profile.key_bits, profile.value_bits]
            widest.append(max(b for b in bits if b != 16))
            kl = 1.0 if profile.name == "probe key 0" else 1e-6
            return SimpleNamespace(kl=kl, delta_nll=0.0, bits_per_element=float(sum(bits)))

    calibrate(Stub(), load_profile("smollm2-basis"), 0.01, "x", min_bits=1)
    assert max(widest) == MAX_BASIS_BITS  # the sensitive keys got the widest a basis allows, no more


def test_profile_lists_only_the_layers_that_differ():
    widths = {(layer, t): 4 for layer in range(6) for t in ("key", "value")} | {(2, "key"): 6, (3, "key"): 6}
    profile = as_profile(load_profile("default"), widths, "x")
    assert (profile.key_bits, profile.value_bits) == (4, 4)
    assert [(r.first, r.last, r.key, r.value) for r in profile.layers] == [(2, 3, 6, 4)]
    assert all(profile.layer_bits(layer) == (widths[(layer, "key")], widths[(layer, "value")]) for layer in range(6))


@pytest.mark.model
@pytest.mark.parametrize("base", ["default", "entropy"])
def test_calibrated_profile_meets_its_target_with_fewer_bits(model_dir, tmp_path, base):
    from cachegen_vllm.offline.quality import Harness

    out = tmp_path / "calibrated.toml"
    target = 0.02
    calibration = run(model_dir, None, target, out, base, windows=2, context_tokens=256, continuation_tokens=32)
    profile = load_profile(out)  # the file it wrote is a valid profile
    assert profile.layers == calibration.profile.layers and len(profile.layers) > 0  # per-layer widths
    assert profile.coding == load_profile(base).coding
    harness = Harness(model_dir, 2, 256, 32, 0)
    measured = harness.evaluate(profile)
    assert measured.delta_nll <= target
    assert measured.bits_per_element < harness.evaluate(load_profile(base)).bits_per_element - 0.5


def test_a_calibrated_basis_profile_names_its_basis_relative_to_itself(tmp_path):
    """A profile written from a basis profile points at the same basis file, from wherever it lies."""
    from cachegen_vllm.offline.calibrate import Calibration, profile_toml
    from cachegen_vllm.offline.quality import QualityResult

    base = load_profile("smollm2-basis")
    measured = QualityResult("x", 1, 2.5, 6.4, 0.001, 0.1, 0.001, 0.99, 1.0)
    out = tmp_path / "deep" / "x.toml"
    out.parent.mkdir()
    out.write_text(profile_toml(Calibration(base, measured, 0.01), "smollm2-basis", "a sample", out.parent))
    written = load_profile(out)
    assert (written.rotation, written.basis) == ("basis", base.basis)


@pytest.mark.model
def test_the_basis_command_fits_a_basis_a_profile_can_use(model_dir, tmp_path):
    from cachegen_vllm.codec.basis import BasisRegistry, load
    from cachegen_vllm.config import profile_from_dict
    from cachegen_vllm.serving.cli import main

    out = tmp_path / "fitted.safetensors"
    main(["basis", str(model_dir), "--windows", "2", "--context-tokens", "255", "--offset", "256", "--out", str(out)])
    assert load(str(out)).shape == (30, 3, 64)
    profile = profile_from_dict(
        {
            "chunk_tokens": 256,
            "group_tokens": 64,
            "rotation": "basis",
            "basis": out.name,
            "coding": "rans",
            "bits": {"key": 3, "value": 3},
        },
        "fitted",
        root=tmp_path,
    )
    assert BasisRegistry().for_profile(profile, KVGeometry(30, 3, 64, torch.bfloat16)).digest == load(str(out)).digest


@pytest.mark.model
def test_a_model_without_a_shipped_basis_calibrates_on_its_automatic_one(llama_dir, tmp_path):
    """`--base basis` on a model of another geometry: widths calibrated on the basis fitted to it."""
    from cachegen_vllm.codec.basis import load
    from cachegen_vllm.fitting import auto as autobasis

    out = tmp_path / "llama.toml"
    run(llama_dir, None, 0.05, out, "basis", windows=2, context_tokens=256, continuation_tokens=32)
    written = load_profile(out)
    fitted = autobasis.resolve(load_profile("basis"), str(llama_dir)).basis
    assert written.basis == fitted and load(written.basis).shape == (2, 8, 128)
