#!/usr/bin/env python
"""Runs each main CUDA kernel path of addnorm once at a bandwidth-bound size, for Nsight
Compute (scripts/gpu_check.sh's `profile` step):

    ncu -k regex:norm_ --section SpeedOfLight --section Occupancy ... python scripts/profile_kernels.py

Cases (bf16 unless noted): add_layer_norm forward, register path (8192 x 8192, post-LN
and training: h stored); its backward (register path, weight gradients); the looping paths
at 1024 x 65536 (add_rms_norm forward and backward); fp32 16384 x 1024 forward and backward.
"""

import os
import sys

import torch

try:
    import addnorm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import addnorm  # noqa: F401

CASES = [
    ("layer_norm", torch.bfloat16, 8192, 8192),
    ("rms_norm", torch.bfloat16, 1024, 65536),
    ("layer_norm", torch.float32, 16384, 1024),
]


def main():
    for norm, dtype, m, n in CASES:
        rms = norm == "rms_norm"
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
        r = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
        w = torch.ones(n, device="cuda", dtype=dtype)
        b = None if rms else torch.zeros(n, device="cuda", dtype=dtype)
        eps = 1e-5
        # post-LN forward (h not stored), then the training forward (h stored) and its backward
        torch.ops.addnorm._norm_fwd(x, r, [n], w, b, eps, rms, False, False)
        out, h, mean, rstd = torch.ops.addnorm._norm_fwd(x, r, [n], w, b, eps, rms, True, False)
        torch.ops.addnorm._norm_bwd(x, None, h, mean, rstd, w, not rms, rms)
        torch.cuda.synchronize()
        print(f"{norm} {dtype} {m}x{n}: ran forward (post-LN, training) and backward", flush=True)


if __name__ == "__main__":
    main()
