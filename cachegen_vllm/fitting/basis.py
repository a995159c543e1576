"""The statistics a calibrated basis is fitted from, measured on a model's sample, and the fit
(the construction and why: `cachegen_vllm.codec.basis`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from cachegen_vllm.codec.basis import Basis, fit
from cachegen_vllm.codec.profile import ConfigError
from cachegen_vllm.codec.rope import turn
from cachegen_vllm.fitting.sample import ModelSample


@torch.inference_mode()
def basis_statistics(
    sample: ModelSample, chunk_tokens: int, skip_tokens: int, rope: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `codec.basis.fit` needs, float64 [layers, 2, kv heads, dim, dim] each, from the
    sample's windows: the covariance of K and V (centred per chunk of ``chunk_tokens``, as the
    quantizer centres them; the first ``skip_tokens``, sent exact, left out), and the metric: the
    second moment of the queries of each KV head's query heads (after RoPE) for keys, the Gram
    matrix of its columns of the output projection for values. The queries are the ones attention
    multiplies the cached keys by: after the model's query norm where it has one (Qwen3, Gemma 3)
    and RoPE; the model's query scale is left out, as `codec.basis.fit` normalizes each metric.
    With ``rope`` (`rope_frequencies`), keys and queries are measured before RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = sample.geometry
    attention = attention_modules(sample.model)
    shape = (g.num_layers, 2, g.num_kv_heads, g.head_dim, g.head_dim)
    covariance, metric = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for kv in sample.exact_kv:
        for layer, tensors in enumerate(kv):
            for t, x in enumerate(tensors):
                start = sample.context_tokens - 1 - len(x)  # a sliding window's cache holds its last tokens
                x = x.double() if rope is None or t == 1 else turn(x, rope[layer], start, sign=-1)
                for chunk in x[skip_tokens:].split(chunk_tokens):
                    centred = chunk - chunk.mean(0)
                    covariance[layer, t] += torch.einsum("thd,the->hde", centred, centred)

    def queries(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, g.head_dim)
            norm = getattr(module, "q_norm", None)
            q = (q if norm is None else norm(q)).transpose(1, 2)
            if rope is None:
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            q = q[0].double().reshape(g.num_kv_heads, -1, g.head_dim)  # a KV head's query heads are consecutive
            metric[layer, 0] += q.mT @ q

        return hook

    hooks = [a.register_forward_pre_hook(queries(i), with_kwargs=True) for i, a in enumerate(attention)]
    try:
        for window in sample.windows:
            sample.model(window[: sample.context_tokens - 1][None])
    finally:
        for h in hooks:
            h.remove()
    for layer, a in enumerate(attention):
        columns = a.o_proj.weight.double().view(
            -1, g.num_kv_heads, a.o_proj.weight.shape[1] // g.num_kv_heads // g.head_dim, g.head_dim
        )
        metric[layer, 1] = torch.einsum("ohgd,ohge->hde", columns, columns)
    return covariance, metric


def rope_frequencies(model) -> torch.Tensor:
    """float64 [layers, rotary pairs]: each layer's RoPE frequencies as the model's rotary
    embedding holds them (one set, or one per layer type as Gemma 3 has: `config.layer_types`);
    `ConfigError` naming ``pre_rope`` if it has none the fit can read."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    layers = model.config.num_hidden_layers
    types = getattr(model.config, "layer_types", None) or [None] * layers
    rows = []
    for kind in types:
        frequencies = getattr(rotary, f"{kind}_inv_freq", None) if kind else None
        frequencies = frequencies if frequencies is not None else getattr(rotary, "inv_freq", None)
        if not isinstance(frequencies, torch.Tensor):
            raise ConfigError(
                "pre_rope", f"{type(model).__name__} has no rotary embedding with inv_freq at model.rotary_emb"
            )
        rows.append(frequencies.double())
    if len({len(r) for r in rows}) != 1:
        raise ConfigError("pre_rope", f"{type(model).__name__}'s layers turn different numbers of channels")
    return torch.stack(rows)


def attention_modules(model) -> list:
    """Each layer's attention module, if the fit can read it: separate q, k, v and o projections
    and rotary embeddings passed in, as transformers writes Llama, Mistral, Qwen2, Qwen3 and Gemma 3
    (`ConfigError` naming the model's class otherwise)."""
    blocks = getattr(getattr(model, "model", None), "layers", None) or []
    modules = [getattr(block, "self_attn", None) for block in blocks]
    readable = bool(modules) and all(
        m is not None
        and all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and "position_embeddings" in inspect.signature(m.forward).parameters
        for m in modules
    )
    if not readable:
        found = sorted({type(m).__name__ for m in modules}) or ["no model.layers[i].self_attn"]
        raise ConfigError(
            "basis",
            f'"auto" fits attention with q_proj, k_proj, v_proj, o_proj and RoPE (Llama, Mistral, Qwen2, '
            f"Qwen3, Gemma 3); {type(model).__name__} has {', '.join(found)}: fit a basis with a script "
            "of its own, or use a profile without one",
        )
    return modules


def check_readable(model_dir: Path) -> None:
    """`attention_modules`' refusal before any weight is read: the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        attention_modules(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))


def fit_basis(sample: ModelSample, chunk_tokens: int, skip_tokens: int, pre_rope: bool = False) -> Basis:
    """The calibrated basis of the sample's model on its windows (undoing RoPE on keys if
    ``pre_rope``)."""
    rope = rope_frequencies(sample.model) if pre_rope else None
    return fit(*basis_statistics(sample, chunk_tokens, skip_tokens, rope), rope=rope)
