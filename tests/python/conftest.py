"""Shared helpers for the addnorm test suite.

Conventions used by every test file:

* References are computed with torch's own functions (``x + r``, ``F.layer_norm``,
  ``F.rms_norm`` and autograd through them) in float64 on the *same rounded inputs*
  the op sees, then compared against the op's result with a tolerance derived
  only from the result's dtype (see ``assert_close``).
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
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import addnorm  # noqa: E402,F401  (registers torch.ops.addnorm.*)

# --------------------------------------------------------------------------- devices

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes: 'bfloat16' instead of 'dtype2'."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (tests may reseed explicitly too)."""
    torch.manual_seed(0)
    yield


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


# --------------------------------------------------------------------------- data


def make_data(shape, dtype, device, *, scale=3.0, offset=5.0, requires_grad=False):
    """randn*scale+offset generated in float32 then cast (the same values for every dtype)."""
    t = (torch.randn(shape, dtype=torch.float32) * scale + offset).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def make_affine(normalized_shape, dtype, device, *, requires_grad=False):
    w = (1.0 + 0.5 * torch.randn(normalized_shape)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(normalized_shape)).to(device=device, dtype=dtype)
    return w.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def h_dtype_for(x_dtype, residual_dtype, residual_in_fp32):
    """The dtype of h documented in the spec."""
    if x_dtype == torch.float64:
        return torch.float64
    if residual_in_fp32 or residual_dtype == torch.float32:
        return torch.float32
    return x_dtype


# --------------------------------------------------------------------------- ops


def call_add_norm(rms, x, residual, normalized_shape, weight, bias, eps, *,
                  return_residual=True, residual_in_fp32=False):
    if rms:
        return torch.ops.addnorm.add_rms_norm(
            x, residual, list(normalized_shape), weight, eps,
            return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    return torch.ops.addnorm.add_layer_norm(
        x, residual, list(normalized_shape), weight, bias, 1e-5 if eps is None else eps,
        return_residual=return_residual, residual_in_fp32=residual_in_fp32)


def call_norm(rms, x, normalized_shape, weight, bias, eps):
    if rms:
        return torch.ops.addnorm.rms_norm(x, list(normalized_shape), weight, eps)
    return torch.ops.addnorm.layer_norm(x, list(normalized_shape), weight, bias, 1e-5 if eps is None else eps)


def _to64(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def reference_add_norm(rms, x, residual, normalized_shape, weight, bias, eps, *,
                       residual_in_fp32=False, grad_out=None, grad_h=None):
    """float64 reference. Returns dict(h=eager-rounded h in h's dtype, out=float64,
    and grad_<name> float64 for every given tensor with requires_grad).

    eps=None (RMS only) means the machine epsilon of the type torch computes in, as
    F.rms_norm does: float32's for float16/bfloat16/float32 input, float64's for float64.
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
    if rms:
        opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
        e = torch.finfo(opmath).eps if eps is None else eps
        out64 = F.rms_norm(h64, normalized_shape, w64, e)
    else:
        # LayerNorm is shift invariant (values and derivatives), so centering h with a
        # detached mean first does not change the math, but it keeps torch's float64 kernel
        # (y = x * rstd*w + (b - mean * rstd*w)) free of cancellation, e.g. exact zeros for N=1.
        dims = tuple(range(h64.dim() - len(normalized_shape), h64.dim()))
        centered = h64 - h64.detach().mean(dim=dims, keepdim=True) if h64.numel() else h64
        out64 = F.layer_norm(centered, normalized_shape, w64, b64, 1e-5 if eps is None else eps)
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


def grads_of(outputs, grad_outputs, named_inputs):
    """autograd.grad over the (name, tensor) pairs that require grad; returns a dict."""
    named = [(n, t) for n, t in named_inputs if t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [t for _, t in named],
                                [g for _, g in pairs], allow_unused=True, retain_graph=True)
    return {"grad_" + n: g for (n, _), g in zip(named, grads)}


def check_add_norm_against_reference(rms, x, residual, normalized_shape, weight, bias, eps, *,
                                     residual_in_fp32=False, return_residual=True,
                                     backward=True, name=""):
    """Runs the add op forward (and backward with gradients into out and h) and compares
    everything with reference_add_norm. Returns the op's outputs."""
    out, h = call_add_norm(rms, x, residual, normalized_shape, weight, bias, eps,
                           return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    hd = h_dtype_for(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    assert out.dtype == x.dtype, f"{name}: out dtype {out.dtype} != input dtype {x.dtype}"
    assert out.shape == x.shape and out.device == x.device
    if return_residual:
        assert h.dtype == hd, f"{name}: h dtype {h.dtype} != {hd}"
        assert h.shape == x.shape and h.device == x.device
    else:
        assert h.numel() == 0, f"{name}: return_residual=False must return an empty h"
    grad_out = grad_h = None
    if backward:
        grad_out = torch.randn(x.shape, device=x.device).to(out.dtype)
        if return_residual:
            grad_h = torch.randn(x.shape, device=x.device).to(hd)
    ref = reference_add_norm(rms, x, residual, normalized_shape, weight, bias, eps,
                             residual_in_fp32=residual_in_fp32, grad_out=grad_out, grad_h=grad_h)
    if return_residual:
        # h is an elementwise add rounded once: bitwise equal to eager x + r.
        assert torch.equal(h.cpu(), ref["h"].cpu()), f"{name}: h differs from eager x + r"
    assert_close(out, ref["out"], name=f"{name} out")
    if backward:
        named = [("x", x), ("residual", residual), ("weight", weight), ("bias", bias)]
        outs = [out, h] if return_residual else [out]
        gos = [grad_out, grad_h] if return_residual else [grad_out]
        ours = grads_of(outs, gos, named)
        for key, g in ours.items():
            t = dict(named)[key[5:]]
            assert g is not None, f"{name}: {key} is None"
            assert g.dtype == t.dtype, f"{name}: {key} dtype {g.dtype} != {t.dtype}"
            assert_close(g, ref[key], reduced=key in ("grad_weight", "grad_bias"), name=f"{name} {key}")
    return out, h
