"""Fit a calibrated per-head basis to a checkpoint and write it as a basis file: ``python -m
cachegen_vllm.fitting MODEL --out FILE`` (what `auto.fit` runs), or ``cachegen-vllm basis``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cachegen_vllm.codec.basis import save
from cachegen_vllm.codec.profile import ConfigError
from cachegen_vllm.fitting.auto import REFUSED
from cachegen_vllm.fitting.basis import check_readable, fit_basis
from cachegen_vllm.fitting.sample import ModelSample


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, nargs="?", help="a Hugging Face model directory")
    p.add_argument("--text", type=Path, help="a UTF-8 sample text (default: the CPython language reference)")
    p.add_argument("--out", type=Path, required=True, help="the basis file to write (a profile names it in `basis`)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument(
        "--context-tokens", type=int, default=1151, help="tokens per window (+1, the harness's continuation)"
    )
    p.add_argument(
        "--offset",
        type=int,
        default=1152,
        help="tokens each window is moved on: the defaults fit on the text "
        "between the quality windows (`cachegen-vllm quality`: 16 windows of 1024+128 tokens), never on them",
    )
    p.add_argument(
        "--chunk-tokens", type=int, default=256, help="the profiles' chunk: the covariance is centred per chunk"
    )
    p.add_argument(
        "--skip-tokens", type=int, default=4, help="leading tokens the profiles send exact (attention sinks)"
    )
    p.add_argument("--pre-rope", action="store_true", help="undo RoPE on keys before the basis (codec.rope)")
    return p


def main(
    argv: list[str] | None = None,
    prog: str = "python -m cachegen_vllm.fitting",
    default_model: Callable[[], Path] | None = None,
) -> None:
    """Parse ``argv`` and fit; ``default_model``: the checkpoint when none is named (the CLI's
    embedded model)."""
    command = parser(prog)
    args = command.parse_args(argv)
    if args.model is None and default_model is None:
        command.error("the model directory is required")
    model_dir = args.model if args.model is not None else default_model()  # type: ignore[misc]
    try:
        check_readable(model_dir)
    except ConfigError as refused:
        command.exit(REFUSED, f"{refused}\n")
    corpus = args.text.read_text() if args.text else None
    sample = ModelSample(model_dir, args.windows, args.context_tokens, 1, corpus=corpus, offset=args.offset)
    basis = fit_basis(sample, args.chunk_tokens, args.skip_tokens, args.pre_rope)
    text = (
        f"{args.windows} windows of {args.context_tokens} tokens of "
        + (args.text.name if args.text else "the CPython language reference")
        + f", moved {args.offset} tokens on"
    )
    metadata = {"model": model_dir.name, "sample": text, "chunk_tokens": str(args.chunk_tokens)}
    save(basis, args.out, metadata | {"pre_rope": str(args.pre_rope).lower()})
    print(f"{args.out}: basis {basis.digest:016x} for (layers, kv heads, head dim) {basis.shape}, fitted on {text}")


if __name__ == "__main__":
    main()
