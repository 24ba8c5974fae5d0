"""Autograd of the addnorm ops: gradcheck and gradgradcheck in float64 for every public op
and argument combination (including gradients flowing into the returned h), forward-mode
AD against torch, functorch transforms, partial requires_grad, unused and separately
backpropagated outputs, and determinism of the weight/bias gradients."""

import gc
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import addnorm
from conftest import DEVICES, make_affine, make_data
from reference import errors_vs_torch, meets_bar

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


def _add_norm_case(case, device):
    """(fn, inputs) of one add_layer_norm / add_rms_norm argument combination: fn returns
    (out, h) with return_residual, else (out,)."""
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

    return fn, (x, r, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADD_CASES, ids=[_case_id(c) for c in ADD_CASES])
def test_gradcheck_add_norm(case, device):
    """add_layer_norm / add_rms_norm: gradients of (out, h) w.r.t. input, residual, weight,
    bias. With return_residual=True gradcheck also feeds a gradient into h.
    (residual_in_fp32 is a no-op for float64, which keeps float64: checked too.)"""
    fn, inputs = _add_norm_case(case, device)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


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
        # h = x + residual: it requires grad only through them, as in eager.
        assert h.requires_grad == bool(req & {"x", "residual"})
        outs = [(o, g) for o, g in ((out, gout), (h, gh)) if o.requires_grad]
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
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
    weight/bias get no gradient (None, as in eager), and no norm backward runs."""
    x = make_data((3, 16), F64, device, requires_grad=True)
    r = make_data((3, 16), F64, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((16,), F64, device, requires_grad=True)
    out, h = (torch.ops.addnorm.add_rms_norm(x, r, [16], w, 1e-5) if rms else
              torch.ops.addnorm.add_layer_norm(x, r, [16], w, b, 1e-5))
    gh = torch.randn(3, 16, dtype=F64, device=device)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    seen = []
    with Record():
        gx, gr, gw = torch.autograd.grad([h], [x, r, w], [gh], allow_unused=True, retain_graph=True)
    assert torch.ops.addnorm._norm_bwd not in seen, seen
    assert torch.equal(gx, gh) and torch.equal(gr, gh)
    assert gw is None  # not zeros: optimizers treat the two differently
    with Record():  # (the recorder sees a norm backward where one runs)
        torch.autograd.grad([out], [x], [gh], retain_graph=True)
    assert torch.ops.addnorm._norm_bwd in seen, seen
    (h * gh).sum().backward()
    assert w.grad is None and (rms or b.grad is None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_only_h_used_skips_the_norm(rms, dtype, device):
    """Only h feeds the loss: h's gradient reaches input and residual unchanged even where the
    norm's own derivative is NaN (an infinite element; LayerNorm of a one-element row with
    eps = 0, whose rstd is infinite), as with eager's x + r."""
    x = torch.tensor([[1.0, float("inf"), 2.0], [0.5, -1.0, 3.0]], device=device, dtype=dtype)
    cases = [(x, [3], 1e-5)]
    if not rms:
        cases.append((x.reshape(6, 1), [1], 0.0))
    for xv, ns, eps in cases:
        xv = xv.clone().requires_grad_()
        r = torch.ones_like(xv, requires_grad=True)
        w = torch.ones(ns, device=device, dtype=dtype, requires_grad=True)
        out, h = (torch.ops.addnorm.add_rms_norm(xv, r, ns, w, eps) if rms else
                  torch.ops.addnorm.add_layer_norm(xv, r, ns, w, None, eps))
        assert torch.isnan(out).any()  # the norm's values (and derivatives) hold NaN
        gh = torch.randn(xv.shape, device=device).to(dtype)
        gx, gr, gw = torch.autograd.grad([h], [xv, r, w], [gh], allow_unused=True)
        assert torch.equal(gx, gh) and torch.equal(gr, gh)
        assert gw is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_h_requires_grad_only_through_input_or_residual(rms, device):
    """h = x + residual requires grad exactly when x or residual does (weight and bias do not
    reach it), as eager's x + r; out requires grad when any input does."""
    names = ["x", "residual", "weight"] + ([] if rms else ["bias"])
    x = make_data((3, 16), F64, device)
    r = make_data((3, 16), F64, device, scale=1.0, offset=0.0)
    w, b = make_affine((16,), F64, device)
    for k in range(len(names) + 1):
        for req in itertools.combinations(names, k):
            t = {n: v.clone().requires_grad_(n in req) for n, v in
                 zip(["x", "residual", "weight", "bias"], [x, r, w, b])}
            out, h = (torch.ops.addnorm.add_rms_norm(t["x"], t["residual"], [16], t["weight"], 1e-5) if rms else
                      torch.ops.addnorm.add_layer_norm(t["x"], t["residual"], [16], t["weight"], t["bias"], 1e-5))
            assert out.requires_grad == bool(req), req
            assert h.requires_grad == (t["x"] + t["residual"]).requires_grad, req


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


H_LOOKS = ["retain_grad", "hook_replaces", "hook_in_place", "hook_sets_data", "autograd_grad",
           "backward_inputs"]


def _prenorm_leaves(rms, residual, device):
    x = make_data((3, 16), F64, device, requires_grad=True)
    r = (make_data((3, 16), F64, device, scale=1.0, offset=0.0, requires_grad=True)
         if residual else None)
    w, b = make_affine((16,), F64, device, requires_grad=True)
    return x, r, w, (None if rms else b)


def _look_at_h_grad(look, h, x, loss):
    """Asks for h's gradient, or changes it, in one of the ways torch offers, during loss's
    backward (asking for x's too: with h alone nothing runs where the loss does not use h)."""
    if look == "retain_grad":
        h.retain_grad()
        loss.backward()
    elif look == "hook_replaces":
        h.register_hook(lambda g: g * 0)
        loss.backward()
    elif look == "hook_in_place":
        def zero_in_place(g):
            g.zero_()  # (returns None: the changed tensor itself goes on)
        h.register_hook(zero_in_place)
        loss.backward()
    elif look == "hook_sets_data":
        def set_data(g):
            g.data = g * 0  # (the same tensor, other storage)
        h.register_hook(set_data)
        loss.backward()
    elif look == "autograd_grad":
        torch.autograd.grad(loss, [h, x], allow_unused=True)
    else:
        loss.backward(inputs=[h, x])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_in_loss", [True, False], ids=["h_used", "h_unused"])
@pytest.mark.parametrize("look", H_LOOKS)
@pytest.mark.parametrize("variant", ["plain", "no_residual", "dropout", "memory_efficient"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_asking_for_or_changing_returned_h_grad_raises(rms, variant, look, h_in_loss, device):
    """The h returned with return_residual is the norm node's sibling output (the fused
    backward adds the norm's part of h's gradient in its own pass), so the gradient at h is
    only that of h's other uses, where torch's h = x + r (before the norm) gets its full
    gradient: h.retain_grad() gave h.grad 0.78-1.68 off, a hook zeroing h's gradient left
    input's gradient wrong, torch.autograd.grad(loss, h) returned the partial gradient.
    Asking for it or changing it in a hook raises now; where the loss does not use h (torch's
    gradient is then the norm's part alone), asking for it raises too, and a hook on h is
    never called (as its gradient is not computed)."""
    x, r, w, b = _prenorm_leaves(rms, variant != "no_residual", device)
    fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
    kw = {"dropout_p": 0.3} if variant == "dropout" else {}
    if variant == "memory_efficient":
        kw["memory_efficient"] = True
    bias = {} if rms else {"bias": b}
    out, h = fn(x, r, [16], w, return_residual=True, **bias, **kw)
    go = torch.randn(out.shape, dtype=F64, device=device)
    loss = (out * go).sum() + (h.pow(2).sum() if h_in_loss else 0)
    if look.startswith("hook") and not h_in_loss:
        _look_at_h_grad(look, h, x, loss)
        return
    match = "gradient of the h returned with return_residual|changed its gradient"
    with pytest.raises(RuntimeError, match=match):
        _look_at_h_grad(look, h, x, loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_hooks_reading_returned_h_grad_pass(rms, device):
    """Hooks on h that leave its gradient as it is pass (FSDP's pre-backward hooks, on every
    output of a wrapped module, are such: returning None or the gradient itself), and so do
    hooks removed again; the leaves' gradients are then torch's."""
    x, r, w, b = _prenorm_leaves(rms, True, device)
    leaves = [t for t in (x, r, w, b) if t is not None]
    go = torch.randn(3, 16, dtype=F64, device=device)
    h_ref = x + r
    out_ref = F.rms_norm(h_ref, [16], w) if rms else F.layer_norm(h_ref, [16], w, b)
    expected = torch.autograd.grad((out_ref * go).sum() + h_ref.pow(2).sum(), leaves)
    seen = []
    for hook in (lambda g: None, lambda g: g, seen.append, "removed", "multi_grad_hook"):
        fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
        out, h = fn(x, r, [16], w, **({} if rms else {"bias": b}), return_residual=True)
        if hook == "removed":
            h.register_hook(lambda g: g * 0).remove()
        elif hook == "multi_grad_hook":
            torch.autograd.graph.register_multi_grad_hook((out, h), lambda gs: None)
        else:
            h.register_hook(hook)
        got = torch.autograd.grad((out * go).sum() + h.pow(2).sum(), leaves)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert len(seen) == 1 and seen[0].shape == (3, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_returned_h_unobserved_gradients_match_torch(rms, device):
    """Without anything looking at h's gradient, the gradients of every leaf equal those of
    torch's h = x + r then F.layer_norm / F.rms_norm, with hooks on out and on the leaves,
    torch.autograd.grad for some leaves, and backward(inputs=) of leaves."""
    x, r, w, b = _prenorm_leaves(rms, True, device)
    leaves = [t for t in (x, r, w, b) if t is not None]
    go = torch.randn(3, 16, dtype=F64, device=device)

    def run(fused):
        if fused:
            fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
            out, h = fn(x, r, [16], w, **({} if rms else {"bias": b}), return_residual=True)
        else:
            h = x + r
            out = F.rms_norm(h, [16], w) if rms else F.layer_norm(h, [16], w, b)
        out.register_hook(lambda g: g * 2)
        return (out * go).sum() + h.pow(2).sum()

    expected = torch.autograd.grad(run(False), leaves)
    torch.testing.assert_close(torch.autograd.grad(run(True), leaves), expected,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(run(True), [x, w]),
                               (expected[0], expected[2]), rtol=1e-12, atol=1e-12)
    x.register_hook(lambda g: g * 3)
    run(True).backward(inputs=[x, r])
    torch.testing.assert_close(x.grad, 3 * expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.grad, expected[1], rtol=1e-12, atol=1e-12)
    assert w.grad is None


def test_returned_h_check_with_backward_in_several_threads():
    """Backward passes over one graph in two threads at once (torch allows it), with a hook
    on h that reads its gradient slowly: no pass sees another's gradient as changed (the
    gradient that reached h was kept in the node, shared by the threads: 128 of 200 passes
    raised, and without hooks the process could abort), and the gradients are right."""
    import threading
    import time

    x, r, w, b = _prenorm_leaves(False, True, "cpu")
    out, h = addnorm.add_layer_norm(x, r, [16], w, b, return_residual=True)
    h.register_hook(lambda g: time.sleep(0.0005))
    loss = (out * out).sum() + h.sum()
    expected = torch.autograd.grad(loss, [x, w], retain_graph=True)
    errors, wrong = [], []

    def work():
        for _ in range(100):
            try:
                got = torch.autograd.grad(loss, [x, w], retain_graph=True)
                wrong.extend(not torch.equal(a, e) for a, e in zip(got, expected))
            except RuntimeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not any(wrong) and len(wrong) == 400


def test_returned_h_check_with_a_backward_inside_a_hook():
    """A hook on h that runs a backward of its own over the same graph (a graph task inside
    the graph task, through the same h node) keeps both passes' checks apart: the inner
    pass's hook reads, the outer one changes the gradient and raises (the inner pass's
    record replaced the outer's, which then went unchecked)."""
    x, r, w, b = _prenorm_leaves(False, True, "cpu")
    for change in (False, True):
        out, h = addnorm.add_layer_norm(x, r, [16], w, b, return_residual=True)
        loss = (out * out).sum() + h.sum()
        depth = []

        def hook(g, change=change):
            if depth:  # the inner pass: read only
                return None
            depth.append(1)
            torch.autograd.grad(loss, [x], retain_graph=True)
            depth.pop()
            return g * 2 if change else None

        h.register_hook(hook)
        if change:
            with pytest.raises(RuntimeError, match="changed its gradient"):
                torch.autograd.grad(loss, [x], retain_graph=True)
        else:
            torch.autograd.grad(loss, [x], retain_graph=True)


def test_returned_h_module_full_backward_hook_matches_torch():
    """A full backward hook on AddLayerNorm(return_residual=True) sees torch's grad_input and
    grad_output (a module's output gradients are those of the outputs' uses after it, in
    torch's h = x + r; out = layer_norm(h) too): no check fires there."""
    class Unfused(torch.nn.LayerNorm):
        def forward(self, x, r):
            h = x + r
            return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps), h

    x0, r0 = make_data((3, 8), F64, "cpu"), make_data((3, 8), F64, "cpu", scale=1.0, offset=0.0)
    go = torch.randn(3, 8, dtype=F64)
    seen = []
    for m in (Unfused(8).double(), addnorm.AddLayerNorm(8, return_residual=True).double()):
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, 8, dtype=F64))
            m.bias.copy_(torch.linspace(-1, 1, 8, dtype=F64))
        hooked = {}
        m.register_full_backward_hook(lambda mod, gi, gout: hooked.update(gi=gi, gout=gout))
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        out, h = m(x, r)
        ((out * go).sum() + h.pow(2).sum()).backward()
        seen.append([*hooked["gi"], *hooked["gout"], x.grad])
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-12, atol=1e-12)


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
@pytest.mark.parametrize("mode", ["plain", "dropout_memory_efficient"])
def test_cpu_results_independent_of_thread_count(m, n, x_dtype, w_dtype, rms, mode):
    """The CPU backward sums dweight/dbias per chunk of rows and adds the chunks in order;
    the chunks depend on M and N only, so the gradients are bitwise the same for 1, 2 and 3
    threads (4096 rows: 64 chunks; 1000 rows of 100: 7 chunks, the last shorter; 64 rows of
    768: 3 chunks; 5 rows of 4099: 2 chunks, 4 rows and 1); so are the outputs and the input
    and residual gradients (row by row), with the fused dropout (the same seed, the same
    mask) and from the output (memory_efficient)."""
    torch.manual_seed(m + n)
    x = make_data((m, n), x_dtype, "cpu")
    r = make_data((m, n), x_dtype, "cpu", scale=1.0, offset=0.0)
    w0, b0 = make_affine((n,), w_dtype, "cpu")
    gout = torch.randn(m, n).to(x_dtype)
    extra = ({} if mode == "plain" else
             dict(dropout_p=0.25, dropout_seed=torch.tensor([m, n]), memory_efficient=True))
    threads = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
            out, _ = (torch.ops.addnorm.add_rms_norm(xi, ri, [n], w, 1e-6, **extra) if rms else
                      torch.ops.addnorm.add_layer_norm(xi, ri, [n], w, b, 1e-5, **extra))
            out.backward(gout)
            results[t] = dict(weight=w.grad, bias=None if rms else b.grad, out=out.detach(),
                              input=xi.grad, residual=ri.grad)
    finally:
        torch.set_num_threads(threads)
    for t in (2, 3):
        for name, value in results[1].items():
            assert value is None or torch.equal(results[t][name], value), \
                f"{name} differs: 1 vs {t} threads"
    assert torch.count_nonzero(results[1]["weight"]) > 0
    if mode != "plain":  # the dropout ran: input's gradient zero where dropped
        assert not torch.equal(results[1]["input"], results[1]["residual"])


# --------------------------------------------------------------------------- higher order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADD_CASES, ids=[_case_id(c) for c in ADD_CASES])
def test_gradgradcheck_add_norm(case, device):
    """Second derivatives of add_layer_norm / add_rms_norm, every argument combination:
    through out and h, w.r.t. input, residual, weight, bias and the incoming gradients;
    reverse-over-reverse and forward-over-reverse (a dual input into a create_graph
    backward, as Hessian-vector products run: the kept h must carry its tangent)."""
    fn, inputs = _add_norm_case(case, device)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, check_fwd_over_rev=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ns", [(5,), (3, 4)], ids=["1d", "2d"])
@pytest.mark.parametrize("name,has_w,has_b", PLAIN_CASES)
def test_gradgradcheck_norm(name, has_w, has_b, ns, device):
    x = _leaf((2, 3) + ns, device, 2.0, -1.0)
    w = _leaf(ns, device, 0.5, 1.0) if has_w else None
    b = _leaf(ns, device) if has_b else None
    if name == "layer_norm":
        fn = lambda x, w, b: torch.ops.addnorm.layer_norm(x, list(ns), w, b, 1e-5)  # noqa: E731
    else:
        fn = lambda x, w, b: torch.ops.addnorm.rms_norm(x, list(ns), w, None)  # noqa: E731
    assert gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_hessian_and_gradient_penalty_match_torch(rms, device):
    """A Hessian through the residual (only h was saved: the case that returned zeros once)
    and a gradient-penalty loss (WGAN-GP style) with its gradient w.r.t. the weight, against
    torch's x + r and F.layer_norm / F.rms_norm."""
    torch.manual_seed(3)
    x, r, c = (torch.randn(3, 6, dtype=F64, device=device) for _ in range(3))
    w = torch.randn(6, dtype=F64, device=device)

    def ours(x, w):
        if rms:
            return addnorm.add_rms_norm(x, r, 6, w, 1e-5)
        return addnorm.add_layer_norm(x, r, 6, w)

    def theirs(x, w):
        return (torch.nn.functional.rms_norm(x + r, [6], w, 1e-5) if rms
                else torch.nn.functional.layer_norm(x + r, [6], w))

    h_ours = torch.autograd.functional.hessian(lambda x: (ours(x, w) * c).sum(), x)
    h_theirs = torch.autograd.functional.hessian(lambda x: (theirs(x, w) * c).sum(), x)
    assert h_theirs.abs().max() > 0.1
    torch.testing.assert_close(h_ours, h_theirs, rtol=1e-10, atol=1e-12)

    def penalty(f):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad((f(xi, wi) * c).sum(), [xi], create_graph=True)
        loss = (gx.norm(dim=-1) - 1).pow(2).mean()
        (gw,) = torch.autograd.grad(loss, [wi])
        return loss.detach(), gw

    for a, e in zip(penalty(ours), penalty(theirs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_double_backward_from_cpp_api_path():
    """The C++ functions (addnorm::add_layer_norm, ...) reach the same Autograd kernel as
    torch.ops.addnorm.*: create_graph through the op that torch.ops dispatches. (The
    GoogleTest suite differentiates twice from C++.)"""
    x = _leaf((2, 4), "cpu", 1.0, 0.5)
    w = _leaf((4,), "cpu", 0.5, 1.0)
    out = torch.ops.addnorm.layer_norm(x, [4], w, None, 1e-5)
    (gx,) = torch.autograd.grad(out.pow(3).sum(), [x], create_graph=True)
    assert gx.requires_grad and gx.grad_fn is not None
    (gw,) = torch.autograd.grad(gx.sum(), [w])
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (gxr,) = torch.autograd.grad(torch.nn.functional.layer_norm(xr, [4], wr).pow(3).sum(), [xr],
                                 create_graph=True)
    (gwr,) = torch.autograd.grad(gxr.sum(), [wr])
    torch.testing.assert_close(gw, gwr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("case", ["ln", "rms", "add_ln", "add_rms", "prenorm", "dropout",
                                  "prenorm_dropout_rms"])
def test_create_graph_first_order_values_are_the_kernels(case, dtype, device):
    """With create_graph=True (gradient penalties, Hessian-vector products) the first-order
    gradients are the fused backward's values, bitwise, as torch's are its kernel's with and
    without it (they came from ATen ops in the compute type: up to 9x torch's error on rows
    whose first element is an outlier), also with a gradient into the returned h and with
    the fused dropout, which the kernel adds and applies in its pass; second derivatives
    still flow (gradgradcheck above)."""
    torch.manual_seed(0)
    n, rms = 17, case.endswith("rms")
    residual = case not in ("ln", "rms")
    prenorm = case.startswith("prenorm")
    p = 0.3 if "dropout" in case else 0.0
    seed = addnorm.dropout_seed(device) if p else None
    x = make_data((32, n), torch.float64, device)
    x[:, 0] = 3e4  # (an outlier first: the composite's statistics lose most there)
    x = x.to(dtype)
    r = make_data((32, n), dtype, device) if residual else None
    w, b = make_affine(n, dtype, device)
    dy = torch.randn(32, n, dtype=dtype, device=device)
    dh = torch.randn(32, n, dtype=dtype, device=device)

    def grads(create_graph):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b) if t is not None]
        xi, ri = leaves[0], (leaves[1] if residual else None)
        wi, bi = leaves[-2:]
        op = torch.ops.addnorm.add_rms_norm if rms else torch.ops.addnorm.add_layer_norm
        out, h = op(xi, ri, [n], wi, *(() if rms else (bi,)), 1e-5, return_residual=prenorm,
                    dropout_p=p, dropout_seed=seed)
        inputs = leaves[:-1] if rms else leaves
        outs, gouts = ((out, h), (dy, dh)) if prenorm else ((out,), (dy,))
        gs = torch.autograd.grad(outs, inputs, gouts, create_graph=create_graph)
        assert gs[0].requires_grad == create_graph  # (the bias's, sum(dy), has no graph)
        return gs

    for got, want in zip(grads(True), grads(False)):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADD_CASES, ids=[_case_id(c) for c in ADD_CASES])
def test_forward_mode_add_norm_matches_torch(case, device):
    """Tangents of out (and of the returned h) from tangents of every input, with and
    without a graph being recorded, against torch's ops under forward-mode AD."""
    rms, has_res, has_w, has_b, rr, f32 = case
    fn, inputs = _add_norm_case(case, device)
    primals = [t.detach() for t in inputs if t is not None]
    tangents = [torch.randn_like(t) for t in primals]

    def ref(x, *rest):
        rest = list(rest)
        r = rest.pop(0) if has_res else None
        w = rest.pop(0) if has_w else None
        b = rest.pop(0) if has_b else None
        h = x if r is None else x + r
        out = (torch.nn.functional.rms_norm(h, [5], w, 1e-5) if rms
               else torch.nn.functional.layer_norm(h, [5], w, b, 1e-5))
        return (out, h) if rr else (out,)

    def ours(*args):
        it = iter(args)
        x = next(it)
        r = next(it) if has_res else None
        w = next(it) if has_w else None
        b = next(it) if has_b else None
        return fn(x, r, w, b)

    for requires_grad in (False, True):
        ps = [p.clone().requires_grad_(requires_grad) for p in primals]
        _, t_ours = torch.func.jvp(ours, tuple(ps), tuple(tangents)) if not requires_grad else (None, None)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(ps, tangents)]
            outs = ours(*duals)
            t_dual = [fwAD.unpack_dual(o).tangent for o in outs]
            primal = [fwAD.unpack_dual(o).primal for o in outs]
        assert all(t is not None for t in t_dual), "a tangent is missing"
        # The values are those of the call without tangents, bitwise; h is a tensor of its
        # own (not the input, which it equals without a residual).
        assert all(torch.equal(a, e) for a, e in zip(primal, ours(*primals)))
        assert not rr or primal[1].data_ptr() != ps[0].data_ptr()
        _, t_ref = torch.func.jvp(ref, tuple(primals), tuple(tangents))
        for a, e in zip(t_dual, t_ref):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        if t_ours is not None:
            for a, e in zip(t_ours, t_ref):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["dropout", "fp32_residual", "residual_in_fp32", "h_only"])
def test_tangents_with_a_graph_in_half_precision(case, device):
    """Tangents and a graph node together (the path forward-over-reverse takes, h built from
    differentiable ops) with bfloat16 input: with dropout, a float32 residual,
    residual_in_fp32, and h returned without a residual. out keeps the input's dtype and is
    within one rounding of the call without tangents, h is that call's h (bitwise) and a
    tensor of its own, and out's tangent is torch's (float64 composite) to bfloat16
    accuracy."""
    n = 64
    x = make_data((4, n), torch.bfloat16, device)
    r = {"dropout": x, "fp32_residual": x.float(), "residual_in_fp32": x, "h_only": None}[case]
    r = None if r is None else torch.randn_like(r)
    w, b = make_affine((n,), torch.bfloat16, device)
    kw = dict(return_residual=True, residual_in_fp32=case == "residual_in_fp32")
    if case == "dropout":
        kw.update(dropout_p=0.3, dropout_seed=addnorm.dropout_seed(device))
    op = lambda x: torch.ops.addnorm.add_layer_norm(x, r, [n], w, b, 1e-5, **kw)  # noqa: E731
    xg = x.clone().requires_grad_()
    out0, h0 = op(xg)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out1, h1 = op(fwAD.make_dual(xg, t))
        tangent = fwAD.unpack_dual(out1).tangent
        out1, h1 = fwAD.unpack_dual(out1).primal, fwAD.unpack_dual(h1).primal
    assert out1.dtype == out0.dtype == torch.bfloat16 and h1.dtype == h0.dtype
    assert torch.equal(h1, h0) and h1.data_ptr() != xg.data_ptr()
    torch.testing.assert_close(out1, out0, rtol=2 ** -7, atol=2 ** -7)
    scale = (addnorm.dropout_mask(kw["dropout_seed"], [4, n], 0.3).double() / 0.7
             if case == "dropout" else 1.0)
    f = lambda x: F.layer_norm(  # noqa: E731
        x * scale + (0.0 if r is None else r.double()), [n], w.double(), b.double(), 1e-5)
    _, expected = torch.func.jvp(f, (x.double(),), (t.double(),))
    torch.testing.assert_close(tangent.double(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_forward_mode_jacobian_matches_reverse(rms, device):
    """A forward-mode Jacobian (jacfwd and autograd.functional's forward-mode strategy)
    equals the reverse-mode one and is not zero."""
    x = make_data((3, 7), F64, device)
    w, _ = make_affine((7,), F64, device)
    f = (lambda x: addnorm.rms_norm(x, [7], w, 1e-5)) if rms else (lambda x: addnorm.layer_norm(x, 7, w))
    j_rev = torch.autograd.functional.jacobian(f, x)
    j_fwd = torch.autograd.functional.jacobian(f, x, strategy="forward-mode", vectorize=True)
    assert j_rev.abs().max() > 0.1
    torch.testing.assert_close(j_fwd, j_rev, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), j_rev, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_functorch_transforms_match_torch(device):
    """torch.func.grad, hessian and vmap run (through the ops' ATen composite) and match
    torch."""
    x = make_data((3, 6), F64, device)
    r = make_data((3, 6), F64, device, scale=1.0, offset=0.0)
    w, b = make_affine((6,), F64, device)
    F_ = torch.nn.functional
    g = torch.func.grad(lambda x: addnorm.add_layer_norm(x, r, 6, w, b).pow(2).sum())(x)
    g_ref = torch.func.grad(lambda x: F_.layer_norm(x + r, [6], w, b).pow(2).sum())(x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    hs = torch.func.hessian(lambda x: addnorm.rms_norm(x, [6], w, 1e-5).pow(3).sum())(x)
    hs_ref = torch.func.hessian(lambda x: F_.rms_norm(x, [6], w, 1e-5).pow(3).sum())(x)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-10, atol=1e-12)
    xs = make_data((4, 3, 6), F64, device)
    torch.testing.assert_close(torch.vmap(lambda x: addnorm.layer_norm(x, 6, w, b))(xs),
                               F_.layer_norm(xs, [6], w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_functorch_outputs_are_the_kernels(op, dtype, device):
    """Inside torch.func transforms (vjp, jvp, vmap) the output has the fused kernel's values,
    bitwise those of a call outside them (the ATen composite the transforms differentiate
    gave up to 1.8x torch's error in float32 and float64); the derivatives are the
    composite's (test_functorch_transforms_match_torch)."""
    torch.manual_seed(0)
    x = make_data((16, 768), dtype, device)
    x[:, 0] = 3e4  # (an outlier first)
    r = make_data((16, 768), dtype, device)
    w, b = make_affine((768,), dtype, device)
    f = {"layer_norm": lambda x, r: addnorm.layer_norm(x, 768, w, b),
         "rms_norm": lambda x, r: addnorm.rms_norm(x, 768, w, 1e-5),
         "add_layer_norm": lambda x, r: addnorm.add_layer_norm(x, r, 768, w, b),
         "add_rms_norm": lambda x, r: addnorm.add_rms_norm(x, r, 768, w, 1e-5)}[op]
    want = f(x, r)
    assert torch.equal(torch.func.vjp(f, x, r)[0], want)
    assert torch.equal(torch.func.jvp(f, (x, r), (torch.ones_like(x), torch.ones_like(r)))[0], want)
    # (vmap over vjp: the composite's kernel call on batched values, through the vmap rule)
    out = torch.func.vmap(lambda x, r: torch.func.vjp(f, x, r)[0])(x.unsqueeze(1), r.unsqueeze(1))
    assert torch.equal(out.squeeze(1), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["add_ln", "add_rms"])
@pytest.mark.parametrize("n,outlier", [(17, True), (768, False), (768, True)])
def test_functorch_gradients_meet_the_bar(rms, dtype, n, outlier, device):
    """torch.func's gradients are the derivatives of the ATen composite, taken in double for
    float32 / bfloat16 / float16 input: within the accuracy bar (in float, up to 2.7x torch's
    error for the input's gradient and 9x for the weight's on rows with an outlier first)."""
    for seed in range(3):
        torch.manual_seed(seed)
        x = make_data((32, n), torch.float64, device)
        if outlier:
            x[:, 0] = 3e4
        x = x.to(dtype)
        r = make_data((32, n), dtype, device, scale=1.0, offset=0.0)
        w, b = make_affine((n,), dtype, device)
        b = None if rms else b
        dy = torch.randn(32, n, dtype=dtype, device=device)

        def f(x, r, w, *b):
            return (addnorm.add_rms_norm(x, r, n, w, 1e-5) if rms
                    else addnorm.add_layer_norm(x, r, n, w, *b))

        primals = (x, r, w) + (() if rms else (b,))
        out, vjp = torch.func.vjp(f, *primals)
        grads = vjp(dy)
        ours = {"out": out, "grad_x": grads[0], "grad_residual": grads[1], "grad_weight": grads[2]}
        if not rms:
            ours["grad_bias"] = grads[3]
        errs, _ = errors_vs_torch(ours, x, r, [n], w, b, 1e-5, rms, grad_out=dy)
        for q, (e_ours, e_torch, ref_max) in errs.items():
            ok, ratio = meets_bar(e_ours, e_torch, ref_max, dtype)
            assert ok, f"seed {seed} {q}: {ratio:.2f}x torch's error"


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_rule_runs_the_op_once_and_matches_entry_by_entry(device):
    """The ops' vmap rule (FuncTorchBatched): a batch dimension of input and residual (at any
    position, either or both) runs the op once, bitwise as entry by entry, without torch's
    fallback (disabled here: an op reaching it raises), also for a batch of size 0,
    per-sample gradients (vmap(grad)) and vmap over a backward (Jacobians); a batched weight runs entry by entry; the fused dropout with one seed
    gives every entry the mask of a call on it (vmap's semantics)."""
    torch.manual_seed(0)
    x = make_data((5, 4, 16), torch.float32, device)
    r = make_data((5, 4, 16), torch.float32, device)
    w, b = make_affine((16,), torch.float32, device)
    ws = make_data((3, 16), torch.float32, device)
    # (without torch's fallback, which an op with no rule of its own would reach: it raises)
    fallback = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        _check_vmap_rule(x, r, w, b, ws, device)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(fallback)


def _check_vmap_rule(x, r, w, b, ws, device):
    vmap, F_ = torch.func.vmap, torch.nn.functional

    def each(f, *ts):
        return torch.stack([f(*(t[i] for t in ts)) for i in range(ts[0].shape[0])])

    cases = [
        (lambda a, c: addnorm.add_layer_norm(a, c, 16, w, b), (x, r), 0),
        (lambda a: addnorm.add_layer_norm(a, r[0], 16, w, b), (x,), 0),
        (lambda c: addnorm.add_rms_norm(x[0], c, 16, w, return_residual=True)[1], (r,), 0),
        (lambda a: addnorm.layer_norm(a, 16, w, b), (x,), 1),
        (lambda a: addnorm.rms_norm(a, 16, w), (x,), 0),
    ]
    for f, args, dim in cases:
        moved = tuple(t.movedim(0, dim) for t in args)
        assert torch.equal(vmap(f, in_dims=dim)(*moved), each(f, *args))
    assert vmap(lambda a: addnorm.layer_norm(a, 16, w, b))(x[:0]).shape == (0, 4, 16)
    f = lambda ww: addnorm.layer_norm(x[0], 16, ww, b)  # noqa: E731
    assert torch.equal(vmap(f)(ws), each(f, ws))
    seed = addnorm.dropout_seed(device)
    f = lambda a: torch.ops.addnorm.add_layer_norm(  # noqa: E731
        a, None, [16], dropout_p=0.5, dropout_seed=seed)[0]
    assert torch.equal(vmap(f)(x), each(f, x))
    loss = lambda ln: lambda ww, xx: ln(xx, (16,), ww, b).pow(2).sum()  # noqa: E731
    per_sample = vmap(torch.func.grad(loss(addnorm.layer_norm)), in_dims=(None, 0))(w, x)
    expected = vmap(torch.func.grad(loss(F_.layer_norm)), in_dims=(None, 0))(w, x)
    torch.testing.assert_close(per_sample, expected)
    assert vmap(torch.func.grad(loss(addnorm.layer_norm)), in_dims=(None, 0))(
        w, x[:0]).shape == (0, 16)
    # vmap over a backward (a Jacobian, row by row): _norm_bwd once for the input's
    # gradients, entry by entry with the weight's (its gradient sums over rows)
    xd, rd, wd, bd = (t.double().requires_grad_() for t in (x[0], r[0], w, b))
    basis = torch.eye(4 * 16, dtype=F64, device=device).reshape(-1, 4, 16)
    for inputs in ([xd], [xd, wd]):
        rows = []
        for out in (addnorm.add_layer_norm(xd, rd, 16, wd, bd), F_.layer_norm(xd + rd, (16,), wd, bd)):
            rows.append(vmap(lambda v: torch.autograd.grad(out, inputs, v, retain_graph=True))(basis))
        torch.testing.assert_close(rows[0], rows[1], rtol=1e-10, atol=1e-12)
    # empty shapes: rows of none (a mean and rstd of shape [0] are statistics, not
    # placeholders), rows of zero elements, a batch of none where entries run one by one
    x0 = xd[:0].detach().requires_grad_()
    out = addnorm.layer_norm(x0, 16, wd)
    g0 = torch.zeros(3, 0, 16, dtype=F64, device=device)
    assert vmap(lambda v: torch.autograd.grad(out, x0, v, retain_graph=True)[0])(g0).shape == (3, 0, 16)
    empty = torch.zeros(0, device=device)
    assert vmap(lambda a: addnorm.add_layer_norm(a, empty, 0))(x[:3, 0, :0]).shape == (3, 0)
    out = addnorm.layer_norm(xd, 16, wd)
    none = torch.zeros(0, 4, 16, dtype=F64, device=device)
    got = vmap(lambda v: torch.autograd.grad(out, [xd, wd], v, retain_graph=True))(none)
    assert [t.shape for t in got] == [(0, 4, 16), (0, 16)]
    assert vmap(lambda ww: addnorm.layer_norm(x[0], 16, ww))(ws[:0]).shape == (0, 4, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_functorch_returned_h_without_residual_is_its_own_tensor(op, device):
    """Inside torch.func transforms, h returned without a residual (h = input) is a new
    tensor, as in eager mode and as the schema says (no alias): it was input itself, so an
    in-place update of h changed the input and gave wrong gradients."""
    x = make_data((3, 8), F64, device)

    def f(x):
        y = x * 1
        _, h = getattr(addnorm, op)(y, None, 8, return_residual=True)
        assert h is not y
        h.mul_(2)  # must leave y as it is
        return y.pow(2).sum()

    torch.testing.assert_close(torch.func.grad(f)(x), 2 * x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_backward_computes_the_parameter_gradients_asked_for(residual, device):
    """torch.autograd.grad with a subset of the inputs (a pipeline schedule's input-gradient
    pass, a gradient penalty w.r.t. the input): the backward kernel is asked only for the
    parameter gradients wanted (it summed the weight and bias gradients of every row
    anyway), and every subset's gradients are torch's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Flags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.addnorm._norm_bwd.default:
                seen.append((args[6], args[8]))  # (has_bias, weight_grad)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, r = (_leaf((4, 16), device) for _ in range(2))
    w, b = _leaf((16,), device, 0.5, 1.0), _leaf((16,), device)
    g = torch.randn(4, 16, dtype=F64, device=device)
    subsets = {"x": ([x], (False, False)), "w": ([w], (False, True)), "b": ([b], (True, False)),
               "x,w": ([x, w], (False, True)), "all": ([x, w, b], (True, True))}
    if residual:
        subsets["r,b"] = ([r, b], (True, False))
    for name, (inputs, flags) in subsets.items():
        seen = []
        with Flags():
            ours = torch.autograd.grad(addnorm.add_layer_norm(x, r if residual else None, 16, w, b),
                                       inputs, g)
        assert seen == [flags], name
        theirs = torch.autograd.grad(F.layer_norm(x + r if residual else x, (16,), w, b), inputs, g)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True], ids=["f64", "bf16_input"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["plain", "dropout"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["h", "from_out"])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_backward_computes_the_input_gradients_asked_for(op, memory_efficient, p, mixed, device):
    """A backward asked for the parameters' gradients alone (input and residual frozen,
    torch.autograd.grad with the parameters, a pipeline schedule's weight-gradient pass)
    writes no [M, N] gradient: the kernel gets grad_h_wanted=False and no dropout (it wrote
    grad_h, and the dropout's input gradient, for autograd to drop). Asked for the input
    alone with dropout, it writes the input's gradient and no grad_h; asked for the
    residual alone, grad_h without the dropout's pass, in the kernel or after it (it ran
    _dropout_apply over grad_h for autograd to drop), and no cast of grad_h to a frozen
    bfloat16 input's dtype beside a float32 residual. Every subset's gradients are the full
    backward's, bitwise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.addnorm._norm_bwd.default:
                kw = kwargs or {}
                seen.append((kw.get("grad_h_wanted", True), kw.get("dropout_p", 0.0) > 0,
                             out[0].numel() > 0, out[3].numel() > 0))
            elif func is torch.ops.addnorm._dropout_apply.default:
                seen.append("dropout")  # (no separate dropout pass)
            elif func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy) and out is not args[0]:
                seen.append("cast")  # (a copy: to() of the same dtype returns its argument)
            return out

    torch.manual_seed(0)
    dtype = torch.float32 if mixed else F64
    x, r = (_leaf((4, 16), device).to(dtype).detach().requires_grad_() for _ in range(2))
    w, b = (t.to(dtype).detach().requires_grad_() for t in (_leaf((16,), device, 0.5, 1.0),
                                                           _leaf((16,), device)))
    if mixed:  # (bfloat16 input beside a float32 residual and parameters: a float32 h)
        x = x.detach().bfloat16().requires_grad_()
    params = [w] if op == "add_rms_norm" else [w, b]
    g = torch.randn(4, 16, dtype=x.dtype, device=device)

    def grads(inputs):
        torch.manual_seed(1)  # (the same dropout seed for every subset)
        out = getattr(addnorm, op)(x, r, 16, *params, dropout_p=p,
                                   memory_efficient=memory_efficient)
        return torch.autograd.grad(out, inputs, g)

    everything = dict(zip(["x", "r", "w", "b"], grads([x, r, *params])))
    drop = p > 0
    # subset: (grad_h_wanted, dropout in the kernel, grad_h written, grad_input written)
    subsets = {"w": (False, False, False, False), "x": (not drop, drop, not drop, drop),
               "r": (True, False, True, False), "x,r": (True, drop, True, drop)}
    if op == "add_layer_norm":
        subsets["w,b"] = subsets["w"]
    for name, flags in subsets.items():
        seen = []
        with Record():
            got = grads([{"x": x, "r": r, "w": w, "b": b}[k] for k in name.split(",")])
        cast = mixed and not drop and "x" in name  # (the input's gradient, from a float32 grad_h)
        assert seen == [flags] + ["cast"] * cast, name
        for k, t in zip(name.split(","), got):
            assert torch.equal(t, everything[k]), (name, k)


# --------------------------------------------------------------------------- separate outputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["h_then_out", "out_then_h"])
def test_out_and_h_backpropagate_separately(order, device):
    """y, h = add_layer_norm(..., return_residual=True): backward through h alone, then
    through out alone (or the other way round), without retain_graph, as with torch's x + r
    and F.layer_norm; the gradients equal torch's."""
    base = [make_data((4, 8), F64, device), make_data((4, 8), F64, device, scale=1.0, offset=0.0),
            *make_affine((8,), F64, device)]

    def run(ours):
        x, r, w, b = (t.clone().requires_grad_() for t in base)
        if ours:
            y, h = addnorm.add_layer_norm(x, r, 8, w, b, return_residual=True)
        else:
            h = x + r
            y = torch.nn.functional.layer_norm(h, [8], w, b)
        steps = [lambda: (h * h).sum().backward(), lambda: y.pow(2).sum().backward()]
        grads = []
        for step in (steps if order == "h_then_out" else steps[::-1]):
            step()
            grads.append([None if t.grad is None else t.grad.clone() for t in (x, r, w, b)])
        return grads

    for a_step, e_step in zip(run(True), run(False)):
        for a, e in zip(a_step, e_step):
            assert (a is None) == (e is None)
            if a is not None:
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # out twice still fails like torch's
    x = make_data((4, 8), F64, device, requires_grad=True)
    y, h = addnorm.add_layer_norm(x, None, 8, return_residual=True)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_fused_dropout_seed_is_released_with_the_saved_tensors():
    """After the norm's backward (without retain_graph) the node lets go of the fused
    dropout's seed with its saved tensors where that backward computed the input's dropout
    gradient, though the graph is still held (a loss kept for
    logging kept every step's seeds), as torch's dropout node frees its mask after its
    backward. A later backward through h alone then raises as torch's does where it asks for
    the input's gradient, and runs where it does not, or where the first backward did not
    compute it (torch's dropout node has not run then); without dropout it runs (torch's add
    keeps nothing)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def make(input_grad=True, p=0.5):
        x = torch.randn(4, 16, requires_grad=input_grad)
        r = torch.randn(4, 16, requires_grad=True)
        w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
        seed = torch.tensor([1, 2])
        out, h = torch.ops.addnorm.add_layer_norm(x, r, [16], w, b, return_residual=True,
                                                  dropout_p=p, dropout_seed=seed)
        return x, r, w, out, h, StorageWeakRef(seed.untyped_storage())

    mask = addnorm.dropout_mask(torch.tensor([1, 2]), (4, 16), 0.5)
    x, r, w, out, h, seed = make()
    h.sum().backward()  # (h alone: the norm's backward has not run, the seed stays)
    assert not seed.expired()
    loss = out.sum() + h.sum()
    loss.backward()
    assert seed.expired(), "the seed outlived the backward"
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        h.sum().backward()
    assert torch.autograd.grad(h.sum(), [r])[0].eq(1).all()  # (no dropout on r's path)
    x, r, w, out, h, seed = make(input_grad=False)  # (x frozen: the seed is not used)
    out.sum().backward()
    (h * 2).sum().backward()
    for first in ("w", "r"):  # the first backward computes no input gradient: the seed stays
        x, r, w, out, h, seed = make()
        torch.autograd.grad(out.sum(), [w if first == "w" else r])
        assert not seed.expired()
        gx, = torch.autograd.grad(h.sum(), [x])
        torch.testing.assert_close(gx, mask.float() / 0.5)
    x, r, w, out, h, seed = make()  # (create_graph: the same once the gradients' graph is gone)
    g = torch.autograd.grad((out * out).sum(), [x, r, w], create_graph=True, retain_graph=False)
    del g
    assert seed.expired(), "the seed outlived a create_graph backward"
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        h.sum().backward()
    x, r, w, out, h, seed = make(p=0.0)
    (out.sum() + h.sum()).backward()
    h.sum().backward()


@pytest.mark.parametrize("failure", ["create_graph_refused", "unpack_hook_raises"])
def test_a_failed_norm_backward_keeps_the_saved_tensors(failure):
    """A norm backward that raised (memory_efficient's refusal of second derivatives, an
    unpack hook that raised) has not run: a backward through h alone afterwards leaves the
    saved tensors, and the backward through out still works, with the gradients of a run
    without the failure."""
    base = [make_data((4, 8), F64, "cpu"), make_data((4, 8), F64, "cpu"), *make_affine((8,), F64, "cpu")]

    def run(fail):
        x, r, w, b = (t.clone().requires_grad_() for t in base)
        state = {"raise": fail and failure == "unpack_hook_raises"}

        def unpack(t):
            if state["raise"]:
                state["raise"] = False
                raise KeyError("unpack")
            return t

        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            y, h = addnorm.add_layer_norm(x, r, 8, w, b, return_residual=True,
                                          memory_efficient=failure == "create_graph_refused")
        if fail:
            with pytest.raises((RuntimeError, KeyError), match="second derivatives|unpack"):
                torch.autograd.grad(y.sum(), w, retain_graph=True,
                                    create_graph=failure == "create_graph_refused")
        (h * h).sum().backward()
        y.pow(2).sum().backward()
        return [t.grad for t in (x, r, w, b)]

    for a, e in zip(run(True), run(False)):
        assert torch.equal(a, e)


def test_checkpoint_early_stop_frees_the_recomputed_graph():
    """Non-reentrant checkpointing stops its recompute by raising from the pack hook of the
    last tensor it needs, here one the norm's node saves: the node once kept its output (h)
    in its context then, a reference cycle through the output's grad_fn that kept it and
    the recomputed graph before it alive at every step. Nothing of a step's recompute
    outlives the step."""
    import weakref

    class Marker:
        pass

    alive = []

    class Mark(torch.autograd.Function):  # (one Marker per forward, kept by its node's ctx)
        @staticmethod
        def forward(ctx, t):
            ctx.marker = Marker()
            alive.append(weakref.ref(ctx.marker))
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    r = torch.randn(4, 8)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    for kw in ({}, {"memory_efficient": True}, {"dropout_p": 0.5}):
        alive.clear()
        x = torch.randn(4, 8, requires_grad=True)
        y = torch.utils.checkpoint.checkpoint(
            lambda t: addnorm.add_layer_norm(Mark.apply(t), r, 8, w, b, **kw), x, use_reentrant=False)
        (y * y).sum().backward()
        del y
        gc.collect()
        assert len(alive) == 2  # the forward's marker and the recompute's
        assert [ref() for ref in alive] == [None, None], kw


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
    _, gw, gb, _ = torch.ops.addnorm._norm_bwd(torch.ones_like(out), None, x.detach(), mean, rstd, w, True, False, False)
    assert gw.numel() == 0 and gb.shape == (32,)
    # Nor anything at all (no grad_h, no weight or bias gradient): empty results, no kernel
    # state touched (the kernels take no partials then).
    for rms, (dtype, h) in itertools.product((False, True), ((torch.float64, x), (torch.float32, x.float()))):
        out, _, mean, rstd = torch.ops.addnorm._norm_fwd(h.detach(), None, [32], None, None, 1e-5, rms, False,
                                                         False)
        g = torch.ops.addnorm._norm_bwd(torch.ones_like(out), None, h.detach(), mean, rstd, None, False, rms,
                                        eps=1e-5, grad_h_wanted=False)
        assert [t.numel() for t in g] == [0, 0, 0, 0], [t.shape for t in g]


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("stats", ["saved", "own", "from_output"])
def test_float64_parameter_gradients_alone_equal_those_computed_with_grad_h(rms, stats):
    """Asked for the weight and bias gradients alone (an input that needs none), the float64
    backward skips dh but gives the same weight and bias gradients, bit for bit: with the
    forward's statistics, with those of h itself (eps given; one row beyond the double range
    of its squares) and from the output."""
    torch.manual_seed(3)
    x = torch.randn(40, 37, dtype=torch.float64) * 3 + 1
    x[5] *= 1e200
    w = torch.randn(37, dtype=torch.float64)
    b = None if rms else torch.randn(37, dtype=torch.float64)
    out, _, mean, rstd = torch.ops.addnorm._norm_fwd(x, None, [37], w, b, 1e-5, rms, False, False)
    h = out if stats == "from_output" else x
    dy = torch.randn_like(x)
    kw = dict(eps=1e-5 if stats == "own" else None, from_output=stats == "from_output",
              bias=b if stats == "from_output" else None)
    full = torch.ops.addnorm._norm_bwd(dy, None, h, mean, rstd, w, not rms, rms, True, **kw)
    alone = torch.ops.addnorm._norm_bwd(dy, None, h, mean, rstd, w, not rms, rms, True, **kw, grad_h_wanted=False)
    assert alone[0].numel() == 0 and full[0].shape == x.shape
    for a, f in zip(alone[1:3], full[1:3]):
        torch.testing.assert_close(a, f, rtol=0, atol=0)
    # The reference: each row scaled to a largest magnitude of one first (eps with it).
    scale = x.abs().amax(-1, keepdim=True)
    xs = x / scale
    d = xs if rms else xs - xs.mean(-1, keepdim=True)
    xhat = d / (d.square().mean(-1, keepdim=True) + 1e-5 / scale.square()).sqrt()
    torch.testing.assert_close(full[1], (dy * xhat).sum(0))
    if not rms:
        torch.testing.assert_close(full[2], dy.sum(0))


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
