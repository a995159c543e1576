"""The transport across a real, shaped link: producer and consumer in two network namespaces joined
by a veth pair limited to 1 Gbit/s (and 1 ms delay where the kernel has netem)."""

import importlib.util
from pathlib import Path

import pytest

from cachegen_vllm.testing.netns import unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")


def _bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_transport.py"
    spec = importlib.util.spec_from_file_location("bench_transport", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_everything_arrives_across_a_shaped_link():
    bench = _bench()
    result = bench.run_link("1gbit", 1.0, frames=24)
    assert result["frames"] == result["frames_expected"] == 24
    assert result["bytes"] == 24 * len(bench._frame())  # each checked against its checksum on arrival
