#!/usr/bin/env python
"""Benchmark of one Transformer encoder layer: addnorm.TransformerEncoderLayer against
torch.nn.TransformerEncoderLayer (same weights, batch_first, dim_feedforward 4 * d_model).

Modes (--modes):
  fwd      training forward (train mode, parameters and input require grad)
  fwdbwd   training forward + backward (``out.backward(grad)``); fwd and fwdbwd come
           from the same repetitions (a clock mark between forward and backward). Also the
           memory of a step, addnorm's and torch's: on CUDA the peak of
           torch.cuda.max_memory_allocated above what the step starts with, on the CPU the
           bytes of the storages autograd saves (the layer's parameters and the input left
           out), and how many tensors of the input's size that is fewer for addnorm
  eval     inference forward: eval mode under torch.no_grad(). Three implementations:
           addnorm; torch's inference fast path (nn.TransformerEncoderLayer in eval under
           no_grad calls torch._transformer_encoder_layer_fwd; the run checks that it
           does); and torch eager with the fast path off
           (torch.backends.mha.set_fastpath_enabled(False)).
Every mode also times torch.compile of torch's layer (default inductor; compiled in the
warm-up, not timed; --no-compile leaves it out).
Implementations run interleaved, round-robin, each repetition; medians are reported and
the ratios (torch time / addnorm time, > 1: addnorm faster) come from the same run.
Dropout is --dropout (default 0.1) in the training modes, off in eval. --norm-first runs
pre-LN layers (default: post-LN, torch's default). Every case also records the largest
difference between addnorm's and torch's outputs (eval).

Shapes (--shapes): comma list of DxHxSxB (d_model x nhead x seq x batch). Default grid:
d_model 512 (nhead 8) and 1024 (nhead 16) x seq 128, 512 x batch 8, 32 on CUDA. On CPU
the full grid takes far too long, so the default is a subset (CPU_DEFAULT: 512x8x128x8
and 1024x16x512x8), and bf16 runs only the eval mode there unless --cpu-bf16-train:
torch's bf16 backward on a CPU without native bf16 matmul (AVX2) is very slow (about 10 s
per forward + backward at 512x8x128x8, 12x fp32; minutes per repetition at
1024x16x512x8). The default CPU run takes about 5 minutes on 2 cores.

Examples:
  python benchmarks/bench_encoder.py --quick
  python benchmarks/bench_encoder.py --json benchmarks/results/encoder_cpu.json --md benchmarks/results/encoder_cpu.md
  python benchmarks/bench_encoder.py --device cuda --json benchmarks/results/encoder_gpu.json --md benchmarks/results/encoder_gpu.md
  python benchmarks/bench_encoder.py --shapes 1024x16x512x8 --dtypes fp32,bf16 --modes fwdbwd,eval
"""

import argparse
import copy
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
from torch import nn


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd", "eval")
MODE_LABEL = {"fwd": "training forward", "fwdbwd": "training forward + backward",
              "eval": "inference forward (eval, no_grad)"}
FULL_GRID = [(d, h, s, b) for d, h in ((512, 8), (1024, 16)) for s in (128, 512) for b in (8, 32)]
CPU_DEFAULT = "512x8x128x8,1024x16x512x8"
QUICK = {"cpu": "512x8x128x8", "cuda": "512x8x128x8,1024x16x512x32"}


def parse_shapes(text):
    shapes = sc.parse_shapes(text, dims=4, example="1024x16x512x8")
    for d, h, _, _ in shapes:
        if d % h:
            raise ValueError(f"bad shape {d}x{h}x...: d_model must be divisible by nhead")
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when addnorm has CUDA kernels and a GPU is visible, else cpu")
    p.add_argument("--shapes", default=None, help=f"DxHxSxB list (default: cuda the full grid, cpu {CPU_DEFAULT})")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--modes", default="fwd,fwdbwd,eval", help="comma list of fwd, fwdbwd, eval")
    p.add_argument("--quick", action="store_true",
                   help=f"small check: shapes cpu {QUICK['cpu']}, cuda {QUICK['cuda']}; few repetitions")
    p.add_argument("--cpu-bf16-train", action="store_true",
                   help="on CPU, also run the training modes in bf16 (very slow, see above)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the training modes")
    p.add_argument("--norm-first", action="store_true", help="pre-LN layers")
    p.add_argument("--activation", choices=("relu", "gelu"), default="relu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per implementation (cpu 1, cuda 5)")
    p.add_argument("--target-s", type=float, default=None,
                   help="aim for this many seconds of timed runs per implementation and mode "
                        "(default cpu 4, cuda 0.5; --quick: cpu 0.5, cuda 0.1)")
    p.add_argument("--min-reps", type=int, default=None, help="default cpu 3, cuda 10")
    p.add_argument("--max-reps", type=int, default=None, help="default cpu 15, cuda 200")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--md", default=None, help="write a Markdown report")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile of torch's layer out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class _FastpathProbe:
    """Counts calls of torch._transformer_encoder_layer_fwd (what torch's layer calls on
    its inference fast path) while active."""

    def __init__(self):
        self.calls = 0
        self._orig = torch._transformer_encoder_layer_fwd

    def __enter__(self):
        orig = self._orig

        def wrapped(*a, **k):
            self.calls += 1
            return orig(*a, **k)

        torch._transformer_encoder_layer_fwd = wrapped
        return self

    def __exit__(self, *exc):
        torch._transformer_encoder_layer_fwd = self._orig
        return False


def make_layers(d, h, dtype, device, args):
    torch.manual_seed(args.seed)
    ref = nn.TransformerEncoderLayer(d, h, 4 * d, args.dropout, args.activation, batch_first=True,
                                     norm_first=args.norm_first, device=device, dtype=dtype)
    ours = addnorm.TransformerEncoderLayer(d, h, 4 * d, args.dropout, args.activation, batch_first=True,
                                           norm_first=args.norm_first, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def bench_case(shape, dtype_name, modes, device, args, cfg, progress):
    """Times every implementation of every mode of one (shape, dtype). Returns result rows."""
    d, h, s, b = shape
    dtype = DTYPES[dtype_name]
    cuda = device == "cuda"
    clock = sc.Clock("cuda" if cuda else "cpu")
    ours, ref = make_layers(d, h, dtype, device, args)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(b, s, d, generator=g).to(device=device, dtype=dtype)
    grad_out = torch.randn(b, s, d, generator=g).to(device=device, dtype=dtype)
    ref_c = torch.compile(ref) if cfg["compile"] else None  # (recompiles for eval: guarded)
    rows = []
    base = dict(d_model=d, nhead=h, seq=s, batch=b, dim_feedforward=4 * d, dtype=dtype_name)

    def run_reps(fns, n_marks, label):
        """fns: impl -> callable(clock) returning a list of n_marks durations.
        Warm-up, then adaptive repetitions interleaved round-robin, the order rotated each
        repetition (no implementation always runs first)."""
        samples = {k: [] for k in fns}
        for k, fn in fns.items():
            for _ in range(cfg["warmup"]):
                fn()
        clock.sync()
        t_start = time.perf_counter()
        reps = 0
        names = list(fns)
        while True:
            k0 = reps % len(names)
            for k in names[k0:] + names[:k0]:
                samples[k].append(fns[k]())
            reps += 1
            spent = time.perf_counter() - t_start
            per_rep = spent / reps
            if reps >= cfg["max_reps"]:
                break
            if reps >= cfg["min_reps"] and spent + per_rep > cfg["target_s"] * len(fns):
                break
        return samples

    train_modes = [m for m in modes if m in ("fwd", "fwdbwd")]
    if train_modes:
        progress.step(f"d{d} h{h} s{s} b{b} {dtype_name} train")
        impls = {"addnorm": ours, "torch": ref}
        if ref_c is not None:
            impls["torch_compile"] = ref_c
        xg = x.detach().clone().requires_grad_(True)

        def make_fn(layer):
            layer.train()

            def fn():
                for p in layer.parameters():
                    p.grad = None
                xg.grad = None
                torch.manual_seed(args.seed)
                t0 = clock.mark()
                out = layer(xg)
                t1 = clock.mark()
                out.backward(grad_out)
                t2 = clock.mark()
                clock.sync()
                return clock.elapsed(t0, t1), clock.elapsed(t0, t2)
            return fn

        fns = {k: make_fn(v) for k, v in impls.items()}
        if "torch_compile" in fns:
            fns["torch_compile"]()  # compiles forward and backward (the warm-up runs it again)
        samples = run_reps(fns, 2, "train")
        # The memory of a training step (after the timed runs: warm caches), from a start
        # without gradients: on CUDA the peak above that start, on the CPU the bytes
        # autograd saves.
        def step_memory(k):
            for p in impls[k].parameters():
                p.grad = None
            xg.grad = None
            return sc.step_memory_bytes(fns[k], cuda, [*impls[k].parameters(), xg])
        memory = {k: step_memory(k) for k in ("addnorm", "torch")}
        for mode, idx in (("fwd", 0), ("fwdbwd", 1)):
            if mode not in modes:
                continue
            med = {k: statistics.median(t[idx] for t in v) for k, v in samples.items()}
            rows.append(dict(base, mode=mode, times=med, reps=len(samples["addnorm"]),
                             ratios={k: med[k] / med["addnorm"] for k in med if k != "addnorm"},
                             **(dict(memory=memory, mn_bytes=x.numel() * x.element_size())
                                if mode == "fwdbwd" else {})))
    if "eval" in modes:
        progress.step(f"d{d} h{h} s{s} b{b} {dtype_name} eval")
        ours.eval()
        ref.eval()

        def make_eval_fn(layer):
            def fn():
                with torch.no_grad():
                    t0 = clock.mark()
                    layer(x)
                    t1 = clock.mark()
                clock.sync()
                return clock.elapsed(t0, t1)
            return fn

        def fn_eager():
            prev = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                with torch.no_grad():
                    t0 = clock.mark()
                    ref(x)
                    t1 = clock.mark()
                clock.sync()
            finally:
                torch.backends.mha.set_fastpath_enabled(prev)
            return clock.elapsed(t0, t1)

        # Which path torch took, and how far the outputs are apart.
        with torch.no_grad():
            out_ours = ours(x).float()
            with _FastpathProbe() as probe:
                out_fast = ref(x).float()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                out_eager = ref(x).float()
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
        fastpath_used = probe.calls > 0
        diffs = {"torch_fastpath": (out_ours - out_fast).abs().max().item(),
                 "torch_eager": (out_ours - out_eager).abs().max().item()}
        del out_ours, out_fast, out_eager
        fns = {"addnorm": make_eval_fn(ours), "torch_fastpath": make_eval_fn(ref),
               "torch_eager": fn_eager}
        if ref_c is not None:
            fns["torch_compile"] = make_eval_fn(ref_c)
            fns["torch_compile"]()  # compiles (the warm-up runs it again)
        samples = run_reps(fns, 1, "eval")
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append(dict(base, mode="eval", times=med, reps=len(samples["addnorm"]),
                         ratios={k: med[k] / med["addnorm"] for k in med if k != "addnorm"},
                         fastpath_used=fastpath_used, max_abs_diff=diffs))
    return rows


def fmt_ms(s):
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e3:.2f}"


def table(results, mode):
    sel = [r for r in results if r["mode"] == mode]
    if not sel:
        return None, []
    if mode == "eval":
        header = ["d_model", "nhead", "seq", "batch", "dtype", "addnorm ms", "torch fast path ms",
                  "torch eager ms", "torch compile ms", "x vs fast path", "x vs eager", "x vs compile",
                  "fast path used", "max abs diff", "reps"]
    else:
        header = ["d_model", "nhead", "seq", "batch", "dtype", "addnorm ms", "torch ms",
                  "torch compile ms", "x vs torch", "x vs compile"]
        header += ["addnorm MiB", "torch MiB", "M×N fewer"] if mode == "fwdbwd" else []
        header += ["reps"]
    rows = []
    for r in sel:
        t, q = r["times"], r["ratios"]
        row = [str(r["d_model"]), str(r["nhead"]), str(r["seq"]), str(r["batch"]), r["dtype"],
               fmt_ms(t["addnorm"])]
        ratio_c = f"{q['torch_compile']:.2f}" if "torch_compile" in q else "-"
        if mode == "eval":
            row += [fmt_ms(t["torch_fastpath"]), fmt_ms(t["torch_eager"]),
                    fmt_ms(t.get("torch_compile")), f"{q['torch_fastpath']:.2f}",
                    f"{q['torch_eager']:.2f}", ratio_c,
                    "yes" if r["fastpath_used"] else "no", f"{r['max_abs_diff']['torch_eager']:.1e}"]
        else:
            row += [fmt_ms(t["torch"]), fmt_ms(t.get("torch_compile")), f"{q['torch']:.2f}", ratio_c]
            if mode == "fwdbwd":
                mem = r["memory"]
                row += [f"{mem['addnorm'] / 2**20:.1f}", f"{mem['torch'] / 2**20:.1f}",
                        f"{(mem['torch'] - mem['addnorm']) / r['mn_bytes']:.1f}"]
        row.append(str(r["reps"]))
        rows.append(row)
    return header, rows


def summary(results):
    lines = []
    for mode in MODES:
        sel = [r for r in results if r["mode"] == mode]
        for key in (("torch_fastpath", "torch_eager") if mode == "eval" else ("torch",)) + ("torch_compile",):
            vals = [r["ratios"][key] for r in sel if key in r["ratios"]]
            if vals:
                gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
                lines.append(f"{MODE_LABEL[mode]}: {key} time / addnorm time, geometric mean "
                             f"{gm:.2f}x over {len(vals)} cases (min {min(vals):.2f}, max {max(vals):.2f})")
    fewer = [(r["memory"]["torch"] - r["memory"]["addnorm"]) / r["mn_bytes"]
             for r in results if r.get("memory")]
    if fewer:
        lines.append(f"training step memory: addnorm holds {min(fewer):.1f} to {max(fewer):.1f} "
                     f"tensors of the input's size (M×N) fewer than torch over {len(fewer)} cases")
    return lines


def markdown(sweep):
    info, cfg = sweep["machine"], sweep["config"]
    lines = [f"# addnorm encoder-layer benchmark ({cfg['device']})", "",
             f"Command: `{info['command']}`  ", f"Date: {info['date']}; source: {info.get('source_revision', 'unknown')}", "",
             "| machine | |", "|---|---|"]
    for k, label in (("cpu_model", "CPU"), ("cpu_cores", "cores"), ("torch_threads", "torch threads"),
                     ("gpu", "GPU"), ("torch_version", "torch"), ("torch_cuda", "torch CUDA"),
                     ("addnorm_version", "addnorm"), ("addnorm_cpu_capability", "addnorm.cpu_capability()"),
                     ("torch_cpu_capability", "torch CPU capability"),
                     ("loadavg_1min", "load average before the run"),
                     ("other_cpu_share", "cores' share busy with other processes during the run")):
        if info.get(k) is not None:
            lines.append(f"| {label} | {info[k]} |")
    lines += ["", f"One layer, batch_first, dim_feedforward = 4 x d_model, activation {cfg['activation']}, "
              f"{'pre-LN (norm_first)' if cfg['norm_first'] else 'post-LN'}, dropout {cfg['dropout']} "
              "in training (off in eval). Median times; `x vs <impl>` = that implementation's time / "
              "addnorm's time, measured in the same run (> 1: addnorm is faster). Training forward and "
              "forward + backward come from the same repetitions. Eval: torch's fast path is "
              "`nn.TransformerEncoderLayer` in eval under `no_grad` "
              "(`torch._transformer_encoder_layer_fwd`; `fast path used` says whether torch took it); "
              "torch eager is the same layer with `torch.backends.mha.set_fastpath_enabled(False)`; "
              "torch compile is `torch.compile` of torch's layer (inductor, compiled before timing); "
              "`max abs diff` is the largest difference of addnorm's output from torch eager's. "
              "Memory of a training step (forward + backward, measured once after the timed runs): "
              + ("the peak of `torch.cuda.max_memory_allocated` above what was allocated before "
                 "the step" if cfg["device"] == "cuda" else
                 "the bytes of the distinct storages autograd saves for backward, the layer's "
                 "parameters and the input left out")
              + "; `M×N fewer` = (torch's - addnorm's) / the bytes of one tensor of the input's "
              "size."
              + (" Half-precision training modes were not run on CPU (`--cpu-bf16-train` runs "
                 "them; torch's bf16 backward is very slow on CPUs without native bf16 matmul)."
                 if cfg["device"] == "cpu" and not cfg.get("cpu_bf16_train") else ""), ""]
    for line in summary(sweep["results"]):
        lines.append(f"- {line}")
    lines.append("")
    for mode in MODES:
        header, rows = table(sweep["results"], mode)
        if not rows:
            continue
        lines += [f"## {MODE_LABEL[mode]}", "", sc.format_md_table(header, rows), ""]
    lines += [f"Run time {sc.fmt_duration(sweep['elapsed_s'])}.", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if addnorm.cuda_available() else "cpu")
    if device == "cuda" and not addnorm.cuda_available():
        print("--device cuda: addnorm has no CUDA kernels here or no GPU is visible", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    dtypes = [t.strip() for t in args.dtypes.split(",") if t.strip()]
    bad = [t for t in dtypes if t not in DTYPES]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad += [m for m in modes if m not in MODES]
    if bad:
        print(f"unknown dtype(s)/mode(s) {bad}", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif args.quick:
        shapes = parse_shapes(QUICK[device])
    else:
        shapes = FULL_GRID if cuda else parse_shapes(CPU_DEFAULT)
    quick = args.quick
    cfg = {
        "device": device, "dtypes": dtypes, "compile": not args.no_compile, "modes": modes, "shapes": shapes,
        "cpu_bf16_train": args.cpu_bf16_train, "dropout": args.dropout, "norm_first": args.norm_first, "activation": args.activation,
        "warmup": args.warmup if args.warmup is not None else (5 if cuda else 1),
        "target_s": args.target_s if args.target_s is not None else
        ((0.1 if quick else 0.5) if cuda else (0.5 if quick else 4.0)),
        "min_reps": args.min_reps if args.min_reps is not None else (10 if cuda else (2 if quick else 3)),
        "max_reps": args.max_reps if args.max_reps is not None else (200 if cuda else (5 if quick else 15)),
    }
    info = sc.machine_info(device)
    print(f"addnorm {info['addnorm_version']} | torch {info['torch_version']} | {device} | "
          f"{info.get('gpu') or info['cpu_model']} | {info['cpu_cores']} cores, "
          f"{info['torch_threads']} threads", file=sys.stderr)
    load = info.get("loadavg_1min")
    if load is not None and load > 0.5 and not cuda:
        print(f"warning: the machine is busy (1-minute load average {load:.2f}); timings will be noisy",
              file=sys.stderr)
    train = int(any(m in modes for m in ("fwd", "fwdbwd")))
    steps = 0
    for dt in dtypes:
        half_cpu = not cuda and DTYPES[dt] != torch.float32 and not args.cpu_bf16_train
        steps += len(shapes) * ((0 if half_cpu else train) + int("eval" in modes))
    progress = sc.Progress(steps, enabled=not args.no_progress)
    t0 = time.perf_counter()
    busy = None if cuda else sc.cpu_snapshot()
    results = []
    for shape in shapes:
        for dt in dtypes:
            case_modes = modes
            if not cuda and DTYPES[dt] != torch.float32 and not args.cpu_bf16_train:
                case_modes = [m for m in modes if m == "eval"]
            if not case_modes:
                continue
            try:
                results += bench_case(shape, dt, case_modes, device, args, cfg, progress)
            except Exception as e:  # e.g. out of memory: report and go on
                print(f"error in {shape} {dt}: {type(e).__name__}: {e}", file=sys.stderr)
                results.append(dict(d_model=shape[0], nhead=shape[1], seq=shape[2], batch=shape[3],
                                    dtype=dt, mode="error", error=f"{type(e).__name__}: {e}"))
            if cuda:
                torch.cuda.empty_cache()
    progress.done()
    if busy is not None:
        sc.note_other_cpu_share(info, busy)
    good = [r for r in results if r["mode"] != "error"]
    sweep = {"machine": info, "config": {**cfg, "shapes": [list(s) for s in shapes]},
             "results": results, "elapsed_s": time.perf_counter() - t0}
    for mode in MODES:
        header, rows = table(good, mode)
        if rows:
            print(f"\n{MODE_LABEL[mode]}")
            print(sc.format_text_table(header, rows))
    print()
    for line in summary(good):
        print(line)
    print(f"total time {sc.fmt_duration(sweep['elapsed_s'])}")
    sweep["results"] = results
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(sweep, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.md:
        sweep_md = dict(sweep, results=good)
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(markdown(sweep_md))
        print(f"wrote {args.md}")
    return 1 if len(good) < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
