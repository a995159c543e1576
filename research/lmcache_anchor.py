"""LMCache's own CacheGen serializer on the quality harness's windows: its bits/element and dNLL.

LMCache (PyPI ``lmcache``) pins numpy<=2.2.6, which vLLM's environment does not allow, so this runs
in an environment of its own, with this package installed there without its dependencies (not on
PYTHONPATH: the checkout's top-level kernels/ would shadow the ``kernels`` package transformers
probes for). Of lmcache's many dependencies the serializer needs only those below. Each window's
KV is cut into LMCache's 256-token chunks and each chunk goes through ``CacheGenSerializer.to_bytes``
and ``CacheGenDeserializer.from_bytes`` (the CPU/numba path, LMCache's default bins for a model
of this depth); every serialized byte is counted.

    python3 -m venv .venv-lmcache
    .venv-lmcache/bin/pip install torch==2.13.0 "numpy<=2.2.6" numba transformers safetensors xxhash \
        cachetools requests && .venv-lmcache/bin/pip install --no-deps lmcache==0.5.6 -e .
    .venv-lmcache/bin/python research/lmcache_anchor.py --json research/results/lmcache_cachegen.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from cachegen_vllm.config import load_profile
from cachegen_vllm.offline.model import default_model_dir
from cachegen_vllm.offline.quality import Harness, format_table, result_dict

CHUNK = 256  # LMCache's default chunk_size


class LMCacheHarness(Harness):
    def roundtrip(self, profile, kv):
        from lmcache.storage_backend.serde.cachegen_decoder import CacheGenDeserializer
        from lmcache.storage_backend.serde.cachegen_encoder import CacheGenSerializer

        config = SimpleNamespace(chunk_size=CHUNK)
        metadata = SimpleNamespace(model_name=str(self.model_dir))
        serializer = CacheGenSerializer(config, metadata)
        deserializer = CacheGenDeserializer(config, metadata, torch.bfloat16)
        # [layers, 2, tokens, heads, head_dim], LMCache's layout
        blob = torch.stack([torch.stack([k, v]) for k, v in kv])
        pieces, nbytes = [], 0
        for start in range(0, blob.shape[2], CHUNK):
            data = serializer.to_bytes(blob[:, :, start : start + CHUNK].contiguous())
            nbytes += len(data)
            pieces.append(deserializer.from_bytes(data))
        out = torch.cat(pieces, dim=2)
        return [(out[layer, 0], out[layer, 1]) for layer in range(out.shape[0])], nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("research/results/lmcache_cachegen.json"))
    args = parser.parse_args()
    import lmcache

    model_dir = default_model_dir()
    harness = LMCacheHarness(model_dir, args.windows, args.context_tokens, args.continuation_tokens, 0)
    harness.model_dir = model_dir
    result = harness.evaluate(dataclasses.replace(load_profile("raw"), name="lmcache-cachegen"))
    print(format_table([result]))
    setup = dict(
        lmcache=lmcache.__version__ if hasattr(lmcache, "__version__") else "0.5.6",
        chunk_tokens=CHUNK,
        windows=args.windows,
        context_tokens=args.context_tokens,
        continuation_tokens=args.continuation_tokens,
    )
    args.json.write_text(json.dumps(dict(setup=setup, result=result_dict(result)), indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
