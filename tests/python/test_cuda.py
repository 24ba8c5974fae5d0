"""CUDA-only tests of the addnorm kernels: agreement with the CPU kernels (and the float64
reference) over dtypes and every size bucket of the CUDA kernels, unaligned views, CUDA
graph capture and replay, non-default streams, a second device, tensors with more than
2**31 elements, many rows (grid-stride loops) and bitwise-reproducible weight gradients.

The size buckets (see csrc/cuda/norm_kernels.cu): the row lives in registers for
N <= 16384 forward / 8192 backward (float32, bfloat16, float16; 8192 / 2048 for float64)
when every pointer is 16-byte aligned and N a multiple of the vector width, with several
rows per warp for tiny N, a warp per row for small N and a block per row above; larger N
loop over the row with vector loads; odd N and unaligned pointers loop one element at a time.
"""

import os
import subprocess
import sys

import pytest
import torch

import addnorm

from conftest import (
    assert_close,
    assert_stats_close,
    call_add_norm,
    call_norm,
    check_add_norm_against_reference,
    float64_short_rows_weight_grad_failures,
    grads_of,
    half_data_float32_h_failures,
    make_affine,
    make_data,
    one_element_rms_failures,
    past_float_range_case,
    reference_add_norm,
    rstd_past_float_cases,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]
NORMS = ["layer_norm", "rms_norm"]

# One or more sizes per bucket and each bucket's edges (for every dtype's vector width).
HIDDEN_SIZES = [
    1, 7,                       # scalar path, tiny rows (N=2 is left out: its LayerNorm
                                # gradient is pure cancellation, beyond any kernel's 1e-5)
    16, 64, 256,                # several rows per warp
    512, 768,                   # warp per row; 64 threads with 2 rows per CTA
    1000, 1024, 2048, 2056,     # block per row (2056: fp64 backward loops)
    4096, 4099,                 # 4099: odd, scalar looping path
    8192, 8200,                 # backward register limit (fp32/bf16/fp16) and just above
    12288, 16384, 16392,        # forward register limit and just above (vector looping)
    32768, 65536, 100003,       # looping; 100003 odd
    262144,                     # the largest N the issue names
]


def _rows_for(n):
    """Rows per case: many for small N (several CTAs, partial CTAs), few for huge N."""
    return max(3, min(67, (1 << 19) // n))


def _rms(norm):
    return norm == "rms_norm"


def _eps(rms):
    return 1e-6 if rms else 1e-5


def _run_add_norm(rms, device, x, r, w, b, eps, gout, gh, *, residual_in_fp32=False):
    """The add op and its gradients (into out and h) on device; returns a dict of results."""
    def on(t):
        return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)
    xs, rs, ws, bs = on(x), on(r), on(w), on(b)
    out, h = call_add_norm(rms, xs, rs, x.shape[-1:], ws, bs, eps,
                           return_residual=True, residual_in_fp32=residual_in_fp32)
    res = {"out": out, "h": h}
    res.update(grads_of([out, h], [gout.to(device), gh.to(device)],
                        [("x", xs), ("residual", rs), ("weight", ws), ("bias", bs)]))
    return res


def _assert_cpu_cuda_agree(cuda_res, cpu_res, name):
    for key, ref in cpu_res.items():
        got = cuda_res[key]
        assert got.dtype == ref.dtype, f"{name} {key}: dtype {got.dtype} != {ref.dtype}"
        if key == "h":  # an elementwise add rounded once: bitwise the same everywhere
            assert torch.equal(got.cpu(), ref), f"{name}: h differs between CPU and CUDA"
        else:
            assert_close(got, ref.double(), dtype=got.dtype,
                         reduced=key in ("grad_weight", "grad_bias"), name=f"{name} {key} vs CPU")


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
def test_cpu_cuda_agreement(hidden_size, dtype, norm):
    """add_layer_norm / add_rms_norm forward and all gradients: CUDA matches the float64
    reference and the CPU kernels, h is bitwise equal on both, in every size bucket."""
    rms = _rms(norm)
    n, m = hidden_size, _rows_for(hidden_size)
    torch.manual_seed(n)
    x = make_data((m, n), dtype, "cpu", requires_grad=True)
    r = make_data((m, n), dtype, "cpu", scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((n,), dtype, "cpu", requires_grad=True)
    b = None if rms else b
    gout = torch.randn(m, n).to(dtype)
    gh = torch.randn(m, n).to(dtype)
    name = f"{norm} {dtype} {m}x{n}"
    cpu = _run_add_norm(rms, "cpu", x, r, w, b, _eps(rms), gout, gh)
    cuda = _run_add_norm(rms, "cuda", x, r, w, b, _eps(rms), gout, gh)
    _assert_cpu_cuda_agree(cuda, cpu, name)
    ref = reference_add_norm(rms, x, r, (n,), w, b, _eps(rms), grad_out=gout, grad_h=gh)
    assert_close(cuda["out"], ref["out"], name=f"{name} out")
    for key in ("grad_x", "grad_residual", "grad_weight", "grad_bias"):
        if key in ref:
            assert_close(cuda[key], ref[key], reduced=key in ("grad_weight", "grad_bias"),
                         name=f"{name} {key}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [1, 7, 64, 768, 4096, 8200, 16392, 100003])
@pytest.mark.parametrize("affine", [False, True])
def test_plain_norm_and_stats_agreement(affine, hidden_size, dtype, norm):
    """layer_norm / rms_norm without residual (with and without weight/bias), and the
    internal op's mean/rstd, CPU vs CUDA."""
    rms = _rms(norm)
    n, m = hidden_size, _rows_for(hidden_size)
    torch.manual_seed(n + 1)
    x = make_data((m, n), dtype, "cpu")
    w, b = make_affine((n,), dtype, "cpu") if affine else (None, None)
    b = None if rms else b
    eps = _eps(rms)
    out_cpu = call_norm(rms, x, (n,), w, b, eps)
    xc, wc, bc = (None if t is None else t.cuda() for t in (x, w, b))
    out_cuda = call_norm(rms, xc, (n,), wc, bc, eps)
    assert_close(out_cuda, out_cpu.double(), dtype=dtype, name="out vs CPU")
    assert_close(out_cuda, reference_add_norm(rms, x, None, (n,), w, b, eps)["out"], name="out")
    stats_cpu = torch.ops.addnorm._norm_fwd(x, None, [n], w, b, eps, rms, False, False)
    stats_cuda = torch.ops.addnorm._norm_fwd(xc, None, [n], wc, bc, eps, rms, False, False)
    for name, i in (("mean", 2), ("rstd", 3)):
        got, exp = stats_cuda[i], stats_cpu[i]
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        if got.numel():
            assert_close(got, exp.double(), name=f"{name} vs CPU")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("hidden_size", [40, 768, 4096, 8200, 16392, 100003])
@pytest.mark.parametrize("scale", [3e38, 1e-25, 3e-22], ids=["huge", "tiny", "subnormal"])
def test_bfloat16_statistics_past_float_range(scale, hidden_size, norm):
    """bfloat16 rows whose float partial sums leave float's range (sums past 3.4e38 and a
    constant row of such values; squares below 2^-100 with eps = 0, underflowing or
    subnormal): the kernels sum those terms again in double, so out, mean, rstd and grad_h
    (dy of 3e37, of xhat's sign, for the large rows) are the CPU kernels', whose sums are
    double."""
    rms = _rms(norm)
    n, m = hidden_size, 3
    x, w, b, eps, dy = past_float_range_case(m, n, scale, rms, _eps(rms),
                                             torch.Generator().manual_seed(n))
    cuda = [None if t is None else t.cuda() for t in (x, w, b, dy)]
    cpu = torch.ops.addnorm._norm_fwd(x, None, [n], w, b, eps, rms, True, False)
    got = torch.ops.addnorm._norm_fwd(cuda[0], None, [n], cuda[1], cuda[2], eps, rms, True, False)
    assert got[0].isfinite().all(), "out not finite"
    assert_close(got[0], cpu[0].double(), name="out")
    assert_stats_close(got, cpu, x, rms)
    _, h, mean, rstd = cpu
    theirs = torch.ops.addnorm._norm_bwd(dy, None, h, mean, rstd, w, not rms, rms, True, eps)
    ours = torch.ops.addnorm._norm_bwd(cuda[3], None, h.cuda(), mean.cuda(), rstd.cuda(), cuda[1],
                                       not rms, rms, True, eps)
    assert ours[0].isfinite().all(), "grad_h not finite"
    assert_close(ours[0], theirs[0].double(), name="grad_h")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("hidden_size", [40, 768, 4096, 1001, 8200, 16392])
def test_rstd_past_float_range(hidden_size, norm):
    """test_cuda_emulated.test_emulated_rstd_past_float_range_like_cpu on the GPU: bfloat16
    output of rows whose rstd lies past float's range (subnormal-size rows with eps = 0, from
    a bfloat16 or a float32 h; constant rows with eps = 1e-300) gives the CPU kernels' out
    and rstd, out finite."""
    rms = _rms(norm)
    n = hidden_size
    w, b = make_affine((n,), torch.bfloat16, "cpu")
    b = None if rms else b
    wc, bc = w.cuda(), None if b is None else b.cuda()
    for label, x, r, eps in rstd_past_float_cases(3, n, torch.Generator().manual_seed(n)):
        cpu = torch.ops.addnorm._norm_fwd(x, r, [n], w, b, eps, rms, True, False)
        got = torch.ops.addnorm._norm_fwd(x.cuda(), None if r is None else r.cuda(), [n], wc, bc,
                                          eps, rms, True, False)
        assert got[0].isfinite().all(), f"{label}: out not finite"
        assert_close(got[0], cpu[0].double(), name=f"{label}: out")
        assert_close(got[3], cpu[3].double(), name=f"{label}: rstd")


@pytest.mark.parametrize("floats_in", [4, 2])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_float32_params_views_into_a_buffer(norm, floats_in):
    """test_cuda_emulated's test of the vector paths for float32 views 16 bytes into their
    buffers, on the GPU: bfloat16 data with a float32 weight, bias, residual, h and h's
    gradient 16 bytes (the register paths, two 16-byte loads per vector of eight) or 8 bytes
    (the one-element looping path) into a buffer give the results of aligned copies
    (bitwise where the paths are the same) and no misaligned-address fault."""
    rms, (m, n) = norm == "rms_norm", (5, 768)
    x = make_data((m, n), torch.bfloat16, "cuda")
    r = make_data((m, n), torch.float32, "cuda", scale=1.0, offset=0.0)
    w, b = make_affine((n,), torch.float32, "cuda")
    b = None if rms else b
    dy, gres = torch.randn(m, n, device="cuda").to(torch.bfloat16), torch.randn(m, n, device="cuda")

    def into(t, k):
        view = torch.empty(t.numel() + k, dtype=t.dtype, device="cuda")[k:].view(t.shape)
        return view.copy_(t)

    def run(r, w, b, gres, h=None):
        out = torch.ops.addnorm._norm_fwd(x, r, [n], w, b, 1e-5, rms, True, False)
        h = out[1] if h is None else h
        return out + torch.ops.addnorm._norm_bwd(dy, gres, h, out[2], out[3], w, not rms, rms,
                                                 True, 1e-5)

    ref = run(r, w, b, gres)
    k = floats_in
    got = run(into(r, k), into(w, k), None if b is None else into(b, k), into(gres, k),
              into(ref[1], k))
    assert into(w, k).data_ptr() % 32 == 4 * k
    for i, (a, e) in enumerate(zip(got, ref)):
        if k == 4:
            assert torch.equal(a, e), f"result {i} differs from the aligned call's"
        else:
            assert_close(a.cpu(), e.cpu().double(), dtype=a.dtype, reduced=i in (5, 6),
                         name=f"result {i}")


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset"])
@pytest.mark.parametrize("hidden_size", [40, 768, 4096, 1001, 8200, 16392])
def test_bfloat16_rows_near_float_max(hidden_size, aligned):
    """test_cuda_emulated.test_emulated_bfloat16_rows_near_float_max_like_cpu on the GPU:
    bfloat16 LayerNorm rows of 3.3e38 and -3.3e38 (h - mean beyond float's range) give the
    CPU kernels' out, statistics and gradients, all finite."""
    n = hidden_size
    x = torch.full((4, n), -3.3e38).to(torch.bfloat16)
    x[:, 0] = 3.3e38
    x[1::2] *= 0.5
    w, b = make_affine((n,), torch.bfloat16, "cpu")
    dy = torch.randn(4, n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    # (offset: a contiguous view one element into its storage: misaligned vector loads)
    xc = (x.cuda() if aligned else
          torch.empty(4 * n + 1, dtype=x.dtype, device="cuda")[1:].view(4, n))
    xc.copy_(x)
    cpu = torch.ops.addnorm._norm_fwd(x, None, [n], w, b, 1e-5, False, False, False)
    got = torch.ops.addnorm._norm_fwd(xc, None, [n], w.cuda(), b.cuda(), 1e-5, False, False,
                                      False)
    cpu_g = torch.ops.addnorm._norm_bwd(dy, None, x, cpu[2], cpu[3], w, True, False, True, 1e-5)
    got_g = torch.ops.addnorm._norm_bwd(dy.cuda(), None, xc, cpu[2].cuda(), cpu[3].cuda(),
                                        w.cuda(), True, False, True, 1e-5)
    for a, e, what in ((got[0], cpu[0], "out"), (got[2], cpu[2], "mean"), (got[3], cpu[3], "rstd"),
                       (got_g[0], cpu_g[0], "grad_h"), (got_g[1], cpu_g[1], "grad_weight"),
                       (got_g[2], cpu_g[2], "grad_bias")):
        assert a.isfinite().all(), f"{what} not finite"
        assert_close(a.cpu(), e.double(), reduced=what in ("grad_weight", "grad_bias"), name=what)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("hidden_size", [40, 768, 4096, 1001, 8200])
def test_subnormal_eps_float64_constant_rows(hidden_size, norm):
    """test_cuda_emulated.test_emulated_subnormal_eps_float64_like_cpu on the GPU: float64
    constant rows with a subnormal eps give finite out, rstd and gradients, as the CPU's."""
    rms = _rms(norm)
    n = hidden_size
    w, b = make_affine((n,), torch.float64, "cpu")
    b = None if rms else b
    x = torch.tensor([0.0, 3.0, -1e-300], dtype=torch.float64).unsqueeze(1).repeat(1, n)
    dy = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dev = [None if t is None else t.cuda() for t in (x, w, b, dy)]
    for eps in (1e-310, 5e-324):
        cpu = torch.ops.addnorm._norm_fwd(x, None, [n], w, b, eps, rms, False, False)
        got = torch.ops.addnorm._norm_fwd(dev[0], None, [n], dev[1], dev[2], eps, rms, False,
                                          False)
        cpu_g = torch.ops.addnorm._norm_bwd(dy, None, x, cpu[2], cpu[3], w, not rms, rms, True,
                                            eps)
        got_g = torch.ops.addnorm._norm_bwd(dev[3], None, dev[0], got[2], got[3], dev[1], not rms,
                                            rms, True, eps)
        for a, e, what in ((got[0], cpu[0], "out"), (got[3], cpu[3], "rstd"),
                           (got_g[0], cpu_g[0], "grad_h")):
            assert a.isfinite().all(), f"eps={eps:g}: {what} not finite"
            assert_close(a.cpu(), e, name=f"eps={eps:g}: {what}")
        assert_close(got_g[1].cpu(), cpu_g[1], reduced=True, name=f"eps={eps:g}: grad_weight")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_one_element_rms_rows_meet_bar(dtype):
    """test_cuda_emulated.test_emulated_one_element_rms_rows_meet_bar on the GPU: RMSNorm over
    one-element bfloat16/float16 rows, whose input gradient nearly cancels, meets the bar."""
    def fwd(x, w, eps):
        return torch.ops.addnorm._norm_fwd(x.cuda(), None, [1], w.cuda(), None, eps, True, True,
                                           False)[1:]

    def bwd(dy, h, mean, rstd, w, eps):
        g = torch.ops.addnorm._norm_bwd(dy.cuda(), None, h, mean, rstd, w.cuda(), False, True,
                                        True, eps)
        return [t.cpu() for t in g]

    assert one_element_rms_failures(dtype, fwd, bwd) == []


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [768, 1001], ids=["register", "looping"])
def test_half_data_float32_h_backward_meets_bar(n, dtype):
    """test_cuda_emulated.test_emulated_half_data_float32_h_backward_meets_bar on the GPU:
    bfloat16/float16 data with a float32 residual, rows near a large mean; the backward takes
    the statistics of h itself (with the saved float32 mean, weight gradients were up to 10x
    torch's error)."""
    def fwd(x, r, w, b, rms):
        return torch.ops.addnorm._norm_fwd(x.cuda(), r.cuda(), [n], w.cuda(),
                                           None if b is None else b.cuda(), 1e-5, rms, True,
                                           False)[1:]

    def bwd(dy, h, mean, rstd, w, rms):
        g = torch.ops.addnorm._norm_bwd(dy.cuda(), None, h, mean, rstd, w.cuda(), not rms, rms,
                                        True, 1e-5)
        return [None if t is None else t.cpu() for t in g]

    bad = half_data_float32_h_failures(n, dtype, fwd, bwd)
    assert not bad, f"above torch's error: (seed, rms, result, ratio) {bad}"


def test_float64_short_rows_weight_grads_meet_bar():
    """test_cuda_emulated.test_emulated_float64_short_rows_weight_grads_meet_bar on the GPU:
    the register path's float64 weight and bias gradients summed as double-doubles."""
    def fwd(x, w, b, rms):
        return torch.ops.addnorm._norm_fwd(x.cuda(), None, [x.shape[1]], w.cuda(),
                                           None if b is None else b.cuda(), 1e-5, rms, False,
                                           False)[2:]

    def bwd(dy, x, mean, rstd, w, rms):
        g = torch.ops.addnorm._norm_bwd(dy.cuda(), None, x.cuda(), mean, rstd, w.cuda(), not rms,
                                        rms, True, 1e-5)
        return [None if t is None else t.cpu() for t in g]

    bad = float64_short_rows_weight_grad_failures(fwd, bwd)
    assert not bad, f"above torch's error: (M, N, rms, seed, ratio) {bad}"


MIXED = [
    # (input dtype, residual dtype, weight dtype, residual_in_fp32)
    (x, r, w, f)
    for x in HALF_DTYPES
    for r in (x, torch.float32)
    for w in (x, torch.float32)
    for f in (False, True)
]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype,residual_in_fp32", MIXED)
@pytest.mark.parametrize("hidden_size", [64, 768, 4096, 8200, 16392, 4099])
def test_mixed_dtypes_cuda(hidden_size, x_dtype, r_dtype, w_dtype, residual_in_fp32, norm):
    """bf16/fp16 input with fp32 residual and/or fp32 weight/bias and residual_in_fp32, in
    the register, vector-looping and scalar paths: CUDA vs reference and vs CPU."""
    rms = _rms(norm)
    n, m = hidden_size, _rows_for(hidden_size)
    torch.manual_seed(n + 2)
    x = make_data((m, n), x_dtype, "cpu", requires_grad=True)
    r = make_data((m, n), r_dtype, "cpu", scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((n,), w_dtype, "cpu", requires_grad=True)
    b = None if rms else b
    check_add_norm_against_reference(
        rms, x.detach().cuda().requires_grad_(), r.detach().cuda().requires_grad_(), (n,),
        w.detach().cuda().requires_grad_(), None if b is None else b.detach().cuda().requires_grad_(),
        _eps(rms), residual_in_fp32=residual_in_fp32, name=f"{norm} mixed {m}x{n}")
    h_dtype = torch.float32 if (residual_in_fp32 or r_dtype == torch.float32) else x_dtype
    gout = torch.randn(m, n).to(x_dtype)
    gh = torch.randn(m, n).to(h_dtype)
    cpu = _run_add_norm(rms, "cpu", x, r, w, b, _eps(rms), gout, gh, residual_in_fp32=residual_in_fp32)
    cuda = _run_add_norm(rms, "cuda", x, r, w, b, _eps(rms), gout, gh, residual_in_fp32=residual_in_fp32)
    _assert_cpu_cuda_agree(cuda, cpu, f"{norm} mixed {m}x{n}")


# --------------------------------------------------------------------------- layouts


def _unaligned(t):
    """A contiguous tensor equal to t whose data pointer is one element off alignment."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 768, 4096, 16392])
@pytest.mark.parametrize("layout", ["sliced", "unaligned_x", "unaligned_all"])
def test_unaligned_views(layout, hidden_size, dtype, norm):
    """x[..., 1:] views and contiguous tensors at odd addresses (input, residual, weight,
    bias) take the scalar path and give the reference results."""
    rms = _rms(norm)
    n, m = hidden_size, 5
    torch.manual_seed(n + 3)
    if layout == "sliced":
        xb = make_data((m, n + 1), dtype, "cuda")
        rb = make_data((m, n + 1), dtype, "cuda", scale=1.0, offset=0.0)
        x, r = xb[..., 1:], rb[..., 1:]
        w, b = make_affine((n,), dtype, "cuda")
    else:
        x = make_data((m, n), dtype, "cuda")
        r = make_data((m, n), dtype, "cuda", scale=1.0, offset=0.0)
        w, b = make_affine((n,), dtype, "cuda")
        x = _unaligned(x)
        if layout == "unaligned_all":
            r, w, b = _unaligned(r), _unaligned(w), _unaligned(b)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    check_add_norm_against_reference(rms, x, r, (n,), w, None if rms else b, _eps(rms),
                                     name=f"{layout} {norm} {dtype} N={n}")


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [768, 4096, 8200])
def test_internal_bwd_unaligned(hidden_size, dtype, rms):
    """_norm_bwd with grad_out, grad_residual_out, h and weight at odd addresses equals the
    aligned call (up to reduction order) and the CPU kernels."""
    n, m = hidden_size, 7
    torch.manual_seed(n + 4)
    h = make_data((m, n), dtype, "cuda")
    w, b = make_affine((n,), dtype, "cuda")
    b = None if rms else b
    _, _, mean, rstd = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
    gout = torch.randn(m, n, device="cuda").to(dtype)
    gres = torch.randn(m, n, device="cuda").to(dtype)
    aligned = torch.ops.addnorm._norm_bwd(gout, gres, h, mean, rstd, w, not rms, rms)
    odd = torch.ops.addnorm._norm_bwd(_unaligned(gout), _unaligned(gres), _unaligned(h),
                                      mean, rstd, _unaligned(w), not rms, rms)
    cpu = torch.ops.addnorm._norm_bwd(gout.cpu(), gres.cpu(), h.cpu(), mean.cpu(), rstd.cpu(),
                                      w.cpu(), not rms, rms)
    for name, a, o, c in zip(("grad_h", "grad_weight", "grad_bias"), aligned, odd, cpu):
        reduced = name != "grad_h"
        assert_close(o, a.double(), dtype=dtype, reduced=reduced, name=f"{name} unaligned vs aligned")
        assert_close(o, c.double(), dtype=dtype, reduced=reduced, name=f"{name} unaligned vs CPU")


# --------------------------------------------------------------------------- many rows


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(300_001, 16), (70_001, 256), (9_001, 4096), (20_001, 7)])
def test_many_rows(shape, norm):
    """More rows than one wave of CTAs: the grid-stride loops and the per-CTA weight-gradient
    partials over many rows each."""
    rms = _rms(norm)
    m, n = shape
    torch.manual_seed(m)
    x = make_data((m, n), torch.bfloat16, "cuda", requires_grad=True)
    r = make_data((m, n), torch.bfloat16, "cuda", scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((n,), torch.float32, "cuda", requires_grad=True)
    check_add_norm_against_reference(rms, x, r, (n,), w, None if rms else b, _eps(rms),
                                     name=f"many rows {norm} {m}x{n}")


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8192, 1024), (4097, 64), (64, 20000), (4097, 7), (300, 100003)])
def test_weight_grads_bitwise_reproducible(shape, dtype, rms):
    """grad_weight / grad_bias (and grad_h) are bitwise identical from run to run (fixed
    reduction order, no atomics), in the register, vector-looping and scalar paths."""
    m, n = shape
    torch.manual_seed(m + n)
    h = make_data((m, n), dtype, "cuda")
    w, b = make_affine((n,), torch.float32, "cuda")
    b = None if rms else b
    _, _, mean, rstd = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
    gout = torch.randn(m, n, device="cuda").to(dtype)
    first = torch.ops.addnorm._norm_bwd(gout, None, h, mean, rstd, w, not rms, rms)
    for _ in range(4):
        again = torch.ops.addnorm._norm_bwd(gout, None, h, mean, rstd, w, not rms, rms)
        for a, f in zip(again, first):
            assert torch.equal(a, f)
    # and the forward
    out1 = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
    out2 = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
    for a, f in zip(out1, out2):
        assert torch.equal(a, f)



# Runs in a fresh process (ADDNORM_CUDA_MAX_GRID is read once per process): the forward's
# statistics and the backward's gradients of fixed inputs, saved to argv[1].
_GRID_CAP_SCRIPT = """
import sys
import torch
import addnorm  # noqa: F401

results = {}
for m, n in [(8192, 1024), (4097, 64), (3000, 768), (4097, 7), (300, 100003)]:
    for dtype in (torch.float32, torch.bfloat16):
        for rms in (False, True):
            torch.manual_seed(m + n)
            h = (torch.randn(m, n) * 3 + 5).to("cuda", dtype)
            w = (1 + 0.5 * torch.randn(n)).cuda()
            b = None if rms else (0.5 * torch.randn(n)).cuda()
            gout = torch.randn(m, n).to("cuda", dtype)
            fwd = torch.ops.addnorm._norm_fwd(h, None, [n], w, b, 1e-5, rms, False, False)
            _, _, mean, rstd = fwd
            bwd = torch.ops.addnorm._norm_bwd(gout, None, h, mean, rstd, w, not rms, rms)
            results[(m, n, str(dtype), rms)] = [t.cpu() for t in fwd + bwd]
torch.save(results, sys.argv[1])
"""


def test_weight_grads_independent_of_grid_size(tmp_path):
    """grad_weight / grad_bias (and every other result) are bitwise the same whatever grid
    the row kernels run on: the weight-gradient partials come from row chunks fixed by M and
    N, each summed in the same order whichever CTA takes it. ADDNORM_CUDA_MAX_GRID caps the
    grid (1: one CTA does every chunk; 7: CTAs with different numbers of chunks)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(addnorm.__file__)))
    results = {}
    for cap in ["", "1", "7", "100"]:
        env = dict(os.environ, ADDNORM_CUDA_MAX_GRID=cap)
        env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
        out = tmp_path / f"cap{cap or 'none'}.pt"
        subprocess.run([sys.executable, "-c", _GRID_CAP_SCRIPT, str(out)], env=env, check=True)
        results[cap] = torch.load(out)
    for cap in ["1", "7", "100"]:
        for key, ref in results[""].items():
            for i, (a, e) in enumerate(zip(results[cap][key], ref)):
                assert torch.equal(a, e), f"cap {cap}, {key}: result {i} differs from the uncapped grid"
    for key, ref in results[""].items():
        grad_w = ref[5]
        assert torch.count_nonzero(grad_w) > 0, f"{key}: weight gradient is zero"


# --------------------------------------------------------------------------- graphs, streams


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("hidden_size", [1024, 20000, 1001])
def test_cuda_graph_capture_and_replay(hidden_size, norm):
    """Forward and backward (with weight-gradient scratch allocation) captured in a CUDA
    graph; replays on new data equal eager calls bitwise."""
    rms = _rms(norm)
    m, n = 33, hidden_size
    dtype = torch.bfloat16
    torch.manual_seed(n)
    x = make_data((m, n), dtype, "cuda", requires_grad=True)
    r = make_data((m, n), dtype, "cuda", scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((n,), torch.float32, "cuda", requires_grad=True)
    b = None if rms else b
    params = [t for t in (x, r, w, b) if t is not None]
    gout = torch.randn(m, n, device="cuda").to(dtype)
    gh = torch.randn(m, n, device="cuda").to(dtype)

    def step():
        out, h = call_add_norm(rms, x, r, (n,), w, b, _eps(rms))
        grads = torch.autograd.grad([out, h], params, [gout, gh])
        return (out, h, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up (lazy module loading, allocator) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step()
    for trial in range(2):
        with torch.no_grad():
            for t in (x, r, w, b, gout, gh):
                if t is not None:
                    t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype) * (1 + trial))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for s, e in zip(static_results, eager):
            assert torch.equal(s, e)


@pytest.mark.parametrize("hidden_size", [1024, 20000, 1001])
def test_non_default_stream(hidden_size):
    """The kernels run on the current stream: inputs written on a side stream behind a long
    sleep are seen by the op called on that stream (a kernel on another stream would read
    the zeros)."""
    m, n = 64, hidden_size
    torch.manual_seed(n)
    data = make_data((m, n), torch.float32, "cuda")
    res = make_data((m, n), torch.float32, "cuda", scale=1.0, offset=0.0)
    w, b = make_affine((n,), torch.float32, "cuda")
    gout = torch.randn(m, n, device="cuda")
    expected = call_add_norm(False, data, res, (n,), w, b, 1e-5)
    x = torch.zeros_like(data, requires_grad=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on this stream only
        with torch.no_grad():
            x.copy_(data)
        out, h = call_add_norm(False, x, res, (n,), w, b, 1e-5)
        (gx,) = torch.autograd.grad([out], [x], [gout])
    side.synchronize()
    assert torch.equal(out, expected[0]) and torch.equal(h, expected[1])
    ref = reference_add_norm(False, data.requires_grad_(), res, (n,), w, b, 1e-5, grad_out=gout)
    assert_close(gx, ref["grad_x"], name="grad_x on a side stream")


def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the device guard launches on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.manual_seed(0)
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        for n in (768, 20000, 1001):
            x = make_data((9, n), torch.bfloat16, dev, requires_grad=True)
            r = make_data((9, n), torch.bfloat16, dev, scale=1.0, offset=0.0, requires_grad=True)
            w, b = make_affine((n,), torch.bfloat16, dev, requires_grad=True)
            out, h = check_add_norm_against_reference(False, x, r, (n,), w, b, 1e-5,
                                                       name=f"cuda:1 N={n}")
            assert out.device == dev and h.device == dev
            assert torch.cuda.current_device() == 0


# --------------------------------------------------------------------------- > 2**31 elements


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [((1 << 19) + 1, 4096), (8193, 262144)])
def test_more_than_2_31_elements(shape, rms):
    """bf16 tensors with more than 2**31 elements (64-bit indexing), register path and
    looping path: rows before and after element 2**31 and the weight gradients."""
    m, n = shape
    assert m * n > 2**31
    numel_bytes = m * n * 2
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * numel_bytes + (4 << 30):
        pytest.skip(f"needs ~{(4 * numel_bytes + (4 << 30)) / 2**30:.0f} GiB free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (1 + 0.5 * torch.randn(n, device="cuda", generator=gen))
    b = None if rms else 0.5 * torch.randn(n, device="cuda", generator=gen)
    eps = 1e-5
    out, _, mean, rstd = torch.ops.addnorm._norm_fwd(x, None, [n], w, b, eps, rms, False, False)
    rows = sorted({0, 1, (1 << 31) // n - 1, (1 << 31) // n, m - 2, m - 1})
    xs = x[rows].double()
    if rms:
        exp = torch.nn.functional.rms_norm(xs, [n], w.double(), eps)
    else:
        exp = torch.nn.functional.layer_norm(xs, [n], w.double(), b.double(), eps)
    assert_close(out[rows], exp, name="out rows around 2**31")
    # Backward with grad_out = x (saves 4 GiB): grad_h rows and the weight gradients.
    grad_h, grad_w, grad_b, _ = torch.ops.addnorm._norm_bwd(x, None, x, mean, rstd, w, not rms, rms)
    del out
    xs_req = xs.clone().requires_grad_()
    w64 = w.double().requires_grad_()
    if rms:
        o = torch.nn.functional.rms_norm(xs_req, [n], w64, eps)
    else:
        o = torch.nn.functional.layer_norm(xs_req, [n], w64, b.double(), eps)
    (exp_gx,) = torch.autograd.grad(o, [xs_req], xs)
    assert_close(grad_h[rows], exp_gx, name="grad_h rows around 2**31")
    del grad_h
    exp_gw = torch.zeros(n, dtype=torch.float64, device="cuda")
    exp_gb = torch.zeros(n, dtype=torch.float64, device="cuda")
    chunk = max(1, (1 << 26) // n)
    for r0 in range(0, m, chunk):
        hc = x[r0:r0 + chunk].double()
        if rms:
            xhat = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps)
        else:
            xhat = (hc - hc.mean(-1, keepdim=True)) * torch.rsqrt(hc.var(-1, unbiased=False, keepdim=True) + eps)
        exp_gw += (hc * xhat).sum(0)
        exp_gb += hc.sum(0)
    assert_close(grad_w, exp_gw, reduced=True, name="grad_weight")
    if not rms:
        assert_close(grad_b, exp_gb, reduced=True, name="grad_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_float64_weight_is_torchs(dtype):
    """rms_norm with a float64 weight beside narrower input computes what torch's does on CUDA
    too (the norm in float32, times the weight in float64, rounded to the input's dtype): the
    input's dtype out, a float64 weight gradient, values and gradients torch's to the input's
    precision; eager, scripted and compiled alike (test_modules.py has the CPU's)."""
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm(768, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = addnorm.replace_modules(torch.nn.Sequential(theirs)).cuda()
    x = (torch.randn(512, 768, device="cuda") * 3 + 1).to(dtype)
    g = torch.randn(512, 768, device="cuda").to(dtype)

    def run(f):
        xx = x.clone().requires_grad_()
        y = f(xx)
        w = theirs.weight if f is theirs else ours[0].weight
        return [y, *torch.autograd.grad(y, [xx, w], g)]

    want = run(theirs)
    for f in (ours, torch.jit.script(ours), torch.compile(ours, fullgraph=True)):
        got = run(f)
        assert [t.dtype for t in got] == [dtype, dtype, torch.float64]
        for a, t in zip(got, want):
            torch.testing.assert_close(a.to(dtype), t.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtypes_and_values_are_torchs(dtype):
    """Under CUDA autocast torch runs layer_norm in float32 (float32 output) and rms_norm in
    the input's dtype: addnorm's modules return torch's dtypes, and values within the bar.
    add_layer_norm of a half input and a float32 residual (the residual stream under
    autocast) is eager's F.layer_norm(x + r): h exactly, out in float32; with a half
    residual h is eager's, and out keeps the half dtype (docs/semantics.md, "Autocast")."""
    torch.manual_seed(0)
    n = 256
    for name, torch_cls in (("LayerNorm", torch.nn.LayerNorm), ("RMSNorm", torch.nn.RMSNorm)):
        t = torch_cls(n, device="cuda")
        with torch.no_grad():
            t.weight.uniform_(0.5, 1.5)
        o = getattr(addnorm, name)(n, device="cuda")
        o.load_state_dict(t.state_dict())
        x = make_data((64, n), dtype, "cuda")
        with torch.autocast("cuda", dtype=dtype):
            expected, got = t(x), o(x)
        assert got.dtype == expected.dtype, name
        assert_close(got, expected.double(), name=f"{name} under autocast")
    x = make_data((64, n), dtype, "cuda", requires_grad=True)
    r = make_data((64, n), torch.float32, "cuda", requires_grad=True)
    w, b = make_affine(n, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=dtype):
        h_eager = x + r
        expected = torch.nn.functional.layer_norm(h_eager, [n], w, b)
        out, h = addnorm.add_layer_norm(x, r, n, w, b, return_residual=True)
    assert out.dtype == expected.dtype == torch.float32 and h.dtype == torch.float32
    assert torch.equal(h, h_eager)
    assert_close(out, expected.double(), name="add_layer_norm under autocast")
    gx, gr = torch.autograd.grad(out, [x, r], torch.ones_like(out))
    assert gx.dtype == dtype and gr.dtype == torch.float32
    # A half residual: h is eager's x + r in that dtype, out keeps it (eager's is float32)
    r = r.detach().to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        h_eager = x + r
        expected = torch.nn.functional.layer_norm(h_eager, [n], w, b)
        out, h = addnorm.add_layer_norm(x, r, n, w, b, return_residual=True)
    assert h.dtype == out.dtype == dtype and torch.equal(h, h_eager)
    assert_close(out, expected.double(), name="add_layer_norm, half residual, under autocast")
