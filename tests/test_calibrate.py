"""Calibration: the allocation rule, and the command on the embedded model."""

import pytest

from cachegen_vllm.calibrate import PROBE_BITS, allocate, as_profile, run
from cachegen_vllm.config import load_profile


def test_allocation_gives_sensitive_tensors_more_bits_and_spends_its_budget():
    sens = {(0, "key"): 0.01, (0, "value"): 0.0001, (1, "key"): 0.001, (1, "value"): 0.0001}
    tight, loose = allocate(sens, 0.001, 2, 8), allocate(sens, 0.01, 2, 8)
    assert tight[(0, "key")] > tight[(1, "key")] > tight[(0, "value")]  # in order of sensitivity
    assert sum(loose.values()) < sum(tight.values())  # a looser target costs fewer bits
    for widths, budget in ((tight, 0.001), (loose, 0.01)):
        estimate = sum(sens[i] * 4.0 ** (PROBE_BITS - w) for i, w in widths.items())
        assert estimate <= budget
        # greedy to the end: any further step down would break the budget
        assert all(w == 2 or estimate + sens[i] * 4.0 ** (PROBE_BITS - w) * 3 > budget for i, w in widths.items())
    assert allocate(sens, 1e-12, 2, 8) == {i: 8 for i in sens}  # nothing affordable: widest everywhere


def test_profile_lists_only_the_layers_that_differ():
    widths = {(layer, t): 4 for layer in range(6) for t in ("key", "value")} | {(2, "key"): 6, (3, "key"): 6}
    profile = as_profile(load_profile("default"), widths, "x")
    assert (profile.key_bits, profile.value_bits) == (4, 4)
    assert [(r.first, r.last, r.key, r.value) for r in profile.layers] == [(2, 3, 6, 4)]
    assert all(profile.layer_bits(layer) == (widths[(layer, "key")], widths[(layer, "value")]) for layer in range(6))


@pytest.mark.model
def test_calibrated_profile_meets_its_target_with_fewer_bits(model_dir, tmp_path):
    from cachegen_vllm.quality import Harness

    out = tmp_path / "calibrated.toml"
    target = 0.02
    calibration = run(model_dir, None, target, out, "default", windows=2, context_tokens=256, continuation_tokens=32)
    profile = load_profile(out)  # the file it wrote is a valid profile
    assert profile.layers == calibration.profile.layers and len(profile.layers) > 0  # per-layer widths
    harness = Harness(model_dir, 2, 256, 32, 0)
    measured = harness.evaluate(profile)
    assert measured.delta_nll <= target
    assert measured.bits_per_element < harness.evaluate(load_profile("default")).bits_per_element - 0.5
