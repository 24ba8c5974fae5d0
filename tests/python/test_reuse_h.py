"""On the CPU, the backward of a fused add & norm writes the gradient of h over h itself
where that backward is h's last reader: h was written by the forward, nothing but the
autograd node holds it (no user reference, view, saved-tensor hook that keeps it, other
node), and the graph is freed after this backward (no retain_graph, no create_graph). No
new [M, N] tensor is allocated then, and the gradients are bitwise those of a backward that
allocates (retain_graph=True, which never reuses). Wherever anything else can still see h,
h is left as it was."""

import pytest
import torch

import addnorm
from conftest import make_affine, make_data

F = addnorm.functional
N = 96
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _inputs(dtype, seed=0):
    torch.manual_seed(seed)
    x = make_data((3, 5, N), dtype, "cpu", requires_grad=True)
    r = make_data((3, 5, N), dtype, "cpu", requires_grad=True)
    w, b = make_affine((N,), dtype, "cpu", requires_grad=True)
    return x, r, w, b


def _call(op, x, r, w, b, **kw):
    if op == "add_layer_norm":
        return F.add_layer_norm(x, r, (N,), w, b, **kw)
    return F.add_rms_norm(x, r, (N,), w, **kw)


def _grads(*tensors):
    out = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _norm_bwd_allocated(backward):
    """Bytes the backward kernel call (addnorm::_norm_bwd) allocates during backward()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward()
    return sum(e.cpu_memory_usage for e in prof.events() if e.name == "addnorm::_norm_bwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_post_norm_grad_takes_h_memory_bitwise_the_same(op, dtype, dropout_p):
    x, r, w, b = _inputs(dtype)
    g = torch.randn(3, 5, N, dtype=dtype)
    kw = dict(dropout_p=dropout_p) if dropout_p else {}
    # Reference: retain_graph keeps the graph, so h is not the backward's to reuse.
    torch.manual_seed(1)  # (the same mask in both calls)
    out = _call(op, x, r, w, b, **kw)
    allocated_ref = _norm_bwd_allocated(lambda: out.backward(g, retain_graph=True))
    expected = _grads(x, r, w, b)
    torch.manual_seed(1)
    out = _call(op, x, r, w, b, **kw)
    allocated = _norm_bwd_allocated(lambda: out.backward(g))
    got = _grads(x, r, w, b)
    for a, e in zip(got, expected):
        assert e is None or torch.equal(a, e)
    # grad_h (of h's dtype, here the input's) is the one [M, N] tensor not allocated; with
    # dropout the input's gradient still is.
    assert allocated_ref - allocated == x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", DTYPES)
def test_returned_h_dropped_by_the_caller_is_reused(dtype):
    x, r, w, b = _inputs(dtype)
    out, h = F.add_layer_norm(x, r, (N,), w, b, return_residual=True)
    (out.sum() + (h * 2).sum()).backward(retain_graph=True)
    expected = _grads(x, r, w, b)
    out, h = F.add_layer_norm(x, r, (N,), w, b, return_residual=True)
    h_ptr = h.data_ptr()
    loss = out.sum() + (h * 2).sum()
    del out, h
    loss.backward()
    got = _grads(x, r, w, b)
    assert all(torch.equal(a, e) for a, e in zip(got, expected))
    assert h_ptr in (got[0].data_ptr(), got[1].data_ptr())


def _h_after_backward(keep, **backward_kw):
    """(h as the forward wrote it, h after backward, the input's gradient) where keep(h)
    holds h in some way during backward."""
    x, r, w, b = _inputs(torch.float32)
    out, h = F.add_layer_norm(x, r, (N,), w, b, return_residual=True)
    before = h.detach().clone()
    held = keep(h)
    del h
    out.backward(torch.ones_like(out), **backward_kw)
    return before, held, x.grad


@pytest.mark.parametrize("keep", [
    lambda h: h,                      # the tensor itself
    lambda h: h[1],                   # a view
    lambda h: h.detach(),             # a detached alias
    lambda h: h.detach().numpy(),     # a numpy array on its memory
], ids=["tensor", "view", "detached", "numpy"])
def test_h_seen_elsewhere_is_left_as_it_was(keep):
    before, held, gx = _h_after_backward(keep)
    after = torch.as_tensor(held)
    assert torch.equal(after, before if after.shape == before.shape else before[1])
    assert gx.data_ptr() != after.data_ptr()


def test_retained_graph_keeps_h_for_a_second_backward():
    x, r, w, b = _inputs(torch.float32)
    out = F.add_layer_norm(x, r, (N,), w, b)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = _grads(x, r, w, b)
    out.backward(g)
    second = _grads(x, r, w, b)
    assert all(torch.equal(a, e) for a, e in zip(first, second))


def test_a_hook_that_keeps_the_saved_tensor_sees_it_unchanged():
    x, r, w, b = _inputs(torch.float32)
    stash = []

    def pack(t):
        stash.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.add_layer_norm(x, r, (N,), w, b)
    (h,) = [t for t in stash if t.shape == x.shape]
    before = h.clone()
    out.sum().backward()
    assert torch.equal(h, before)


def test_another_node_that_saved_h_and_has_not_run_keeps_it():
    # h feeds a branch whose backward does not run in this pass (its output is not in the
    # loss): that node still holds h, so this backward allocates.
    x, r, w, b = _inputs(torch.float32)
    out, h = F.add_layer_norm(x, r, (N,), w, b, return_residual=True)
    side = h.sin()  # sin saves h
    before = h.detach().clone()
    h_ptr = h.data_ptr()
    del h
    out.sum().backward()
    assert x.grad.data_ptr() != h_ptr
    r.grad = None
    side.sum().backward()  # sin's backward reads h: unchanged
    torch.testing.assert_close(r.grad, before.cos(), rtol=0, atol=0)


def test_checkpoint_and_create_graph_give_the_same_gradients():
    from torch.utils.checkpoint import checkpoint
    x, r, w, b = _inputs(torch.float64)
    _call("add_layer_norm", x, r, w, b).sum().backward(retain_graph=True)
    expected = _grads(x, r, w, b)
    checkpoint(lambda a, c: _call("add_layer_norm", a, c, w, b), x, r,
               use_reentrant=False).sum().backward()
    assert all(torch.equal(a, e) for a, e in zip(_grads(x, r, w, b), expected))
    gx, = torch.autograd.grad(_call("add_layer_norm", x, r, w, b).sum(), [x], create_graph=True)
    torch.testing.assert_close(gx, expected[0], rtol=1e-12, atol=1e-12)


def test_not_reused_from_the_output_or_without_a_written_h():
    # memory_efficient keeps out, not h; a norm without residual normalizes the input itself
    # (the caller's tensor): neither is the backward's to overwrite.
    x, r, w, b = _inputs(torch.float32)
    out = F.add_layer_norm(x, r, (N,), w, b, memory_efficient=True)
    before = out.detach().clone()
    out.backward(torch.ones_like(out))
    assert torch.equal(out.detach(), before)
    y = x.detach() * 2
    y.requires_grad_(True)
    before = y.detach().clone()
    F.layer_norm(y, (N,), w, b).sum().backward()
    assert torch.equal(y.detach(), before)


def test_batched_gradients_read_h_for_every_slice():
    # A batched backward (is_grads_batched, jacobian(vectorize=True), vmap over grad) calls
    # the kernel once per slice through the batching fallback: h must survive each call.
    x, r, w, b = _inputs(torch.float64)
    G = torch.randn(3, 3, 5, N, dtype=torch.float64)

    def batched(retain):
        out = _call("add_layer_norm", x, r, w, b)
        return torch.autograd.grad(out, x, G, is_grads_batched=True, retain_graph=retain)[0]

    def vmapped(retain):
        out = _call("add_layer_norm", x, r, w, b)
        return torch.func.vmap(
            lambda g: torch.autograd.grad(out, x, g, retain_graph=retain)[0])(G)

    for run in (batched, vmapped):
        assert torch.equal(run(False), run(True))
    xs = x.detach()[0, :2].clone().requires_grad_(True)

    def f(v):
        return F.add_layer_norm(v, r.detach()[0, :2], (N,), w.detach(), b.detach())
    torch.testing.assert_close(torch.autograd.functional.jacobian(f, xs, vectorize=True),
                               torch.autograd.functional.jacobian(f, xs), rtol=0, atol=0)


def test_backward_retried_after_a_hook_raised_refuses_the_overwritten_h():
    # A post hook of the node runs after its backward, before the graph is freed: if it
    # raises, h already holds the gradient, and a retried backward raises autograd's in-place
    # error instead of reading it.
    x, r, w, b = _inputs(torch.float32)
    out = F.add_layer_norm(x, r, (N,), w, b)

    def post(grad_inputs, grad_outputs):
        raise RuntimeError("failure in a hook")
    handle = out.grad_fn.register_hook(post)
    with pytest.raises(RuntimeError, match="failure in a hook"):
        out.sum().backward()
    handle.remove()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
