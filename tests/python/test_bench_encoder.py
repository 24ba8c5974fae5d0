"""benchmarks/bench_encoder.py (one encoder layer against nn.TransformerEncoderLayer) runs
end to end at tiny sizes on the CPU and records what it claims for a training step: both
layers' times, and the bytes autograd saves, addnorm's at least one tensor of the input's
size fewer per norm (its norms keep no h of their own, its fused residual dropouts no mask)."""

import json

import pytest
from conftest import load_benchmark


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bench_encoder_training_step_memory(tmp_path, dropout):
    mod = load_benchmark("bench_encoder")
    out = tmp_path / "encoder.json"
    argv = ["--device", "cpu", "--shapes", "64x4x16x2", "--dtypes", "fp32", "--modes",
            "fwd,fwdbwd", "--no-compile", "--min-reps", "1", "--max-reps", "1", "--target-s",
            "0.01", "--dropout", str(dropout), "--json", str(out), "--no-progress"]
    assert mod.main(argv) == 0
    sweep = json.loads(out.read_text())
    rows = sweep["results"]
    assert [r["mode"] for r in rows] == ["fwd", "fwdbwd"]
    assert "memory" not in rows[0]
    row = rows[1]
    assert row["times"]["addnorm"] > 0 and row["times"]["torch"] > 0
    assert row["mn_bytes"] == 2 * 16 * 64 * 4
    mem = row["memory"]
    assert mem["addnorm"] > 0
    # Post-LN: each norm's h is a tensor torch's LayerNorm keeps and addnorm's does not (the
    # next Linear keeps the norm's output in both); dropout adds torch's masks.
    assert mem["torch"] - mem["addnorm"] >= 2 * row["mn_bytes"]
    md = mod.markdown(sweep)
    assert "M×N fewer" in md and "training step memory" in md
