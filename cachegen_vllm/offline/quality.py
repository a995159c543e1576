"""Quality of compressed KV on a real model, every byte on the wire counted.

For each text window: the model prefills ``context - 1`` tokens; their KV (rounded to bf16, as
vLLM's cache holds it) goes through the codec; then the last context token and the continuation
are fed on top of the decoded KV, exactly what a decode instance does after a P/D transfer.
Reported per profile, averaged over windows:

- bits per element: 8 x all frame bytes (headers, tables, statistics, checksums) / K and V elements;
- ratio vs bf16: 16 / bits per element;
- dNLL: mean teacher-forced NLL of the continuation (nats/token) minus that with the exact KV;
- KL: mean KL(exact || compressed) of the next-token distributions along the continuation (nats),
  a far less noisy measure of the same damage than dNLL;
- top-1 agreement: how often the teacher-forced argmax matches the exact-KV argmax;
- greedy match: the fraction of a greedy continuation that matches the exact-KV one before the
  first divergence (so 1.0 means the same text).

The windows, the model and its exact KV: `cachegen_vllm.fitting.sample`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cachegen_vllm.codec import decode_frames, encode_layer
from cachegen_vllm.codec.basis import BasisRegistry
from cachegen_vllm.codec.profile import Profile
from cachegen_vllm.config import load_profile
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.fitting.sample import ModelSample


@dataclass
class QualityResult:
    profile: str
    windows: int
    bits_per_element: float
    ratio_vs_bf16: float
    delta_nll: float  # nats/token, compressed minus exact
    perplexity_change_pct: float
    kl: float  # nats/token
    top1_agreement: float
    greedy_match: float  # nan when no greedy tokens were asked for


class Harness(ModelSample):
    """The model's sample plus the exact-KV baseline of each window: what compressed KV is scored
    against."""

    def __init__(
        self,
        model_dir: Path,
        windows: int,
        context_tokens: int,
        continuation_tokens: int,
        greedy_tokens: int,
        corpus: str | None = None,
        offset: int = 0,
    ):
        super().__init__(model_dir, windows, context_tokens, continuation_tokens, corpus, offset)
        self.greedy_tokens = greedy_tokens
        self.baseline = [self._score(kv, w) for kv, w in zip(self.exact_kv, self.windows)]

    def _cache(self, kv):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k.float().transpose(0, 1)[None].contiguous(), v.float().transpose(0, 1)[None].contiguous(), i)
        return cache

    @torch.inference_mode()
    def _score(self, kv, window: torch.Tensor):
        """(per-token NLL, log-probabilities, greedy tokens) given the context's KV."""
        feed = window[self.context_tokens - 1 : -1]
        target = window[self.context_tokens :]
        logits = self.model(feed[None], past_key_values=self._cache(kv), use_cache=True).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        nll = -logprobs.gather(1, target[:, None])[:, 0]
        cache, token, greedy = self._cache(kv), window[self.context_tokens - 1 : self.context_tokens], []
        for _ in range(self.greedy_tokens):
            out = self.model(token[None], past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1:].argmax(-1)
            greedy.append(int(token))
        return nll, logprobs, greedy

    def roundtrip(self, profile: Profile, kv):
        """KV after encode + decode, and the bytes the frames took."""
        out, nbytes = [], 0
        bases = BasisRegistry()
        basis = bases.for_profile(profile, self.geometry)
        total = max(len(k) for k, _ in kv)  # a sliding window's cache holds the last of them
        for layer, (k, v) in enumerate(kv):
            frames = encode_layer(
                k, v, geometry=self.geometry, profile=profile, layer=layer, token_start=total - len(k), basis=basis
            )
            nbytes += sum(len(f) for f in frames)
            chunks = decode_frames(frames, self.geometry, bases=bases)
            out.append((torch.cat([c.key for c in chunks]), torch.cat([c.value for c in chunks])))
        return out, nbytes

    def evaluate(self, profile: Profile) -> QualityResult:
        profile.check_geometry(self.geometry.num_layers)
        return self.measure(profile.name, lambda kv: self.roundtrip(profile, kv))

    def measure(self, name: str, roundtrip) -> QualityResult:
        """The quality of any codec: ``roundtrip(kv)`` returns a window's KV as its decoder gives
        it back (per layer, K and V ``[tokens, kv heads, head dim]``) and the bytes it moved."""
        total_bytes = elements = 0
        dnll, kl, top1, greedy = [], [], [], []
        for kv, window, (base_nll, base_logprobs, base_greedy) in zip(self.exact_kv, self.windows, self.baseline):
            decoded, nbytes = roundtrip(kv)
            total_bytes += nbytes
            elements += sum(k.numel() + v.numel() for k, v in kv)
            nll, logprobs, tokens = self._score(decoded, window)
            dnll.append(float(nll.mean() - base_nll.mean()))
            kl.append(float((base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1).mean()))
            top1.append(float((logprobs.argmax(-1) == base_logprobs.argmax(-1)).float().mean()))
            if tokens:
                same = next((i for i, (a, b) in enumerate(zip(tokens, base_greedy)) if a != b), len(tokens))
                greedy.append(same / len(tokens))
        bits = 8 * total_bytes / elements
        mean_dnll = sum(dnll) / len(dnll)
        return QualityResult(
            profile=name,
            windows=len(self.windows),
            bits_per_element=bits,
            ratio_vs_bf16=16 / bits,
            delta_nll=mean_dnll,
            perplexity_change_pct=100 * math.expm1(mean_dnll),
            kl=sum(kl) / len(kl),
            top1_agreement=sum(top1) / len(top1),
            greedy_match=sum(greedy) / len(greedy) if greedy else math.nan,
        )


def result_dict(result: QualityResult) -> dict:
    """A JSON-ready dict (NaN, which JSON lacks, becomes null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(result).items()}


def format_table(results: list[QualityResult]) -> str:
    width = max([16, *(len(r.profile) + 2 for r in results)])
    head = (
        f"{'profile':<{width}}{'bits/elem':>10}{'vs bf16':>9}{'dNLL':>10}{'ppl':>9}{'KL':>9}{'top-1':>8}{'greedy':>8}"
    )
    rows = [
        f"{r.profile:<{width}}{r.bits_per_element:>10.3f}{r.ratio_vs_bf16:>8.2f}x{r.delta_nll:>+10.4f}"
        f"{r.perplexity_change_pct:>+8.2f}%{r.kl:>9.4f}{r.top1_agreement:>8.3f}{r.greedy_match:>8.3f}"
        for r in results
    ]
    return "\n".join([head, "-" * len(head), *rows])


def run(
    profiles: list[str],
    model_dir: Path,
    windows: int,
    context_tokens: int,
    continuation_tokens: int,
    greedy_tokens: int,
    json_path: Path | None,
) -> list[QualityResult]:
    started = time.perf_counter()
    print(
        f"preparing {windows} windows of {context_tokens}+{continuation_tokens} tokens on {model_dir.name}",
        file=sys.stderr,
    )
    harness = Harness(model_dir, windows, context_tokens, continuation_tokens, greedy_tokens)
    results = []
    for i, name in enumerate(profiles, 1):
        profile = autobasis.resolve(load_profile(name), str(model_dir))  # "auto": fitted on this model
        print(f"[{i}/{len(profiles)}] {profile.name}", file=sys.stderr, flush=True)
        results.append(harness.evaluate(profile))
    print(format_table(results))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        setup = {
            "model": model_dir.name,
            "windows": windows,
            "context_tokens": context_tokens,
            "continuation_tokens": continuation_tokens,
            "greedy_tokens": greedy_tokens,
            "kv_dtype": "bfloat16",
            "texts": "pydoc_data.topics (CPython language reference)",
            "seconds": round(time.perf_counter() - started, 1),
        }
        json_path.write_text(
            json.dumps({"setup": setup, "results": [result_dict(r) for r in results]}, indent=2) + "\n"
        )
        print(f"wrote {json_path}", file=sys.stderr)
    return results
