"""Autograd of the addnorm ops: gradcheck in float64 for every public op and argument
combination (including gradients flowing into the returned h), partial requires_grad,
unused outputs, and determinism of the weight/bias gradients."""

import itertools

import pytest
import torch
from torch.autograd import gradcheck

import addnorm
from conftest import DEVICES, make_affine, make_data

F64 = torch.float64


def _leaf(shape, device, scale=1.0, offset=0.0):
    return make_data(shape, F64, device, scale=scale, offset=offset, requires_grad=True)


ADD_CASES = [
    # (rms, has_residual, has_weight, has_bias, return_residual, residual_in_fp32)
    (rms, res, w, b, rr, f32)
    for rms in (False, True)
    for res in (False, True)
    for w in (False, True)
    for b in ((False, True) if not rms else (False,))
    for rr in (False, True)
    for f32 in (False, True)
]


def _case_id(c):
    rms, res, w, b, rr, f32 = c
    return "-".join([
        "rms" if rms else "ln", "res" if res else "nores", "w" if w else "now",
        "b" if b else "nob", "rr" if rr else "norr", "fp32res" if f32 else "x",
    ])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADD_CASES, ids=[_case_id(c) for c in ADD_CASES])
def test_gradcheck_add_norm(case, device):
    """add_layer_norm / add_rms_norm: gradients of (out, h) w.r.t. input, residual, weight,
    bias. With return_residual=True gradcheck also feeds a gradient into h.
    (residual_in_fp32 is a no-op for float64, which keeps float64: checked too.)"""
    rms, has_res, has_w, has_b, rr, f32 = case
    shape, ns = (3, 2, 5), (5,)
    x = _leaf(shape, device, 2.0, 1.0)
    r = _leaf(shape, device) if has_res else None
    w = _leaf(ns, device, 0.5, 1.0) if has_w else None
    b = _leaf(ns, device) if has_b else None
    op = torch.ops.addnorm.add_rms_norm if rms else torch.ops.addnorm.add_layer_norm

    def fn(x, r, w, b):
        if rms:
            out, h = op(x, r, list(ns), w, 1e-5, return_residual=rr, residual_in_fp32=f32)
        else:
            out, h = op(x, r, list(ns), w, b, 1e-5, return_residual=rr, residual_in_fp32=f32)
        if rr:
            assert h.shape == x.shape and h.dtype == F64
            return out, h
        assert h.numel() == 0
        return (out,)

    assert gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


PLAIN_CASES = [("layer_norm", w, b) for w, b in itertools.product((False, True), repeat=2)] + [
    ("rms_norm", w, False) for w in (False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ns", [(5,), (3, 4)], ids=["1d", "2d"])
@pytest.mark.parametrize("name,has_w,has_b", PLAIN_CASES)
def test_gradcheck_norm(name, has_w, has_b, ns, device):
    """layer_norm / rms_norm ops, single and multi-dim normalized_shape."""
    x = _leaf((2, 3) + ns, device, 2.0, -1.0)
    w = _leaf(ns, device, 0.5, 1.0) if has_w else None
    b = _leaf(ns, device) if has_b else None
    if name == "layer_norm":
        fn = lambda x, w, b: torch.ops.addnorm.layer_norm(x, list(ns), w, b, 1e-5)  # noqa: E731
    else:
        fn = lambda x, w, b: torch.ops.addnorm.rms_norm(x, list(ns), w, None)  # noqa: E731
    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("return_residual", [False, True])
def test_gradcheck_functional(rms, return_residual, device):
    """addnorm.functional.add_*_norm (out, or (out, h)) with an int normalized_shape,
    multi-dim input, and a 1-D input."""
    for shape in [(2, 3, 6), (6,)]:
        x = _leaf(shape, device, 2.0, 3.0)
        r = _leaf(shape, device)
        w = _leaf((6,), device, 0.5, 1.0)
        b = _leaf((6,), device)
        if rms:
            fn = lambda x, r, w: addnorm.functional.add_rms_norm(  # noqa: E731
                x, r, 6, w, 1e-6, return_residual=return_residual)
            args = (x, r, w)
        else:
            fn = lambda x, r, w, b: addnorm.functional.add_layer_norm(  # noqa: E731
                x, r, 6, w, b, 1e-5, return_residual=return_residual)
            args = (x, r, w, b)
        result = fn(*args)
        assert isinstance(result, tuple) == return_residual
        assert gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_row_of_one_and_constant_rows():
    """Edge rows: N=1 (LayerNorm output is the bias) and rows with zero variance."""
    x = torch.tensor([[1.5], [-2.0], [0.25]], dtype=F64, requires_grad=True)
    w = torch.tensor([1.3], dtype=F64, requires_grad=True)
    b = torch.tensor([-0.7], dtype=F64, requires_grad=True)
    out = torch.ops.addnorm.layer_norm(x, [1], w, b, 1e-5)
    assert torch.equal(out.detach(), b.detach().expand(3, 1))
    assert gradcheck(lambda x, w, b: torch.ops.addnorm.layer_norm(x, [1], w, b, 1e-5), (x, w, b))
    xc = torch.full((2, 8), 3.0, dtype=F64, requires_grad=True)
    # (weight: a stride-0 expand of one value)
    assert gradcheck(lambda x, w: torch.ops.addnorm.add_rms_norm(x, None, [8], w.expand(8), 1e-5),
                     (xc, w))
    assert gradcheck(lambda x, w, b: torch.ops.addnorm.add_layer_norm(x, None, [8], w.expand(8), b.expand(8), 1e-5),
                     (xc, w, b))


# --------------------------------------------------------------------------- partial graphs


PARTIAL_CASES = [(False, w) for w in ("x", "residual", "weight", "bias")] + [
    (True, w) for w in ("x", "residual", "weight")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms,which", PARTIAL_CASES)
def test_partial_requires_grad(rms, which, device):
    """Only one tensor requires grad: its gradient equals the one from the all-requires-grad
    run, and nothing else gets a gradient."""
    base = {
        "x": make_data((4, 24), F64, device),
        "residual": make_data((4, 24), F64, device, scale=1.0, offset=0.0),
    }
    base["weight"], base["bias"] = make_affine((24,), F64, device)
    gout, gh = torch.randn(4, 24, dtype=F64, device=device), torch.randn(4, 24, dtype=F64, device=device)

    def run(req):
        t = {k: v.clone().requires_grad_(k in req) for k, v in base.items()}
        out, h = (torch.ops.addnorm.add_rms_norm(t["x"], t["residual"], [24], t["weight"], 1e-5) if rms else
                  torch.ops.addnorm.add_layer_norm(t["x"], t["residual"], [24], t["weight"], t["bias"], 1e-5))
        if not req:
            assert not out.requires_grad and not h.requires_grad
            return None
        torch.autograd.backward([out, h], [gout, gh])
        return {k: v.grad for k, v in t.items()}

    keys = ["x", "residual", "weight"] + ([] if rms else ["bias"])
    full = run(set(keys))
    part = run({which})
    torch.testing.assert_close(part[which], full[which], rtol=1e-12, atol=1e-12)
    for k in keys:
        if k != which:
            assert part[k] is None
    run(set())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_only_h_used(rms, device):
    """Only h feeds the loss (out unused): grad of input/residual is the gradient into h,
    weight/bias get no gradient (None or zeros)."""
    x = make_data((3, 16), F64, device, requires_grad=True)
    r = make_data((3, 16), F64, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((16,), F64, device, requires_grad=True)
    out, h = (torch.ops.addnorm.add_rms_norm(x, r, [16], w, 1e-5) if rms else
              torch.ops.addnorm.add_layer_norm(x, r, [16], w, b, 1e-5))
    gh = torch.randn(3, 16, dtype=F64, device=device)
    gx, gr, gw = torch.autograd.grad([h], [x, r, w], [gh], allow_unused=True)
    assert torch.equal(gx, gh) and torch.equal(gr, gh)
    assert gw is None or torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_only_out_used(rms, device):
    """Only out feeds the loss (h returned but unused): same gradients as return_residual=False."""
    x = make_data((3, 16), F64, device, requires_grad=True)
    r = make_data((3, 16), F64, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((16,), F64, device, requires_grad=True)
    grads = []
    for rr in (True, False):
        out, _ = (torch.ops.addnorm.add_rms_norm(x, r, [16], w, 1e-5, return_residual=rr) if rms else
                  torch.ops.addnorm.add_layer_norm(x, r, [16], w, b, 1e-5, return_residual=rr))
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, r, w]))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grads[0][0]) > 0


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_weight_grad_deterministic(rms, dtype, device):
    """dweight/dbias use a fixed reduction order: bitwise identical across runs (enough rows
    to be split over threads / CTAs), also with fp32 weights for half inputs."""
    m, n = 4097, 64
    for w_dtype in dict.fromkeys([dtype, torch.float32]):
        x = make_data((m, n), dtype, device)
        r = make_data((m, n), dtype, device, scale=1.0, offset=0.0)
        w0, b0 = make_affine((n,), w_dtype, device)
        gout = torch.randn(m, n, device=device).to(dtype)
        results = []
        for _ in range(3):
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            xi = x.clone().requires_grad_()
            out, _ = (torch.ops.addnorm.add_rms_norm(xi, r, [n], w, 1e-6) if rms else
                      torch.ops.addnorm.add_layer_norm(xi, r, [n], w, b, 1e-5))
            out.backward(gout)
            results.append((w.grad, None if rms else b.grad, xi.grad))
        for other in results[1:]:
            assert torch.equal(results[0][0], other[0]), "weight grad not bitwise deterministic"
            if not rms:
                assert torch.equal(results[0][1], other[1]), "bias grad not bitwise deterministic"
            assert torch.equal(results[0][2], other[2]), "input grad not bitwise deterministic"
        assert torch.count_nonzero(results[0][0]) > 0


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)],
                         ids=["fp32", "bf16_fp32w", "fp64"])
@pytest.mark.parametrize("m,n", [(4096, 768), (1000, 100), (64, 768), (5, 4099)])
def test_cpu_weight_grad_independent_of_thread_count(m, n, x_dtype, w_dtype, rms):
    """The CPU backward sums dweight/dbias per chunk of rows and adds the chunks in order;
    the chunks depend on M and N only, so the gradients are bitwise the same for 1, 2 and 3
    threads (4096 rows: 64 chunks; 1000 rows of 100: 7 chunks, the last shorter; 64 rows of
    768: 3 chunks; 5 rows of 4099: 2 chunks, 4 rows and 1)."""
    torch.manual_seed(m + n)
    x = make_data((m, n), x_dtype, "cpu")
    r = make_data((m, n), x_dtype, "cpu", scale=1.0, offset=0.0)
    w0, b0 = make_affine((n,), w_dtype, "cpu")
    gout = torch.randn(m, n).to(x_dtype)
    threads = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            xi = x.clone().requires_grad_()
            out, _ = (torch.ops.addnorm.add_rms_norm(xi, r, [n], w, 1e-6) if rms else
                      torch.ops.addnorm.add_layer_norm(xi, r, [n], w, b, 1e-5))
            out.backward(gout)
            results[t] = (w.grad, None if rms else b.grad, xi.grad)
    finally:
        torch.set_num_threads(threads)
    for t in (2, 3):
        assert torch.equal(results[t][0], results[1][0]), f"weight grad differs: 1 vs {t} threads"
        if not rms:
            assert torch.equal(results[t][1], results[1][1]), f"bias grad differs: 1 vs {t} threads"
        assert torch.equal(results[t][2], results[1][2]), f"input grad differs: 1 vs {t} threads"
    assert torch.count_nonzero(results[1][0]) > 0


def test_double_backward_is_rejected_or_correct():
    """The spec does not support double backward: create_graph=True then differentiating
    the gradient must either raise or give torch's result, never a silently wrong value."""
    x = make_data((2, 6), F64, "cpu", requires_grad=True)
    w, b = make_affine((6,), F64, "cpu", requires_grad=True)
    out = torch.ops.addnorm.layer_norm(x, [6], w, b, 1e-5)
    try:
        (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
        (ggw,) = torch.autograd.grad(gx.pow(2).sum(), [w])
    except RuntimeError:
        return
    xr, wr, br = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    out_r = torch.nn.functional.layer_norm(xr, [6], wr, br, 1e-5)
    (gxr,) = torch.autograd.grad(out_r.pow(2).sum(), [xr], create_graph=True)
    (ggw_r,) = torch.autograd.grad(gxr.pow(2).sum(), [wr])
    torch.testing.assert_close(ggw, ggw_r)


def test_bias_grad_without_weight_is_not_rounded_to_input_dtype():
    """bf16 input, no weight, fp32 bias: grad_bias is the fp32 sum of grad_out, not a
    bf16-rounded one."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    g = torch.randn(64, 8).to(torch.bfloat16)
    torch.ops.addnorm.layer_norm(x, [8], None, b, 1e-5).backward(g)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, g.float().sum(0), rtol=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_others_are_unchanged():
    torch.manual_seed(1)
    x = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, dtype=torch.float64)  # frozen
    b = torch.randn(32, dtype=torch.float64, requires_grad=True)
    torch.ops.addnorm.layer_norm(x, [32], w, b, 1e-5).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_()
    torch.nn.functional.layer_norm(xr, [32], w, br, 1e-5).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(b.grad, br.grad)
    assert w.grad is None
    # The internal op computes no weight gradient when told not to.
    out, _, mean, rstd = torch.ops.addnorm._norm_fwd(x.detach(), None, [32], w, b, 1e-5, False, False, False)
    _, gw, gb = torch.ops.addnorm._norm_bwd(torch.ones_like(out), None, x.detach(), mean, rstd, w, True, False, False)
    assert gw.numel() == 0 and gb.shape == (32,)


def test_unused_h_gets_no_materialized_gradient():
    """Only out feeds the loss: the gradients equal those of the post-LN form."""
    torch.manual_seed(2)
    x = torch.randn(8, 16, requires_grad=True)
    r = torch.randn(8, 16, requires_grad=True)
    out, h = torch.ops.addnorm.add_layer_norm(x, r, [16], None, None, 1e-5, return_residual=True)
    gx, gr = torch.autograd.grad(out.sum() * 0 + (out * out).sum(), [x, r])
    out2, _ = torch.ops.addnorm.add_layer_norm(x, r, [16], None, None, 1e-5, return_residual=False)
    gx2, gr2 = torch.autograd.grad((out2 * out2).sum(), [x, r])
    torch.testing.assert_close(gx, gx2, rtol=0, atol=0)
    torch.testing.assert_close(gr, gr2, rtol=0, atol=0)
