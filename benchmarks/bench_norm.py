#!/usr/bin/env python
"""Benchmark: addnorm vs torch eager vs torch.compile (inductor) [vs Liger-Kernel on CUDA].

Ops (--ops):
  add_layer_norm          post-LN: out = LN(x + r), h not returned
  add_layer_norm_prenorm  pre-LN: (out, h) returned, both receive gradients
  layer_norm              out = LN(x)
  add_rms_norm            out = RMSNorm(x + r)
  add_rms_norm_prenorm, rms_norm   (not in the default set)
  dropout_add_layer_norm  out = LN(dropout(x, 0.1) + r): eager F.dropout (mask stored) vs
                          addnorm's fused dropout (mask regenerated); not in the default set
  add_layer_norm_memory_efficient  add_layer_norm with addnorm's memory_efficient=True
                          (backward from the output, h never written); not in the default set
The torch baseline is the eager code a user writes (``h = x + r; F.layer_norm(h, ...)``,
``F.rms_norm``); "compile" is torch.compile of exactly that function, compiled per shape.

Modes (--modes): fwd (inputs require grad, i.e. the training forward; --fwd-nograd for
inference), bwd (the ``.backward()`` call alone, on a fresh forward graph each repetition),
fwdbwd (both). Every repetition runs forward then backward with a clock mark between them,
so the three modes come from the same runs. Implementations are interleaved round-robin;
caches are flushed before every repetition (--no-flush to keep them warm); medians reported.
CPU: time.perf_counter; CUDA: torch.cuda.Event, with the flush (256 MiB) enqueued before the
forward and again before the backward, so that the GPU is still busy while the host enqueues
the timed work: the figures are GPU time as long as an implementation's host time per call
stays under the flush's GPU time (~0.1 ms on an H100). For CUDA figures at every size, GPU
time from CUDA-graph replays with host time as its own column, use benchmarks/bench_cuda.py.

Bandwidth: the same run measures dst.copy_(src) on 256 MiB (bytes read + written / time,
median); each addnorm result shows GB/s over the minimal bytes (each input read once, each
output written once) and the fraction of the copy bandwidth.

Examples:
  python benchmarks/bench_norm.py --quick
  python benchmarks/bench_norm.py --json benchmarks/results/cpu.json --md benchmarks/results/cpu.md
  python benchmarks/bench_norm.py --device cuda --ops add_layer_norm --dtypes bf16 --shapes 4096x1024,16384x8192 --modes fwd,bwd
  python benchmarks/bench_norm.py --device cuda --compile dynamic-m   # fewer compilations
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as sc  # noqa: E402  (also puts the source tree's package on the path when needed)

import addnorm  # noqa: E402,F401
import torch  # noqa: E402


CPU_M = (4096, 16384)
CPU_N = (768, 1024, 4096, 8192)
CUDA_M = (1, 32, 4096, 16384)
CUDA_N = (128, 768, 1024, 2048, 4096, 8192, 16384, 65536)
QUICK_SHAPES = {"cpu": "4096x768,4096x4096", "cuda": "32x4096,4096x1024,16384x8192"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when addnorm has CUDA kernels and a GPU is visible, else cpu")
    p.add_argument("--ops", default=",".join(sc.DEFAULT_OPS),
                   help=f"comma list from {', '.join(sc.OPS)} or 'all' (default: %(default)s)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16, fp64")
    p.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma list of fwd, bwd, fwdbwd")
    p.add_argument("--shapes", default=None,
                   help="comma list of MxN, e.g. 4096x768,16384x1024 (default: the device's sweep)")
    p.add_argument("--quick", action="store_true",
                   help=f"small subset: shapes cpu {QUICK_SHAPES['cpu']}, cuda {QUICK_SHAPES['cuda']}, "
                        "fewer repetitions")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed repetitions per case (default: adaptive, see --target-s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default cpu 1, cuda 5)")
    p.add_argument("--target-s", type=float, default=None,
                   help="adaptive repetitions: aim for this many seconds of timed runs per case "
                        "(default cpu 1.0, cuda 0.3; --quick: cpu 0.3, cuda 0.1)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--compile", choices=("static", "dynamic-m", "none"), default="static",
                   help="static (default): torch.compile per shape; dynamic-m: rows marked dynamic, "
                        "one compile per (op, dtype, N); none: leave torch.compile out")
    p.add_argument("--no-compile", action="store_const", const="none", dest="compile")
    p.add_argument("--no-liger", action="store_true", help="leave Liger-Kernel out (CUDA only anyway)")
    p.add_argument("--no-flush", action="store_true", help="do not evict caches between repetitions")
    p.add_argument("--fwd-nograd", action="store_true",
                   help="fwd mode with inputs not requiring grad (only when bwd modes are not asked)")
    p.add_argument("--thp", action="store_true",
                   help="CPU: re-run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 so that large outputs "
                        "get transparent huge pages (fewer page faults on fresh allocations; not "
                        "the default environment of a torch user)")
    p.add_argument("--grad-from-op", action="store_true",
                   help="backward of sum((out * g).sum()) instead of out.backward(g): the "
                        "gradients reach the norm from an op's backward, as in a model (the "
                        "bwd times then include mul's backward, one more pass over M x N)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results (with samples summary) as JSON")
    p.add_argument("--md", default=None, help="write a Markdown report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--estimate-only", action="store_true",
                   help="measure the copy bandwidth, print the time estimate and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.thp and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if addnorm.cuda_available() else "cpu")
    if device == "cuda" and not addnorm.cuda_available():
        print("--device cuda: addnorm has no CUDA kernels here or no GPU is visible", file=sys.stderr)
        return 2

    ops = list(sc.OPS) if args.ops.strip() == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in sc.OPS]
    if bad:
        print(f"unknown op(s) {bad}; choose from {list(sc.OPS)}", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in sc.DTYPES]
    if bad:
        print(f"unknown dtype(s) {bad}; choose from {list(sc.DTYPES)}", file=sys.stderr)
        return 2
    modes = sc.parse_modes(args.modes)
    if args.fwd_nograd and modes != ["fwd"]:
        print(f"--fwd-nograd needs --modes fwd alone (got {','.join(modes)})", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = sc.parse_shapes(args.shapes)
    elif args.quick:
        shapes = sc.parse_shapes(QUICK_SHAPES[device])
    else:
        ms, ns = (CUDA_M, CUDA_N) if device == "cuda" else (CPU_M, CPU_N)
        shapes = [(m, n) for m in ms for n in ns]

    cuda = device == "cuda"
    target = args.target_s
    if target is None and args.quick:
        target = 0.1 if cuda else 0.3
    max_reps = args.max_reps
    if max_reps is None and args.quick:
        max_reps = 50 if cuda else 10
    cfg = sc.BenchConfig(
        device, modes=modes, repeat=args.repeat, warmup=args.warmup, target_s=target,
        min_reps=args.min_reps, max_reps=max_reps, compile=args.compile,
        liger=not args.no_liger, flush=not args.no_flush,
        fwd_grad=not args.fwd_nograd, seed=args.seed, grad_from_op=args.grad_from_op)

    info = sc.machine_info(device)
    print(f"addnorm {info['addnorm_version']} | torch {info['torch_version']} | {device} | "
          f"{info.get('gpu') or info['cpu_model']} | {info['cpu_cores']} cores, "
          f"{info['torch_threads']} threads | addnorm CPU: {info['addnorm_cpu_capability']}")
    load = info.get("loadavg_1min")
    if load is not None and load > 0.5:
        print(f"warning: the machine is busy (1-minute load average {load:.2f} before the run); "
              "timings will be noisy", file=sys.stderr)
    if cuda and cfg.liger and not sc.liger_available():
        print("Liger-Kernel not importable: left out", file=sys.stderr)

    copy_bw = sc.copy_bandwidth(device)
    if args.estimate_only:
        groups, weights, n_impls = sc.plan_sweep(ops, dtypes, shapes, cfg, copy_bw["gbps"])
        est = sum(weights)
        print(f"copy bandwidth {copy_bw['gbps']:.1f} GB/s; estimated time ~{sc.fmt_duration(est)}")
        return 0

    busy = sc.cpu_snapshot()
    sweep = sc.run_sweep(ops, dtypes, shapes, cfg, copy_bw=copy_bw,
                         progress=not args.no_progress, estimate_stream=sys.stdout)
    sc.note_other_cpu_share(info, busy)
    sweep["machine"] = info
    header, rows = sc.table_rows(sweep)
    print()
    print(sc.format_text_table(header, rows))
    print()
    print(f"memory-copy bandwidth (dst.copy_(src), {copy_bw['mib']} MiB fp32): {copy_bw['gbps']:.1f} GB/s")
    for line in sc.summary_lines(sweep):
        print(line)
    errs = [r for r in sweep["results"] if r["errors"]]
    seen = set()
    for r in errs:
        k = (r["op"], r["dtype"], r["M"], r["N"])
        if k not in seen:
            seen.add(k)
            print(f"errors in {k}: {r['errors']}", file=sys.stderr)
    print(f"total time {sc.fmt_duration(sweep['elapsed_s'])} (estimated {sc.fmt_duration(sweep['estimated_s'])})")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(sweep, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(markdown_report(sweep))
        print(f"wrote {args.md}")
    return 0


NOISY = 1.5  # p80 / min above which a case is listed as noisy in the Markdown report


def markdown_report(sweep: dict) -> str:
    info = sweep["machine"]
    cfg = sweep["config"]
    cb = sweep["copy_bandwidth"]
    dev = cfg["device"]
    lines = [f"# addnorm benchmark ({dev})", ""]
    lines.append(f"Command: `{info['command']}`  ")
    lines.append(f"Date: {info['date']}; source: {info.get('source_revision', 'unknown')}")
    lines.append("")
    lines.append("| machine | |")
    lines.append("|---|---|")
    keys = [("cpu_model", "CPU"), ("cpu_cores", "cores"), ("torch_threads", "torch threads"),
            ("memory_gib", "memory (GiB)"), ("gpu", "GPU"), ("gpu_capability", "compute capability"),
            ("gpu_memory_gib", "GPU memory (GiB)"), ("torch_version", "torch"), ("torch_cuda", "torch CUDA"),
            ("triton_version", "triton"), ("liger_kernel_version", "Liger-Kernel"),
            ("python", "python"), ("platform", "platform"), ("addnorm_version", "addnorm"),
            ("addnorm_cpu_capability", "addnorm.cpu_capability()"),
            ("torch_cpu_capability", "torch CPU capability"), ("glibc_tunables", "GLIBC_TUNABLES"),
            ("loadavg_1min", "load average before the run"),
            ("other_cpu_share", "cores' share busy with other processes during the run")]
    for k, label in keys:
        if info.get(k) is not None:
            lines.append(f"| {label} | {info[k]} |")
    lines.append(f"| memory-copy bandwidth | {cb['gbps']:.1f} GB/s (dst.copy_(src), {cb['mib']} MiB fp32, "
                 f"read + written, median of {cb['reps']}) |")
    lines.append("")
    lines.append("Median times. `x vs <impl>` = that implementation's time / addnorm's time, "
                 "measured in the same run (> 1: addnorm is faster). eager = `h = x + r; "
                 "F.layer_norm(h, ...)` (or `F.rms_norm`); compile = `torch.compile` of that same "
                 f"function ({cfg['compile']}). GB/s = minimal bytes / addnorm time: fwd reads x, r, "
                 "weight, bias and writes out (and h for pre-LN); bwd reads grad_out (and grad_h), "
                 "h and weight and writes grad_h once (grad_x = grad_r; with dropout grad_x and grad_r), "
                 "grad_weight, grad_bias. "
                 "`% of copy` = that GB/s / the copy bandwidth. bwd = the `.backward()` call alone "
                 "on a fresh forward graph each repetition"
                 + (" (of `sum((out * g).sum())`, which the forward's time leaves out: mul's "
                    "backward makes the norm's gradient, one more pass over M x N that the "
                    "minimal bytes do not count). " if cfg.get("grad_from_op") else ". ")
                 + ("fwd = the training forward (inputs require grad). " if cfg["fwd_grad"] else "fwd = inference (no grad). ")
                 + ("Caches flushed before each repetition. " if cfg["flush"] else "")
                 + ("On CPU every call allocates its outputs; tensors above glibc's mmap threshold "
                    "are fresh pages, so page faults are part of every implementation's time."
                    if dev == "cpu" else ""))
    lines.append("")
    lines.append("Summary (geometric means over the cases below):")
    lines.append("")
    for line in sc.summary_lines(sweep):
        lines.append(f"- {line.strip()}")
    lines.append("")
    header, rows = sc.table_rows(sweep)
    for m in sc.MODES:
        sel = [row for row, r in zip(rows, sweep["results"]) if r["mode"] == m]
        if not sel:
            continue
        lines.append(f"## {sc.MODE_LABEL[m]}")
        lines.append("")
        lines.append(sc.format_md_table(header, sel))
        lines.append("")
    noisy = []
    for r in sweep["results"]:
        spread = {k: v["p80_s"] / v["min_s"] for k, v in r["impls"].items()
                  if v.get("min_s") and v.get("p80_s") and v["p80_s"] > NOISY * v["min_s"]}
        if spread:
            noisy.append(f"{r['op']} {r['dtype']} {r['M']}x{r['N']} {r['mode']} ("
                         + ", ".join(f"{k} {q:.1f}x" for k, q in spread.items()) + ")")
    if noisy:
        lines.append(f"Noisy cases: an implementation's 80th-percentile time above {NOISY}x its "
                     f"minimum (take their ratios with care): {'; '.join(noisy)}.")
        lines.append("")
    compile_times = [(r["op"], r["dtype"], r["M"], r["N"], r["compile_first_call_s"])
                     for r in sweep["results"] if r.get("compile_first_call_s") and r["mode"] == cfg["modes"][0]]
    if compile_times:
        tot = sum(c[-1] for c in compile_times)
        lines.append(f"torch.compile first calls (compilation included): {tot:.0f} s in total over "
                     f"{len(compile_times)} cases.")
        lines.append("")
    errs = {}
    for r in sweep["results"]:
        if r["errors"]:
            errs[(r["op"], r["dtype"], f"{r['M']}x{r['N']}")] = r["errors"]
    if errs:
        lines.append("Errors:")
        lines.append("")
        for k, e in errs.items():
            lines.append(f"- {' '.join(map(str, k))}: {e}")
        lines.append("")
    lines.append(f"Run time {sc.fmt_duration(sweep['elapsed_s'])}.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
