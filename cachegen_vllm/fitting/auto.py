"""A calibrated basis for whatever model a producer serves, with no manual step: a profile whose
`basis` is ``"auto"`` gets one fitted to the model at start-up, by ``python -m
cachegen_vllm.fitting`` in a process of its own (a few forward passes of the checkpoint with
transformers, on the CPU, over a built-in text; its memory is gone when it exits), and cached on
disk under the checkpoint's identity, so that a restart, or another rank, reuses it. The producer
then serves the file to any decode whose frames name a basis it lacks.

What the fit measures and why: `codec.basis`. It reads attention as transformers writes Llama,
Mistral, Qwen2, Qwen3 and Gemma 3 (separate projections, RoPE, a query norm where the model has
one: `fitting.basis.attention_modules`), and refuses other models by their class at start-up.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import xxhash

from cachegen_vllm.codec.profile import AUTO_BASIS, ConfigError, Profile
from cachegen_vllm.config import cache_dir

# The built-in text's windows (the CPython language reference), between the quality windows: a
# fit of 8 x 1,024 tokens.
WINDOWS = 8
CONTEXT_TOKENS = 1024
REFUSED = 3  # the fit's exit status for a model it cannot read: its last line is the ConfigError
FIT = f"fit-v1 windows={WINDOWS} context={CONTEXT_TOKENS}"  # a change of the procedure refits


def checkpoint_key(model: str) -> str:
    """xxh3-64 of what identifies a checkpoint: its config, and the names and sizes of its files."""
    root = Path(model)
    if not (root / "config.json").is_file():
        raise ConfigError("basis", f'"auto" fits a basis on a local checkpoint; {model!r} has no config.json')
    files = sorted((p.name, p.stat().st_size) for p in root.iterdir() if p.is_file())
    return xxhash.xxh3_64_hexdigest((root / "config.json").read_bytes() + repr(files).encode())


def basis_path(model: str, chunk_tokens: int, skip_tokens: int, pre_rope: bool = False) -> Path:
    """Where the model's fitted basis is cached, for a profile's chunk, exact leading tokens and
    whether it undoes RoPE."""
    settings = f"{checkpoint_key(model)}|{chunk_tokens}|{skip_tokens}|{FIT}" + ("|pre-rope" if pre_rope else "")
    key = xxhash.xxh3_64_hexdigest(settings.encode())
    return cache_dir() / "bases" / f"{Path(model).name}-{key}.safetensors"


def fitted_bases() -> list[Path]:
    """The bases fitted on this machine so far."""
    return sorted((cache_dir() / "bases").glob("*.safetensors"))


def fit(model: str, chunk_tokens: int, skip_tokens: int, log=print, pre_rope: bool = False) -> Path:
    """The cached basis of ``model`` for these settings, fitted now if it is not cached yet (on the
    CPU; RuntimeError with the fit's output if it fails). One process fits at a time: the
    tensor-parallel ranks of a producer wait for the first and read its file."""
    path = basis_path(model, chunk_tokens, skip_tokens, pre_rope)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        partial = path.with_suffix(f".{os.getpid()}.partial")
        argv = [sys.executable, "-m", "cachegen_vllm.fitting", str(model), "--out", str(partial)]  # __main__.py
        argv += ["--windows", str(WINDOWS), "--context-tokens", str(CONTEXT_TOKENS)]
        argv += ["--chunk-tokens", str(chunk_tokens), "--skip-tokens", str(skip_tokens)]
        argv += ["--pre-rope"] if pre_rope else []
        log(f"fitting a basis for {Path(model).name} (once; cached in {path.parent})")
        started = time.perf_counter()
        # on the CPU: the serving GPU's memory is vLLM's
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            if done.returncode == REFUSED:
                field, _, message = done.stderr.strip().splitlines()[-1].partition(": ")
                raise ConfigError(field, message)
            raise RuntimeError(f"fitting a basis for {model} failed:\n{done.stderr[-4000:]}")
        partial.replace(path)
    log(f"fitted a basis for {Path(model).name} in {time.perf_counter() - started:.1f} s: {path}")
    return path


def resolve(profile: Profile, model: str, log=print) -> Profile:
    """The profile with an ``"auto"`` basis replaced by the model's fitted one (others as they are)."""
    if profile.basis != AUTO_BASIS:
        return profile
    skip = max((tier.tokens for tier in profile.sink), default=0)
    path = fit(model, profile.chunk_tokens, skip, log, profile.pre_rope)
    return dataclasses.replace(profile, basis=str(path), pre_rope=False)
