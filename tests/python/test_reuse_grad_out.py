"""On the CPU, the backward of every norm op writes its result over the gradient it received
(grad_out, the gradient of the norm's output) where nothing else holds that gradient: the
engine moved it in, no hook, capture, other node or Python object keeps it, and no other
tensor is on its memory. That is the usual case in a model, where the gradient comes from
the next op's backward (a Linear's, an activation's). The backward then allocates one
[M, N] tensor fewer (two with the fused dropout: the input's gradient over grad_out, h's
over h), and the gradients are bitwise those of a backward whose grad_out is held
elsewhere. Wherever anything else can still see grad_out, it is left as it was."""

import pytest
import torch

import addnorm
from conftest import make_affine, make_data

F = addnorm.functional
N = 96
SHAPE = (3, 5, N)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _norm_bwd_allocated(backward):
    """Bytes the backward kernel call (addnorm::_norm_bwd) allocates during backward()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward()
    return sum(e.cpu_memory_usage for e in prof.events() if e.name == "addnorm::_norm_bwd")


def _leaves(dtype, seed=0, n=N):
    torch.manual_seed(seed)
    x = make_data(SHAPE[:-1] + (n,), dtype, "cpu", requires_grad=True)
    r = make_data(SHAPE[:-1] + (n,), dtype, "cpu", requires_grad=True)
    w, b = make_affine((n,), dtype, "cpu", requires_grad=True)
    return x, r, w, b


def _grads(*tensors):
    out = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _same(got, expected):
    """Bitwise the same gradients (None where none)."""
    return all((a is None and e is None) or (a is not None and e is not None and torch.equal(a, e))
               for a, e in zip(got, expected))


CALLS = {  # (the norm over the last dim, whatever its size)
    "layer_norm": lambda x, r, w, b: F.layer_norm(x, w.shape, w, b),
    "rms_norm": lambda x, r, w, b: F.rms_norm(x, w.shape, w),
    "add_layer_norm_memory_efficient":
        lambda x, r, w, b: F.add_layer_norm(x, r, w.shape, w, b, memory_efficient=True),
    "add_rms_norm_memory_efficient":
        lambda x, r, w, b: F.add_rms_norm(x, r, w.shape, w, memory_efficient=True),
    "add_layer_norm_no_residual_dropout":
        lambda x, r, w, b: F.add_layer_norm(x, None, w.shape, w, b, dropout_p=0.25),
}


@pytest.mark.parametrize("n", [N, 67])  # (67: the kernels' scalar tails)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(CALLS))
def test_gradient_from_an_op_takes_its_memory_bitwise_the_same(op, dtype, n):
    x, r, w, b = _leaves(dtype, n=n)
    c = torch.randn(x.shape, dtype=dtype)
    # Reference: grad_out is c itself, which the caller holds: the backward allocates.
    torch.manual_seed(1)  # (the same dropout mask in both calls)
    out = CALLS[op](x, r, w, b)
    allocated_ref = _norm_bwd_allocated(lambda: out.backward(c))
    expected = _grads(x, r, w, b)
    # (out * c).sum(): mul's backward makes grad_out = 1 * c, a tensor only the engine holds.
    torch.manual_seed(1)
    out = CALLS[op](x, r, w, b)
    allocated = _norm_bwd_allocated(lambda: (out * c).sum().backward())
    assert _same(_grads(x, r, w, b), expected)
    assert allocated_ref - allocated == x.numel() * x.element_size()


@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dropout_gradients_take_h_and_grad_out(dtype, residual_dtype):
    # Post-LN with the fused dropout: h's gradient (the residual's) over h, the input's
    # gradient over grad_out; with a float32 residual of bfloat16 input, each in its dtype.
    x, r, w, b = _leaves(dtype)
    if residual_dtype is not None:
        r = r.detach().to(residual_dtype).requires_grad_(True)
    c = torch.randn(SHAPE, dtype=dtype)

    def out_of():
        torch.manual_seed(1)
        return F.add_layer_norm(x, r, (N,), w, b, dropout_p=0.25)
    out = out_of()
    allocated_ref = _norm_bwd_allocated(lambda: out.backward(c, retain_graph=True))
    expected = _grads(x, r, w, b)
    out = out_of()
    allocated = _norm_bwd_allocated(lambda: (out * c).sum().backward())
    assert _same(_grads(x, r, w, b), expected)
    # retain_graph keeps h and c is the caller's: the reference allocates both gradients.
    assert allocated_ref - allocated == x.numel() * (x.element_size() + r.element_size())


def _reference(op, dtype, c):
    x, r, w, b = _leaves(dtype)
    CALLS[op](x, r, w, b).backward(c)
    return _grads(x, r, w, b)


@pytest.mark.parametrize("watch", ["tensor_hook", "post_hook", "capture"])
def test_gradient_seen_elsewhere_is_left_as_it_was(watch):
    # A hook on out that keeps its gradient; a post hook of the node (the engine keeps the
    # node's incoming gradients for it); out among the inputs of torch.autograd.grad.
    x, r, w, b = _leaves(torch.float32)
    c = torch.randn(SHAPE)
    expected = _reference("layer_norm", torch.float32, c)
    out = CALLS["layer_norm"](x, r, w, b)
    loss = (out * c).sum()
    if watch == "capture":
        seen, grad_x = torch.autograd.grad(loss, [out, x])
    else:
        kept = []
        if watch == "tensor_hook":
            out.register_hook(kept.append)
        else:
            out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: kept.append(grad_outputs[0]))
        loss.backward()
        seen, grad_x = kept[0], x.grad
    assert torch.equal(seen, c)
    assert torch.equal(grad_x, expected[0])


@pytest.mark.parametrize("combine", ["add", "cat"])
def test_one_gradient_reaching_two_norms(combine):
    # a + b: add's backward passes the same tensor to both norms (the first to run sees the
    # other's reference); cat: each gets a view of one buffer (the first sees the other view).
    x1, _, w, b = _leaves(torch.float64, seed=0)
    x2, _, _, _ = _leaves(torch.float64, seed=1)
    c = torch.randn(SHAPE, dtype=torch.float64)
    c2 = torch.cat([c, c]) if combine == "cat" else c

    def run(separately):
        o1 = F.layer_norm(x1, (N,), w, b)
        o2 = F.layer_norm(x2, (N,), w, b)
        if separately:
            torch.autograd.backward([o1, o2], [c, c])
        else:
            both = o1 + o2 if combine == "add" else torch.cat([o1, o2])
            (both * c2).sum().backward()
        return _grads(x1, x2, w, b)
    expected = run(True)
    got = run(False)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2:], expected[2:], rtol=1e-14, atol=1e-14)


def test_one_gradient_reaching_out_and_the_returned_h():
    # out + h: the norm's node receives the same tensor as out's and as h's gradient.
    x, r, w, b = _leaves(torch.float32)
    c = torch.randn(SHAPE)

    def run(hold):
        out, h = F.add_layer_norm(x, r, (N,), w, b, return_residual=True)
        if hold:
            torch.autograd.backward([out, h], [c, c])
        else:
            ((out + h) * c).sum().backward()
        return _grads(x, r, w, b)
    expected = run(True)
    assert _same(run(False), expected)


class _Twice(torch.Tensor):
    """A wrapper subclass whose ops run twice on the unwrapped tensors (as a determinism
    check might): Python code around the kernel that calls it again on its arguments."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype,
                                                   device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.elem if isinstance(t, _Twice) else t
        args, kwargs = torch.utils._pytree.tree_map(unwrap, (args, kwargs or {}))
        func(*args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_a_subclass_argument_keeps_the_call_allocating(op):
    # A subclass weight sends the backward kernel's call through Python: neither grad_out
    # nor h may be written over there (the second call reads them again).
    x, r, w, b = _leaves(torch.float32)
    c = torch.randn(SHAPE)

    def call(weight):
        if op == "layer_norm":
            return F.layer_norm(x, (N,), weight, b)
        return F.add_layer_norm(x, r, (N,), weight, b)
    call(w.detach()).backward(c, retain_graph=True)
    expected = _grads(x, r)
    (call(_Twice(w.detach())) * c).sum().backward()
    assert _same(_grads(x, r), expected)
