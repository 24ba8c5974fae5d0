"""benchmarks/bench_bert.py (the 12-layer encoder training step) runs end to end at tiny
sizes on the CPU and records what it claims: a row per mode with both models' times and
the bytes autograd saves per step, addnorm's smaller (memory_efficient norms, fused residual
dropouts keeping no mask)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench_bert():
    spec = importlib.util.spec_from_file_location(
        "bench_bert", os.path.join(ROOT, "benchmarks", "bench_bert.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_saved_bytes_leave_out_parameters_and_input():
    # The Linear saves its input (for the weight's gradient; x needs none, so not the
    # weight), relu its output: only relu's output is the step's.
    import torch
    mod = load_bench_bert()
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step():
        lin(x).relu().sum().backward()
    assert mod.saved_bytes(step, [*lin.parameters(), x]) == 4 * 8 * 4
    assert mod.saved_bytes(step, []) == 2 * 4 * 8 * 4


def test_bench_bert_quick(tmp_path):
    mod = load_bench_bert()
    out = tmp_path / "bert.json"
    assert mod.main(["--quick", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["eager"]
    row = rows[0]
    assert row["addnorm_ms"] > 0 and row["torch_ms"] > 0
    assert row["speedup"] == row["torch_ms"] / row["addnorm_ms"]
    assert row["addnorm_peak_mib"] < row["torch_peak_mib"]
