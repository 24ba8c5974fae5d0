#!/usr/bin/env python
"""Where an encoder layer's inference forward spends its time: torch.profiler tables of the
kernels (CUDA) or operators (CPU) of addnorm.TransformerEncoderLayer and of torch's inference
fast path (nn.TransformerEncoderLayer in eval under no_grad, which calls
torch._transformer_encoder_layer_fwd), same weights and input, side by side
(scripts/gpu_check.sh's `encoder_profile` step). Where addnorm's layer takes torch's fast
path itself (bfloat16 on the CPU, float16/bfloat16 on CUDA), a third table shows addnorm's
own ops (torch.backends.mha.set_fastpath_enabled(False) around its forwards).

    python scripts/profile_encoder.py [--device cuda] [--shape 1024x16x512x32] [--dtype bf16]

Prints, for each implementation, the total device (or CPU) time per forward and the top
operators/kernels by self time, averaged over --reps profiled forwards after a warm-up.
"""

import argparse
import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

try:
    import addnorm
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import addnorm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="1024x16x512x32", help="d_model x nhead x seq x batch")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--top", type=int, default=15, help="rows of each table")
    args = p.parse_args(argv)
    d, h, s, b = (int(v) for v in args.shape.split("x"))
    dev, dtype = args.device, DTYPES[args.dtype]
    cuda = dev == "cuda"

    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(d, h, 4 * d, 0.1, batch_first=True, device=dev, dtype=dtype)
    ours = addnorm.TransformerEncoderLayer(d, h, 4 * d, 0.1, batch_first=True, device=dev,
                                           dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    ref.eval()
    x = torch.randn(b, s, d, device=dev, dtype=dtype)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with torch.no_grad():
        diff = (ours(x).float() - ref(x).float()).abs().max().item()
        print(f"encoder layer d_model {d}, nhead {h}, seq {s}, batch {b}, {args.dtype}, {dev}, "
              f"eval: max |addnorm - torch fast path| = {diff:.3g}")
        fast_dtype = dtype == torch.bfloat16 or (cuda and dtype == torch.float16)
        runs = [("addnorm", ours, True), ("torch fast path", ref, True)]
        if fast_dtype:
            runs.append(("addnorm's own ops (fast path off)", ours, False))
        prev = torch.backends.mha.get_fastpath_enabled()
        for name, layer, fast in runs:
            torch.backends.mha.set_fastpath_enabled(fast)
            try:
                for _ in range(3):
                    layer(x)
                if cuda:
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(args.reps):
                        layer(x)
                    if cuda:
                        torch.cuda.synchronize()
            finally:
                torch.backends.mha.set_fastpath_enabled(prev)
            events = prof.key_averages()
            total_us = sum(getattr(e, key) for e in events) / args.reps
            print(f"\n== {name}: {total_us / 1000:.3f} ms of {'device' if cuda else 'CPU'} time "
                  f"per forward (self times summed, {args.reps} forwards)")
            print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
