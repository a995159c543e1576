import pytest

from cachegen_vllm.codec.profile import AUTO_BASIS, LOSSLESS_BITS
from cachegen_vllm.config import ConfigError, load_profile, profile_from_dict, shipped_profiles

GOOD = {"chunk_tokens": 256, "group_tokens": 64, "bits": {"key": 4, "value": 4}}


def _with(path: str, value):
    data = {**GOOD, "bits": dict(GOOD["bits"])}
    target, *keys = path.split(".")
    if keys:
        data[target][keys[0]] = value
    else:
        data[target] = value
    return data


@pytest.mark.parametrize(
    "data,field",
    [
        (_with("chunk_tokens", 0), "chunk_tokens"),
        (_with("chunk_tokens", "256"), "chunk_tokens"),
        (_with("group_tokens", -1), "group_tokens"),
        (_with("rotation", "fourier"), "rotation"),
        (_with("value_axis", "head"), "value_axis"),
        (_with("bits.key", 9), "bits.key"),
        (_with("bits.value", 0), "bits.value"),
        (_with("bits.value", True), "bits.value"),
        (_with("colour", "blue"), "colour"),
        (_with("bits.keys", 4), "bits.keys"),
        ({"group_tokens": 64, "bits": {"key": 4, "value": 4}}, "chunk_tokens"),
        (
            _with(
                "bits.layers",
                [{"first": 0, "last": 1, "key": 8, "value": 8}, {"first": 1, "last": 2, "key": 4, "value": 12}],
            ),
            "bits.layers[1].first",
        ),
        (_with("bits.layers", [{"first": 3, "last": 1, "key": 8, "value": 8}]), "bits.layers[0].last"),
        (_with("bits.layers", [{"first": 0, "last": 1, "key": 8, "value": 7.5}]), "bits.layers[0].value"),
        (_with("bits.recent", [{"tokens": 0, "key": 8, "value": 8}]), "bits.recent[0].tokens"),
        (_with("bits.recent", [{"tokens": 8, "key": 8}]), "bits.recent[0].value"),
        (_with("bits.recent", {"tokens": 8}), "bits.recent"),
        (_with("bits.sink", [{"tokens": 4, "key": 8, "value": 3.0}]), "bits.sink[0].value"),
    ],
)
def test_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        profile_from_dict(data, "bad")
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_geometry_checks_name_the_field():
    profile = profile_from_dict(_with("bits.layers", [{"first": 0, "last": 40, "key": 8, "value": 8}]), "p")
    with pytest.raises(ConfigError, match=r"^bits.layers\[0\].last: layer 40 does not exist"):
        profile.check_geometry(num_layers=30)
    profile.check_geometry(num_layers=41)


def test_lossless_is_a_width_a_profile_names_and_tiers_still_raise():
    profile = load_profile("lossless")
    assert (profile.key_bits, profile.value_bits) == (LOSSLESS_BITS, LOSSLESS_BITS)
    tiered = profile_from_dict(_with("bits.recent", [{"tokens": 4, "key": 16, "value": "lossless"}]), "p")
    assert tiered.recent[0].value == LOSSLESS_BITS
    with pytest.raises(ConfigError, match=r'^bits.key: must be an integer 1..8, "lossless"'):
        profile_from_dict(_with("bits.key", "losless"), "p")


def test_unknown_profile_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^profile: unknown profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ConfigError, match=r"^profile: no profile file"):
        load_profile(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("chunk_tokens = [")
    with pytest.raises(ConfigError, match=r"^profile: bad: not valid TOML"):
        load_profile(bad)


def test_shipped_profiles_load_and_fit_the_default_model():
    names = shipped_profiles()
    assert {"default", "high-quality", "aggressive"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        if profile.basis != AUTO_BASIS:  # "basis": fitted to the model by the connector (test_autobasis.py)
            profile.check_geometry(num_layers=30)


def test_a_copied_profile_loads_by_path(tmp_path):
    from importlib.resources import files

    copy = tmp_path / "mine.toml"
    copy.write_text((files("cachegen_vllm.configs") / "default.toml").read_text().replace("key = ", "key = 5 #", 1))
    assert load_profile(copy).key_bits == 5
    assert load_profile(str(copy)).name == "mine"
