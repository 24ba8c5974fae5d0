"""The numerical reference of addnorm, for every test and for the self-check of the main job
(benchmarks/selfcheck.py): the exact math of layer_norm / rms_norm / add + norm, forward and
gradients, the tolerances that results are compared with, and the accuracy bar
(docs/architecture.md, "Numerics").

Two references, for two kinds of check:

* ``reference_add_norm``: float64, computed with torch's own functions (``x + r``,
  ``F.layer_norm``, ``F.rms_norm`` and autograd through them), compared against the op's
  result by ``assert_close``, with a tolerance derived only from the result's dtype.
* ``reference_ld``: numpy's extended precision (x86 long double, 64-bit mantissa), so that it
  is also a meaningful reference for float64 results; it defines the accuracy bar
  (``meets_bar``): addnorm's error against it is no larger than that of torch's own kernel
  (``torch_eager``) on the same input. ``errors_vs_torch`` measures both errors.

Conventions of the float64 reference:

* Why float64 instead of running torch eager in the op's own dtype: torch refuses
  some of the mixed-dtype combinations addnorm supports (its CUDA LayerNorm rejects
  bf16/fp16 input with fp32 weight, pytorch issue 135969; mixed weight/bias dtypes
  are rejected on every device) and, where it accepts them, its result carries its
  own rounding error, so a mismatch could not be attributed. Computing in float64
  and comparing the op's (rounded) result against the unrounded value bounds the
  op's error directly, for every dtype combination, with the same code.
* The normalization is defined on ``h`` rounded to h's dtype (that is what eager
  ``h = x + r; F.layer_norm(h)`` computes), so the reference rounds h exactly like
  eager does and feeds that value into the float64 norm; gradients flow through that
  rounding as the identity (a straight-through estimator), as they do in eager.
  Both references normalize that same h.

This module does not import addnorm: it is math and torch only.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

HALF_DTYPES = [torch.bfloat16, torch.float16]

# --------------------------------------------------------------------------- dtypes, eps


def h_dtype_for(x_dtype, residual_dtype, residual_in_fp32):
    """The dtype of h documented in the spec."""
    if x_dtype == torch.float64:
        return torch.float64
    if residual_in_fp32 or residual_dtype == torch.float32:
        return torch.float32
    return x_dtype


def resolve_eps(rms, eps, x_dtype):
    """The eps an op uses when given ``eps``: LayerNorm's default is 1e-5; RMSNorm's (None)
    is the machine epsilon of the type torch computes in, as F.rms_norm does: float32's for
    float16/bfloat16/float32 input, float64's for float64."""
    if eps is not None:
        return eps
    if not rms:
        return 1e-5
    return torch.finfo(torch.float64 if x_dtype == torch.float64 else torch.float32).eps


# --------------------------------------------------------------------------- tolerances

# Results computed in float32 (float32 data, and the float32 accumulation used for
# bf16/fp16) are held to 1e-5; float64 results to 1e-12.
FP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# bf16/fp16 results: a couple of units in the last place of the *output* dtype,
# plus the float32 noise floor (the kernels accumulate in float32, so a value that is
# tiny because of cancellation carries float32-sized absolute noise).
HALF_ULPS = 2
FP32_NOISE = FP_TOL[torch.float32]
_PRECISION_BITS = {torch.bfloat16: 8, torch.float16: 11}  # including the implicit bit


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's grid at |ref| (ref is float64), subnormals included."""
    p = _PRECISION_BITS[dtype]
    a = ref.abs().clamp_min(torch.finfo(dtype).tiny)
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    return torch.ldexp(torch.ones_like(a), (e - p).to(a.dtype))


def assert_close(actual, expected, *, reduced=False, name="", dtype=None):
    """Compares actual (in its own dtype) with a float64 reference of the same shape.

    reduced=True is for results that are sums over rows (grad_weight, grad_bias): their
    rounding error scales with the magnitude of the sum, so the absolute part of the
    tolerance is taken relative to max|expected| (normwise) instead of 1.

    NaN must match NaN, +-inf must match exactly.
    """
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN positions differ"
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e), f"{name}: inf positions differ"
    assert torch.equal(a[inf_e], e[inf_e]), f"{name}: inf signs differ"
    fin = torch.isfinite(e)
    a, e = a[fin], e[fin]
    if e.numel() == 0:
        return
    scale = e.abs().max().item() if reduced else 1.0
    scale = max(scale, 1e-30)
    if dtype in FP_TOL:
        tol = FP_TOL[dtype]
        allowed = tol * scale + tol * e.abs()
    else:
        allowed = HALF_ULPS * ulp(e, dtype) + FP32_NOISE * scale
    err = (a - e).abs()
    bad = err > allowed
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{e.numel()} elements out of tolerance; "
            f"worst: actual={a[i].item()!r} expected={e[i].item()!r} err={err[i].item():.3e} "
            f"allowed={allowed[i].item():.3e}; max err={err.max().item():.3e}"
        )


# --------------------------------------------------------------------------- float64 reference


def _to64(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def reference_add_norm(rms, x, residual, normalized_shape, weight, bias, eps, *,
                       residual_in_fp32=False, grad_out=None, grad_h=None):
    """float64 reference. Returns dict(h=eager-rounded h in h's dtype, out=float64,
    and grad_<name> float64 for every given tensor with requires_grad).

    eps=None means the op's default (``resolve_eps``).
    """
    normalized_shape = list(normalized_shape)
    hd = h_dtype_for(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    # h exactly as eager computes it (correctly rounded sum in h's dtype).
    with torch.no_grad():
        h_eager = x.to(hd) if residual is None else x.to(hd) + residual.to(hd)
    x64, r64, w64, b64 = _to64(x), _to64(residual), _to64(weight), _to64(bias)
    s64 = x64 if r64 is None else x64 + r64
    # value: the rounded h; gradient: identity (as eager's add / dtype cast).
    h64 = s64 + (h_eager.to(torch.float64) - s64).detach()
    e = resolve_eps(rms, eps, x.dtype)
    if rms:
        out64 = F.rms_norm(h64, normalized_shape, w64, e)
    else:
        # LayerNorm is shift invariant (values and derivatives), so centering h with a
        # detached mean first does not change the math, but it keeps torch's float64 kernel
        # (y = x * rstd*w + (b - mean * rstd*w)) free of cancellation, e.g. exact zeros for N=1.
        dims = tuple(range(h64.dim() - len(normalized_shape), h64.dim()))
        centered = h64 - h64.detach().mean(dim=dims, keepdim=True) if h64.numel() else h64
        out64 = F.layer_norm(centered, normalized_shape, w64, b64, e)
    res = {"h": h_eager, "out": out64.detach()}
    if grad_out is not None or grad_h is not None:
        outs, gos = [], []
        if grad_out is not None:
            outs.append(out64)
            gos.append(grad_out.to(torch.float64))
        if grad_h is not None:
            outs.append(h64)
            gos.append(grad_h.to(torch.float64))
        named = [(n, t) for n, t in (("x", x64), ("residual", r64), ("weight", w64), ("bias", b64))
                 if t is not None and t.requires_grad]
        grads = torch.autograd.grad(outs, [t for _, t in named], gos, allow_unused=True)
        for (n, t), g in zip(named, grads):
            res["grad_" + n] = torch.zeros_like(t) if g is None else g
    return res


# --------------------------------------------------------------------------- extended precision

# x86 extended precision has a 64-bit mantissa (63 stored bits), 11 bits more than float64.
EXTENDED_PRECISION = np.finfo(np.longdouble).nmant >= 63


def to_ld(t):
    """A tensor's values as a numpy long double array (exact for every dtype addnorm takes)."""
    return t.detach().to("cpu", torch.float64).numpy().astype(np.longdouble)


def _row_stats(H, eps, rms):
    """mean (None for RMSNorm) and rstd of the rows of the long double array H (M, N), as
    (M, 1) columns."""
    assert EXTENDED_PRECISION, "the reference needs x86 extended precision long double"
    eps = np.longdouble(eps)
    if rms:
        return None, 1 / np.sqrt((H * H).mean(axis=1, keepdims=True) + eps)
    mu = H.mean(axis=1, keepdims=True)
    return mu, 1 / np.sqrt(((H - mu) ** 2).mean(axis=1, keepdims=True) + eps)


def row_stats_ld(h, eps, rms):
    """(mean, rstd) of the rows of h (M, N) in long double, shape (M,) each; mean is None for
    RMSNorm (whose rstd is that of the mean square)."""
    mu, rstd = _row_stats(to_ld(h), eps, rms)
    return (None if mu is None else mu[:, 0]), rstd[:, 0]


def reference_ld(h, w, b, dy, eps, rms, normalized_shape=None):
    """(out, dh, dw, db) in long double: the norm of h over its trailing normalized_shape (by
    default its last dimension), and the gradients of out (upstream gradient dy) with respect
    to h, the weight and the bias. w=None / b=None mean ones / zeros; eps is a number."""
    ns = tuple(h.shape[-1:] if normalized_shape is None else normalized_shape)
    n = math.prod(ns)
    H, DY = to_ld(h).reshape(-1, n), to_ld(dy).reshape(-1, n)
    W = np.ones(n, np.longdouble) if w is None else to_ld(w).reshape(n)
    B = np.zeros(n, np.longdouble) if b is None else to_ld(b).reshape(n)
    mu, rstd = _row_stats(H, eps, rms)
    xhat = H * rstd if rms else (H - mu) * rstd
    out = xhat * W + (0 if rms else B)
    g = DY * W
    if rms:
        dh = rstd * (g - xhat * (g * xhat).mean(axis=1, keepdims=True))
    else:
        dh = rstd * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    shape = tuple(h.shape)
    return (out.reshape(shape), dh.reshape(shape), (DY * xhat).sum(axis=0).reshape(ns),
            DY.sum(axis=0).reshape(ns))


def max_err(t, ref):
    """max |t - ref| (ref a long double array), as a float."""
    return float(np.abs(to_ld(t) - ref).max())


# --------------------------------------------------------------------------- the accuracy bar

# bf16/fp16: both results are rounded to the same output grid, so their max errors are
# equal unless one of them lands on the other side of a rounding boundary; near a tie
# both choices are ~half an ulp away and which one wins is decided by float32 noise, far
# below one output ulp. 1e-6 * max|ref| covers that float32-level noise and nothing more
# (one bf16 ulp is ~4e-3 relative, one fp16 ulp ~5e-4).
HALF_SLACK = 1e-6


# The kernels meet the bar for every dtype on test_accuracy's inputs (the CUDA kernels also
# in the CUDA emulation, tests/cuda_emulation, against torch's CPU kernels). The CPU's
# float32 output is computed in double lanes and rounded once, so it is within about half an ulp
# of the exact value; the self-check's cases reach a ratio of at most 1.00 (an earlier
# float-lane output reached 1.27 on its float32 LayerNorm over rows of 64).
def meets_bar(err_ours, err_torch, ref_max, dtype):
    """The accuracy bar: addnorm's max error against the long double reference is no larger
    than torch's kernel's on the same input:

        float32 / float64 input:   err_ours / err_torch <= 1  (err_torch = 0 requires
                                   err_ours = 0)
        bfloat16 / float16 input:  err_ours <= err_torch + HALF_SLACK * max|ref|

    dtype is the input's dtype (also for results in another dtype, e.g. a float32 weight's
    gradient). Returns (ok, ratio err_ours / err_torch)."""
    ratio = err_ours / err_torch if err_torch > 0 else (1.0 if err_ours == 0 else float("inf"))
    if dtype in HALF_DTYPES:
        return err_ours <= err_torch + HALF_SLACK * ref_max, ratio
    return ratio <= 1.0, ratio


def torch_eager(x, residual, normalized_shape, weight, bias, eps, rms, grad_out=None, grad_h=None, *,
                residual_in_fp32=False):
    """torch's own kernels on the same input: eager ``h = x + r`` (in h's dtype), then
    F.layer_norm / F.rms_norm (weight and bias as given, or cast up to h's dtype where they
    are narrower: exact), out in x's dtype; backward from grad_out (and grad_h) when given.
    On CUDA, where torch refuses the dtypes (LayerNorm with bfloat16/float16 input and float32
    weight, pytorch issue 135969), on the CPU. eps as given to the op (None: its default).
    Returns dict(h, out, grad_<name> for x, residual, weight and bias where given)."""
    eps = resolve_eps(rms, eps, x.dtype)
    hd = h_dtype_for(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    named = [(n, t) for n, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
             if t is not None]

    def run(dev):
        leaves = {n: t.detach().to(dev, copy=True).requires_grad_() for n, t in named}
        xt, rt = leaves["x"], leaves.get("residual")
        h = xt.to(hd) if rt is None else xt.to(hd) + rt.to(hd)
        wt, bt = (None if leaves.get(k) is None else
                  leaves[k].to(hd) if torch.promote_types(leaves[k].dtype, hd) == hd else leaves[k]
                  for k in ("weight", "bias"))
        ns = list(normalized_shape)
        with warnings.catch_warnings():  # bfloat16/float16 input with a float32 weight: as meant
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            out = (F.rms_norm(h, ns, wt, eps) if rms else F.layer_norm(h, ns, wt, bt, eps)).to(x.dtype)
        pairs = [(o, g.to(dev)) for o, g in ((out, grad_out), (h, grad_h)) if g is not None]
        if pairs and x.numel():
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        res = {"h": h.detach(), "out": out.detach()}
        res.update({"grad_" + n: t.grad for n, t in leaves.items()})
        return res

    try:
        return run(x.device)
    except RuntimeError:
        if x.device.type == "cpu" or all(t.dtype == hd for _, t in named):
            raise
        return run("cpu")


def errors_vs_torch(ours, x, residual, normalized_shape, weight, bias, eps, rms, grad_out=None,
                    grad_h=None, *, residual_in_fp32=False):
    """The errors of addnorm's results and of torch's (``torch_eager``) against the long double
    reference, for the bar (``meets_bar``).

    ours: addnorm's results on these inputs: "out" and "grad_<name>" (x, residual, weight,
    bias) computed with these upstream gradients (grad_out into out, grad_h into the
    returned h); other keys and empty tensors are passed over.
    Returns ({quantity: (err_ours, err_torch, max|ref|)}, torch_eager's results)."""
    theirs = torch_eager(x, residual, normalized_shape, weight, bias, eps, rms, grad_out, grad_h,
                         residual_in_fp32=residual_in_fp32)
    qs = [q for q, t in ours.items() if (q == "out" or q.startswith("grad_")) and t.numel()]
    if not qs:
        return {}, theirs
    dy = torch.zeros_like(theirs["out"]) if grad_out is None else grad_out
    out, dh, dw, db = reference_ld(theirs["h"], weight, bias, dy, resolve_eps(rms, eps, x.dtype), rms,
                                   normalized_shape)
    if grad_h is not None:  # the gradient into the returned h passes straight to x and residual
        dh = dh + to_ld(grad_h)
    ref = {"out": out, "grad_x": dh, "grad_residual": dh, "grad_weight": dw, "grad_bias": db}
    errs = {q: (max_err(ours[q], ref[q]), max_err(theirs[q], ref[q]), float(np.abs(ref[q]).max()))
            for q in qs}
    return errs, theirs
