"""benchmarks/gpu_check.py, the one command that checks the GPU code paths on a lent GPU, in its
smoke mode on the CPU (Triton's interpreter, tiny shapes), so that it cannot rot between GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_section_on_a_cpu_and_its_checks_hold(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke", "--out", str(out)],
        env=env,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert result["smoke"] and [entry["status"] for entry in sections.values()] == ["ok"] * 6, sections
    rows = {name: {row["case"]: row for row in entry["rows"]} for name, entry in sections.items()}
    assert not any("error" in row for entries in rows.values() for row in entries.values()), rows
    identity = rows["1 byte identity at 4K"]
    variety = ("block 32", "block 64", "kernel blocks per manager block", "one KV head", "TP rank", "float16", "saves")
    assert all(any(v in name for name in identity) for v in variety), list(identity)
    assert all(r["identical"] and r["decode_equal"] and r["outside_untouched"] for r in identity.values())
    (several,) = [r for name, r in identity.items() if "saves in the step" in name]
    assert len(several["per_save"]) == 3 and all(r["identical"] for r in several["per_save"])
    throughput = rows["4 throughput"]
    (encode,) = [r for r in throughput.values() if "host_syncs_per_call" in r]
    assert encode["host_syncs_per_call"] == 2 and encode["ratio"] > 2
    one = throughput["host calls per layer, 1 save in the step"]
    many = throughput["host calls per layer, 16 saves in the step"]
    assert one["calls"] == many["calls"] == {"launches": 3, "copies": 1, "events": 1, "buffers": 1}
    assert (one["frames"], many["frames"]) == (1, 16)
    (pipeline,) = rows["5 pipeline"].values()
    assert (
        pipeline["frames_equal_reference"] and pipeline["decoded_equal_reference"] and pipeline["held_prefix_untouched"]
    )


def test_the_gpu_checks_import_where_neither_pyzmq_nor_vllm_is_installed():
    """The GPU box has torch, Triton, numba, xxhash and safetensors, but no pyzmq and no vLLM: the
    check and the kernels' benchmark must import there (once, the transport's package pulled pyzmq
    in through the configuration's options)."""
    probe = (
        "import runpy, sys\n"
        "sys.modules['zmq'] = None\n"  # import zmq raises ImportError, as where it is not installed
        "sys.modules['vllm'] = None\n"
        "for name in ('gpu_check', 'bench_kernels'):\n"
        f"    runpy.run_path({str(ROOT / 'benchmarks')!r} + f'/{{name}}.py', run_name='imported')\n"
        "print('imported', sorted(m for m in sys.modules if m.startswith(('zmq', 'vllm')) and sys.modules[m]))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "imported []"
