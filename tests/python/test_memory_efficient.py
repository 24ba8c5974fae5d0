"""memory_efficient=True: the ops keep their output instead of h, and backward recovers the
normalized values from it (xhat = (out - bias) / weight).

What is checked: the gradients against the path that keeps h (float64: the same to
rounding; float32 / bfloat16: within the error that rounding out to its dtype brings, see
test_accuracy_against_float64) and against gradcheck; a weight with a zero falls back to
keeping h (same gradients, h saved); no weight; the saved tensors (one M x N tensor fewer
per norm in a stack of layers); second derivatives refused, tangents computed; the internal
op's checks; modules, TorchScript, torch.compile.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import addnorm
from conftest import DEVICES, make_affine, make_data

OPS = ["add_layer_norm", "add_rms_norm"]


def run(op, x, r, w, b, *, memory_efficient, return_residual=False, dropout_p=None,
        generator=None, residual_in_fp32=False):
    n = x.shape[-1]
    if op == "add_layer_norm":
        return addnorm.add_layer_norm(
            x, r, n, w, b, return_residual=return_residual, dropout_p=dropout_p,
            generator=generator, residual_in_fp32=residual_in_fp32,
            memory_efficient=memory_efficient)
    return addnorm.add_rms_norm(
        x, r, n, w, 1e-6, return_residual=return_residual, dropout_p=dropout_p,
        generator=generator, residual_in_fp32=residual_in_fp32,
        memory_efficient=memory_efficient)


def grads(op, x, r, w, b, dy, dh=None, **kw):
    """Output (and h) and the gradients of every input that requires grad."""
    outs = run(op, x, r, w, b, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    inputs = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
    tensors = [outs[0]] + ([outs[1]] if dh is not None else [])
    gouts = [dy] + ([dh] if dh is not None else [])
    return [o.detach() for o in outs], torch.autograd.grad(tensors, inputs, gouts)


# The unit rounding of each output dtype, and the bound on |bias| / |weight| past which the
# op keeps h (the rebuilt xhat would err by more than 1/16): 1 / (16 unit).
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
        torch.bfloat16: 2.0 ** -8}


def data(op, shape, dtype, device, *, residual=True, weight=True, bias=True):
    """Input, residual, weight (1 + 0.5 N(0, 1)), bias (0.5 N(0, 1)), output gradient. The
    weights of columns whose bias is past the bound (16-bit dtypes) are raised to half of it,
    so that the output is what is kept (test_bias_far_above_weight_keeps_h has those)."""
    x = make_data(shape, dtype, device, requires_grad=True)
    r = make_data(shape, dtype, device, scale=1.0, offset=0.0, requires_grad=True) if residual else None
    w, b = make_affine(shape[-1], dtype, device, requires_grad=True)
    with torch.no_grad():
        lifted = (b.double().abs() * (32 * UNIT[dtype])).copysign(w.double()).to(dtype)
        w.copy_(torch.where(lifted.abs() > w.abs(), lifted, w))
    w = w if weight else None
    b = b if bias and op == "add_layer_norm" else None
    dy = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    return x, r, w, b, dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("residual,weight,bias,return_residual,dropout",
                         list(itertools.product([True, False], repeat=5)))
def test_same_gradients_as_keeping_h_float64(op, residual, weight, bias, return_residual,
                                             dropout, device):
    """float64: the gradients from the output equal those from h to a few ulps, for every
    combination of residual, weight, bias, returned h (with a gradient of its own) and
    fused dropout."""
    x, r, w, b, dy = data(op, (6, 40), torch.float64, device, residual=residual,
                          weight=weight, bias=bias)
    dh = torch.randn_like(dy) if return_residual else None
    results = []
    for me in (False, True):
        gen = torch.Generator(device=device).manual_seed(7) if dropout else None
        results.append(grads(op, x, r, w, b, dy, dh, memory_efficient=me,
                             return_residual=return_residual,
                             dropout_p=0.2 if dropout else None, generator=gen))
    (outs0, g0), (outs1, g1) = results
    for a, e in zip(outs1, outs0):
        assert torch.equal(a, e)  # the forward does not change
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, device):
    x, r, w, b, _ = data(op, (3, 7), torch.float64, device)
    inputs = tuple(t for t in (x, r, w, b) if t is not None)

    def f(*args):
        x, r, w = args[:3]
        b = args[3] if len(args) > 3 else None
        return run(op, x, r, w, b, memory_efficient=True, return_residual=True)

    assert torch.autograd.gradcheck(f, inputs)


def _err(t, ref):
    return (t.double() - ref).abs().max().item()


def _reference_grads(op, x, r, w, b, dy):
    """float64 gradients of the op (x, r, w, b, as far as given) and the float64 output."""
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, r, w, b) if t is not None]
    xr, rr, wr = ref_inputs[:3]
    br = ref_inputs[3] if len(ref_inputs) > 3 else None
    n = x.shape[-1]
    ref = (F.layer_norm(xr + rr, (n,), wr, br) if op == "add_layer_norm"
           else F.rms_norm(xr + rr, (n,), wr, 1e-6))
    return torch.autograd.grad(ref, ref_inputs, dy.double()), (xr + rr).detach()


def _from_output_formula(op, y, h, w, b, dy):
    """float64 gradients (x, r, w, b) from the rounded output y: xhat = (y - b) / w, rstd
    of h, grad_h = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w."""
    y, w, dy = y.double(), w.detach().double(), dy.double()
    ln = op == "add_layer_norm"
    xhat = (y - b.detach().double()) / w if ln else y / w
    var = h.var(-1, unbiased=False, keepdim=True) if ln else h.square().mean(-1, keepdim=True)
    rstd = (var + (1e-5 if ln else 1e-6)).rsqrt()
    g = dy * w
    c = (g * xhat).mean(-1, keepdim=True)
    dh = rstd * (g - (g.mean(-1, keepdim=True) if ln else 0) - xhat * c)
    return [dh, dh, (dy * xhat).sum(0)] + ([dy.sum(0)] if ln else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight", ["random", "away_from_zero"])
def test_accuracy(op, dtype, weight, device):
    """float32 / bfloat16, 64 x 768. Against the from-output formula evaluated in float64 on
    the rounded output: every gradient within 4x the error of the path that keeps h (against
    its own float64 reference) plus 2 units of the dtype's rounding of the largest value.
    Against the true float64 gradients, the same bound holds when |weight| >= 1: the
    rounding of out costs xhat about ulp(out) / |weight|, large where |weight| is small
    (docs/training.md, "Memory-efficient backward")."""
    shape = (64, 768)
    x, r, w, b, dy = data(op, shape, dtype, device)
    if weight == "away_from_zero":
        with torch.no_grad():
            w.copy_(1.0 + 0.5 * torch.rand(shape[-1]))
    ref_grads, h = _reference_grads(op, x, r, w, b, dy)
    _, g_kept = grads(op, x, r, w, b, dy, memory_efficient=False)
    outs, g_me = grads(op, x, r, w, b, dy, memory_efficient=True)
    formula = _from_output_formula(op, outs[0], h, w, b, dy)
    unit = torch.finfo(dtype).eps
    for name, a, k, e, f in zip("xrwb", g_me, g_kept, ref_grads, formula):
        bound = 4 * _err(k, e) + 2 * unit * e.abs().max().item()
        assert _err(a, f) <= bound, (name, "formula", _err(a, f), bound)
        if weight == "away_from_zero":
            assert _err(a, e) <= bound, (name, "float64", _err(a, e), bound)


def _saved_storages(fn, numel):
    """The distinct storages of the tensors of numel elements that autograd saves in fn."""
    ptrs = set()

    def pack(t):
        if t.numel() == numel:
            ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ptrs, out


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("post_ln", [True, False])
def test_stack_saves_one_tensor_fewer_per_norm(op, post_ln):
    """A stack of L layers (Linear, then the Add & Norm, post-LN and pre-LN) and a Linear
    head: the training graph holds L fewer [M, N] tensors with memory_efficient (each norm's
    output is the next Linear's saved input; h is kept by no one), and the same gradients
    (float64)."""
    L, M, N = 4, 8, 32
    torch.manual_seed(0)
    lins = [torch.nn.Linear(N, N, dtype=torch.float64) for _ in range(L + 1)]
    norms = [make_affine(N, torch.float64, "cpu", requires_grad=True) for _ in range(L)]
    x0 = torch.randn(M, N, dtype=torch.float64, requires_grad=True)

    def stack(me):
        def fn():
            x, res = x0, None
            for lin, (w, b) in zip(lins[:L], norms):
                b = b if op == "add_layer_norm" else None
                if post_ln:  # x = norm(x + lin(x))
                    x = run(op, lin(x), x, w, b, memory_efficient=me)
                else:  # h = res + lin(x); x = norm(h): the norm's h is the next residual
                    x, res = run(op, lin(x), res if res is not None else x0, w, b,
                                 memory_efficient=me, return_residual=True)
            return lins[L](x).sum()
        return fn

    kept, loss0 = _saved_storages(stack(False), M * N)
    lean, loss1 = _saved_storages(stack(True), M * N)
    assert len(kept) - len(lean) == L, (len(kept), len(lean))
    params = [x0] + [p for lin in lins for p in lin.parameters()] + [t for wb in norms for t in wb]
    g0 = torch.autograd.grad(loss0, params, allow_unused=True)
    g1 = torch.autograd.grad(loss1, params, allow_unused=True)
    for a, e in zip(g1, g0):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_the_forward_writes_no_h(op, p):
    """Post-LN, the forward does not write h at all (backward reads the output): the
    internal forward returns an empty h, where it writes one without memory_efficient, or
    with return_residual (h is an output then)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.addnorm._norm_fwd.default:
                shapes.append(tuple(out[1].shape))
            return out

    x, r = (torch.randn(16, 64, requires_grad=True) for _ in range(2))
    w = torch.full((64,), 1.5, requires_grad=True)
    with Spy():
        for me, rr in ((True, False), (False, False), (True, True)):
            run(op, x, r, w, None, memory_efficient=me, return_residual=rr, dropout_p=p)
    assert shapes == [(0,), (16, 64), (16, 64)]


@pytest.mark.parametrize("value", [2e-39, 1e-45])
@pytest.mark.parametrize("op", OPS)
def test_weight_below_float_reciprocal_range_keeps_h(op, value):
    """A float32 weight value whose reciprocal overflows float (|w| < 1 / FLT_MAX, about
    2.9e-39: tiny normals and subnormals) is treated as a zero: the op keeps h and the
    gradients are those of that path, bitwise (they were inf/NaN). The backward from the
    output itself refuses such a weight by name (where a trace keeps the weight unread)."""
    x, r, w, b, dy = data(op, (5, 24), torch.float32, "cpu")
    with torch.no_grad():
        w[3] = value
    out_me = run(op, x, r, w, b, memory_efficient=True)
    out = run(op, x, r, w, b, memory_efficient=False)
    g_me = torch.autograd.grad(out_me, [x, r, w], dy)
    g = torch.autograd.grad(out, [x, r, w], dy)
    assert all(torch.equal(a, e) for a, e in zip(g_me, g))
    assert all(t.isfinite().all() for t in g_me)
    h = (x + r).detach()
    _, _, mean, rstd = torch.ops.addnorm._norm_fwd(h, None, [24], w.detach(), None, 1e-5,
                                                   op.endswith("rms_norm"), False, False)
    with pytest.raises(RuntimeError, match=r"reciprocal overflows; weight\[3\]"):
        torch.ops.addnorm._norm_bwd(dy, None, out.detach(), mean, rstd, w.detach(), False,
                                    op.endswith("rms_norm"), True, None, from_output=True)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("op,where", [("add_layer_norm", "weight"), ("add_rms_norm", "weight"),
                                      ("add_layer_norm", "bias")])
def test_non_finite_weight_or_bias_keeps_h(op, where, value):
    """An inf or NaN weight or bias value leaves out without the normalized values in its
    column (inf or NaN there): on the CPU (eager) the op keeps h, so that column's weight
    gradient is torch's (finite for a finite input), bitwise the path that keeps h."""
    x, r, w, b, dy = data(op, (5, 24), torch.float32, "cpu")
    with torch.no_grad():
        (w if where == "weight" else b)[3] = value
    saved_me, out_me = _saved_storages(lambda: run(op, x, r, w, b, memory_efficient=True),
                                       x.numel())
    assert out_me.untyped_storage().data_ptr() not in saved_me
    out = run(op, x, r, w, b, memory_efficient=False)
    g_me = torch.autograd.grad(out_me, [x, r, w], dy)
    g = torch.autograd.grad(out, [x, r, w], dy)
    for a, e in zip(g_me, g):  # (NaN input gradients, as torch's)
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    h = (x + r).detach().double()
    ref = F.layer_norm(h, [24]) if op == "add_layer_norm" else F.rms_norm(h, [24], eps=1e-6)
    torch.testing.assert_close(g_me[2][3].double(), (dy.double() * ref)[:, 3].sum(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_weight_with_zero_keeps_h(op, device):
    """A weight with a zero leaves out without the normalized values there. CPU (eager):
    the op then keeps h (as without memory_efficient), and the gradients are those of that
    path, bitwise. CUDA: the weight is not read (no synchronization); the op keeps out, and
    the rows' input gradients and that column's weight gradient come out NaN (docs/training.md)."""
    x, r, w, b, dy = data(op, (5, 24), torch.float32, device)
    with torch.no_grad():
        w[3] = 0.0
    fn_me = lambda: run(op, x, r, w, b, memory_efficient=True)  # noqa: E731
    fn = lambda: run(op, x, r, w, b, memory_efficient=False)  # noqa: E731
    if device == "cuda":
        saved_me, out_me = _saved_storages(fn_me, x.numel())
        assert saved_me == {out_me.untyped_storage().data_ptr()}
        gx, gw = torch.autograd.grad(out_me, [x, w], dy)
        assert gx.isnan().all() and gw[3].isnan() and not gw[:3].isnan().any()
        return
    saved_me, out_me = _saved_storages(fn_me, x.numel())
    saved, out = _saved_storages(fn, x.numel())
    assert len(saved_me) == len(saved) == 1  # h
    assert out.untyped_storage().data_ptr() not in saved
    g_me = torch.autograd.grad(out_me, [x, r, w], dy)
    g = torch.autograd.grad(out, [x, r, w], dy)
    for a, e in zip(g_me, g):
        assert torch.equal(a, e)
    # and with no zero, out itself is what is saved
    with torch.no_grad():
        w[3] = 0.5
    saved_me, out_me = _saved_storages(fn_me, x.numel())
    assert saved_me == {out_me.untyped_storage().data_ptr()}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("op", OPS)
def test_rows_of_up_to_three_elements_keep_h(op, n):
    """Rows of 1 to 3 elements keep h (their exact input gradient nearly cancels, so the
    output's rounding was most of it: up to 3x torch's error), with the gradients of that
    path bitwise; from 4 elements on the output is kept."""
    x, r, w, b, dy = data(op, (64, n), torch.float32, "cpu")
    saved_me, out_me = _saved_storages(lambda: run(op, x, r, w, b, memory_efficient=True),
                                       x.numel())
    assert (out_me.untyped_storage().data_ptr() in saved_me) == (n > 3)
    if n <= 3:
        g_me = torch.autograd.grad(out_me, [x, r, w], dy)
        g = torch.autograd.grad(run(op, x, r, w, b, memory_efficient=False), [x, r, w], dy)
        assert all(torch.equal(a, e) for a, e in zip(g_me, g))


@pytest.fixture(params=[False, True], ids=["denormals", "flush_denormal"])
def flush_denormal(request):
    """Runs the test as is and with the CPU flushing denormals (torch.set_flush_denormal)."""
    if request.param and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    yield request.param
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", OPS)
def test_weight_with_zero_keeps_h_in_every_dtype(op, dtype, flush_denormal):
    """The zero test holds for every weight dtype and floating-point mode: it compares in
    double (in float16, 1 / FLT_MAX rounds to 0, and with denormals flushed the float32
    bound reads as 0, so 0 >= bound passed and backward refused the zero)."""
    x, r, w, b, dy = data(op, (5, 24), dtype, "cpu")
    with torch.no_grad():
        w[3] = 0.0
    g_me = torch.autograd.grad(run(op, x, r, w, b, memory_efficient=True), [x, r, w], dy)
    g = torch.autograd.grad(run(op, x, r, w, b, memory_efficient=False), [x, r, w], dy)
    for a, e in zip(g_me, g):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype,value,bound", [
    (torch.float32, 1e-37, 2.0 ** -100), (torch.bfloat16, 1e-37, 2.0 ** -100),
    (torch.float16, 1e-5, 2.0 ** -14)])
@pytest.mark.parametrize("op", OPS)
def test_weight_too_small_for_the_output_keeps_h(op, dtype, value, bound, flush_denormal):
    """A weight so small that out = xhat * weight leaves the output dtype's normal range
    loses xhat's bits there (with denormals flushed, a float32 product below 2^-126 became
    0: in an encoder layer a weight gradient 1% off, input gradients off by 1e-3 of their
    scale; a float16 product is subnormal below 2^-14). Below the bound the op keeps h, with
    that path's gradients bitwise; at the bound it keeps out. (Column 3's bias is 0: a bias
    would trip the bias bound, test_bias_far_above_weight_keeps_h.)"""
    x, r, w, b, dy = data(op, (5, 24), dtype, "cpu")
    with torch.no_grad():
        w[3] = value
        if b is not None:
            b[3] = 0.0
    fn_me = lambda: run(op, x, r, w, b, memory_efficient=True)  # noqa: E731
    saved_me, out_me = _saved_storages(fn_me, x.numel())
    assert out_me.untyped_storage().data_ptr() not in saved_me
    g_me = torch.autograd.grad(out_me, [x, r, w], dy)
    g = torch.autograd.grad(run(op, x, r, w, b, memory_efficient=False), [x, r, w], dy)
    for a, e in zip(g_me, g):
        assert torch.equal(a, e)
    with torch.no_grad():
        w[3] = bound
    saved_me, out_me = _saved_storages(fn_me, x.numel())
    assert saved_me == {out_me.untyped_storage().data_ptr()}


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_bias_far_above_weight_keeps_h(dtype, weight):
    """out = weight * xhat + bias rounds to the output dtype, so xhat = (out - bias) / weight
    errs by up to unit * |bias| / |weight|: past |bias| = |weight| / (16 unit) (float32:
    2^20 |weight|; bfloat16: 16 |weight|; no weight: |weight| = 1) those columns' gradients
    were wrong, not merely less accurate (a float32 weight of 1e-30 under a bias of 1: a
    weight gradient of 0; bfloat16 2^-20 under 0.3: an input gradient of -63 for -0.03). Past
    the bound the op keeps h, with that path's gradients bitwise; at it, out."""
    op = "add_layer_norm"
    x, r, w, b, dy = data(op, (6, 32), dtype, "cpu", weight=weight)
    bound = 1 / (16 * UNIT[dtype])  # |bias| / |weight| at the bound
    for ratio, keeps_out in ((bound, True), (2 * bound, False)):
        with torch.no_grad():
            b[5] = -ratio  # (over a weight of -1 or 1, or none: the ratio exact in every dtype)
            if weight:
                w[5] = w[5].sign()
        saved, out = _saved_storages(lambda: run(op, x, r, w, b, memory_efficient=True),
                                     x.numel())
        assert (out.untyped_storage().data_ptr() in saved) == keeps_out, ratio
        if not keeps_out:
            g = torch.autograd.grad(out, [x, r, w, b] if weight else [x, r, b], dy)
            kept = run(op, x, r, w, b, memory_efficient=False)
            e = torch.autograd.grad(kept, [x, r, w, b] if weight else [x, r, b], dy)
            assert all(torch.equal(a, c) for a, c in zip(g, e))


def test_tiny_weight_under_a_bias_gets_torchs_gradients():
    """A float32 weight of 1e-30 (above the 2^-100 floor) under biases of about 1,
    memory_efficient: every gradient within float32 rounding of the float64 ones (the
    weight gradient was 0 and the input gradients 51% off)."""
    x, r, w, b, dy = data("add_layer_norm", (5, 16), torch.float32, "cpu")
    with torch.no_grad():
        w.fill_(1e-30)
    out = run("add_layer_norm", x, r, w, b, memory_efficient=True)
    got = torch.autograd.grad(out, [x, r, w, b], dy)
    ref, _ = _reference_grads("add_layer_norm", x, r, w, b, dy)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_encoder_layer_with_a_zero_norm_weight_flushing_denormals(flush_denormal):
    """A float32 encoder layer in training with a zero in a norm weight, also with the CPU
    flushing denormals (its backward refused the zero there): torch's gradients."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with torch.no_grad():
        theirs.norm1.weight[2] = 0.0
    ours = addnorm.replace_modules(copy.deepcopy(theirs))
    src = torch.randn(2, 4, 8)
    for layer in (theirs, ours):
        layer(src).square().sum().backward()
    for (name, a), e in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("tracer", ["fake_mode", "make_fx"])
def test_tracing_modes_do_not_read_the_weight(tracer):
    """Under a dispatch mode (FakeTensorMode with real parameters, make_fx tracing real
    tensors) the weight is not read, as under torch.compile: reading it failed there."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    x, r, w, b, _ = data("add_layer_norm", (4, 16), torch.float32, "cpu")
    fn = lambda x: run("add_layer_norm", x, r, w, b, memory_efficient=True)  # noqa: E731
    if tracer == "fake_mode":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert fn(mode.from_tensor(x.detach()).requires_grad_()).shape == x.shape
    else:
        gm = make_fx(fn)(x.detach().requires_grad_())
        assert torch.equal(gm(x.detach()), fn(x.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_second_derivative_refused(device):
    x, r, w, b, dy = data("add_layer_norm", (3, 8), torch.float64, device)
    out = run("add_layer_norm", x, r, w, b, memory_efficient=True)
    with pytest.raises(RuntimeError, match="memory_efficient=True keeps no h"):
        torch.autograd.grad(out, [x], dy, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_tangents(device):
    """Tangents are computed in the forward (from h): the same as without the flag."""
    import torch.autograd.forward_ad as fwAD

    x, r, w, b, _ = data("add_layer_norm", (3, 8), torch.float64, device)
    tx = torch.randn_like(x)
    res = []
    for me in (False, True):
        with fwAD.dual_level():
            out = run("add_layer_norm", fwAD.make_dual(x.detach(), tx), r.detach(), w.detach(),
                      b.detach(), memory_efficient=me)
            res.append(fwAD.unpack_dual(out).tangent)
    assert torch.equal(res[0], res[1])


@pytest.mark.parametrize("device", DEVICES)
def test_from_output_op_checks(device):
    """_norm_bwd(from_output=True): clear errors for a wrong dtype, shape or argument, and
    for a weight with a zero (whose xhat cannot be recovered)."""
    x = make_data((4, 16), torch.float32, device)
    w, b = make_affine(16, torch.float32, device)
    y, _, _, rstd = torch.ops.addnorm._norm_fwd(x, None, [16], w, b, 1e-5, False, False, False)
    g = torch.randn_like(y)
    bwd = torch.ops.addnorm._norm_bwd
    with pytest.raises(RuntimeError, match="grad_out must have the output's dtype"):
        bwd(g.double(), None, y, rstd, rstd, w, True, False, from_output=True, bias=b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        bwd(g, None, y, rstd, rstd, w, True, False, from_output=True, bias=b[:8])
    with pytest.raises(RuntimeError, match="h_dtype must be the output's dtype"):
        bwd(g, None, y, rstd, rstd, w, True, False, from_output=True, h_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bias is read only with from_output"):
        bwd(g, None, y, rstd, rstd, w, True, False, bias=b)
    if device == "cpu":  # the CUDA kernels take the weight as checked by the caller
        w0 = w.clone()
        w0[5] = 0
        with pytest.raises(RuntimeError, match=r"weight without zeros or values whose reciprocal overflows; weight\[5\] = 0"):
            bwd(g, None, y, rstd, rstd, w0, True, False, from_output=True, bias=b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wide", ["residual_in_fp32", "float32_residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_float32_h_beside_16_bit_output_keeps_h(op, dtype, wide, device):
    """A float32 h beside float16/bfloat16 input (residual_in_fp32, or a float32 residual)
    keeps h: xhat rebuilt from the 16-bit output gave the float32 gradients of the residual
    and the weight 16-bit accuracy (weight gradients 1e4x the path's that keeps h). The
    gradients are that path's, bitwise, and the output is not what autograd saves."""
    x, r, w, b, dy = data(op, (64, 96), dtype, device)
    r = r.detach().float().requires_grad_()
    kw = dict(residual_in_fp32=wide == "residual_in_fp32")
    saved, out = _saved_storages(lambda: run(op, x, r, w, b, memory_efficient=True, **kw),
                                 x.numel())
    assert out.untyped_storage().data_ptr() not in saved
    assert len(saved) == 1  # h
    g1 = torch.autograd.grad(out, [x, r, w], dy)
    g0 = torch.autograd.grad(run(op, x, r, w, b, memory_efficient=False, **kw), [x, r, w], dy)
    assert g1[1].dtype == torch.float32
    for a, e in zip(g1, g0):
        assert a.dtype == e.dtype and torch.equal(a, e)
    # The same dtype on both sides still keeps the output, and so does residual_in_fp32
    # without a residual or dropout (h is then the input widened exactly); with dropout and
    # no residual residual_in_fp32's h is kept.
    saved16, out16 = _saved_storages(
        lambda: run(op, x, r.detach().to(dtype), w, b, memory_efficient=True), x.numel())
    assert saved16 == {out16.untyped_storage().data_ptr()}
    for p, keeps_out in ((None, True), (0.2, False)):
        saved, out = _saved_storages(lambda: run(op, x, None, w, b, memory_efficient=True,
                                                 residual_in_fp32=True, dropout_p=p), x.numel())
        assert (saved == {out.untyped_storage().data_ptr()}) == keeps_out, p


def test_modules_and_script():
    """AddLayerNorm / AddRMSNorm(memory_efficient=True): gradients as the functional's, the
    flag in repr, and TorchScript compiles them."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 32, dtype=torch.float64)
    for cls in (addnorm.AddLayerNorm, addnorm.AddRMSNorm):
        m = cls(32, memory_efficient=True, dtype=torch.float64)
        assert "memory_efficient=True" in repr(m)
        ref = cls(32, dtype=torch.float64)
        ref.load_state_dict(m.state_dict())
        s = torch.jit.script(m)
        grads_ = [torch.autograd.grad(mod(x, r).sum(), [x] + list(mod.parameters()))
                  for mod in (m, ref, s)]
        for a, e in zip(grads_[0], grads_[1]):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        for a, e in zip(grads_[2], grads_[0]):
            assert torch.equal(a, e)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces memory_efficient (the from_output backward in
    the backward graph): the same gradients as eager."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, requires_grad=True)
    r = torch.randn(8, 64)
    w, b = make_affine(64, torch.float32, "cpu", requires_grad=True)

    def f(x, r, w, b):
        return addnorm.add_layer_norm(x, r, 64, w, b, memory_efficient=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_eager = torch.autograd.grad(f(x, r, w, b), [x, w, b])
    g_comp = torch.autograd.grad(compiled(x, r, w, b), [x, w, b])
    for a, e in zip(g_comp, g_eager):
        assert torch.equal(a, e)
    # In a traced graph the weight is not inspected: a zero is met by the backward kernel,
    # which refuses it (CPU).
    with torch.no_grad():
        w[7] = 0.0
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w, b)
    with pytest.raises(RuntimeError, match=r"weight without zeros or values whose reciprocal overflows; weight\[7\] = 0"):
        loss.backward()
