"""Keys coded before RoPE (codec/rope.py): a basis that undoes RoPE on keys, exactly, and redoes it
after its inverse; its file, digest and profile field; the fit's frequencies and positions."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cachegen_vllm.codec import KVGeometry, decode_frames, encode_layer, parse_frame
from cachegen_vllm.codec.basis import Basis, BasisRegistry, fit, from_bytes, load, save
from cachegen_vllm.codec.geometry import KV
from cachegen_vllm.codec.rope import TABLE_BITS, turn, unturn_fixed
from cachegen_vllm.config import ConfigError, profile_from_dict

HEAD_DIM, HEADS, LAYERS = 32, 2, 2
GEOMETRY = KVGeometry(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, model="rope-test")
SHAPE = (LAYERS, 2, HEADS, HEAD_DIM, HEAD_DIM)
FREQUENCIES = (10000.0 ** -(torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)).expand(LAYERS, -1)


def _pre_rope_keys(tokens: int, token_start: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys as a cache holds them, after RoPE at positions ``token_start..``; the same keys before
    RoPE): a few strong directions shared by every token, as a head's keys before RoPE are."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(4, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    weights = torch.randn(tokens, 4, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5, 0.25])
    pre = torch.einsum("tf,fhd->thd", weights, directions) + 6 * directions[0]  # a large mean, as real keys have
    pre = pre + 0.05 * torch.randn(tokens, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    return turn(pre, FREQUENCIES[0], token_start).to(torch.bfloat16), pre


def _basis(rope: bool, tokens: int = 512) -> Basis:
    """A basis fitted on the keys of `_pre_rope_keys` (before RoPE if ``rope``), identity metric."""
    post, pre = _pre_rope_keys(tokens, 0, seed=1)
    x = pre if rope else post.double()
    centred = x - x.mean(0)
    covariance = torch.einsum("thd,the->hde", centred, centred).expand(SHAPE).clone()
    metric = torch.eye(HEAD_DIM, dtype=torch.float64).expand(SHAPE)
    return fit(covariance, metric, rope=FREQUENCIES.clone() if rope else None)


def test_undoing_rope_is_exact_integer_arithmetic():
    """The encoder's turn: integer products and sums below 2**48, the same on every device; it
    undoes RoPE to within a rounding."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.round(torch.randn(50, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) * 2**14)
    out = unturn_fixed(fixed, FREQUENCIES[0], 1000)
    assert torch.equal(out, torch.round(out)) and out.abs().max() < 2**16.5
    angles = torch.arange(1000, 1050, dtype=torch.float64)[:, None] * FREQUENCIES[0][None]
    cos = torch.round(torch.cos(angles) * 2**TABLE_BITS).long()[:, None]
    sin = torch.round(torch.sin(-angles) * 2**TABLE_BITS).long()[:, None]
    a, b = fixed[..., : HEAD_DIM // 2].long(), fixed[..., HEAD_DIM // 2 :].long()
    exact = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)  # int64: no rounding anywhere
    assert (out.long() * 2**TABLE_BITS - exact).abs().max() <= 2 ** (TABLE_BITS - 1)  # the nearest integer
    back = turn(out, FREQUENCIES[0], 1000)  # RoPE redone by the decoder
    assert (back - fixed).abs().max() <= 2


def test_channels_past_the_rotary_ones_do_not_turn():
    """Partial rotary embeddings (a quarter of a head turned, as Phi and GPT-NeoX models do): the
    channels past them pass through both ways as they are."""
    fixed = torch.round(torch.randn(20, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)) * 2**14).double()
    quarter = FREQUENCIES[0][: HEAD_DIM // 8]
    out = unturn_fixed(fixed, quarter, 33)
    assert torch.equal(out[..., HEAD_DIM // 4 :], fixed[..., HEAD_DIM // 4 :])
    assert not torch.equal(out[..., 1 : HEAD_DIM // 4], fixed[..., 1 : HEAD_DIM // 4])
    assert torch.equal(turn(fixed, quarter, 33)[..., HEAD_DIM // 4 :], fixed[..., HEAD_DIM // 4 :])
    assert (turn(out, quarter, 33) - fixed).abs().max() <= 2


def test_a_rope_basis_turns_keys_by_their_positions_and_leaves_values():
    basis, plain = _basis(rope=True), _basis(rope=False)
    keys, pre = _pre_rope_keys(64, 300)
    x = keys.float()
    y = basis.apply(x, 1, KV.KEY, token_start=300)
    assert torch.allclose(basis.invert(y, 1, KV.KEY, token_start=300), x, atol=1e-3 * float(x.abs().max()))
    # the coefficients are those of the keys before RoPE: the same at any position
    moved = basis.apply(turn(pre, FREQUENCIES[0], 7).to(torch.bfloat16).float(), 1, KV.KEY, token_start=7)
    assert torch.allclose(moved, y, rtol=0, atol=1e-2 * float(y.abs().max()))  # two bf16 roundings apart
    wrong = basis.invert(y, 1, KV.KEY, token_start=301)
    assert (wrong - x).abs().max() > 0.05 * x.abs().max()
    # values never turn: a rope basis codes them as the same matrices without rope would
    same = Basis.from_forward(basis.forward)
    assert torch.equal(basis.apply(x, 1, KV.VALUE, token_start=300), same.apply(x, 1, KV.VALUE))
    assert plain.rope is None and basis.digest != same.digest


def test_keys_before_rope_code_with_less_error_in_as_many_bytes(tmp_path):
    """What the basis is for: keys whose structure RoPE smears over angles code better once RoPE is
    undone (the same rANS widths: about the same bytes, several times less squared error)."""
    keys, _ = _pre_rope_keys(512, 256, seed=2)
    values = torch.zeros_like(keys)  # costs next to nothing: the bytes are the keys'
    out = {}
    for rope in (False, True):
        basis = _basis(rope)
        path = tmp_path / f"{rope}.safetensors"
        save(basis, path)
        profile = profile_from_dict(
            {
                "chunk_tokens": 256,
                "group_tokens": 64,
                "rotation": "basis",
                "basis": str(path),
                "coding": "rans",
                "bits": {"key": 3, "value": 3},
            },
            "p",
        )
        frames = encode_layer(keys, values, geometry=GEOMETRY, profile=profile, layer=0, token_start=256, basis=basis)
        assert [parse_frame(f, GEOMETRY).token_start for f in frames] == [256, 512]
        chunks = decode_frames(frames, GEOMETRY, bases=BasisRegistry(load(str(path))))
        decoded = torch.cat([c.key for c in chunks]).float()
        error = float(((decoded - keys.float()) ** 2).mean() / (keys.float() ** 2).mean())
        out[rope] = (sum(len(f) for f in frames), error)
    (plain_bytes, plain_error), (rope_bytes, rope_error) = out[False], out[True]
    assert rope_bytes < 1.05 * plain_bytes and rope_error < plain_error / 3, out


def test_a_rope_basis_file_round_trips_and_bad_ones_are_refused(tmp_path):
    basis = _basis(rope=True)
    path = tmp_path / "b.safetensors"
    save(basis, path)
    again = from_bytes(path.read_bytes())
    assert again.digest == basis.digest and torch.equal(again.rope, basis.rope)
    for rope, problem in (
        (FREQUENCIES.float(), "float64 \\[layers, pairs\\]"),
        (FREQUENCIES[:1].clone(), "float64 \\[layers, pairs\\]"),
        (torch.ones(LAYERS, HEAD_DIM, dtype=torch.float64), "pairs at most dim / 2"),
        (-FREQUENCIES.clone(), "not all finite and non-negative"),
    ):
        save_file({"forward": basis.forward, "rope": rope}, str(path))
        with pytest.raises(ValueError, match=problem):
            from_bytes(path.read_bytes())
    save_file({"forward": basis.forward, "other": FREQUENCIES.clone()}, str(path))
    with pytest.raises(ValueError, match="holds 'forward' and, if it undoes RoPE, 'rope'"):
        from_bytes(path.read_bytes())


def test_pre_rope_is_a_field_of_an_automatic_basis(tmp_path):
    fields = {"chunk_tokens": 256, "group_tokens": 64, "rotation": "basis", "coding": "rans"}
    bits = {"key": 3, "value": 3}
    profile = profile_from_dict(dict(fields, basis="auto", pre_rope=True, bits=bits), "p")
    assert profile.pre_rope
    save(_basis(rope=True), tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match=r'^pre_rope: is read with basis = "auto"'):
        profile_from_dict(dict(fields, basis=str(tmp_path / "b.safetensors"), pre_rope=True, bits=bits), "p")
    with pytest.raises(ConfigError, match=r"^pre_rope: must be true or false"):
        profile_from_dict(dict(fields, basis="auto", pre_rope="yes", bits=bits), "p")


def test_auto_fits_and_caches_a_pre_rope_basis_apart(tmp_path, monkeypatch):
    from cachegen_vllm.fitting import auto

    (tmp_path / "config.json").write_text("{}")
    asked = []
    monkeypatch.setattr(auto, "fit", lambda model, chunk, skip, log, pre_rope: asked.append(pre_rope) or "/b")
    profile = profile_from_dict(
        {
            "chunk_tokens": 256,
            "group_tokens": 64,
            "rotation": "basis",
            "coding": "rans",
            "basis": "auto",
            "pre_rope": True,
            "bits": {"key": 3, "value": 3},
        },
        "p",
    )
    resolved = auto.resolve(profile, str(tmp_path))
    assert asked == [True] and resolved.basis == "/b" and not resolved.pre_rope
    assert auto.basis_path(str(tmp_path), 256, 4, True) != auto.basis_path(str(tmp_path), 256, 4)


def test_the_fit_reads_each_layers_frequencies_and_positions(gemma3_dir):
    """Gemma 3 turns its sliding and global layers at different frequencies, and a sliding layer's
    cache holds the last tokens of the window: the fit undoes RoPE at their true positions, so the
    keys it measures are the model's keys before RoPE."""
    from cachegen_vllm.fitting.basis import attention_modules, rope_frequencies
    from cachegen_vllm.fitting.sample import ModelSample

    sample = ModelSample(gemma3_dir, 1, 80, 1, corpus="a b c d e f g h " * 200)
    rope = rope_frequencies(sample.model)
    assert rope.shape == (4, 128) and not torch.equal(rope[0], rope[3])  # local and global thetas
    pre = {}

    def hook(i):
        def keys(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            pre[i] = module.k_norm(module.k_proj(hidden).view(*hidden.shape[:-1], -1, 256))[0]

        return keys

    modules = attention_modules(sample.model)
    hooks = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with torch.inference_mode():
        sample.model(sample.windows[0][:79][None])
    for h in hooks:
        h.remove()
    for layer in (0, 3):
        keys = sample.exact_kv[0][layer][0]
        start = 79 - len(keys)
        assert start == (79 - 31 if layer == 0 else 0)  # a sliding window of 32 holds 31 (vLLM: W - 1)
        undone = turn(keys, rope[layer], start, sign=-1)
        assert (undone - pre[layer][start:].double()).abs().max() < 0.02 * pre[layer].abs().max()
