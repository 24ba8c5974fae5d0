"""Parity of torch.ops.addnorm.* with torch (x + r, F.layer_norm, F.rms_norm), forward and
every gradient (input, residual, weight, bias, and a gradient flowing into the returned h),
over dtypes, sizes, layouts and argument combinations; the internal ops' contracts; opcheck.

Shape coverage is deliberately not the full cross product (2 CPU cores): big N only with a
few rows, many rows only with small N (see SHAPES).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    DEVICES,
    DTYPES,
    HALF_DTYPES,
    assert_close,
    call_add_norm,
    call_norm,
    check_add_norm_against_reference,
    grads_of,
    h_dtype_for,
    make_affine,
    make_data,
    reference_add_norm,
)
from reference import meets_bar, row_stats_ld, to_ld

HIDDEN_SIZES = [1, 7, 64, 768, 1000, 4096, 65536, 100003]
NUM_ROWS = [0, 1, 3, 4097]
# Every (rows, hidden) pair from the two lists whose element count stays small enough
# for a 2-core machine: N up to 100003 with at most 3 rows; 4097 rows only with N <= 64.
MAX_NUMEL = 320_000
SHAPES = [(m, n) for m in NUM_ROWS for n in HIDDEN_SIZES if m * n <= MAX_NUMEL]
NORMS = ["layer_norm", "rms_norm"]
RMS_EPS = 1e-6  # explicit: eps=None is exercised separately (test_rms_eps_none)


def _rms(norm):
    return norm == "rms_norm"


# --------------------------------------------------------------------------- main parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,hidden_size", SHAPES)
def test_add_norm_parity(num_rows, hidden_size, dtype, norm, device):
    """add_layer_norm / add_rms_norm with residual, weight and bias: h equals eager x + r
    bitwise, out and all five gradients match the float64 reference."""
    torch.manual_seed(num_rows * 7 + hidden_size)
    rms = _rms(norm)
    x = make_data((num_rows, hidden_size), dtype, device, requires_grad=True)
    r = make_data((num_rows, hidden_size), dtype, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((hidden_size,), dtype, device, requires_grad=True)
    check_add_norm_against_reference(
        rms, x, r, (hidden_size,), w, None if rms else b, RMS_EPS if rms else 1e-5,
        name=f"{norm} {dtype} {num_rows}x{hidden_size}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,hidden_size", [(0, 64), (1, 1), (3, 7), (5, 1000), (2, 65536), (4097, 7)])
def test_norm_parity(num_rows, hidden_size, dtype, norm, device):
    """layer_norm / rms_norm ops against F.layer_norm / F.rms_norm (float64 reference)."""
    torch.manual_seed(num_rows + hidden_size)
    rms = _rms(norm)
    x = make_data((num_rows, hidden_size), dtype, device, requires_grad=True)
    w, b = make_affine((hidden_size,), dtype, device, requires_grad=True)
    b = None if rms else b
    eps = RMS_EPS if rms else 1e-5
    out = call_norm(rms, x, (hidden_size,), w, b, eps)
    assert out.dtype == dtype and out.shape == x.shape
    gout = torch.randn(x.shape, device=device).to(dtype)
    ref = reference_add_norm(rms, x, None, (hidden_size,), w, b, eps, grad_out=gout)
    assert_close(out, ref["out"], name="out")
    ours = grads_of([out], [gout], [("x", x), ("weight", w), ("bias", b)])
    for key, g in ours.items():
        assert_close(g, ref[key], reduced=key != "grad_x", name=key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
def test_output_memory_format(with_residual, norm, requires_grad, device):
    """Memory format of the results, as torch's functions give it: RMSNorm's output keeps
    the input's (channels_last stays channels_last, as with F.rms_norm), LayerNorm's is
    contiguous (as F.layer_norm's), the returned h is contiguous; values equal torch's."""
    rms = _rms(norm)
    x = make_data((2, 3, 4, 8), torch.float32, device).to(memory_format=torch.channels_last)
    r = (make_data((2, 3, 4, 8), torch.float32, device, scale=1.0, offset=0.0)
         .to(memory_format=torch.channels_last) if with_residual else None)
    w, b = make_affine((8,), torch.float32, device)
    x.requires_grad_(requires_grad)
    if with_residual:
        out, h = call_add_norm(rms, x, r, (8,), w, None if rms else b, RMS_EPS if rms else 1e-5)
        assert h.is_contiguous()
        h_ref = x + r
    else:
        out = call_norm(rms, x, (8,), w, None if rms else b, RMS_EPS if rms else 1e-5)
        h_ref = x
    ref = F.rms_norm(h_ref, [8], w, RMS_EPS) if rms else F.layer_norm(h_ref, [8], w, b, 1e-5)
    assert ref.is_contiguous(memory_format=torch.channels_last) == rms  # torch's choice, checked
    if rms:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if requires_grad:
        (gx,) = torch.autograd.grad(out.pow(2).sum(), [x])
        (gx_ref,) = torch.autograd.grad(ref.pow(2).sum(), [x])
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [768, 4096, 100003])
def test_statistics_within_one_ulp(n, rms, dtype, device):
    """The saved mean and rstd are the row statistics rounded once: within one unit in the
    last place of their dtype (float32; float64 for float64 input) of the statistics of the
    same h in extended precision, in the register path (768, 4096) and the looping path
    (100003). Rows with mean 30 and standard deviation 1 lose digits when summed in float32
    lanes (the variance is 1/900 of the mean square); the kernels sum in double
    (double-double for float64)."""
    import numpy as np

    torch.manual_seed(n + rms)
    m = 3
    x = (torch.randn(m, n, dtype=torch.float64) + 30).to(dtype).to(device)
    eps = 1e-5
    _, _, mean, rstd = torch.ops.addnorm._norm_fwd(x, None, [n], None, None, eps, rms, False, False)
    ref_mean, ref_rstd = row_stats_ld(x, eps, rms)
    stat_eps = np.longdouble(torch.finfo(mean.dtype).eps)

    def ulps(t, ref):
        return float(np.max(np.abs(to_ld(t) - ref) / (np.abs(ref) * stat_eps)))

    assert ulps(rstd, ref_rstd) <= 1.0, f"rstd off by {ulps(rstd, ref_rstd):.2f} ulp"
    if not rms:
        assert ulps(mean, ref_mean) <= 1.0, f"mean off by {ulps(mean, ref_mean):.2f} ulp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
def test_layer_norm_one_element_rows(with_residual, dtype, device):
    """N = 1: h - mean is exactly 0, so the output is exactly beta and the norm passes no
    gradient to h: grad_input is exactly zero (exactly the gradient of the returned h with a
    residual), as torch's kernels return. Pins down that g = dy * gamma is rounded once in
    backward: a fused multiply-add in one of its two uses left the rounding error of dy *
    gamma in grad_input, scaled by rstd = 1/sqrt(eps)."""
    m = 4097
    x = make_data((m, 1), dtype, device, requires_grad=True)
    w, b = make_affine((1,), dtype, device, requires_grad=True)
    gout = torch.randn(m, 1, device=device).to(dtype)
    if with_residual:
        r = make_data((m, 1), dtype, device, scale=1.0, offset=0.0, requires_grad=True)
        out, h = torch.ops.addnorm.add_layer_norm(x, r, [1], w, b, 1e-5)
        gh = torch.randn(m, 1, device=device).to(dtype)
        gx, gr = torch.autograd.grad([out, h], [x, r], [gout, gh])
        assert torch.equal(gr, gh)
        expected = gh
    else:
        out = torch.ops.addnorm.layer_norm(x, [1], w, b, 1e-5)
        (gx,) = torch.autograd.grad(out, [x], gout)
        expected = torch.zeros_like(gx)
    assert torch.equal(out, b.detach().expand(m, 1))
    assert torch.equal(gx, expected), f"max |grad_input - expected| = {(gx - expected).abs().max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 100, 513, 4096])
def test_layer_norm_constant_rows(n, dtype, device):
    """Rows of N equal values: their mean is that value, so h - mean is exactly 0 and the
    output exactly beta (torch's kernels return exactly that); the gradients match the
    reference, where rstd = 1/sqrt(eps) scales every rounding error of the statistics."""
    m = 3
    x = torch.tensor([1.2345678, -4.75, 0.1], dtype=torch.float64).to(dtype)[:, None].expand(m, n)
    x = x.to(device).contiguous().requires_grad_()
    r = torch.zeros(m, n, device=device, dtype=dtype, requires_grad=True)
    w, b = make_affine((n,), dtype, device, requires_grad=True)
    out, _ = check_add_norm_against_reference(False, x, r, (n,), w, b, 1e-5, name=f"constant rows {n}")
    assert torch.equal(out, b.detach().expand(m, n))
    assert torch.equal(torch.ops.addnorm.layer_norm(x, [n], w, b, 1e-5), b.detach().expand(m, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1])
def test_layer_norm_eps(eps, dtype, device):
    """eps enters as in F.layer_norm (inputs with small variance so eps matters)."""
    x = make_data((6, 96), dtype, device, scale=0.05, offset=1.0)
    out = torch.ops.addnorm.layer_norm(x, [96], None, None, eps)
    ref = F.layer_norm(x.double(), [96], None, None, eps)
    assert_close(out, ref, name="out")
    if eps == 0.1:  # the check is sensitive to eps
        assert (F.layer_norm(x.double(), [96], None, None, 1e-5) - ref).abs().max() > 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_rms_eps_none(op, dtype, device):
    """eps=None behaves as in F.rms_norm: torch uses the machine epsilon of the type it
    computes in (float32 for bf16/fp16 inputs, "opmath"), which for float32/float64 inputs is
    torch.finfo(input.dtype).eps. Data with mean square ~ that eps, so a different eps
    would be visible."""
    n = 64
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(opmath).eps
    x = make_data((5, n), dtype, device, scale=eps ** 0.5, offset=0.0)
    w, _ = make_affine((n,), dtype, device)
    if op == "rms_norm":
        out = torch.ops.addnorm.rms_norm(x, [n], w, None)
    else:
        out, _ = torch.ops.addnorm.add_rms_norm(x, torch.zeros_like(x), [n], w, None)
    ref = F.rms_norm(x.double(), [n], w.double(), eps=eps)
    assert_close(out, ref, name="out")
    if device == "cpu":  # torch eager (CPU) with eps=None agrees with that reference.
        assert_close(F.rms_norm(x, [n], w), ref, name="torch eager")
    # Sensitivity: without eps, or with finfo(input dtype).eps for half inputs, the result
    # would differ by far more than the tolerance.
    for other_eps in {0.0, torch.finfo(dtype).eps} - {eps}:
        other = F.rms_norm(x.double(), [n], w.double(), eps=other_eps)
        assert ((other - ref).abs() / ref.abs().clamp_min(1e-3)).max() > 0.05


# --------------------------------------------------------------------------- argument combinations

AFFINE_LN = [(False, False), (True, False), (False, True), (True, True)]  # (weight, bias)
AFFINE_RMS = [(False, False), (True, False)]
AFFINE_CASES = [("layer_norm", w, b) for w, b in AFFINE_LN] + [("rms_norm", w, b) for w, b in AFFINE_RMS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("return_residual", [True, False])
@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("norm,has_weight,has_bias", AFFINE_CASES)
def test_argument_combinations(norm, has_weight, has_bias, has_residual, return_residual, dtype, device):
    """With/without residual, weight, bias; return_residual True/False."""
    rms = _rms(norm)
    shape = (5, 3, 160)
    x = make_data(shape, dtype, device, requires_grad=True)
    r = make_data(shape, dtype, device, scale=1.0, offset=-2.0, requires_grad=True) if has_residual else None
    w, b = make_affine((160,), dtype, device, requires_grad=True)
    check_add_norm_against_reference(
        rms, x, r, (160,), w if has_weight else None, b if has_bias else None,
        RMS_EPS if rms else 1e-5, return_residual=return_residual,
        name=f"{norm} w={has_weight} b={has_bias} r={has_residual} rr={return_residual}")


# --------------------------------------------------------------------------- mixed dtypes

MIXED_CASES = [
    # (input dtype, weight dtype, residual dtype or None, residual_in_fp32)
    (x, w, r, f)
    for x in HALF_DTYPES
    for w in (x, torch.float32)
    for r in (None, x, torch.float32)
    for f in (False, True)
] + [
    (torch.float32, torch.float32, torch.float32, True),
    (torch.float32, torch.float32, None, True),
    (torch.float64, torch.float64, torch.float64, True),  # float64 keeps float64
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("x_dtype,w_dtype,r_dtype,residual_in_fp32", MIXED_CASES)
def test_mixed_dtypes(x_dtype, w_dtype, r_dtype, residual_in_fp32, norm, device):
    """bf16/fp16 input with fp32 weight/bias, fp32 residual with half input, residual_in_fp32.
    out has the input's dtype, h the documented dtype, each gradient its tensor's dtype."""
    rms = _rms(norm)
    torch.manual_seed(1)
    for m, n in [(7, 1000), (4097, 7)]:
        x = make_data((m, n), x_dtype, device, requires_grad=True)
        r = None
        if r_dtype is not None:
            r = make_data((m, n), r_dtype, device, scale=1.0, offset=0.0, requires_grad=True)
        w, b = make_affine((n,), w_dtype, device, requires_grad=True)
        out, h = check_add_norm_against_reference(
            rms, x, r, (n,), w, None if rms else b, RMS_EPS if rms else 1e-5,
            residual_in_fp32=residual_in_fp32, name=f"{norm} x={x_dtype} w={w_dtype} r={r_dtype}")
        expected_h = h_dtype_for(x_dtype, r_dtype, residual_in_fp32)
        assert h.dtype == expected_h
        assert out.dtype == x_dtype


NARROWER_CASES = [  # (input dtype, weight and bias dtype)
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32),
    (torch.float64, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("x_dtype,p_dtype", NARROWER_CASES)
def test_narrower_params_are_widened(x_dtype, p_dtype, norm, device):
    """A weight and bias of a narrower float dtype (torch's F.rms_norm takes them) are read
    widened, which is exact: out, h and every gradient equal those of the call with widened
    copies, the parameters' gradients in their own dtype; with and without a residual, and
    as torch's F.rms_norm (no less accurate)."""
    rms = _rms(norm)
    torch.manual_seed(3)
    wide = torch.float32 if x_dtype in HALF_DTYPES else x_dtype
    x = make_data((5, 96), x_dtype, device, requires_grad=True)
    r = make_data((5, 96), x_dtype, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((96,), p_dtype, device, requires_grad=True)
    w2, b2 = (t.detach().to(wide).requires_grad_() for t in (w, b))
    for residual in (r, None):
        outs = call_add_norm(rms, x, residual, (96,), w, None if rms else b, RMS_EPS)
        outs2 = call_add_norm(rms, x, residual, (96,), w2, None if rms else b2, RMS_EPS)
        grad_outs = [torch.randn_like(o) for o in outs]
        inputs = [("x", x), ("r", residual), ("w", w), ("b", None if rms else b)]
        grads = grads_of(outs, grad_outs, inputs)
        grads2 = grads_of(outs2, grad_outs, [("x", x), ("r", residual), ("w", w2),
                                             ("b", None if rms else b2)])
        for a, e in zip(outs, outs2):
            assert a.dtype == e.dtype and torch.equal(a, e)
        for k in grads:
            assert grads[k].dtype == dict(inputs)[k[5:]].dtype, k
            assert torch.equal(grads[k], grads2[k].to(grads[k].dtype)), k
    if rms:
        expected = F.rms_norm(x.double(), [96], w.double(), RMS_EPS)
        mine = torch.ops.addnorm.rms_norm(x, [96], w, RMS_EPS)
        theirs = F.rms_norm(x, [96], w, RMS_EPS)
        assert mine.dtype == theirs.dtype == x_dtype
        if x_dtype == torch.float64:  # (no wider reference: the same to rounding)
            torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-15)
        else:
            errs = [(t.double() - expected).abs().max().item() for t in (mine, theirs)]
            assert meets_bar(*errs, expected.abs().max().item(), x_dtype)[0], errs
    # one narrower parameter widens both (the kernels read one dtype): a float16 weight
    # with a bfloat16 bias of float16 input was refused as "bias must have the weight's dtype"
    if x_dtype == torch.float16 and not rms:
        out = torch.ops.addnorm.layer_norm(x, [96], w.to(torch.float16), b, 1e-5)
        torch.testing.assert_close(
            out, torch.ops.addnorm.layer_norm(x, [96], w.to(torch.float16).float(), b.float(), 1e-5),
            rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_float32_bias_without_a_weight_is_read_in_float32(dtype, device):
    """A float32 bias and no weight beside float16/bfloat16 input: the bias is read in float32
    (not rounded to the input's dtype first), so out, h and the gradients equal, bit for bit,
    those of the call with a float32 weight of ones; with and without a residual."""
    torch.manual_seed(5)
    x = make_data((64, 40), dtype, device, requires_grad=True)
    r = make_data((64, 40), dtype, device, scale=1.0, offset=0.0)
    b = (torch.randn(40, device=device) * 3).requires_grad_()
    ones = torch.ones(40, device=device)
    op = torch.ops.addnorm.add_layer_norm
    for residual in (None, r):
        out, h = op(x, residual, [40], None, b, 1e-5)
        ref, ref_h = op(x, residual, [40], ones, b, 1e-5)
        assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(h, ref_h)
        g = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (x, b), g), torch.autograd.grad(ref, (x, b), g)):
            assert torch.equal(a, e)
    ln = torch.ops.addnorm.layer_norm
    assert not torch.equal(ln(x, [40], None, b, 1e-5), ln(x, [40], None, b.to(dtype), 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fp32_residual_keeps_precision(dtype, device):
    """With an fp32 residual stream the small increments are not lost to half rounding:
    h = x + r is computed and kept in fp32 (what pre-LN mixed precision training relies on)."""
    r = torch.full((4, 64), 1000.0, device=device)
    x = torch.full((4, 64), 0.25, device=device, dtype=dtype)  # below half's ulp at 1000
    _, h = torch.ops.addnorm.add_layer_norm(x, r, [64])
    assert h.dtype == torch.float32
    assert torch.all(h == 1000.25)
    _, h_half = torch.ops.addnorm.add_layer_norm(x, r.to(dtype), [64])
    assert h_half.dtype == dtype
    assert torch.equal(h_half, x + r.to(dtype))


# --------------------------------------------------------------------------- shapes

ND_CASES = [
    # (input shape, normalized_shape)
    ((16,), (16,)),
    ((3, 16), (16,)),
    ((2, 3, 16), (16,)),
    ((4, 5), (4, 5)),
    ((6, 1, 7), (1, 7)),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape,normalized_shape", ND_CASES)
def test_input_dims(shape, normalized_shape, norm, dtype, device):
    """1-D/2-D/3-D/4-D inputs and multi-dim normalized_shape, for the add op and the plain op."""
    rms = _rms(norm)
    x = make_data(shape, dtype, device, requires_grad=True)
    r = make_data(shape, dtype, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine(normalized_shape, dtype, device, requires_grad=True)
    b = None if rms else b
    eps = RMS_EPS if rms else 1e-5
    check_add_norm_against_reference(rms, x, r, normalized_shape, w, b, eps, name=f"{shape} {normalized_shape}")
    out = call_norm(rms, x, normalized_shape, w, b, eps)
    ref = reference_add_norm(rms, x, None, normalized_shape, w, b, eps)
    assert_close(out, ref["out"], name="plain out")


# --------------------------------------------------------------------------- layouts

LAYOUTS = ["transposed", "sliced", "expanded", "permuted3d", "strided_weight"]


_VIEWS = {
    # layout: (base shape from (m, n), view function)
    "transposed": (lambda m, n: (n, m), lambda t, m: t.t()),
    "sliced": (lambda m, n: (m, n + 1), lambda t, m: t[..., 1:]),
    "expanded": (lambda m, n: (1, n), lambda t, m: t.expand(m, t.shape[-1])),  # row stride 0
    "permuted3d": (lambda m, n: (2, n, m), lambda t, m: t.permute(0, 2, 1)),
    "strided_weight": (lambda m, n: (m, n), lambda t, m: t),  # contiguous input, strided weight
}


def _make_layout(layout, m, n, dtype, device, scale, offset):
    """A leaf 'base' requiring grad and a non-contiguous view of it with rows of n elements."""
    base_shape, view = _VIEWS[layout]
    base = make_data(base_shape(m, n), dtype, device, scale=scale, offset=offset, requires_grad=True)
    return base, view(base, m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous(layout, norm, dtype, device):
    """Non-contiguous input, residual (and weight) give the results of contiguous copies
    (bitwise on the CPU; on CUDA, whose kernel path follows the rows' alignment, within the
    accuracy bar; h bitwise on both), and gradients reach the base tensors."""
    rms = _rms(norm)
    m, n = 6, 72
    xb, x = _make_layout(layout, m, n, dtype, device, 3.0, 5.0)
    rb, r = _make_layout(layout, m, n, dtype, device, 1.0, 0.0)
    if layout == "strided_weight":
        wb = (1.0 + 0.5 * torch.randn(2 * n)).to(device=device, dtype=dtype).requires_grad_()
        w = wb[::2]
        assert not w.is_contiguous()
    else:
        assert not x.is_contiguous() and not r.is_contiguous()
        wb, _ = make_affine((n,), dtype, device, requires_grad=True)
        w = wb
    _, b = make_affine((n,), dtype, device, requires_grad=True)
    b = None if rms else b
    eps = RMS_EPS if rms else 1e-5
    out, h = check_add_norm_against_reference(rms, x, r, (n,), w, b, eps, name=layout)
    # Against the op on contiguous copies.
    out_c, h_c = call_add_norm(rms, x.contiguous(), r.contiguous(), (n,), w.contiguous(),
                               None if b is None else b.contiguous(), eps)
    assert torch.equal(h, h_c)
    if device == "cpu":
        assert torch.equal(out, out_c), "out differs from the contiguous copies'"
    else:
        assert_close(out, out_c.double(), name="out vs contiguous")
    # Gradients reach the bases.
    gout = torch.randn(out.shape, device=device).to(out.dtype)
    gxb, grb, gwb = torch.autograd.grad([out], [xb, rb, wb], [gout])
    assert gxb.shape == xb.shape and grb.shape == rb.shape and gwb.shape == wb.shape
    ref = reference_add_norm(rms, x, r, (n,), w, b, eps, grad_out=gout)
    if not (layout == "expanded" and dtype != torch.float32):
        # (expanded half: the base gradient is torch's own half-precision sum over rows of the
        # op's rounded gradients, not something the op controls; checked via the view above.)
        xb64 = xb.detach().double().requires_grad_()
        exp_gxb = torch.autograd.grad(_VIEWS[layout][1](xb64, m), xb64, ref["grad_x"])[0]
        assert_close(gxb, exp_gxb, reduced=layout == "expanded", name="grad base x")
    if layout == "strided_weight":
        assert torch.all(gwb[1::2] == 0)
        assert_close(gwb[::2], ref["grad_weight"], reduced=True, name="grad strided weight")
    out_plain = call_norm(rms, x, (n,), w, b, eps)
    assert_close(out_plain, reference_add_norm(rms, x, None, (n,), w, b, eps)["out"], name="plain out")


# --------------------------------------------------------------------------- internal ops


def _internal_fwd(x, residual, shape, w, b, eps, is_rms, store, in_fp32):
    return torch.ops.addnorm._norm_fwd(x, residual, list(shape), w, b, eps, is_rms, store, in_fp32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("store_residual", [True, False])
def test_internal_norm_fwd_contract(store_residual, is_rms, dtype, device):
    """_norm_fwd: out, residual_out ([0] when not stored), mean ([0] for RMS) and rstd with
    shape input.shape[:-k] in float32 (float64 for float64)."""
    shape, ns = (2, 3, 4, 5), (4, 5)
    x = make_data(shape, dtype, device)
    r = make_data(shape, dtype, device, scale=1.0, offset=0.0)
    w, b = make_affine(ns, dtype, device)
    b = None if is_rms else b
    eps = 1e-5
    out, res_out, mean, rstd = _internal_fwd(x, r, ns, w, b, eps, is_rms, store_residual, False)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h = x + r
    assert out.dtype == dtype and out.shape == x.shape
    if store_residual:
        assert torch.equal(res_out, h)
    else:
        assert res_out.shape == (0,)
    assert rstd.shape == (2, 3) and rstd.dtype == stat_dtype
    h64 = h.double().flatten(-2)
    if is_rms:
        assert mean.shape == (0,)
        exp_rstd = torch.rsqrt(h64.pow(2).mean(-1) + eps)
    else:
        assert mean.shape == (2, 3) and mean.dtype == stat_dtype
        assert_close(mean, h64.mean(-1), name="mean")
        exp_rstd = torch.rsqrt(h64.var(-1, unbiased=False) + eps)
    assert_close(rstd, exp_rstd, name="rstd")
    ref = reference_add_norm(is_rms, x, r, ns, w, b, eps)
    assert_close(out, ref["out"], name="out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms,has_weight,has_bias", [
    (False, True, True), (False, True, False), (False, False, True), (False, False, False),
    (True, True, False), (True, False, False)])
@pytest.mark.parametrize("with_grad_residual", [True, False])
@pytest.mark.parametrize("with_eps", [False, True], ids=["saved_stats", "eps"])
def test_internal_norm_bwd_contract(with_eps, with_grad_residual, is_rms, has_weight, has_bias, dtype,
                                    device):
    """_norm_bwd: grad_h in h's dtype (including grad_residual_out), grad_weight/grad_bias
    [0] when absent, values equal to the reference gradients; with the forward's eps (the
    CPU kernels then take the statistics from h) and without (mean and rstd as given)."""
    shape, ns = (3, 4, 40), (40,)
    x = make_data(shape, dtype, device, requires_grad=True)
    w, b = make_affine(ns, dtype, device, requires_grad=True)
    w = w if has_weight else None
    b = b if has_bias else None
    eps = 1e-5
    with torch.no_grad():
        out, _, mean, rstd = _internal_fwd(x, None, ns, w, b, eps, is_rms, False, False)
    gout = torch.randn(shape, device=device).to(dtype)
    gres = torch.randn(shape, device=device).to(dtype) if with_grad_residual else None
    grad_h, grad_w, grad_b, _ = torch.ops.addnorm._norm_bwd(
        gout, gres, x.detach(), mean, rstd, None if w is None else w.detach(), has_bias, is_rms,
        **({"eps": eps} if with_eps else {}))
    assert grad_h.dtype == dtype and grad_h.shape == shape
    if w is None:
        assert grad_w.shape == (0,)
    else:
        assert grad_w.shape == ns and grad_w.dtype == w.dtype
    if not has_bias:
        assert grad_b.shape == (0,)
    ref = reference_add_norm(is_rms, x, None, ns, w, b, eps, grad_out=gout, grad_h=gres)
    assert_close(grad_h, ref["grad_x"], name="grad_h")
    if w is not None:
        assert_close(grad_w, ref["grad_weight"], reduced=True, name="grad_weight")
    if has_bias:
        assert_close(grad_b, ref["grad_bias"], reduced=True, name="grad_bias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n", [(300, 72), (40, 1001), (9, 8200)], ids=lambda v: str(v))
@pytest.mark.parametrize("source", ["h_eps", "h_saved_stats", "output"])
@pytest.mark.parametrize("norm,params", [("layer_norm", "wb"), ("layer_norm", "w"),
                                         ("layer_norm", "b"), ("rms_norm", "w")])
@pytest.mark.parametrize("dtypes", ["f32", "bf16", "f16", "bf16_f32h", "f64"])
@pytest.mark.parametrize("with_grad_h", [False, True], ids=["no_grad_h", "grad_h"])
def test_parameter_gradients_alone_are_the_full_backwards(with_grad_h, dtypes, norm, params,
                                                          source, m, n, device):
    """_norm_bwd asked for the weight's and bias's gradients alone (grad_h_wanted=False)
    writes no grad_h and gives the full backward's gradients bitwise: rows in several
    chunks (2, 3, 3), row tails and rows of two or more blocks, from h with the forward's
    eps or with the saved statistics, from the output, a weight alone or a bias alone,
    16-bit data beside a float32 h, a gradient into the returned h (which then goes
    nowhere)."""
    is_rms = norm == "rms_norm"
    torch.manual_seed(m + n)
    dtype = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16}.get(
        dtypes, torch.bfloat16)
    x = (torch.randn(m, n) * 2 + 1).to(device=device, dtype=dtype)
    r = torch.randn(m, n, device=device) if dtypes == "bf16_f32h" else None
    w = (1 + 0.5 * torch.rand(n, device=device)).to(dtype) if "w" in params else None
    b = torch.randn(n, device=device).to(dtype) if "b" in params else None
    eps = 1e-5
    out, h, mean, rstd = torch.ops.addnorm._norm_fwd(x, r, [n], w, b, eps, is_rms, r is not None,
                                                     False)
    h = x if r is None else h
    dy = torch.randn(m, n, device=device).to(dtype)
    gres = torch.randn(m, n, device=device).to(h.dtype) if with_grad_h else None
    from_output = source == "output" and w is not None
    kw = dict(from_output=True, bias=b, h_dtype=h.dtype) if from_output else {}
    if source == "h_eps":
        kw["eps"] = eps

    def bwd(wanted):
        return torch.ops.addnorm._norm_bwd(dy, gres, out if from_output else h, mean, rstd, w,
                                           b is not None, is_rms, grad_h_wanted=wanted, **kw)

    full, alone = bwd(True), bwd(False)
    assert full[0].numel() == m * n and alone[0].numel() == 0
    for k, name in ((1, "weight"), (2, "bias")):
        assert torch.equal(alone[k], full[k]), name
        assert (alone[k].numel() > 0) == (name[0] in params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [40, 1001, 8200])
def test_float32_backward_statistics_from_h(n, is_rms, device):
    """_norm_bwd of float32 data with the forward's eps takes the row statistics from h
    itself, in double: the saved float32 mean and rstd would carry their rounding error into
    every gradient. So a saved rstd three times too large, or a saved mean off by a quarter
    of the spread (it only shifts the sums), changes nothing beyond float32 rounding; without
    eps they are used as given. On CUDA the register path (N = 40), the looping path one
    element at a time (N = 1001) and with 16-byte vectors (N = 8200); with the weight
    gradients and a gradient into h."""
    m, ns, eps = 5, (n,), 1e-5
    torch.manual_seed(n)
    x = make_data((m, n), torch.float32, device, requires_grad=True)
    w, b = make_affine(ns, torch.float32, device, requires_grad=True)
    b = None if is_rms else b
    with torch.no_grad():
        _, _, mean, rstd = _internal_fwd(x, None, ns, w, b, eps, is_rms, False, False)
    gout = torch.randn(m, n, device=device)
    gres = torch.randn(m, n, device=device)
    wrong_mean = mean if is_rms else mean + 0.25 * x.detach().std(-1)
    wrong_rstd = 3.0 * rstd

    def bwd(mean_, rstd_, **kw):
        return torch.ops.addnorm._norm_bwd(gout, gres, x.detach(), mean_, rstd_, w.detach(),
                                           not is_rms, is_rms, **kw)

    ref = reference_add_norm(is_rms, x, None, ns, w, b, eps, grad_out=gout, grad_h=gres)
    names = ["grad_x", "grad_weight"] + ([] if is_rms else ["grad_bias"])
    for label, res in (("saved", bwd(mean, rstd, eps=eps)),
                       ("wrong saved", bwd(wrong_mean, wrong_rstd, eps=eps))):
        for name, got in zip(names, res):
            assert_close(got, ref[name], reduced=name != "grad_x", name=f"{label} stats {name}")
    as_given = bwd(wrong_mean, wrong_rstd)[0]
    assert (as_given - ref["grad_x"]).abs().max() > 1.0, "without eps the statistics are used"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_return_residual_false_outputs(norm, device):
    """return_residual=False: same out as True, second result empty."""
    rms = _rms(norm)
    x = make_data((9, 48), torch.float32, device)
    r = make_data((9, 48), torch.float32, device, scale=1.0, offset=0.0)
    w, b = make_affine((48,), torch.float32, device)
    out1, h1 = call_add_norm(rms, x, r, (48,), w, b, None, return_residual=True)
    out2, h2 = call_add_norm(rms, x, r, (48,), w, b, None, return_residual=False)
    assert h2.numel() == 0
    assert torch.equal(out1, out2)
    assert torch.equal(h1, x + r)


# --------------------------------------------------------------------------- opcheck


def sample_inputs(device, *, requires_grad=False):
    """(op name, args, kwargs) samples for opcheck, in the style of pytorch/extension-cpp.

    requires_grad applies to the public ops only: the internal ops have no autograd kernel
    of their own (autograd is registered on the public ops), so they get plain tensors."""

    def t(*shape, dtype=torch.float32, scale=3.0, offset=5.0, grad=requires_grad):
        return make_data(shape, dtype, device, scale=scale, offset=offset, requires_grad=grad)

    def wb(*shape, dtype=torch.float32, grad=requires_grad):
        return make_affine(shape, dtype, device, requires_grad=grad)

    w, b = wb(16)
    yield "layer_norm", (t(3, 16), [16], w, b, 1e-5), {}
    yield "layer_norm", (t(2, 3, 4, 5), [4, 5], None, None, 1e-3), {}
    w, _ = wb(16)
    yield "rms_norm", (t(3, 16), [16], w, None), {}
    yield "rms_norm", (t(2, 5, 16, dtype=torch.bfloat16), [16], wb(16)[0], 1e-6), {}
    yield "rms_norm", (t(2, 5, 16, dtype=torch.bfloat16), [16], wb(16, dtype=torch.float64)[0], None), {}
    w, b = wb(16)
    yield "add_layer_norm", (t(4, 16), t(4, 16, scale=1.0, offset=0.0), [16], w, b, 1e-5), {}
    yield "add_layer_norm", (t(4, 16), None, [16], None, None, 1e-5), {"return_residual": False}
    w, b = wb(16, dtype=torch.float32)
    yield ("add_layer_norm", (t(2, 3, 16, dtype=torch.bfloat16), t(2, 3, 16, scale=1.0, offset=0.0), [16], w, b, 1e-5),
           {"residual_in_fp32": True})
    w, _ = wb(3, 16)
    yield "add_rms_norm", (t(2, 3, 16), t(2, 3, 16, scale=1.0, offset=0.0), [3, 16], w, 1e-6), {}
    yield ("add_rms_norm", (t(5, 16, dtype=torch.float16), t(5, 16, dtype=torch.float16), [16], None, None),
           {"return_residual": False, "residual_in_fp32": True})
    seed = torch.tensor([123456789, -987654321], dtype=torch.int64, device=device)
    w, b = wb(16)
    yield ("add_layer_norm", (t(4, 16), t(4, 16, scale=1.0, offset=0.0), [16], w, b, 1e-5),
           {"dropout_p": 0.3, "dropout_seed": seed})
    yield ("add_rms_norm", (t(4, 16), None, [16], wb(16)[0], 1e-6),
           {"return_residual": False, "dropout_p": 0.5, "dropout_seed": seed})
    # internal ops
    x = t(4, 16, grad=False)
    r = t(4, 16, scale=1.0, offset=0.0, grad=False)
    w, b = wb(16, grad=False)
    yield "_norm_fwd", (x, r, [16], w, b, 1e-5, False, True, False), {}
    yield "_norm_fwd", (x, None, [16], w, None, 1e-6, True, False, False), {}
    xh = t(2, 3, 16, dtype=torch.bfloat16, grad=False)
    rf = t(2, 3, 16, scale=1.0, offset=0.0, grad=False)
    yield "_norm_fwd", (xh, rf, [16], w, b, 1e-5, False, True, True), {}
    with torch.no_grad():
        _, h, mean, rstd = torch.ops.addnorm._norm_fwd(x, r, [16], w, b, 1e-5, False, True, False)
        _, _, mean_r, rstd_r = torch.ops.addnorm._norm_fwd(x, None, [16], w, None, 1e-6, True, False, False)
    g = t(4, 16, scale=1.0, offset=0.0, grad=False)
    yield "_norm_bwd", (g, g * 0.5, h, mean, rstd, w, True, False), {}
    yield "_norm_bwd", (g, None, x, mean_r, rstd_r, w, False, True), {}
    yield "_norm_bwd", (g, None, x, mean_r, rstd_r, None, False, True), {}
    yield "_norm_bwd", (g, g * 0.5, h, mean, rstd, w, True, False), {"eps": 1e-5}
    yield "_norm_fwd", (x, r, [16], w, b, 1e-5, False, True, False, 0.25, seed), {}
    yield "_dropout_apply", (t(4, 16, scale=1.0, offset=0.0), seed, 0.25), {}
    yield "_dropout_apply", (t(4, 16, scale=1.0, offset=0.0), seed, 0.5), {"dtype": torch.bfloat16}
    yield "_dropout_matmul", (t(2, 3, 4, 5, scale=1.0, offset=0.0), t(2, 3, 5, 6, scale=1.0, offset=0.0), seed, 0.3), {}
    # memory_efficient: the public ops save out; _norm_bwd from the output
    w2, b2 = wb(16)
    yield ("add_layer_norm", (t(4, 16), t(4, 16, scale=1.0, offset=0.0), [16], w2, b2, 1e-5),
           {"memory_efficient": True, "return_residual": False})
    w2, _ = wb(16, dtype=torch.float32)
    yield ("add_rms_norm", (t(2, 3, 16, dtype=torch.bfloat16), t(2, 3, 16, scale=1.0, offset=0.0), [16], w2, 1e-6),
           {"memory_efficient": True, "residual_in_fp32": True})
    with torch.no_grad():
        y, _, _, rstd_y = torch.ops.addnorm._norm_fwd(x, r, [16], w, b, 1e-5, False, False, False)
        yb, _, _, rstd_yb = torch.ops.addnorm._norm_fwd(xh, rf, [16], w, None, 1e-6, True, False, True)
    yield "_norm_bwd", (g, None, y, rstd_y, rstd_y, w, True, False), {"from_output": True, "bias": b}
    gb = t(2, 3, 16, dtype=torch.bfloat16, scale=1.0, offset=0.0, grad=False)
    yield ("_norm_bwd", (gb, rf * 0.5, yb, rstd_yb, rstd_yb, w, False, True),
           {"from_output": True, "h_dtype": torch.float32})
    yield ("_norm_bwd", (g, None, h, mean, rstd, w, True, False),
           {"eps": 1e-5, "dropout_p": 0.25, "dropout_seed": seed, "grad_h_wanted": False})
    # the parameters' gradients alone
    yield "_norm_bwd", (g, g * 0.5, h, mean, rstd, w, True, False), {"eps": 1e-5, "grad_h_wanted": False}


# Static so that collection does not run any op.
_SAMPLE_IDS = [
    "layer_norm-1", "layer_norm-2", "rms_norm-1", "rms_norm-2", "rms_norm-3",
    "add_layer_norm-1", "add_layer_norm-2", "add_layer_norm-3", "add_rms_norm-1", "add_rms_norm-2",
    "add_layer_norm-4", "add_rms_norm-3",
    "_norm_fwd-1", "_norm_fwd-2", "_norm_fwd-3", "_norm_bwd-1", "_norm_bwd-2", "_norm_bwd-3",
    "_norm_bwd-4", "_norm_fwd-4", "_dropout_apply-1", "_dropout_apply-2", "_dropout_matmul-1",
    "add_layer_norm-5", "add_rms_norm-4", "_norm_bwd-5", "_norm_bwd-6", "_norm_bwd-7", "_norm_bwd-8",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(_SAMPLE_IDS)), ids=_SAMPLE_IDS)
def test_opcheck(index, device):
    """torch.library.opcheck (schema, autograd registration, fake tensor, aot dispatch with
    dynamic shapes) on every op, internal ones included."""
    torch.manual_seed(index)
    name, args, kwargs = list(sample_inputs(device, requires_grad=True))[index]
    op = getattr(torch.ops.addnorm, name).default
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_all_ops_have_samples():
    """Every op of the spec is opchecked, and the static test ids match the samples."""
    samples = [n for n, _, _ in sample_inputs("cpu")]
    assert [i.rsplit("-", 1)[0] for i in _SAMPLE_IDS] == samples
    names = set(samples)
    assert names == {"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "_norm_fwd", "_norm_bwd",
                     "_dropout_apply", "_dropout_matmul"}
    for n in names:
        assert hasattr(torch.ops.addnorm, n)


def test_no_grad_and_inference_mode():
    """Ops run under no_grad / inference_mode without building a graph, same values."""
    x = make_data((4, 32), torch.float32, "cpu", requires_grad=True)
    r = make_data((4, 32), torch.float32, "cpu", scale=1.0, offset=0.0)
    w, b = make_affine((32,), torch.float32, "cpu", requires_grad=True)
    out, h = torch.ops.addnorm.add_layer_norm(x, r, [32], w, b)
    with torch.no_grad():
        out2, h2 = torch.ops.addnorm.add_layer_norm(x, r, [32], w, b)
    with torch.inference_mode():
        out3, h3 = torch.ops.addnorm.add_layer_norm(x, r, [32], w, b)
    assert out.requires_grad and not out2.requires_grad and not out3.requires_grad
    assert torch.equal(out, out2) and torch.equal(out, out3)
    assert torch.equal(h, h2) and torch.equal(h, h3)


@pytest.mark.parametrize("rows,n", list(itertools.product([2, 64], [7, 4096])))
def test_outputs_do_not_alias_inputs(rows, n):
    """Results are fresh tensors: writing into them does not change the inputs."""
    x = make_data((rows, n), torch.float32, "cpu")
    r = make_data((rows, n), torch.float32, "cpu")
    x0, r0 = x.clone(), r.clone()
    out, h = torch.ops.addnorm.add_layer_norm(x, r, [n])
    assert out.data_ptr() not in (x.data_ptr(), r.data_ptr())
    assert h.data_ptr() not in (x.data_ptr(), r.data_ptr())
    out.fill_(1.0)
    h.fill_(2.0)
    assert torch.equal(x, x0) and torch.equal(r, r0)
