#!/usr/bin/env python
"""Runs every CUDA kernel path of addnorm once on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize_kernels.py --quick

Covered (forward and backward, the backward with weight and bias partials):
  * every dtype: float32, float64, bfloat16, float16; mixed bf16/fp16 input with float32
    residual, float32 weight/bias and residual_in_fp32;
  * LayerNorm and RMSNorm, with and without residual, weight, bias, stored h, grad into h;
  * every size bucket: several rows per warp (tiny N), warp per row, block per row with one
    and with several rows per CTA, the largest register-path N, the vectorized looping path
    (N just above the register limits: forward and backward limits differ) and the scalar
    looping path (odd N);
  * unaligned (contiguous, storage offset of one element) input, residual, weight, bias,
    grad_out and h, and a sliced view x[..., 1:]; 16 bytes into their buffers (float32
    residual, weight and bias beside bf16/fp16 data: 32-byte vectors read as 16-byte loads);
  * rows not a multiple of the rows per CTA;
  * _dropout_apply (the fused dropout outside the norm) of every dtype and float32 into
    bfloat16/float16: whole groups of eight as vectors, a partial last group, unaligned,
    16 bytes into its buffer.
Results are checked against the CPU kernels (loose tolerances: this is a memory/race
check, the test suite checks accuracy). Exit status 0 when everything ran and matched.
Use PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck so that every tensor is its own
allocation and out-of-bounds accesses are caught.
"""

import argparse
import os
import sys

import torch

try:
    import addnorm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import addnorm  # noqa: F401

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# 16: several rows per warp; 512: warp per row; 768: 64 threads, 2 rows per CTA; 4096: block
# per row; 8200: backward looping for fp32/bf16/fp16 (register limit 8192); 16400: forward
# looping (limit 16384; 8192 for fp64, whose backward limit is 2048); 7, 1001: scalar.
SIZES = [16, 512, 768, 4096, 8200, 16400, 7, 1001]
QUICK_SIZES = [16, 768, 4096, 8200, 16400, 7]
ROWS = 5  # not a multiple of any rows-per-CTA

TOL = {torch.float32: 1e-3, torch.float64: 1e-8, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def unaligned(t):
    """A contiguous copy of t whose data pointer is one element past an aligned address."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def bytes_in(t, nbytes=16):
    """A contiguous copy of t whose data starts nbytes past an aligned allocation: 16 bytes
    in, the vector paths read a 32- or 64-byte vector (float32 beside 16-bit data, the
    float64 dropout) as 16-byte loads."""
    k = nbytes // t.element_size()
    view = torch.empty(t.numel() + k, dtype=t.dtype, device=t.device)[k:].view(t.shape)
    view.copy_(t)
    return view


def close(name, a, b, tol):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= tol * scale:  # also catches NaN
        raise AssertionError(f"{name}: max error {err:.3e} > {tol * scale:.3e}")


def run_case(dev, dtype, n, *, rms, residual, weight, bias, layout, r_dtype=None, w_dtype=None,
             in_fp32=False, grad_h=True, memory_efficient=False, dropout_p=0.0):
    name = (f"{dtype} N={n} rms={rms} residual={residual} weight={weight} bias={bias} "
            f"layout={layout} r_dtype={r_dtype} w_dtype={w_dtype} in_fp32={in_fp32} "
            f"memory_efficient={memory_efficient} dropout_p={dropout_p}")
    g = torch.Generator().manual_seed(n)
    m = ROWS
    x = torch.randn(m, n, generator=g) * 2 + 1
    r = torch.randn(m, n, generator=g) if residual else None
    w = 1 + 0.5 * torch.randn(n, generator=g) if weight else None
    b = 0.5 * torch.randn(n, generator=g) if bias and not rms else None
    gout = torch.randn(m, n, generator=g)
    gh = torch.randn(m, n, generator=g)
    results = {}
    for label, device in (("ref", "cpu"), ("test", dev)):
        def prep(t, dt):
            if t is None:
                return None
            t = t.to(device=device, dtype=dt)
            if label == "test" and layout == "unaligned":
                t = unaligned(t)
            elif label == "test" and layout == "16_bytes_in":
                t = bytes_in(t)
            elif label == "test" and layout == "sliced" and t.dim() == 2:
                wide = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype, device=device)
                wide[:, 1:] = t
                t = wide[:, 1:]
            return t.requires_grad_()
        xs = prep(x, dtype)
        rs = prep(r, r_dtype or dtype)
        ws = prep(w, w_dtype or dtype)
        bs = prep(b, w_dtype or dtype)
        # the same seed on both devices: the same mask (backward from the output with
        # memory_efficient, the input's gradient through the regenerated mask)
        kw = dict(return_residual=True, residual_in_fp32=in_fp32, memory_efficient=memory_efficient,
                  dropout_p=dropout_p,
                  dropout_seed=torch.tensor([5, 7], device=device) if dropout_p else None)
        if rms:
            out, h = torch.ops.addnorm.add_rms_norm(xs, rs, [n], ws, 1e-6, **kw)
        else:
            out, h = torch.ops.addnorm.add_layer_norm(xs, rs, [n], ws, bs, 1e-5, **kw)
        go = prep(gout, out.dtype).detach()
        outs, gos = [out], [go]
        if grad_h:
            outs.append(h)
            gos.append(prep(gh, h.dtype).detach())
        named = [(k, t) for k, t in (("x", xs), ("residual", rs), ("weight", ws), ("bias", bs))
                 if t is not None]
        grads = torch.autograd.grad(outs, [t for _, t in named], gos)
        results[label] = {"out": out, "h": h, **{f"grad_{k}": v for (k, _), v in zip(named, grads)}}
    tol = TOL[dtype]
    for key, ref in results["ref"].items():
        close(f"{name}: {key}", results["test"][key], ref, tol)


def run_internal_bwd(dev, dtype, n, rms):
    """_norm_bwd with unaligned grad_out, grad_residual_out and h (forward stats from CPU)."""
    g = torch.Generator().manual_seed(n + 1)
    m = ROWS
    h = torch.randn(m, n, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    b = None if rms else (0.5 * torch.randn(n, generator=g)).to(dtype)
    _, _, mean, rstd = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
    gout = torch.randn(m, n, generator=g).to(dtype)
    gres = torch.randn(m, n, generator=g).to(dtype)
    ref = torch.ops.addnorm._norm_bwd(gout, gres, h, mean, rstd, w, not rms, rms)
    got = torch.ops.addnorm._norm_bwd(
        unaligned(gout.to(dev)), unaligned(gres.to(dev)), unaligned(h.to(dev)),
        mean.to(dev), rstd.to(dev), unaligned(w.to(dev)), not rms, rms)
    for name, a, e in zip(("grad_h", "grad_weight", "grad_bias"), got, ref):
        close(f"_norm_bwd {dtype} N={n} rms={rms} unaligned: {name}", a, e, TOL[dtype])


def run_dropout_apply(dev, in_dtype, out_dtype, n, layout):
    """_dropout_apply against the CPU kernel's, bitwise (the mask is one function)."""
    g = torch.Generator().manual_seed(n + 3)
    x = torch.randn(n, generator=g).to(in_dtype)
    seed = torch.tensor([5, 7])
    place = {"contiguous": lambda t: t, "unaligned": unaligned, "16_bytes_in": bytes_in}[layout]
    xs = place(x.to(dev))
    got = torch.ops.addnorm._dropout_apply(xs, seed.to(dev), 0.1, out_dtype).cpu()
    ref = torch.ops.addnorm._dropout_apply(x, seed, 0.1, out_dtype)
    if not torch.equal(got, ref):
        raise AssertionError(f"_dropout_apply {in_dtype} -> {out_dtype} n={n} {layout}: differs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and combinations")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: checks this script
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else SIZES
    count = 0
    for dtype in DTYPES:
        for n in sizes:
            for rms in (False, True):
                run_case(dev, dtype, n, rms=rms, residual=True, weight=True, bias=True,
                         layout="contiguous")
                count += 1
                if not args.quick:
                    # no residual, no weight (LayerNorm: bias only), no grad into h
                    run_case(dev, dtype, n, rms=rms, residual=False, weight=False, bias=True,
                             layout="contiguous", grad_h=False)
                    count += 1
            if not args.quick or n in (768, 7):
                run_case(dev, dtype, n, rms=False, residual=True, weight=True, bias=True,
                         layout="unaligned")
                run_internal_bwd(dev, dtype, n, rms=False)
                run_internal_bwd(dev, dtype, n, rms=True)
                count += 3
        run_case(dev, dtype, 64, rms=False, residual=True, weight=True, bias=True, layout="sliced")
        count += 1
        # the fused dropout: backward from the output and from h (the input's gradient
        # written where grad_h is stored; without a residual, grad_h is not written)
        for n in ((768, 8200, 1001) if not args.quick else (768, 1001)):
            for rms in (False, True):
                for lean in (True, False):
                    run_case(dev, dtype, n, rms=rms, residual=True, weight=True, bias=True,
                             layout="contiguous", memory_efficient=lean, dropout_p=0.1)
                    run_case(dev, dtype, n, rms=rms, residual=False, weight=False, bias=True,
                             layout="unaligned", memory_efficient=lean, dropout_p=0.1,
                             grad_h=False)
                    count += 2
    for dtype in (torch.bfloat16, torch.float16):
        for n in ((768, 8200, 16400, 1001) if not args.quick else (768, 16400)):
            for rms in (False, True):
                run_case(dev, dtype, n, rms=rms, residual=True, weight=True, bias=True,
                         layout="contiguous", r_dtype=torch.float32, w_dtype=torch.float32)
                run_case(dev, dtype, n, rms=rms, residual=True, weight=True, bias=False,
                         layout="contiguous", in_fp32=True, w_dtype=torch.float32)
                run_case(dev, dtype, n, rms=rms, residual=True, weight=True, bias=True,
                         layout="16_bytes_in", r_dtype=torch.float32, w_dtype=torch.float32,
                         in_fp32=True)
                count += 3
    for in_dtype, out_dtype in [(t, t) for t in DTYPES] + [(torch.float32, torch.bfloat16),
                                                           (torch.float32, torch.float16)]:
        for n in ((1, 7, 4096, 4101) if not args.quick else (4101,)):
            for layout in ("contiguous", "unaligned", "16_bytes_in"):
                run_dropout_apply(dev, in_dtype, out_dtype, n, layout)
                count += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_kernels: {count} cases ran and matched the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
