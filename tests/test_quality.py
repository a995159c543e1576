"""Round trips of the embedded model's real KV through the shipped profiles.

The bounds are measured, not picked: `cachegen-vllm quality --windows 3 --context-tokens 512
--continuation-tokens 64 --greedy-tokens 8` (the setting below) gave these figures (docs/RESULTS.md):

    profile        bits/elem   dNLL      KL
    high-quality   8.442      -0.0003   0.0000165
    default        4.881      -0.0004   0.00153
    aggressive     3.565      +0.0131   0.0131
    entropy        4.507      -0.0004   0.0028     (rans; the default at 4.883 that run)
    smollm2-basis  2.868      +0.0091   0.0152     (rans in a calibrated basis)

KL bounds are the measured figure with 1.5-2x headroom, so that a real regression (one bit less
for the keys of the default profile quadruples its KL) fails. dNLL is noisier on 192 tokens; its
bound is just above the main table's 16-window, 1K-context figure (+0.0036).
"""

import pytest

from cachegen_vllm.codec import encode_layer, parse_frame
from cachegen_vllm.codec.basis import BasisRegistry
from cachegen_vllm.codec.format import frame_nbytes
from cachegen_vllm.config import load_profile
from cachegen_vllm.offline.quality import Harness

pytestmark = pytest.mark.model

DEFAULT_MAX_BITS = 4.9
DEFAULT_MAX_DNLL = 0.004
DEFAULT_MAX_KL = 0.0023
HQ_MAX_ABS_DNLL = 0.001
HQ_MAX_KL = 0.00003
ENTROPY_MIN_BITS_SAVED = 0.3  # measured 0.376 (4.507 vs 4.883 bits)
ENTROPY_MAX_KL = 0.0042  # measured 0.0028
BASIS_MAX_BITS = 3.0  # measured 2.868: the target, <= 3 bits within +1% perplexity (16 windows: 2.73, +0.89%)
BASIS_MAX_KL = 0.025  # measured 0.0152


@pytest.fixture(scope="module")
def harness(model_dir):
    return Harness(model_dir, windows=3, context_tokens=512, continuation_tokens=64, greedy_tokens=8)


@pytest.fixture(scope="module")
def results(harness):
    names = ("raw", "high-quality", "default", "aggressive", "entropy", "smollm2-basis")
    return {name: harness.evaluate(load_profile(name)) for name in names}


def test_raw_profile_changes_nothing(results):
    r = results["raw"]
    assert r.delta_nll == 0 and r.kl == 0
    assert r.top1_agreement == 1 and r.greedy_match == 1
    assert 16 < r.bits_per_element < 16.05  # bf16 plus headers and checksums


def test_bits_on_the_wire_are_what_the_profile_predicts(harness, results):
    """Every byte is counted: the measured bits equal the frame layout's prediction."""
    for name in ("high-quality", "default", "aggressive", "entropy", "smollm2-basis"):
        profile = load_profile(name)
        kv = harness.exact_kv[0]
        _, nbytes = harness.roundtrip(profile, kv)
        predicted, basis = 0, BasisRegistry().for_profile(profile)
        for layer, (k, v) in enumerate(kv):
            for frame in encode_layer(k, v, geometry=harness.geometry, profile=profile, layer=layer, basis=basis):
                predicted += frame_nbytes(parse_frame(frame, harness.geometry), harness.geometry)
        assert nbytes == predicted
        assert results[name].bits_per_element == pytest.approx(
            8 * nbytes / sum(k.numel() + v.numel() for k, v in kv), rel=0.02
        )


def test_profiles_order_size_against_quality(results):
    hq, default, aggressive = results["high-quality"], results["default"], results["aggressive"]
    assert hq.bits_per_element > default.bits_per_element > aggressive.bits_per_element
    assert hq.kl < default.kl < aggressive.kl


def test_default_profile_quality_bound(results):
    r = results["default"]
    assert r.bits_per_element < DEFAULT_MAX_BITS
    assert r.delta_nll < DEFAULT_MAX_DNLL
    assert r.kl < DEFAULT_MAX_KL


def test_high_quality_profile_is_near_lossless(results):
    r = results["high-quality"]
    assert abs(r.delta_nll) < HQ_MAX_ABS_DNLL
    assert r.kl < HQ_MAX_KL
    assert r.top1_agreement > 0.98


def test_entropy_coding_saves_bits_at_about_the_same_loss(results):
    """rANS over uniform steps (wire format v2), the default profile's tiers and widths: fewer bits
    on the wire, KL within the same range (measured 0.0028 against the default's 0.0015 here;
    0.0021 against 0.0018 on the 16-window table)."""
    r, default = results["entropy"], results["default"]
    assert r.bits_per_element < default.bits_per_element - ENTROPY_MIN_BITS_SAVED
    assert r.kl < ENTROPY_MAX_KL
    assert r.delta_nll < DEFAULT_MAX_DNLL


def test_a_calibrated_basis_codes_3_bit_widths_under_3_bits(results):
    """smollm2-basis (3-bit widths, entropy-coded in the fitted basis): under 3 bits per element
    with every byte counted, at a KL that the same widths in the Hadamard rotation only reach with
    about 0.6 bit/element more (docs/RESULTS.md). Fitting the basis on other data, or coding in the
    Hadamard rotation, fails the bits bound."""
    r = results["smollm2-basis"]
    assert r.bits_per_element < BASIS_MAX_BITS
    assert r.kl < BASIS_MAX_KL
