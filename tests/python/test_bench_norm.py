"""The plumbing of the CPU benchmark's timing (benchmarks/common.py's bench_group, which
bench_norm.py runs): its spot check of addnorm's output against eager's flags a wrong
result in the report instead of timing it silently."""

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def common():
    return load_benchmark("common")


def _group(common, op, dtype=torch.float32):
    cfg = common.BenchConfig("cpu", modes=["fwd"], compile="none", repeat=1, warmup=0,
                             flush=False)
    return common.bench_group(op, dtype, 16, 64, cfg, common._Flusher("cpu", False), {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spot_check_passes_the_kernels(common, dtype):
    g = _group(common, "add_layer_norm", dtype)
    assert "spot_check" not in g["errors"]
    assert g["max_abs_diff_vs_eager"] < common.SPOT_CHECK_TOL[dtype] * 10
    assert g["modes"]["fwd"]["impls"]["addnorm"]["median_s"] > 0


def test_spot_check_flags_a_wrong_output(common, monkeypatch):
    """An addnorm whose output is 1% off is reported in the group's errors (and so in the
    Markdown report's "Errors"), still timed."""
    right = common._addnorm_fn

    def wrong(op, N, eps):
        fn = right(op, N, eps)

        def call(*args):
            outs = fn(*args)
            return (outs[0] * 1.01,) + tuple(outs[1:])
        return call

    monkeypatch.setattr(common, "_addnorm_fn", wrong)
    g = _group(common, "add_layer_norm")
    assert "above" in g["errors"].get("spot_check", "")
    assert "addnorm" in g["modes"]["fwd"]["impls"]


def test_spot_check_passes_over_the_dropout_op(common):
    """The fused dropout's mask is not eager's: no comparison there."""
    g = _group(common, "dropout_add_layer_norm")
    assert "spot_check" not in g["errors"] and "max_abs_diff_vs_eager" not in g


def test_other_cpu_share_counts_other_processes_not_this_one(common, monkeypatch):
    """The share of the cores other processes kept busy during a run: the machine's busy
    time less this process's, over wall time and cores (a run's ratios are biased under
    load, so the reports print it); a busy child process shows, None without /proc/stat."""
    import os
    import subprocess
    import sys
    snaps = iter([(10.0, 115.0, 15.0)])
    monkeypatch.setattr(common, "cpu_snapshot", lambda: next(snaps))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 10 s on 2 cores, 15 busy seconds of which 5 this process's: 10 / 20
    assert common.other_cpu_share((0.0, 100.0, 10.0)) == 0.5
    assert common.other_cpu_share(None) is None
    monkeypatch.undo()
    if common.cpu_snapshot() is None:
        pytest.skip("no /proc/stat here")
    start = common.cpu_snapshot()
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"], check=True)
    # (the child took one core for 1.5 s: at least 1 / cores of them, less the start-up)
    assert common.other_cpu_share(start) >= 0.6 / (os.cpu_count() or 1)
