"""How many times encoding one layer makes the host wait for the device, by prompt length: the
tensor calls that read a result on the host (`device.counting_host_syncs`), counted on CPU tensors
as a GPU would wait at them, with the torch rANS coder (a device coder's contract: tensors in and
out). A bounded count is what keeps a GPU producer's sealer from trailing the forward pass.

    python benchmarks/host_syncs.py [--tokens 256 2048 8192] [--profiles default entropy smollm2-basis]
"""

from __future__ import annotations

import argparse

import torch

from cachegen_vllm.codec import KVGeometry, encode_layer, entropy
from cachegen_vllm.config import load_profile
from cachegen_vllm.device import Runtime, counting_host_syncs

GEOMETRY = KVGeometry(30, 3, 64, torch.bfloat16, model="SmolLM2-135M-Instruct")  # the shipped basis's


def host_syncs(profile_name: str, tokens: int) -> int:
    profile = load_profile(profile_name)
    g = torch.Generator().manual_seed(tokens)
    key, value = (torch.randn(tokens, 3, 64, generator=g).bfloat16() for _ in range(2))
    runtime = Runtime(torch.device("cpu"))
    with counting_host_syncs(runtime):
        encode_layer(key, value, geometry=GEOMETRY, profile=profile, layer=3)
    return runtime.host_syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--profiles", nargs="+", default=["default", "entropy", "smollm2-basis"])
    args = parser.parse_args()
    entropy.register_coder("cpu", entropy.REFERENCE_CODER)
    print("| profile | " + " | ".join(f"{t} tokens" for t in args.tokens) + " |")
    print("|---|" + "---|" * len(args.tokens))
    for name in args.profiles:
        host_syncs(name, 64)  # once first: the coder's tables are made on first use
        print(f"| {name} | " + " | ".join(str(host_syncs(name, t)) for t in args.tokens) + " |")


if __name__ == "__main__":
    main()
