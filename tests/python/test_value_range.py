"""Finite inputs of any magnitude: forward and every gradient stay right where the squares of
the inputs leave the range of their dtype (|h| from ~1e18 for float32, whose squares overflow
float lanes, and ~1e154 for float64), and with eps = 0 where the variance underflows (float32
|h| below ~1e-23, float64 below ~1e-154): no infinities, no NaN, no zero rows.

References: float32/bfloat16 inputs against torch's float64 kernels on the input scaled by a
power of two (exact), with eps scaled accordingly (LayerNorm/RMSNorm(x; eps) = norm(x / s;
eps / s^2), so the reference sees moderate values); float64 inputs against the long double
reference of reference.py (x86 extended precision has the exponent range for their squares).
Gradients of the input scale like 1 / s and are compared after multiplying both by s (exact).
"""

import math

import numpy as np
import pytest
import torch

from conftest import assert_close
from reference import reference_add_norm, reference_ld, to_ld

NORMS = ["layer_norm", "rms_norm"]
SHAPES = [(4, 768), (2, 4099)]  # register-width rows, and an odd length (scalar tails)
F32_MAX = torch.finfo(torch.float32).max
F64_MAX = torch.finfo(torch.float64).max


def _data(shape, scale, dtype, seed):
    """Uniform in [-scale, scale) (so that a scale near the dtype's max stays finite)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return (u * scale).to(dtype)


def _affine(n, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(dtype)
    gout = torch.randn(2, n, generator=g)  # rows repeated below
    return w, b, gout


def _ours(norm, x, w, b, gout, eps, with_residual):
    """out and the gradients of x, w (and b for LayerNorm) from the addnorm op."""
    rms = norm == "rms_norm"
    xs = x.clone().requires_grad_()
    ws = w.clone().requires_grad_()
    bs = None if rms else b.clone().requires_grad_()
    if with_residual:  # h = x + 0: the add path (and its scratch row) with the same h
        r = torch.zeros_like(x)
        out, _ = (torch.ops.addnorm.add_rms_norm(xs, r, [x.shape[-1]], ws, eps) if rms else
                  torch.ops.addnorm.add_layer_norm(xs, r, [x.shape[-1]], ws, bs, eps))
    else:
        out = (torch.ops.addnorm.rms_norm(xs, [x.shape[-1]], ws, eps) if rms else
               torch.ops.addnorm.layer_norm(xs, [x.shape[-1]], ws, bs, eps))
    grads = torch.autograd.grad(out, [t for t in (xs, ws, bs) if t is not None], gout)
    return out, grads


def _reference_scaled(norm, x, w, b, gout, eps, k):
    """float64 out and gradients (reference_add_norm) of norm(y) for y = x * 2^-k (exact) with
    eps * 2^-2k; the input's gradient is that of y, i.e. the true one multiplied by 2^k."""
    rms = norm == "rms_norm"
    y = (x.double() * 2.0 ** -k).requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = None if rms else b.double().requires_grad_()
    ref = reference_add_norm(rms, y, None, [x.shape[-1]], w64, b64, eps * 2.0 ** (-2 * k), grad_out=gout)
    return ref["out"], [ref["grad_x"], ref["grad_weight"]] + ([] if rms else [ref["grad_bias"]])


def _assert_grad_input(dx, ref_scaled, k, name):
    """dx (in its dtype) against the true gradient times 2^k (float64): elements in the
    dtype's normal range within its usual tolerance after scaling; elements whose true
    value is subnormal in the dtype (bfloat16 keeps a couple of bits there) within one step
    of its subnormal grid."""
    fi = torch.finfo(dx.dtype)
    got = dx.double() * 2.0 ** k
    normal = ref_scaled.abs() >= fi.tiny * 2.0 ** k
    assert_close(got[normal], ref_scaled[normal], dtype=dx.dtype, name=f"{name} grad_input * 2^{k}")
    step = fi.tiny * fi.eps * 2.0 ** k
    err = (got[~normal] - ref_scaled[~normal]).abs()
    assert err.numel() == 0 or err.max().item() <= step, (
        f"{name} grad_input (subnormal range): error {err.max().item():.3e} > {step:.3e}")


def _check(norm, x, w, b, gout, eps, k, with_residual, name):
    gout = gout.to(x.dtype)
    out, grads = _ours(norm, x, w, b, gout, eps, with_residual)
    ref_out, ref_grads = _reference_scaled(norm, x, w, b, gout, eps, k)
    for t, what in [(out, "out")] + list(zip(grads, ["grad_input", "grad_weight", "grad_bias"])):
        assert torch.isfinite(t).all(), f"{name} {what}: not finite"
    assert_close(out, ref_out, name=f"{name} out")
    _assert_grad_input(grads[0], ref_grads[0], k, name)
    for g, rg, what in zip(grads[1:], ref_grads[1:], ["grad_weight", "grad_bias"]):
        assert_close(g, rg, reduced=True, name=f"{name} {what}")


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e18, 4e18, 1e30, F32_MAX / 2, F32_MAX * 0.99],
                         ids=["1e18", "4e18", "1e30", "max_half", "max"])
def test_large_float32_inputs(scale, norm, shape, with_residual):
    """float32 rows up to the largest finite values: the sums of squares are taken in double
    lanes, and the output of rows whose |h - mean| could overflow float is computed in
    double. (Float lanes of 32 squares each overflow from |h| ~ 3e18.)"""
    k = math.frexp(scale)[1]
    x = _data(shape, scale, torch.float32, seed=shape[1])
    w, b, gout = _affine(shape[1], torch.float32, seed=shape[1])
    gout = gout.repeat(shape[0] // 2, 1)
    _check(norm, x, w, b, gout, 1e-5, k, with_residual, f"{norm} float32 scale={scale:g}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e30, F32_MAX / 2, F32_MAX * 0.99],
                         ids=["1e30", "max_half", "max"])
def test_large_bfloat16_inputs(scale, norm):
    """bfloat16 input (float32 weight) at float32-sized magnitudes (near float's largest, h -
    mean itself can leave float's range)."""
    k = math.frexp(scale)[1]
    shape = (4, 768)
    x = _data(shape, scale, torch.bfloat16, seed=3)
    assert torch.isfinite(x).all()
    w, b, gout = _affine(shape[1], torch.float32, seed=3)
    _check(norm, x, w, b, gout.repeat(2, 1), 1e-5, k, False, f"{norm} bfloat16 scale={scale:g}")


def _check_f64_ld(norm, x, w, b, gout, eps, k, name):
    """float64 results against the long double reference; the input's gradient compared
    after multiplying by 2^k."""
    rms = norm == "rms_norm"
    gout = gout.to(x.dtype)
    out, grads = _ours(norm, x, w, b, gout, eps, False)
    ref_out, ref_dh, ref_dw, ref_db = reference_ld(x, w, b, gout, eps, rms)
    for t, what in [(out, "out")] + list(zip(grads, ["grad_input", "grad_weight", "grad_bias"])):
        assert torch.isfinite(t).all(), f"{name} {what}: not finite"

    def f64(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float64))

    assert_close(out, f64(ref_out), name=f"{name} out")
    scaled = torch.from_numpy((to_ld(grads[0]) * np.ldexp(np.longdouble(1), k)).astype(np.float64))
    assert_close(scaled, f64(ref_dh * np.ldexp(np.longdouble(1), k)), dtype=torch.float64,
                 name=f"{name} grad_input * 2^{k}")
    assert_close(grads[1], f64(ref_dw), reduced=True, name=f"{name} grad_weight")
    if not rms:
        assert_close(grads[2], f64(ref_db), reduced=True, name=f"{name} grad_bias")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e155, 1e300, F64_MAX / 2, F64_MAX * 0.99],
                         ids=["1e155", "1e300", "max_half", "max"])
def test_large_float64_inputs(scale, norm):
    """float64 rows whose squares overflow double: the statistics are summed again at a
    power-of-two scale (rare path), the output is computed at that scale, and the backward
    takes h - mean at a scale where it cannot overflow."""
    k = math.frexp(scale)[1]
    x = _data((4, 768), scale, torch.float64, seed=11)
    w, b, gout = _affine(768, torch.float64, seed=11)
    _check_f64_ld(norm, x, w, b, gout.double().repeat(2, 1), 1e-5, k, f"{norm} float64 scale={scale:g}")


# --------------------------------------------------------------------------- eps = 0


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e-20, 1e-24, 1e-30, 1e-37])
def test_eps_zero_tiny_float32_inputs(scale, norm, with_residual):
    """eps = 0 with rows whose variance underflows float32 (|h| below ~1e-23): the
    statistics are summed in double, so the result is finite and right, as the math says
    (torch's float32 kernels give +-inf; addnorm gave NaN)."""
    k = math.frexp(scale)[1]
    x = _data((4, 768), scale, torch.float32, seed=5)
    w, b, gout = _affine(768, torch.float32, seed=5)
    _check(norm, x, w, b, gout.repeat(2, 1), 0.0, k, with_residual,
           f"{norm} float32 eps=0 scale={scale:g}")


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_tiny_bfloat16_inputs(norm):
    """eps = 0, bfloat16 input with float32 weight, |h| ~ 1e-30."""
    k = math.frexp(1e-30)[1]
    x = _data((4, 768), 1e-30, torch.bfloat16, seed=6)
    w, b, gout = _affine(768, torch.float32, seed=6)
    _check(norm, x, w, b, gout.repeat(2, 1), 0.0, k, False, f"{norm} bfloat16 eps=0")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", [1e-160, 1e-300])
def test_eps_zero_tiny_float64_inputs(scale, norm):
    """eps = 0 with float64 rows whose squares underflow (1e-160: subnormal squares; 1e-300:
    squares below the smallest subnormal): the statistics are summed again at a
    power-of-two scale."""
    k = math.frexp(scale)[1]
    x = _data((4, 768), scale, torch.float64, seed=7)
    w, b, gout = _affine(768, torch.float64, seed=7)
    _check_f64_ld(norm, x, w, b, gout.double().repeat(2, 1), 0.0, k, f"{norm} float64 eps=0")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [1e-310, 5e-324])
def test_subnormal_eps_float64_constant_rows(eps, norm):
    """A subnormal eps with float64 rows that are constant or nearly so: rstd = 1 / sqrt(eps)
    squares past double's range (its Newton step once gave NaN), and rows of large values
    were rescaled by a power of two below 1, where eps underflowed (NaN output); torch's
    kernel gives NaN gradients for some of these rows."""
    rows = [torch.zeros(768), torch.full((768,), 3.0), torch.full((768,), -1e-300),
            torch.arange(768) * 1e-320]
    x = torch.stack([r.double() for r in rows])
    w, b, gout = _affine(768, torch.float64, seed=9)
    k = math.frexp(math.sqrt(eps))[1]  # grad_input scales like 1 / sqrt(eps)
    _check_f64_ld(norm, x, w, b, gout.double().repeat(2, 1), eps, k, f"{norm} eps={eps:g}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [1e-5, 1e-310])
def test_constant_float64_rows_whose_sums_overflow(eps, norm):
    """Constant float64 rows whose sum (LayerNorm) or sum of squares overflows: summed again
    at a scale below 1, where a constant row has no deviations and eps * scale^2 underflows;
    LayerNorm's statistics are then the row's value and 1 / sqrt(eps) (out = bias: it was
    NaN, with NaN or zero gradients)."""
    x = torch.tensor([1e307, -1.2e307, 5e306, 1.7e308], dtype=torch.float64)
    x = x.unsqueeze(1).repeat(1, 768)
    w, b, gout = _affine(768, torch.float64, seed=10)
    rms = norm == "rms_norm"
    k = math.frexp(1 / 1e307)[1] if rms else math.frexp(math.sqrt(eps))[1]
    rows = slice(0, 3) if rms else slice(None)  # (RMSNorm of 1.7e308: a gradient of ~1e-308)
    _check_f64_ld(norm, x[rows], w, b, gout.double().repeat(2, 1)[rows], eps, k,
                  f"{norm} eps={eps:g}")


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_subnormal_float32_rows(norm):
    """eps = 0, float32 rows of subnormal numbers: rstd exceeds float32's range and is saved
    as inf, yet the output is right (normalized in double), and so are the gradients (the
    backward takes the statistics from h, with eps); grad_input itself is +-inf where its
    true value exceeds float32's range, and right elsewhere."""
    k = math.frexp(1e-40)[1]
    x = _data((4, 768), 1e-40, torch.float32, seed=8)
    w, b, gout = _affine(768, torch.float32, seed=8)
    gout = gout.repeat(2, 1).to(x.dtype)
    rms = norm == "rms_norm"
    _, _, _, rstd = torch.ops.addnorm._norm_fwd(x, None, [768], w, None if rms else b, 0.0, rms,
                                                False, False)
    assert torch.isinf(rstd).all()
    out, grads = _ours(norm, x, w, b, gout, 0.0, False)
    ref_out, ref_grads = _reference_scaled(norm, x, w, b, gout, 0.0, k)
    assert_close(out, ref_out, name="out")
    for g, rg, what in zip(grads[1:], ref_grads[1:], ["grad_weight", "grad_bias"]):
        assert_close(g, rg, reduced=True, name=what)
    ref_dx = ref_grads[0] * 2.0 ** -k  # the true grad_input, in float64
    fits = ref_dx.abs() < F32_MAX
    assert (~fits).any() and fits.any()  # both kinds of element occur
    dx = grads[0].double()
    assert torch.equal(torch.isinf(dx), ~fits)
    assert torch.equal(torch.sign(dx[~fits]), torch.sign(ref_dx[~fits]))
    assert_close(dx[fits] * 2.0 ** k, ref_grads[0][fits], dtype=torch.float32, name="grad_input")


# --------------------------------------------------------------------------- rows near their mean


def _exact_layer_norm(row, eps):
    """LayerNorm of a float64 row without weight, exactly (fractions), rounded once."""
    from decimal import Decimal, getcontext
    from fractions import Fraction
    getcontext().prec = 60
    v = [Fraction(t) for t in row]
    mean = sum(v) / len(v)
    var = sum((t - mean) ** 2 for t in v) / len(v) + Fraction(eps)
    if var == 0:
        return [math.nan] * len(v)
    s = (Decimal(var.numerator) / Decimal(var.denominator)).sqrt()
    return [float(Decimal((t - mean).numerator) / Decimal((t - mean).denominator) / s) for t in v]


def _near_mean_rows():
    """float64 rows whose elements are within an ulp or a few of their mean, where the mean's
    double-double low part is as large as an element's difference from its high part."""
    rows = []
    for a in (1.0, 12345.678, 1e16, 2.0 ** 53, 1e30, 7e13):
        b = math.nextafter(a, math.inf)
        rows += [[a, b], [a, b, a], [a, a, b, a, a], [a, math.nextafter(b, math.inf), a]]
    g = torch.Generator().manual_seed(3)
    rows += (1.7e9 + torch.randn(4, 64, generator=g, dtype=torch.float64)).tolist()
    return rows


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-5])
def test_float64_rows_near_their_mean(eps):
    """The float64 variance is the sum of (h - mean)^2 with the mean a double-double: each
    difference is renormalized before it is squared. Squared as dh^2 + 2 dh dl, a difference
    whose low part was as large as its high part (h within an ulp of the mean) lost dl^2, and
    a constant row's variance came out below zero: NaN rows (about 9% of constant rows of
    |h| >= 1e14 with eps 1e-5), and errors of up to 1e3 ulps near a large mean. torch's
    kernel gives [0, 1.414] for [1, 1 + 2^-52] with eps = 0 (exactly [-1, 1])."""
    for row in _near_mean_rows():
        x = torch.tensor([row], dtype=torch.float64)
        got = torch.ops.addnorm.layer_norm(x, [len(row)], None, None, eps)[0]
        ref = torch.tensor(_exact_layer_norm(row, eps), dtype=torch.float64)
        if ref.isnan().any():  # (a constant row with eps = 0: 0 / 0, as torch)
            continue
        err = ((got - ref).abs() / (ref.abs() * 2.0 ** -52).clamp_min(2.0 ** -1074)).max()
        assert err <= 2, f"eps={eps} row {row[:3]}...: {err:.3g} ulps off, {got[:3].tolist()}"
    g = torch.Generator().manual_seed(4)
    const = torch.exp(torch.rand(300, 1, generator=g, dtype=torch.float64) * 40).expand(300, 5)
    for fn in (lambda x: torch.ops.addnorm.layer_norm(x, [5], None, None, eps),
               lambda x: torch.ops.addnorm.add_layer_norm(x, torch.zeros_like(x), [5], None, None, eps)[0]):
        out = fn(const.contiguous())
        if eps > 0:
            assert torch.equal(out, torch.zeros_like(out)), "constant rows: not all zero"
