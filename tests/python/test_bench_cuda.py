"""The plumbing of benchmarks/bench_cuda.py (the CUDA benchmark), run on the CPU with the
GPU clocks replaced: every implementation's step for every mode computes what it should
(outputs, and gradients for every input), a row per mode comes out with ratios and the
bandwidth fraction, and the table formats. The timing itself needs a GPU."""

import json

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture
def bench(monkeypatch):
    mod = load_benchmark("bench_cuda")
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    calls = []

    def fake_seconds(run):  # (by call count: with reps=1, addnorm's call first, 1e-5 s, then eager's)
        calls.append(run())
        return 1e-5 if len(calls) % 2 else 2e-5

    monkeypatch.setattr(mod, "graph_runner", lambda step, k: step)
    monkeypatch.setattr(mod, "gpu_seconds", fake_seconds)
    monkeypatch.setattr(mod, "host_time", lambda step: (step(), 3e-6)[1])
    mod.calls = calls
    return mod


class Args:
    no_compile = True
    no_liger = True
    reps = 1


@pytest.mark.parametrize("op", ["add_layer_norm", "add_layer_norm_prenorm", "add_rms_norm"])
def test_bench_case_rows(bench, op):
    rows = bench.bench_case("small", op, "fp32", 8, 64, bench.MODES, Args(), lambda: None, 1000.0)
    assert [r["mode"] for r in rows] == list(bench.MODES)
    for r in rows:
        assert set(r["impls"]) == {"addnorm", "eager"}, r["errors"]
        assert r["method"] == {"addnorm": "graph", "eager": "graph"}
        assert r["speedup"]["eager"] == pytest.approx(2.0)
        assert r["impls"]["addnorm"]["gpu_s"] == pytest.approx(1e-5 / r["k"])  # (per step)
        assert r["frac_copy"] == pytest.approx(r["bytes"] / (1e-5 / r["k"]) / 1e9 / 1000.0)
        if r["mode"] in ("fwd", "fwd_train"):
            assert r["impls"]["addnorm"]["host_s"] == 3e-6
    header, lines = bench.table(rows)
    assert len(lines) == len(rows) and all(len(line) == len(header) for line in lines)


@pytest.mark.parametrize("refused", ["addnorm", "eager"])
def test_a_step_not_captured_times_its_whole_row_eagerly(bench, monkeypatch, refused):
    """When one implementation's step cannot be captured in a CUDA graph, every
    implementation of that row is timed with the fallback (events around eager calls), so
    no ratio sets a graph replay against eager calls; the other rows keep the graphs. An
    implementation whose eager re-timing fails leaves the row with an error, not the case."""
    fns = {"addnorm": addnorm_ref, "eager": lambda *a: addnorm_ref(*a)}
    state = {"refused": False}
    step_name = [None]
    real_steps_for = bench.steps_for

    def steps_for(fn, *a):
        step_name[0] = next(n for n, f in fns.items() if f is fn)
        return real_steps_for(fn, *a)

    def graph_or_refuse(step, k):
        if not state["refused"] and step_name[0] == refused:
            state["refused"] = True
            raise RuntimeError("capture invalidated")
        return lambda: (step(), 1e-5 * k)[1]

    monkeypatch.setattr(bench, "steps_for", steps_for)
    monkeypatch.setattr(bench, "graph_runner", graph_or_refuse)
    monkeypatch.setattr(bench, "eager_runner", lambda step, k: lambda: (step(), 4e-5 * k)[1])
    monkeypatch.setattr(bench, "gpu_seconds", lambda run: run())
    monkeypatch.setattr(bench, "impl_fns", lambda *a: fns)
    rows = bench.bench_case("small", "add_layer_norm", "fp32", 8, 64, ("fwd", "bwd"), Args(),
                            lambda: None, 1000.0)
    first, second = rows
    assert first["method"] == {"addnorm": "eager", "eager": "eager"}
    assert first["speedup"]["eager"] == 1.0 and f"{refused}_graph" in first["errors"]
    assert second["method"] == {"addnorm": "graph", "eager": "graph"}
    header, lines = bench.table(rows)
    assert lines[0][4:6] == ["40.0*", "40.0*"] and lines[1][4:6] == ["10.0", "10.0"]

    # the eager step of the other implementation fails: its time goes, the row stays
    state["refused"] = False

    def eager_fails_for_the_other(step, k):
        if step_name[0] != refused:
            raise torch.OutOfMemoryError("out of memory")
        return lambda: (step(), 4e-5 * k)[1]

    monkeypatch.setattr(bench, "eager_runner", eager_fails_for_the_other)
    rows = bench.bench_case("small", "add_layer_norm", "fp32", 8, 64, ("fwd",), Args(),
                            lambda: None, 1000.0)
    other = "eager" if refused == "addnorm" else "addnorm"
    assert rows[0]["method"] == {refused: "eager"} and f"{other}_eager" in rows[0]["errors"]
    assert set(rows[0]["impls"]) == {refused}


def test_implementations_are_timed_in_turns(bench, monkeypatch):
    """A repetition times every implementation's call once, each after a flush, in an order
    rotated by one from one repetition to the next; per-step medians (time / k); a call that
    raises is dropped with its error and the others go on."""
    log = []

    def runner(name, seconds):
        def run():
            log.append(name)
            if name == "c" and log.count("c") == 2:
                raise RuntimeError("boom")
            return seconds.pop(0)
        return run

    monkeypatch.setattr(bench, "gpu_seconds", lambda run: run())
    runs = {"a": runner("a", [4.0, 2.0, 6.0]), "b": runner("b", [8.0, 8.0, 2.0]),
            "c": runner("c", [1.0, 1.0, 1.0])}
    times, errors = bench.time_interleaved(runs, lambda: log.append("flush"), 2, 3)
    assert log == ["flush", "a", "flush", "b", "flush", "c",   # a b c
                   "flush", "b", "flush", "c", "flush", "a",   # b c (raises) a
                   "flush", "a", "flush", "b"]                 # (c a b, without c)
    assert times == {"a": 2.0, "b": 4.0} and errors == {"c": "RuntimeError: boom"}


def addnorm_ref(x, r, w, b):
    return torch.nn.functional.layer_norm(x + r, x.shape[-1:], w, b)


def test_steps_compute_gradients(bench):
    """bwd and fwdbwd steps return a gradient for every input (x, residual, weight, bias),
    equal for addnorm and eager; fwd returns the output without a graph."""
    x, r, w, b, grads = bench.make_inputs("add_layer_norm", torch.float64, 4, 16)
    fns = bench.impl_fns("add_layer_norm", 16, w, b, False, False)
    fwd = {n: bench.steps_for(f, "fwd", x, r, w, b, grads)() for n, f in fns.items()}
    assert not fwd["addnorm"][0].requires_grad
    torch.testing.assert_close(fwd["addnorm"][0], fwd["eager"][0])
    for mode in ("bwd", "fwdbwd"):
        res = {n: bench.steps_for(f, mode, x, r, w, b, grads)() for n, f in fns.items()}
        assert len(res["addnorm"]) == 4 and all(g is not None for g in res["addnorm"])
        for a, e in zip(res["addnorm"], res["eager"]):
            torch.testing.assert_close(a, e)


def test_minimal_bytes_count_grads_once_only_where_they_alias(bench):
    """The ideal backward writes grad_x = grad_r = grad_h once with a residual and no dropout;
    with the fused dropout grad_x is grad_h times the mask, a tensor of its own."""
    sc = bench.sc
    M, N = 8, 64
    size = M * N * 4
    plain = sc.minimal_bytes("add_layer_norm", M, N, torch.float32,
                             grads_alias=sc.grads_aliased("add_layer_norm"))
    drop = sc.minimal_bytes("dropout_add_layer_norm", M, N, torch.float32,
                            grads_alias=sc.grads_aliased("dropout_add_layer_norm"))
    assert sc.grads_aliased("add_layer_norm") and not sc.grads_aliased("dropout_add_layer_norm")
    assert drop["bwd"] - plain["bwd"] == size and drop["fwd"] == plain["fwd"]


def test_results_written_after_every_case(bench, tmp_path):
    """main writes the JSON and the Markdown table after every case (a run stopped by a time
    limit keeps what it measured), marking a partial run in both."""
    rows = bench.bench_case("small", "add_layer_norm", "fp32", 8, 64, bench.MODES, Args(),
                            lambda: None, 1000.0)

    class Out(Args):
        json = str(tmp_path / "bench.json")
        md = str(tmp_path / "bench.md")

    info = {"command": "bench_cuda.py", "date": "today", "torch_version": torch.__version__}
    copy = {"gbps": 1000.0}
    bench.write_results(Out(), info, rows, copy, 1.0, 1, 3)
    with open(Out.json) as f:
        saved = json.load(f)
    assert (saved["cases_done"], saved["cases_total"]) == (1, 3)
    assert len(saved["results"]) == len(rows)
    md = (tmp_path / "bench.md").read_text()
    assert "partial: 1 of 3 cases" in md and md.count("\n| ") >= len(rows)
    bench.write_results(Out(), info, rows, copy, 2.0, 3, 3)
    assert "partial" not in (tmp_path / "bench.md").read_text()


def test_baseline_column(bench, tmp_path):
    """--baseline: addnorm's time of the same case (op, dtype, M x N, mode) in an earlier run's
    JSON over its time now, as a column of the table; cases the baseline lacks show '-'."""
    rows = bench.bench_case("small", "add_layer_norm", "fp32", 8, 64, bench.MODES, Args(),
                            lambda: None, 1000.0)
    then = json.loads(json.dumps(rows))
    for r in then:
        r["impls"]["addnorm"]["gpu_s"] *= 3.0
    then[0]["M"] = 16  # another shape: no match for the first mode
    path = tmp_path / "then.json"
    path.write_text(json.dumps({"results": then}))
    bench.add_baseline(rows, bench.load_baseline(str(path)))
    assert "vs_baseline" not in rows[0]
    for r in rows[1:]:
        assert r["vs_baseline"] == pytest.approx(3.0)
        assert r["baseline_s"] == pytest.approx(3.0 * r["impls"]["addnorm"]["gpu_s"])
    header, lines = bench.table(rows)
    assert header[-2:] == ["baseline us", "x vs baseline"]
    assert lines[0][-2:] == ["-", "-"] and lines[1][-1] == "3.00x"
    assert "x vs baseline" not in bench.table(rows[:1])[0]


def test_committed_results_load_as_baseline(bench):
    """The committed H200 results (the baseline of the next GPU run) load, keyed by cases of
    the benchmark's plan."""
    import os
    results = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")
    files = ",".join(os.path.join(results, f"gpu_h200_{g}_r2.json") for g in ("large", "dropout"))
    base = bench.load_baseline(files)
    planned = {(op, dt, M, N, mode) for _, op, dts, shapes, modes in bench.PLAN
               for dt in dts for M, N in shapes for mode in modes}
    assert len(base) > 20 and set(base) <= planned
    assert all(0 < s < 1 for s in base.values())
