"""benchmarks/bench_bert.py (the 12-layer encoder training step) runs end to end at tiny
sizes on the CPU and records what it claims: a row per mode with both models' times and
the bytes autograd saves per step, addnorm's smaller (memory_efficient norms, fused residual
dropouts keeping no mask)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_bert_quick(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_bert", os.path.join(ROOT, "benchmarks", "bench_bert.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bert.json"
    assert mod.main(["--quick", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["eager"]
    row = rows[0]
    assert row["addnorm_ms"] > 0 and row["torch_ms"] > 0
    assert row["speedup"] == row["torch_ms"] / row["addnorm_ms"]
    assert row["addnorm_peak_mib"] < row["torch_peak_mib"]
