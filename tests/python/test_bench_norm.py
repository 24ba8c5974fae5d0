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
    """The share of the cores other processes kept busy during a run: the busy time of the
    CPUs the run may use less that of this process and its descendants, over wall time and
    those CPUs (a run's ratios are biased under load, so the reports print it); None without
    /proc/stat. The process tree's CPU time counts a live child (torch.compile's workers run
    through a run) and not a process outside the tree."""
    import os
    import subprocess
    import sys
    import time
    snaps = iter([(10.0, 115.0, 15.0)])
    monkeypatch.setattr(common, "cpu_snapshot", lambda: next(snaps))
    monkeypatch.setattr(common, "_cpus", lambda: [0, 1])
    # 10 s on 2 CPUs, 15 busy seconds of which 5 this process tree's: 10 / 20
    assert common.other_cpu_share((0.0, 100.0, 10.0)) == 0.5
    assert common.other_cpu_share(None) is None
    monkeypatch.undo()
    if common.cpu_snapshot() is None:
        pytest.skip("no /proc/stat here")
    if os.getpid() == 1:
        pytest.skip("an orphan would become this process's child (PID 1)")
    # one second of CPU time, however busy the machine is
    burn = f"{sys.executable} -c 'import time\nwhile time.process_time() < 1.0: pass'"

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as f:
            return sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")

    # a live child that has used a second of CPU time (then sleeps until killed)
    before = common._tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass\n"
                              "time.sleep(120)"])
    try:
        deadline = time.time() + 60
        while cpu_seconds(child.pid) < 0.95 and time.time() < deadline:
            time.sleep(0.05)
        assert common._tree_cpu_seconds() - before >= 0.9
    finally:
        child.kill()
        child.wait()
    before = common._tree_cpu_seconds()
    # the shell exits at once: its python is no longer a descendant of this process
    pid = int(subprocess.run(f"{burn} >/dev/null 2>&1 & echo $!", shell=True,
                             capture_output=True, text=True, check=True).stdout)
    while running(pid):
        time.sleep(0.05)
    assert common._tree_cpu_seconds() - before < 0.5

