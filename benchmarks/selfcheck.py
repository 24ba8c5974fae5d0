"""The self-check of the main job (benchmarks/main.py, `make run`): every op
(layer_norm, rms_norm, add_layer_norm, add_rms_norm), forward and gradients, against
PyTorch on several dtypes, shapes and argument combinations, one PASS/FAIL line per check
with its worst error ratio to torch. The returned residual stream ``h`` must equal torch's
``x + r`` bit for bit.

Every result is held to the accuracy bar of the test suite (tests/python/reference.py,
``meets_bar``; docs/architecture.md, "Numerics"): its max error against the long double
reference is no larger than that of torch's own kernel on the same input.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Sequence, Tuple

import torch

from common import DTYPE_NAME, OPS

try:
    import reference
except ImportError:  # running from a source tree: the reference lives with the tests
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
    import reference


class _CheckResult:
    def __init__(self, ok: bool, name: str, detail: str):
        self.ok, self.name, self.detail = ok, name, detail


def _randn(shape, dtype, device, gen, scale=1.0, offset=0.0, noncontig=False):
    if noncontig and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
        t = (t * scale + offset).to(dtype=dtype, device=device).transpose(-1, -2)
        return t
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset
    return t.to(dtype=dtype, device=device)


def _check_one(device: str, op: str, dtype, shape, nshape, *, wdtype="same", rdtype="same",
               residual_in_fp32=False, weight=True, bias=True, noncontig=False, scale=1.0,
               eps="default", residual=True, seed=0) -> _CheckResult:
    import addnorm

    kind, has_res, prenorm = OPS[op]
    has_res = has_res and residual
    gen = torch.Generator().manual_seed(seed)
    wdt = dtype if wdtype == "same" else wdtype
    rdt = (dtype if rdtype == "same" else rdtype) if has_res else None
    hdt = reference.h_dtype_for(dtype, rdt, residual_in_fp32)
    use_bias = bias and kind == "ln"
    if eps == "default":
        eps = 1e-5 if kind == "ln" else None

    x0 = _randn(shape, dtype, device, gen, scale, noncontig=noncontig)
    r0 = _randn(shape, rdt, device, gen, scale) if has_res else None
    w0 = _randn(nshape, wdt, device, gen, 0.5, 1.0) if weight else None
    b0 = _randn(nshape, wdt, device, gen, 0.5) if (weight or bias) and use_bias else None

    def leaf(t):
        if t is None:
            return None
        c = t.detach().clone()
        if noncontig and t is x0:
            c = t.detach().transpose(-1, -2).clone().transpose(-1, -2)
        return c.requires_grad_(True)

    xa, ra, wa, ba = (leaf(t) for t in (x0, r0, w0, b0))
    name = (f"{device:<4} {op:<23} x={DTYPE_NAME[dtype]}"
            + (f" r={DTYPE_NAME[rdt]}" if has_res and rdt != dtype else "")
            + (f" w={DTYPE_NAME[wdt]}" if weight and wdt != dtype else "")
            + (" fp32-residual" if residual_in_fp32 else "")
            + ("" if weight else " no-affine")
            + (" residual=None" if OPS[op][1] and not has_res else "")
            + (" non-contig" if noncontig else "")
            + (f" scale={scale:g}" if scale != 1.0 else "")
            + f" {tuple(shape)}")
    try:
        # ---- addnorm
        if kind == "ln":
            if OPS[op][1]:
                res = addnorm.add_layer_norm(xa, ra, nshape, wa, ba, eps, return_residual=prenorm,
                                             residual_in_fp32=residual_in_fp32)
            else:
                res = addnorm.layer_norm(xa, nshape, wa, ba, eps)
        else:
            if OPS[op][1]:
                res = addnorm.add_rms_norm(xa, ra, nshape, wa, eps, return_residual=prenorm,
                                           residual_in_fp32=residual_in_fp32)
            else:
                res = addnorm.rms_norm(xa, nshape, wa, eps)
        outs_a = tuple(res) if prenorm else (res,)

        problems = []
        if outs_a[0].dtype != dtype:
            problems.append(f"out dtype {outs_a[0].dtype} != {dtype}")
        if tuple(outs_a[0].shape) != tuple(shape):
            problems.append(f"out shape {tuple(outs_a[0].shape)} != {tuple(shape)}")
        if prenorm and outs_a[1].dtype != hdt:
            problems.append(f"h dtype {outs_a[1].dtype} != {hdt}")

        # ---- backward with random upstream gradients (out, and h for pre-LN)
        g_out = _randn(shape, dtype, device, gen)
        g_h = _randn(shape, hdt, device, gen) if prenorm else None
        numel = x0.numel()
        if numel > 0:
            torch.autograd.backward(outs_a, [g_out] if g_h is None else [g_out, g_h])

        ours = {"out": outs_a[0]} if tuple(outs_a[0].shape) == tuple(shape) else {}
        for nm, a in (("grad_x", xa), ("grad_residual", ra), ("grad_weight", wa), ("grad_bias", ba)):
            if a is None or numel == 0:
                continue
            if a.grad is None:
                problems.append(f"{nm} is None")
                continue
            if a.grad.dtype != a.dtype:
                problems.append(f"{nm} dtype {a.grad.dtype} != {a.dtype}")
            if a.grad.shape != a.shape:
                problems.append(f"{nm} shape {tuple(a.grad.shape)} != {tuple(a.shape)}")
                continue
            ours[nm] = a.grad
        for nm, t in ours.items():
            if not torch.isfinite(t).all():
                problems.append(f"{nm} has non-finite values")

        # ---- torch's kernels on the same input, both against the long double reference
        errs, theirs = reference.errors_vs_torch(ours, x0, r0, nshape, w0, b0, eps, kind == "rms",
                                                 g_out, g_h, residual_in_fp32=residual_in_fp32)
        if prenorm and numel > 0:  # must be exactly torch's x + r
            d = (outs_a[1].detach().cpu().double() - theirs["h"].cpu().double()).abs().max().item()
            if not d == 0.0:
                problems.append(f"h differs from torch's x + r by {d:.3g}")
        worst = None  # (ratio, name, err_a, err_t)
        for nm, (err_a, err_t, ref_max) in errs.items():
            ok, ratio = reference.meets_bar(err_a, err_t, ref_max, dtype)
            if not ok:
                problems.append(f"{nm}: max err {err_a:.3g} > torch's {err_t:.3g} (ratio {ratio:.3g})")
            if worst is None or ratio >= worst[0]:
                worst = (ratio, nm, err_a, err_t)
        detail = (f"max err {worst[2]:.2e} (torch {worst[3]:.2e}, ratio {worst[0]:.2f}) [{worst[1]}]"
                  if worst else "empty")
        if problems:
            return _CheckResult(False, name, "; ".join(problems))
        return _CheckResult(True, name, detail)
    except Exception as e:  # an exception is a failure, reported, not raised
        return _CheckResult(False, name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _check_error(device: str, label: str, fn: Callable[[], object], must_contain: str) -> _CheckResult:
    name = f"{device:<4} error: {label}"
    try:
        fn()
    except RuntimeError as e:
        msg = str(e)
        if "addnorm:" in msg and must_contain in msg:
            return _CheckResult(True, name, "RuntimeError raised as specified")
        return _CheckResult(False, name, f"RuntimeError without 'addnorm:'/'{must_contain}': {msg.splitlines()[0][:160]}")
    except Exception as e:
        return _CheckResult(False, name, f"{type(e).__name__} instead of RuntimeError: {str(e)[:160]}")
    return _CheckResult(False, name, "no error raised")


def selfcheck_cases(device: str):
    """(label, thunk) pairs; each thunk returns a _CheckResult."""
    import addnorm

    cases = []
    bf16, fp32, fp16, fp64 = torch.bfloat16, torch.float32, torch.float16, torch.float64
    ops = ("layer_norm", "rms_norm", "add_layer_norm", "add_layer_norm_prenorm",
           "add_rms_norm", "add_rms_norm_prenorm")
    seed = 0

    def add(op, dtype, shape, nshape, **kw):
        nonlocal seed
        seed += 1
        s = seed
        cases.append(lambda: _check_one(device, op, dtype, shape, nshape, seed=s, **kw))

    for op in ops:
        for dtype in (fp32, bf16):
            add(op, dtype, (4, 7, 64), (64,))
            add(op, dtype, (33, 1000), (1000,))
            add(op, dtype, (2, 3, 5, 7), (5, 7))
        add(op, fp16, (4, 7, 64), (64,))
        add(op, fp64, (33, 257), (257,))
    # mixed precision, flags and edge cases
    add("add_layer_norm", bf16, (16, 512), (512,), wdtype=fp32)
    add("add_rms_norm", bf16, (16, 512), (512,), wdtype=fp32)
    add("add_layer_norm_prenorm", bf16, (16, 512), (512,), rdtype=fp32)
    add("add_rms_norm_prenorm", bf16, (16, 512), (512,), residual_in_fp32=True)
    add("add_layer_norm_prenorm", fp16, (16, 512), (512,), residual_in_fp32=True, wdtype=fp32)
    add("add_layer_norm", fp32, (16, 512), (512,), weight=False, bias=False)
    add("add_rms_norm", bf16, (16, 512), (512,), weight=False)
    add("layer_norm", fp32, (24, 96), (96,), noncontig=True)
    add("add_layer_norm", bf16, (24, 96), (96,), noncontig=True)
    add("add_layer_norm_prenorm", fp32, (8, 256), (256,), residual=False)
    add("rms_norm", bf16, (8, 256), (256,), scale=1e-2)   # exposes the eps=None default
    add("layer_norm", fp32, (16, 1), (1,))
    add("add_rms_norm", fp32, (0, 64), (64,))
    add("add_layer_norm_prenorm", fp32, (3, 65537), (65537,))
    add("add_layer_norm", bf16, (5, 16384), (16384,), scale=100.0)

    dev = device

    def int_input():
        x = torch.ones(4, 8, dtype=torch.int32, device=dev)
        torch.ops.addnorm.layer_norm(x, [8], None, None, 1e-5)

    def bad_residual():
        x = torch.randn(4, 8, device=dev)
        r = torch.randn(4, 7, device=dev)
        torch.ops.addnorm.add_layer_norm(x, r, [8], None, None, 1e-5)

    def bad_weight():
        x = torch.randn(4, 8, device=dev)
        torch.ops.addnorm.rms_norm(x, [8], torch.ones(7, device=dev), None)

    cases.append(lambda: _check_error(dev, "integer input", int_input, "input"))
    cases.append(lambda: _check_error(dev, "residual shape mismatch", bad_residual, "residual"))
    cases.append(lambda: _check_error(dev, "weight shape mismatch", bad_weight, "weight"))
    return cases


def run_selfcheck(devices: Sequence[str], stream=None, verbose: bool = True) -> Tuple[int, int]:
    """Runs every check on every device; prints one PASS/FAIL line per check.
    Returns (passed, total)."""
    stream = stream or sys.stdout
    passed = total = 0
    for device in devices:
        t0 = time.perf_counter()
        for thunk in selfcheck_cases(device):
            res = thunk()
            total += 1
            passed += res.ok
            if verbose or not res.ok:
                stream.write(f"{'PASS' if res.ok else 'FAIL'}  {res.name}: {res.detail}\n")
                stream.flush()
        if device == "cuda":
            torch.cuda.synchronize()
        stream.write(f"      ({device}: checks took {time.perf_counter() - t0:.1f}s)\n")
    return passed, total
