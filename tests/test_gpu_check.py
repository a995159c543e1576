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
    assert result["smoke"] and [entry["status"] for entry in sections.values()] == ["ok"] * 4, sections
    rows = {name: {row["case"]: row for row in entry["rows"]} for name, entry in sections.items()}
    assert not any("error" in row for entries in rows.values() for row in entries.values()), rows
    identity = rows["1 byte identity"].values()
    assert len(identity) == 2 and all(r["identical"] and r["decode_equal"] and r["outside_untouched"] for r in identity)
    (throughput,) = [r for r in rows["2 throughput"].values() if "host_syncs_per_call" in r]
    assert throughput["host_syncs_per_call"] == 2 and throughput["ratio"] > 2
    (pipeline,) = rows["3 pipeline"].values()
    assert (
        pipeline["frames_equal_reference"] and pipeline["decoded_equal_reference"] and pipeline["held_prefix_untouched"]
    )
