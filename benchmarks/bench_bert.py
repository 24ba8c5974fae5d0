#!/usr/bin/env python
"""The user's view: the training step of a 12-layer Transformer encoder at BERT-base sizes
(d_model 768, nhead 12, dim_feedforward 3072, seq 512, batch 16, post-LN, gelu, dropout
0.1), torch's nn.TransformerEncoder against the same model after addnorm.replace_modules.

A step is forward, a loss (mean of the output), backward, and the gradients set to None;
on CUDA under bf16 autocast (--dtype), on CPU in float32 by default.

Modes (--modes):
  eager    the step as Python runs it. Reports the wall time per step (median over
           repetitions of --steps steps), on CUDA also the host time to enqueue one step
           (no synchronization inside), and the peak memory of a step
           (torch.cuda.max_memory_allocated above what the model and inputs hold; on CPU,
           the bytes of the storages autograd saves in a step, the model's parameters and
           the input left out: the activations kept for backward).
  graph    CUDA only: the whole step captured once with torch.cuda.graph and replayed (the
           fused dropout draws its seed from the CUDA generator inside the graph, so every
           replay gets fresh masks; torch's dropout does the same).
  compile  torch.compile of the step's forward for both models (default inductor).

Ratios are torch time / addnorm time from the same run (> 1: addnorm faster),
implementations interleaved, medians reported.

Examples:
  python benchmarks/bench_bert.py --device cuda --json benchmarks/results/bert_gpu.json --md benchmarks/results/bert_gpu.md
  python benchmarks/bench_bert.py --device cpu --seq 128 --batch 4 --layers 4 --modes eager
  python benchmarks/bench_bert.py --quick          # tiny sizes, a check that it runs
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as sc  # noqa: E402  (also puts the source tree's package on the path when needed)

import addnorm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when addnorm has CUDA kernels and a GPU is visible")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--nhead", type=int, default=12)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--norm-first", action="store_true", help="pre-LN layers")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="autocast dtype (default cuda bf16; cpu fp32, no autocast)")
    p.add_argument("--modes", default=None, help="comma list of eager, graph, compile "
                   "(default cuda all three, cpu eager)")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (cuda 10, cpu 1)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (cuda 10, cpu 3)")
    p.add_argument("--quick", action="store_true",
                   help="2 layers, d_model 64, seq 32, batch 2, few repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if addnorm.cuda_available() else "cpu"
    cuda = args.device == "cuda"
    if args.quick:
        args.layers, args.d_model, args.nhead, args.seq, args.batch = 2, 64, 4, 32, 2
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.modes = (args.modes or ("eager,graph,compile" if cuda else "eager")).split(",")
    for m in args.modes:
        if m not in ("eager", "graph", "compile"):
            p.error(f"unknown mode {m!r}")
        if m == "graph" and not cuda:
            p.error("--modes graph needs --device cuda")
    args.steps = args.steps or (10 if cuda else 1)
    args.reps = args.reps or (2 if args.quick else (10 if cuda else 3))
    return args


def make_models(args):
    torch.manual_seed(args.seed)
    layer = nn.TransformerEncoderLayer(args.d_model, args.nhead, 4 * args.d_model, args.dropout,
                                       "gelu", batch_first=True, norm_first=args.norm_first)
    theirs = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
    theirs = theirs.to(args.device).train()
    ours = addnorm.replace_modules(copy.deepcopy(theirs)).train()
    return {"addnorm": ours, "torch": theirs}


def make_step(model, x, args, forward=None):
    """One training step (forward, loss, backward, grads to None) as a function."""
    forward = model if forward is None else forward
    autocast = args.dtype != "fp32"
    params = list(model.parameters())

    def step():
        with torch.autocast(args.device, dtype=DTYPES[args.dtype], enabled=autocast):
            loss = forward(x).float().mean()
        loss.backward()
        for p in params:
            p.grad = None
        return loss
    return step


def measure(step, args, cuda):
    """(seconds per step, host seconds per step or None): one repetition of args.steps."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    host = (time.perf_counter() - t0) / args.steps
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps, (host if cuda else None)


def run(args):
    cuda = args.device == "cuda"
    models = make_models(args)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.seq, args.d_model, generator=g).to(args.device)
    results = []
    progress = (sc.Progress(len(args.modes) * (len(models) + args.reps))
                if not args.no_progress else None)
    for mode in args.modes:
        steps = {}
        for name, model in models.items():
            if progress:
                progress.step(f"{mode} {name}: preparing")
            if mode == "compile":  # (both models share TransformerEncoder.forward's code:
                # one cache entry each, guarded on the layers' type)
                step = make_step(model, x, args, forward=torch.compile(model))
            else:
                step = make_step(model, x, args)
            for _ in range(2):
                step()  # warm-up (compiles)
            if mode == "graph":
                step = sc.capture_cuda_graph(step).replay
            steps[name] = step
        peak = ({n: sc.step_memory_bytes(s, cuda, [*models[n].parameters(), x])
                 for n, s in steps.items()} if mode == "eager" else {})
        times = {n: [] for n in steps}
        hosts = {n: [] for n in steps}
        names = list(steps)
        for rep in range(args.reps):  # interleaved, the order rotated each repetition
            if progress:
                progress.step(f"{mode}: repetition {rep + 1}/{args.reps}")
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                t, h = measure(steps[n], args, cuda)
                times[n].append(t)
                if h is not None:
                    hosts[n].append(h)
        row = {"mode": mode}
        for n in steps:
            row[f"{n}_ms"] = statistics.median(times[n]) * 1e3
            if hosts[n] and mode == "eager":
                row[f"{n}_host_ms"] = statistics.median(hosts[n]) * 1e3
            if n in peak:
                row[f"{n}_peak_mib"] = peak[n] / 2**20
        row["speedup"] = row["torch_ms"] / row["addnorm_ms"]
        results.append(row)
    if progress:
        progress.done()
    return results


def table(results):
    cols = ["mode", "addnorm_ms", "torch_ms", "speedup", "addnorm_host_ms", "torch_host_ms",
            "addnorm_peak_mib", "torch_peak_mib"]
    cols = [c for c in cols if any(c in r for r in results)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    info = sc.machine_info(args.device)
    print(f"addnorm {addnorm.__version__} | torch {torch.__version__} | {args.device} | "
          f"{args.layers} layers, d_model {args.d_model}, nhead {args.nhead}, seq {args.seq}, "
          f"batch {args.batch}, {args.dtype}, dropout {args.dropout}, "
          f"{'pre' if args.norm_first else 'post'}-LN", flush=True)
    results = run(args)
    print(table(results))
    config = {k: v for k, v in vars(args).items() if k not in ("json", "md")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sc.command_line(), "machine": info, "config": config,
                       "results": results}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# addnorm {args.layers}-layer encoder training step ({args.device})\n\n"
                    f"Command: `{sc.command_line()}`  \nDate: {info['date']}; source: "
                    f"{info['source_revision']}\n\n"
                    f"Machine: {json.dumps(info)}\n\nConfig: {json.dumps(config)}\n\n"
                    "Times are ms per step (medians); speedup = torch / addnorm from the same "
                    "run; peak: on CUDA max_memory_allocated above the model and input, on "
                    "CPU the bytes autograd saves in a step, the model's parameters and the "
                    "input excluded.\n\n" + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
