#!/usr/bin/env python
"""CUDA benchmark of the fused Add & Norm ops as GPU time: addnorm vs torch eager vs
torch.compile vs Liger-Kernel, side by side in one run, with the memory-copy bandwidth of
the same run.

What is timed, per case (op, dtype, M x N) and mode:
  fwd        forward without autograd (inference; post-LN ops write no h)
  fwd_train  forward with inputs that require grad (addnorm writes h for backward)
  bwd        the backward alone (the autograd graph of one forward, replayed)
  fwdbwd     forward + backward
Every implementation's step is captured in a CUDA graph; a replay is timed between two CUDA
events after a 256 MiB buffer is zeroed (the L2 cache is flushed, and the GPU is still busy
with the flush while the replay is enqueued, so the figure is GPU time without host
overhead). Small cases put k back-to-back steps in one graph (the time is divided by k), so
that the timed region is long enough to measure; their L2 is warm after the first step, for
every implementation alike. The implementations of a case are timed in turns, one replay
each per repetition in an order rotated from one repetition to the next, so that the GPU's
clock and temperature drifts reach all alike; medians of --reps replays. When a graph cannot
be captured, the case falls back to events around eager calls and is marked "(eager
timing)".

Host time: for the small cases, the wall time per call of many back-to-back calls (fwd and
fwd_train), which is then host-bound: the per-call overhead a user sees at small sizes.

Bandwidth: GB/s over the minimal bytes (every input read once, every output written once;
fwd_train also counts the write of h), and that as a fraction of the device-to-device copy bandwidth measured in the same run
(bytes read + written).

    python benchmarks/bench_cuda.py --json benchmarks/results/gpu_h100.json --md benchmarks/results/gpu_h100.md
    python benchmarks/bench_cuda.py --quick
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as sc  # noqa: E402  (also puts the source tree's package on the path when needed)

import addnorm  # noqa: E402,F401
import torch  # noqa: E402


DEVICE = "cuda"  # (the test of this script's plumbing runs it on the CPU)
MODES = ("fwd", "fwd_train", "bwd", "fwdbwd")
IMPLS = ("addnorm", "eager", "compile", "liger")

# (group, op, dtypes, shapes, modes): the table and targets.
BF16 = ("bf16",)
BOTH = ("bf16", "fp32")
LARGE = [(32768, 768), (16384, 1024), (16384, 4096), (8192, 8192)]   # M*N >= 8M elements
LONG = [(4096, 16384), (2048, 32768), (1024, 65536), (512, 131072)]  # M*N = 64M elements
SMALL = [(1, 1024), (32, 4096), (4096, 1024), (1, 8192)]
PLAN = [
    ("large", "add_layer_norm", BOTH, LARGE, ("fwd", "fwd_train", "bwd", "fwdbwd")),
    ("large", "add_rms_norm_prenorm", BF16, [(16384, 4096)], ("fwd", "bwd", "fwdbwd")),
    ("large", "add_layer_norm_prenorm", BF16, [(8192, 8192)], ("fwd", "bwd", "fwdbwd")),
    ("long", "add_rms_norm", BOTH, LONG, ("fwd", "bwd")),
    ("long", "add_layer_norm", BF16, LONG, ("fwd", "bwd")),
    ("small", "add_layer_norm", BF16, SMALL, ("fwd", "fwd_train", "fwdbwd")),
    # training-step fusion: dropout + add + LN (eager: F.dropout(x, p) + r, then the norm)
    # and the backward from the output
    ("dropout", "dropout_add_layer_norm", BF16, [(16384, 1024), (8192, 8192)],
     ("fwd_train", "fwdbwd")),
    ("dropout", "add_layer_norm_memory_efficient", ("fp32",), [(16384, 1024)], ("fwdbwd",)),
]
QUICK_PLAN = [
    ("large", "add_layer_norm", BF16, [(32768, 768), (8192, 8192)], ("fwd", "bwd", "fwdbwd")),
    ("large", "add_layer_norm", ("fp32",), [(16384, 1024)], ("fwd", "bwd")),
    ("long", "add_rms_norm", BF16, [(1024, 65536)], ("fwd", "bwd")),
    ("small", "add_layer_norm", BF16, [(1, 1024), (32, 4096)], ("fwd", "fwdbwd")),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few cases, fewer repetitions")
    p.add_argument("--only", default=None, help="comma list of groups to run: large, long, small, dropout")
    p.add_argument("--reps", type=int, default=None, help="timed replays per case (default 25; --quick 10)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-liger", action="store_true", help="leave Liger-Kernel out")
    p.add_argument("--baseline", default=None,
                   help="comma list of JSON results of an earlier run (the same GPU): a column "
                        "of addnorm's time there over its time now, per matching case")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ timing

class Flush:
    def __init__(self):
        self.buf = torch.empty(256 << 18, dtype=torch.float32, device="cuda")  # 256 MiB

    def __call__(self):
        self.buf.zero_()


def copy_bandwidth(reps=20):
    """Median device-to-device copy bandwidth (bytes read + written) of a 512 MiB copy."""
    n = (512 << 20) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    med = statistics.median(times)
    del src, dst
    return {"bytes": 2 * n * 4, "median_s": med, "gbps": 2 * n * 4 / med / 1e9, "reps": reps}


def graph_runner(step, k):
    """A call that replays k steps captured in one CUDA graph (captured, and replayed once)."""
    graph = sc.capture_cuda_graph(step, k)
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay  # (which keeps the graph)


def eager_runner(step, k):
    """Fallback: a call of k back-to-back eager steps (its events may include host time)."""
    for _ in range(3):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()

    def run():
        for _ in range(k):
            step()
    return run


def gpu_seconds(run):
    """GPU seconds of one call of run, between two CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3


def time_interleaved(runs, flush, k, reps):
    """Median seconds per step of each of runs ({name: call of k steps}), timed in turns: a
    repetition times every call once, each after a flush, in an order rotated by one from one
    repetition to the next, so that drifts of the GPU's clocks or temperature during a case
    reach every implementation alike and none always runs first. A call that raises is
    dropped (its error returned); the others go on. Returns ({name: seconds}, {name: error})."""
    names = list(runs)
    times = {n: [] for n in names}
    errors = {}
    for i in range(reps):
        j = i % len(names) if names else 0
        for n in names[j:] + names[:j]:
            if n in errors:
                continue
            try:
                flush()
                times[n].append(gpu_seconds(runs[n]) / k)
            except Exception as e:
                errors[n] = f"{type(e).__name__}: {str(e)[:200]}"
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
    return {n: statistics.median(t) for n, t in times.items() if n not in errors}, errors


def host_time(step, calls=200):
    """Wall seconds per call of back-to-back calls (host-bound at small sizes)."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t0) / calls)
    return statistics.median(best)


# ------------------------------------------------------------------------------------ cases

def make_inputs(op, dtype, M, N, seed=0):
    kind, has_res, prenorm = sc.OPS[op]
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 7919 * M + N)
    x = torch.randn(M, N, device=DEVICE, dtype=dtype, generator=gen)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype, generator=gen) if has_res else None
    w = (1 + 0.1 * torch.randn(N, device=DEVICE, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(N, device=DEVICE, generator=gen)).to(dtype) if kind == "ln" else None
    grads = [torch.randn(M, N, device=DEVICE, dtype=dtype, generator=gen)]
    if prenorm:
        grads.append(torch.randn(M, N, device=DEVICE, dtype=dtype, generator=gen))
    return x, r, w, b, grads


def impl_fns(op, N, w, b, want_compile, want_liger):
    kind = sc.OPS[op][0]
    eps = 1e-5 if kind == "ln" else None
    fns = {"addnorm": sc._addnorm_fn(op, N, eps), "eager": sc._as_tuple(sc._eager_fn(op, N, eps))}
    if want_compile:
        fns["compile"] = sc._as_tuple(torch.compile(sc._eager_fn(op, N, eps), dynamic=False))
    if want_liger:
        li = sc._liger_impl(op, N, eps, w, b)
        if li is not None:
            fns["liger"] = li.fn
    return fns


def steps_for(fn, mode, x, r, w, b, grads):
    """The callable to time for one mode, and the leaves it differentiates."""
    leaves = [t for t in (x, r, w, b) if t is not None]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, r, w, b)
        return step
    req = [t.detach().requires_grad_() for t in leaves]
    it = iter(req)
    xx = next(it)
    rr = next(it) if r is not None else None
    ww = next(it)
    bb = next(it) if b is not None else None
    if mode == "fwd_train":
        return lambda: fn(xx, rr, ww, bb)
    if mode == "fwdbwd":
        def step():
            outs = fn(xx, rr, ww, bb)
            return torch.autograd.grad(outs, req, grads[: len(outs)], allow_unused=True)
        return step
    # bwd: one forward outside the timed graph; its graph is replayed
    outs = fn(xx, rr, ww, bb)
    return lambda: torch.autograd.grad(outs, req, grads[: len(outs)], retain_graph=True,
                                       allow_unused=True)


def bench_case(group, op, dt, M, N, modes, args, flush, copy_gbps):
    dtype = sc.DTYPES[dt]
    x, r, w, b, grads = make_inputs(op, dtype, M, N)
    fns = impl_fns(op, N, w, b, not args.no_compile, not args.no_liger and sc.liger_available())
    nbytes = sc.minimal_bytes(op, M, N, dtype, dtype, dtype, grads_alias=sc.grads_aliased(op))
    # training forward: addnorm writes h for backward (post-LN too; not memory_efficient, whose
    # backward starts from out): counted, unlike the minimal bytes of the other modes
    kind, has_res, prenorm = sc.OPS[op]
    writes_h = has_res and not prenorm and op != "add_layer_norm_memory_efficient"
    nbytes["fwd_train"] = nbytes["fwd"] + (M * N * x.element_size() if writes_h else 0)
    ideal_s = nbytes["fwdbwd"] / (copy_gbps * 1e9)
    k = max(1, min(64, math.ceil(200e-6 / max(ideal_s, 1e-7))))
    rows = []
    for mode in modes:
        row = {"group": group, "op": op, "dtype": dt, "M": M, "N": N, "mode": mode,
               "bytes": nbytes[mode], "k": k, "impls": {}, "method": {}, "errors": {}}
        def step_of(name, fn):
            # Liger may write its input gradient into the upstream gradient (common.py's
            # clone_grads): it gets its own copy, so the others see the original values.
            own = [g.clone() for g in grads] if name == "liger" else grads
            return steps_for(fn, mode, x, r, w, b, own)

        # Every implementation's step captured (runners held together), then timed in turns.
        # One method per row: where a step cannot be captured, every step of the row is timed
        # with the fallback (events around eager calls), so that no ratio sets a replay
        # against eager calls.
        steps, runs = {}, {}
        for name, fn in fns.items():
            try:
                steps[name] = step_of(name, fn)
            except Exception as e:
                row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            try:
                runs[name] = graph_runner(steps[name], k)
                row["method"][name] = "graph"
            except Exception as e:  # not capturable
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                row["errors"][name + "_graph"] = f"{type(e).__name__}: {str(e)[:200]}"
                row["method"][name] = "eager"
        if "eager" in row["method"].values():
            runs.clear()  # (the graphs' memory, and the steps', back before the eager steps run)
            steps.clear()
            for name in list(row["method"]):
                try:
                    steps[name] = step_of(name, fns[name])  # (a step no capture has seen)
                    runs[name] = eager_runner(steps[name], k)
                    row["method"][name] = "eager"
                except Exception as e:  # (out of memory outside the graph pool, say)
                    row["errors"][name + "_eager"] = f"{type(e).__name__}: {str(e)[:200]}"
                    del row["method"][name]
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
        times, errors = time_interleaved(runs, flush, k, args.reps)
        for name, err in errors.items():
            row["errors"][name + "_timing"] = err
            del row["method"][name]
        for name, t in times.items():
            row["impls"][name] = {"gpu_s": t}
            if group == "small" and mode in ("fwd", "fwd_train"):
                try:
                    row["impls"][name]["host_s"] = host_time(steps[name])
                except Exception as e:
                    row["errors"][name + "_host"] = f"{type(e).__name__}: {str(e)[:200]}"
        del steps, runs
        a = row["impls"].get("addnorm")
        if a:
            row["addnorm_gbps"] = nbytes[mode] / a["gpu_s"] / 1e9
            row["frac_copy"] = row["addnorm_gbps"] / copy_gbps
            row["speedup"] = {n: v["gpu_s"] / a["gpu_s"] for n, v in row["impls"].items() if n != "addnorm"}
        rows.append(row)
    del x, r, w, b, grads, fns
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


MODE_LABEL = {"fwd": "fwd", "fwd_train": "fwd (train)", "bwd": "bwd", "fwdbwd": "fwd+bwd"}
OP_LABEL = {"add_layer_norm": "add+LN", "add_layer_norm_prenorm": "add+LN pre-LN (y, h)",
            "add_rms_norm": "add+RMS", "add_rms_norm_prenorm": "add+RMS pre-LN (y, h)",
            "layer_norm": "LN", "rms_norm": "RMS"}


def load_baseline(paths):
    """addnorm's GPU seconds per (op, dtype, M, N, mode) in earlier runs' JSON results (the
    last file that has a case wins)."""
    base = {}
    for path in paths.split(",") if paths else []:
        with open(path.strip()) as f:
            for r in json.load(f)["results"]:
                a = r["impls"].get("addnorm")
                if a:
                    base[(r["op"], r["dtype"], r["M"], r["N"], r["mode"])] = a["gpu_s"]
    return base


def add_baseline(rows, base):
    """vs_baseline: addnorm's time in the baseline over its time now (> 1: faster now)."""
    for r in rows:
        a = r["impls"].get("addnorm")
        was = base.get((r["op"], r["dtype"], r["M"], r["N"], r["mode"]))
        if a and was:
            r["baseline_s"] = was
            r["vs_baseline"] = was / a["gpu_s"]


def table(rows):
    impls = [n for n in IMPLS if any(n in r["impls"] for r in rows)]
    others = impls[1:]
    with_base = any("vs_baseline" in r for r in rows)
    header = (["case", "dtype", "MxN", "mode"] + [f"{n} us" for n in impls]
              + [f"x vs {n}" for n in others] + ["% of copy", "host us (addnorm / eager)"]
              + (["baseline us", "x vs baseline"] if with_base else []))
    out = []
    for r in rows:
        a = r["impls"].get("addnorm")
        line = [OP_LABEL.get(r["op"], r["op"]), r["dtype"], f"{r['M']}x{r['N']}", MODE_LABEL[r["mode"]]]
        for n in impls:
            v = r["impls"].get(n)
            mark = "*" if r["method"].get(n) == "eager" else ""
            line.append(f"{v['gpu_s'] * 1e6:.1f}{mark}" if v else ("err" if n in r["errors"] else "-"))
        for n in others:
            s = r.get("speedup", {}).get(n)
            line.append(f"{s:.2f}x" if s else "-")
        line.append(f"{100 * r['frac_copy']:.0f}%" if r.get("frac_copy") else "-")
        ha = a.get("host_s") if a else None
        he = r["impls"].get("eager", {}).get("host_s")
        line.append(f"{ha * 1e6:.1f} / {he * 1e6:.1f}" if ha and he else "-")
        if with_base:
            b = r.get("baseline_s")
            line += [f"{b * 1e6:.1f}", f"{r['vs_baseline']:.2f}x"] if b else ["-", "-"]
        out.append(line)
    return header, out


def write_results(args, info, rows, copy, elapsed_s, done, total):
    """Writes the rows measured so far to args.json / args.md; a run cut short (done of total
    cases) says so in both."""
    partial = f"partial: {done} of {total} cases" if done < total else None
    result = {"machine": info, "copy_bandwidth": copy, "reps": args.reps, "elapsed_s": elapsed_s,
              "cases_done": done, "cases_total": total, "results": rows}
    # (each file written whole, then renamed over the last: a kill mid-write leaves the last)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.md:
        header, lines = table(rows)
        with open(args.md + ".tmp", "w") as f:
            f.write(f"# addnorm CUDA benchmark: {info.get('gpu', 'GPU')}\n\n")
            if partial:
                f.write(f"**{partial}** (the run stopped before the end).\n\n")
            f.write(f"Command: `{info['command']}`  \n")
            f.write(f"Date: {info['date']}; source: {info.get('source_revision', 'unknown')}; torch {info['torch_version']} (CUDA {info.get('torch_cuda')}), "
                    f"triton {info.get('triton_version', '-')}, liger-kernel {info.get('liger_kernel_version', '-')}  \n")
            f.write(f"Device-to-device copy bandwidth (read + write) in the same run: {copy['gbps']:.0f} GB/s.  \n")
            if getattr(args, "baseline", None):
                f.write(f"Baseline (addnorm's times of an earlier run, x vs baseline = then / now): "
                        f"`{args.baseline}`.  \n")
            f.write("Times are GPU microseconds per call (median of CUDA-graph replays after an L2 flush, "
                    "the implementations of a row replayed in turns, the order rotated each repetition; "
                    "`*`: events around eager calls, for every implementation of a row where one step could "
                    "not be captured). Ratios are other / addnorm "
                    "(> 1: addnorm is faster). % of copy: addnorm's bytes (each input read once, each "
                    "output written once; fwd (train) counts the write of h, which addnorm's "
                    "training forward makes for backward, post-LN too) per second over the copy "
                    "bandwidth. Host us: wall time per "
                    "call of back-to-back calls at small sizes.\n\n")
            f.write(sc.format_md_table(header, lines) + "\n")
        os.replace(args.md + ".tmp", args.md)


def main(argv=None):
    args = parse_args(argv)
    if not (torch.cuda.is_available() and addnorm.cuda_available()):
        print("bench_cuda.py needs a CUDA device and addnorm's CUDA kernels", file=sys.stderr)
        return 2
    args.reps = args.reps or (10 if args.quick else 25)
    plan = QUICK_PLAN if args.quick else PLAN
    if args.only:
        keep = {g.strip() for g in args.only.split(",")}
        plan = [p for p in plan if p[0] in keep]
    cases = [(g, op, dt, M, N, modes) for g, op, dts, shapes, modes in plan for dt in dts for M, N in shapes]
    if not args.no_compile:
        sc._setup_dynamo()
        # The bwd mode replays the backward of one forward (retain_graph=True), which
        # AOTAutograd refuses for a graph compiled with donated buffers (fp32 16384x1024 on
        # an H200: "compiled with non-empty donated buffers"); they only save memory.
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    t0 = time.perf_counter()
    copy = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name(0)}; copy bandwidth {copy['gbps']:.0f} GB/s; "
          f"{len(cases)} cases", flush=True)
    flush = Flush()
    info = sc.machine_info("cuda")
    bar = sc.Progress(len(cases), enabled=not args.no_progress)
    base = load_baseline(args.baseline)
    rows = []
    for i, (g, op, dt, M, N, modes) in enumerate(cases):
        bar.step(f"{g} {op} {dt} {M}x{N}")
        try:
            rows += bench_case(g, op, dt, M, N, modes, args, flush, copy["gbps"])
            add_baseline(rows, base)
        except Exception as e:
            print(f"\n{op} {dt} {M}x{N}: skipped ({type(e).__name__}: {str(e)[:200]})", flush=True)
            torch.cuda.empty_cache()
        # (after every case: a run stopped by a time limit keeps what it measured)
        write_results(args, info, rows, copy, time.perf_counter() - t0, i + 1, len(cases))
    bar.done()
    header, lines = table(rows)
    print(sc.format_text_table(header, lines))
    print(f"total time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
