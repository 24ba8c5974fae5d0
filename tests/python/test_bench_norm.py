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
    time less that of this process and its children (torch.compile's workers), over wall
    time and cores (a run's ratios are biased under load, so the reports print it): a busy
    process outside the tree shows, a busy child does not; None without /proc/stat."""
    import os
    import subprocess
    import sys
    import time
    snaps = iter([(10.0, 115.0, 15.0)])
    monkeypatch.setattr(common, "cpu_snapshot", lambda: next(snaps))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 10 s on 2 cores, 15 busy seconds of which 5 this process's: 10 / 20
    assert common.other_cpu_share((0.0, 100.0, 10.0)) == 0.5
    assert common.other_cpu_share(None) is None
    monkeypatch.undo()
    if common.cpu_snapshot() is None:
        pytest.skip("no /proc/stat here")
    busy = f"{sys.executable} -c 'import time\nt = time.time()\nwhile time.time() - t < 1.5: pass'"

    def share(detached):
        start = common.cpu_snapshot()
        if not detached:
            subprocess.run(busy, shell=True, check=True)
        else:  # (the shell exits at once: its child is no longer this process's descendant)
            pid = int(subprocess.run(f"{busy} >/dev/null 2>&1 & echo $!", shell=True,
                                     capture_output=True, text=True, check=True).stdout)
            while True:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.05)
        return common.other_cpu_share(start)

    cores = os.cpu_count() or 1
    other, own = share(True), share(False)
    # (the other process took one core for 1.5 s, less its start-up; the child as much)
    assert other >= 0.6 / cores and own <= other - 0.4 / cores, (other, own)
