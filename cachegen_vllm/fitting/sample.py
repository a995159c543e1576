"""A model and its exact KV on windows of a text: what a basis is fitted on, and what the quality
harness (`cachegen_vllm.offline.quality`) scores compressed KV against.

The texts default to the Python language reference shipped with CPython (``pydoc_data.topics``):
long technical English that every machine has, so results repeat anywhere without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cachegen_vllm.codec import KVGeometry


def load_windows(tokenizer, count: int, length: int, corpus: str | None = None, offset: int = 0) -> list[torch.Tensor]:
    """``count`` non-overlapping token windows of ``length``, spread over ``corpus`` (default: the
    Python language reference), each moved ``offset`` tokens on: with an offset of at least
    ``length`` (and a stride that leaves room), windows between those of offset 0, e.g. to fit a
    basis on text the quality windows do not hold."""
    if corpus is None:
        from pydoc_data.topics import topics

        corpus = "\n\n".join(topics[name] for name in sorted(topics))
    ids = torch.tensor(tokenizer(corpus).input_ids)
    available = len(ids) // length
    if available < count:
        raise ValueError(f"the corpus holds {available} windows of {length} tokens, {count} asked for")
    stride = available // count  # spread the windows over the whole reference
    if offset + ((count - 1) * stride + 1) * length > len(ids):
        raise ValueError(f"windows moved {offset} tokens on run past the corpus's {len(ids)} tokens")
    return [ids[i * stride * length + offset : (i * stride + 1) * length + offset] for i in range(count)]


class ModelSample:
    """A transformers checkpoint (float32, on the CPU), windows of ``context_tokens +
    continuation_tokens`` tokens of a text, and the KV of each window's first ``context_tokens - 1``
    tokens, rounded to bf16 as vLLM's cache holds it (``exact_kv``: per window, per layer, K and V
    ``[tokens, kv heads, head dim]``)."""

    def __init__(
        self,
        model_dir: Path,
        windows: int,
        context_tokens: int,
        continuation_tokens: int,
        corpus: str | None = None,
        offset: int = 0,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.config
        self.geometry = KVGeometry(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            torch.bfloat16,
            model=Path(model_dir).name,
        )
        self.context_tokens = context_tokens
        self.windows = load_windows(self.tokenizer, windows, context_tokens + continuation_tokens, corpus, offset)
        self.exact_kv = [self._prefill(w[: context_tokens - 1]) for w in self.windows]

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = self.model(ids[None], use_cache=True).past_key_values
        # [1, heads, tokens, dim] -> [tokens, heads, dim], rounded to bf16 like vLLM's cache
        return [
            (layer.keys[0].transpose(0, 1).bfloat16(), layer.values[0].transpose(0, 1).bfloat16())
            for layer in cache.layers
        ]
