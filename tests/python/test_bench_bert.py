"""benchmarks/bench_bert.py (the 12-layer encoder training step) runs end to end at tiny
sizes on the CPU and records what it claims: a row per mode with both models' times and
the bytes autograd saves per step, addnorm's smaller (memory_efficient norms, fused residual
dropouts keeping no mask)."""

import json

from conftest import load_benchmark


def test_saved_bytes_leave_out_parameters_and_input():
    # The Linear saves its input (for the weight's gradient; x needs none, so not the
    # weight), relu its output: only relu's output is the step's.
    import torch
    mod = load_benchmark("bench_bert")
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step():
        lin(x).relu().sum().backward()
    assert mod.sc.saved_bytes(step, [*lin.parameters(), x]) == 4 * 8 * 4
    assert mod.sc.saved_bytes(step, []) == 2 * 4 * 8 * 4


def test_bench_bert_quick(tmp_path):
    mod = load_benchmark("bench_bert")
    out = tmp_path / "bert.json"
    assert mod.main(["--quick", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["eager"]
    row = rows[0]
    assert row["addnorm_ms"] > 0 and row["torch_ms"] > 0
    assert row["speedup"] == row["torch_ms"] / row["addnorm_ms"]
    assert row["addnorm_peak_mib"] < row["torch_peak_mib"]
