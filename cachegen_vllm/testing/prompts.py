"""Prompts of real text for the embedded model, and how far two answers agree."""

from __future__ import annotations


def document_prompt(index: int, tokens: int) -> list[int]:
    """``tokens`` token ids of English text (Python's documentation) for the embedded model, from a
    place that differs with ``index``."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from cachegen_vllm.offline.model import ensure_default_model

    text = "\n\n".join(topics[k] for k in sorted(topics))[index * 20000 + 5000 :]
    ids = AutoTokenizer.from_pretrained(str(ensure_default_model()))(text).input_ids[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"document_prompt: index {index} leaves {len(ids)} tokens of text, not {tokens}")
    return ids


def common_prefix(a: str, b: str) -> float:
    """How much of two answers agrees before their first difference, as a share of the longer."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)
