"""torch.compile(fullgraph=True) and torch.export of code using the addnorm ops: no graph
breaks, the custom ops stay in the graph, forward and backward match eager, dynamic shapes
compile once.

Most cases use backend="aot_eager" (traces forward and backward through the fake/meta
kernels and the autograd registration, runs fast on 2 cores); one case uses inductor."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import addnorm
from conftest import DEVICES, assert_close, make_affine, make_data


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """aot_eager backend that counts compiled frames and records the Dynamo graphs."""

    def __init__(self):
        self.counter = CompileCounterWithBackend("aot_eager")
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.counter(gm, example_inputs)

    @property
    def frame_count(self):
        return self.counter.frame_count

    def targets(self):
        return {n.target for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}

    def has_op(self, op):
        """op (an OpOverload) or its packet is called in one of the Dynamo graphs."""
        return any(t is op or t is op.overloadpacket for t in self.targets())


# Functions under test: f(x, r, w, b) -> tensor or tuple; the normalized size is read from x
# so that it is symbolic under dynamic shapes.
def f_add_layer_norm(x, r, w, b):
    out, h = torch.ops.addnorm.add_layer_norm(x, r, [x.shape[-1]], w, b, 1e-5)
    return torch.relu(out) * 2.0, h * 0.5


def f_add_rms_norm(x, r, w, b):
    out, h = torch.ops.addnorm.add_rms_norm(x, r, [x.shape[-1]], w, None)
    return out.sin(), h


def f_layer_norm(x, r, w, b):
    return torch.ops.addnorm.layer_norm(x + r, [x.shape[-1]], w, b, 1e-5) * 3.0


def f_rms_norm(x, r, w, b):
    return torch.ops.addnorm.rms_norm(x - r, [x.shape[-1]], w, 1e-6).cos()


def f_functional_prenorm(x, r, w, b):
    out, h = addnorm.functional.add_layer_norm(x, r, x.shape[-1], w, b, return_residual=True)
    return out + h.to(out.dtype)


def f_functional_postnorm(x, r, w, b):
    return addnorm.functional.add_rms_norm(x, r, x.shape[-1], w, 1e-6) * 2.0


def f_functional_fp32_residual(x, r, w, b):
    out, h = addnorm.functional.add_layer_norm(x, r, x.shape[-1], w, b, return_residual=True,
                                               residual_in_fp32=True)
    return out, h


def f_functional_layer_norm(x, r, w, b):  # (the wrappers, which offer eager calls to _C)
    return addnorm.layer_norm(x + r, x.shape[-1], w, b)


def f_functional_rms_norm(x, r, w, b):
    return addnorm.rms_norm(x - r, [x.shape[-1]], w)


FUNCTIONS = {
    "add_layer_norm": (f_add_layer_norm, torch.ops.addnorm.add_layer_norm.default),
    "add_rms_norm": (f_add_rms_norm, torch.ops.addnorm.add_rms_norm.default),
    "layer_norm": (f_layer_norm, torch.ops.addnorm.layer_norm.default),
    "rms_norm": (f_rms_norm, torch.ops.addnorm.rms_norm.default),
    "functional_prenorm": (f_functional_prenorm, torch.ops.addnorm.add_layer_norm.default),
    "functional_postnorm": (f_functional_postnorm, torch.ops.addnorm.add_rms_norm.default),
    "functional_fp32_residual": (f_functional_fp32_residual, torch.ops.addnorm.add_layer_norm.default),
    "functional_layer_norm": (f_functional_layer_norm, torch.ops.addnorm.layer_norm.default),
    "functional_rms_norm": (f_functional_rms_norm, torch.ops.addnorm.rms_norm.default),
}


def _inputs(shape, x_dtype, w_dtype, device):
    n = shape[-1]
    x = make_data(shape, x_dtype, device, requires_grad=True)
    r = make_data(shape, x_dtype, device, scale=1.0, offset=0.0, requires_grad=True)
    w, b = make_affine((n,), w_dtype, device, requires_grad=True)
    return [x, r, w, b]


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def _run_with_grads(fn, args, seed=0):
    """Forward, then backward with fixed random cotangents; returns (outputs, grads)."""
    outs = _as_tuple(fn(*args))
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, args, cot, allow_unused=True)
    return [o.detach() for o in outs], grads


def _assert_same(eager, compiled, args):
    (eo, eg), (co, cg) = eager, compiled
    assert len(eo) == len(co)
    for a, e in zip(co, eo):
        assert a.dtype == e.dtype
        assert_close(a, e.double(), name="output")
    for t, a, e in zip(args, cg, eg):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == t.dtype
            assert_close(a, e.double(), reduced=t.dim() == 1, name="grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-fp32w"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_compile_fullgraph_aot_eager(name, dtypes, device):
    """fullgraph=True (any graph break raises), the op appears in the Dynamo graph, forward
    and backward match eager."""
    fn, op = FUNCTIONS[name]
    args = _inputs((4, 3, 40), *dtypes, device)
    backend = RecordingBackend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    _assert_same(_run_with_grads(fn, args), _run_with_grads(compiled, args), args)
    assert backend.frame_count == 1
    assert backend.has_op(op), f"{op} not in the Dynamo graph: {backend.targets()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm", "functional_prenorm"])
def test_compile_dynamic_true_no_recompile(name, device):
    """dynamic=True: a second shape (other rows and other hidden size) reuses the graph."""
    fn, _ = FUNCTIONS[name]
    backend = RecordingBackend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for shape in [(4, 3, 32), (6, 5, 48), (2, 7, 24)]:
        args = _inputs(shape, torch.float32, torch.float32, device)
        _assert_same(_run_with_grads(fn, args), _run_with_grads(compiled, args), args)
    assert backend.frame_count == 1, f"recompiled: {backend.frame_count} frames"


@pytest.mark.parametrize("device", DEVICES)
def test_compile_mark_dynamic_no_recompile(device):
    """torch._dynamo.mark_dynamic on the row dims: other row counts reuse the graph."""
    fn, _ = FUNCTIONS["add_layer_norm"]
    backend = RecordingBackend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for rows in [5, 9, 33]:
        args = _inputs((rows, 64), torch.bfloat16, torch.float32, device)
        torch._dynamo.mark_dynamic(args[0], 0)
        torch._dynamo.mark_dynamic(args[1], 0)
        _assert_same(_run_with_grads(fn, args), _run_with_grads(compiled, args), args)
    assert backend.frame_count == 1, f"recompiled: {backend.frame_count} frames"


def test_compile_unbacked_sizes():
    """Data-dependent (unbacked) sizes, as after boolean indexing: an input and a residual with
    independent unbacked rows, and an unbacked normalized dim against a weight of static
    size, compile with fullgraph=True (the shape checks become runtime assertions there,
    where they had failed the trace: "Could not guard on data-dependent expression"), and the
    compiled forward and backward are eager's. memory_efficient's short-row rule (rows of 1
    to 3 keep h) on an unbacked row length adds no guard (it raised): the graph keeps h, and
    its gradients are bitwise those of memory_efficient=False; with a weight of static size
    the row length is known (8), and the graph keeps out as eager does."""
    x, r = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    ln_me = lambda me: lambda x, r, w: addnorm.add_layer_norm(x, r, x.shape[-1], memory_efficient=me)  # noqa: E731
    cases = [(lambda x, r, w: addnorm.add_layer_norm(x, r, 8, w), None, [(x, 0), (r, 0)]),
             (lambda x, r, w: addnorm.add_rms_norm(x, r, 8, w, memory_efficient=True), None,
              [(x, 0), (r, 0)]),
             (lambda x, r, w: addnorm.layer_norm(x, x.shape[-1], w), None, [(x, 1)]),
             (lambda x, r, w: addnorm.rms_norm(x, [x.shape[-1]], w), None, [(x, 1)]),
             (ln_me(True), ln_me(False), [(x, 1), (r, 1)]),
             (lambda x, r, w: addnorm.add_rms_norm(x, r, x.shape[-1], w, memory_efficient=True), None,
              [(x, 1), (r, 1)])]
    for fn, ref, marks in cases:
        torch._dynamo.reset()
        for t, d in marks:
            torch._dynamo.decorators.mark_unbacked(t, d)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, r, w)
        exp = (ref or fn)(x, r, w)
        assert torch.equal(got, exp)
        g = torch.randn_like(exp)
        for a, e in zip(torch.autograd.grad(got, (x, r, w), g, allow_unused=True),
                        torch.autograd.grad(exp, (x, r, w), g, allow_unused=True)):
            assert (a is None) == (e is None) and (a is None or torch.equal(a, e))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_module(device):
    """A model with addnorm modules (pre-LN residual stream) compiles with fullgraph=True."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d)
            self.add_norm = addnorm.AddLayerNorm(d, return_residual=True)
            self.norm = addnorm.RMSNorm(d)

        def forward(self, x, residual):
            out, h = self.add_norm(self.fc(x), residual)
            return self.norm(out) + h

    model = Block(32).to(device)
    x = make_data((3, 5, 32), torch.float32, device, requires_grad=True)
    r = make_data((3, 5, 32), torch.float32, device, scale=1.0, offset=0.0, requires_grad=True)
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    params = list(model.parameters())
    eager_out = model(x, r)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, r] + params)
    comp_out = compiled(x, r)
    comp_grads = torch.autograd.grad(comp_out.sum(), [x, r] + params)
    assert_close(comp_out, eager_out.double(), name="out")
    for a, e in zip(comp_grads, eager_grads):
        assert_close(a, e.double(), reduced=a.shape != x.shape, name="grad")  # params: sums over rows
    assert backend.has_op(torch.ops.addnorm.add_layer_norm.default), backend.targets()
    assert backend.has_op(torch.ops.addnorm.rms_norm.default), backend.targets()


def test_compile_inductor():
    """One inductor case (slow on 2 cores): forward and backward of add_layer_norm with
    surrounding pointwise ops that inductor fuses around the custom op."""
    fn, _ = FUNCTIONS["add_layer_norm"]
    args = _inputs((4, 64), torch.float32, torch.float32, "cpu")
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    _assert_same(_run_with_grads(fn, args), _run_with_grads(compiled, args), args)


# --------------------------------------------------------------------------- export


class PreNormBlock(nn.Module):
    def __init__(self, d, rms=False):
        super().__init__()
        self.rms = rms
        self.fc = nn.Linear(d, d)
        self.weight = nn.Parameter(1.0 + 0.5 * torch.randn(d))
        self.bias = nn.Parameter(0.5 * torch.randn(d))

    def forward(self, x, residual):
        y = self.fc(x)
        if self.rms:
            out, h = torch.ops.addnorm.add_rms_norm(y, residual, [y.shape[-1]], self.weight, 1e-6)
        else:
            out, h = torch.ops.addnorm.add_layer_norm(y, residual, [y.shape[-1]], self.weight, self.bias, 1e-5)
        return out, h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_export_keeps_custom_op(rms, device):
    """torch.export.export keeps addnorm.add_layer_norm / add_rms_norm as one node, with a
    dynamic batch dim, and the exported program computes what eager does."""
    mod = PreNormBlock(48, rms).to(device)
    x = make_data((4, 6, 48), torch.float32, device)
    r = make_data((4, 6, 48), torch.float32, device, scale=1.0, offset=0.0)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(mod, (x, r), dynamic_shapes={"x": {0: batch}, "residual": {0: batch}})
    op = torch.ops.addnorm.add_rms_norm.default if rms else torch.ops.addnorm.add_layer_norm.default
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(op) == 1, targets
    assert "addnorm" in str(ep.graph)
    for bsz in (4, 9):
        xi = make_data((bsz, 6, 48), torch.float32, device)
        ri = make_data((bsz, 6, 48), torch.float32, device, scale=1.0, offset=0.0)
        got = ep.module()(xi, ri)
        exp = mod(xi, ri)
        assert len(got) == 2
        for a, e in zip(got, exp):
            assert a.shape == (bsz, 6, 48)
            assert_close(a, e.double(), name="exported vs eager")


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_export_memory_efficient_keeps_a_dynamic_row_lengths_range(rms):
    """memory_efficient=True with a dynamic row length N: the short-row rule (rows of 1 to 3
    keep h) adds no guard, so the exported program takes every N of its range (the guard
    N >= 4 failed export with Dim(min=1), and narrowed Dim.DYNAMIC to N >= 4: the program
    refused N = 3), and its outputs and gradients are eager's at each N."""
    def fn(x, r):
        op = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
        return op(x, r, x.shape[-1], memory_efficient=True)

    class M(nn.Module):
        def forward(self, x, r):
            return fn(x, r)

    x, r = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    for dim in (torch.export.Dim("N", min=1, max=64), torch.export.Dim.DYNAMIC):
        ep = torch.export.export(M(), (x, r), dynamic_shapes=({1: dim},) * 2)
        for n in (1, 3, 8, 17):
            xi, ri = torch.randn(4, n, requires_grad=True), torch.randn(4, n)
            got, exp = ep.module()(xi, ri), fn(xi, ri)
            assert torch.equal(got, exp)
            g = torch.randn_like(exp)
            assert torch.equal(torch.autograd.grad(got, xi, g)[0], torch.autograd.grad(exp, xi, g)[0])


def test_run_decompositions_backward_raises_instead_of_no_gradients():
    """ExportedProgram.run_decompositions traces through the ops' autograd kernels and
    records the internal _norm_fwd: its forward is exact, and a backward through it raises
    (it gave no gradients to the norm's parameters and everything before it, silently)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), addnorm.AddLayerNorm(32), nn.Linear(32, 1))
    x = torch.randn(4, 32)
    em = torch.export.export(m, (x,)).run_decompositions({}).module()
    assert torch.equal(em(x), m(x))
    with pytest.raises(RuntimeError, match="derivative for addnorm::_norm_fwd is not implemented"):
        em(x).sum().backward()


def test_aoti_package_runs_the_ops(tmp_path):
    """AOTInductor compiles a model with the drop-ins and the encoder layer (eval) into a
    package whose results equal eager's, with a dynamic batch dim."""
    torch.manual_seed(0)
    m = nn.Sequential(addnorm.LayerNorm(32), nn.Linear(32, 32),
                      addnorm.TransformerEncoderLayer(32, 4, 64, batch_first=True)).eval()
    with torch.no_grad():
        m[0].weight.normal_(1, 0.5)
        m[0].bias.normal_(0, 0.5)
    x = torch.randn(2, 5, 32)
    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch},))
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(tmp_path / "model.pt2"))
        run = torch._inductor.aoti_load_package(path)
        for bsz in (2, 3):
            xi = torch.randn(bsz, 5, 32)
            assert_close(run(xi), m(xi).double(), name="AOTInductor vs eager")


@pytest.mark.parametrize("kw", [{}, {"dropout_p": 0.2}, {"memory_efficient": True},
                                {"return_residual": True}], ids=str)
def test_compiled_autograd_over_an_eager_forward(kw):
    """Compiled autograd (torch._dynamo.config.compiled_autograd) over the nodes of an eager
    forward gives eager's gradients (a C++ node that marked outputs non-differentiable hit
    an internal assert there); the encoder layer's nodes too."""
    torch.manual_seed(0)
    x, r = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    layer = addnorm.TransformerEncoderLayer(32, 4, 64, dropout=0.1)
    src = torch.randn(5, 2, 32, requires_grad=True)
    leaves = [x, r, w, b, src, *layer.parameters()]

    def grads(compiled):
        for t in leaves:
            t.grad = None
        torch.manual_seed(1)
        o = addnorm.add_layer_norm(x, r, 32, w, b, **kw)
        o = o if isinstance(o, tuple) else (o,)
        loss = sum(t.pow(i + 2).sum() for i, t in enumerate(o)) + layer(src).pow(2).sum()
        if compiled:
            with torch._dynamo.config.patch(compiled_autograd=True):
                torch.compile(lambda: loss.backward(), backend="aot_eager")()
        else:
            loss.backward()
        return [t.grad for t in leaves]

    for a, e in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"memory_efficient": True}, {"dropout_p": 0.2}], ids=str)
def test_compiled_autograd_frees_the_saved_tensors(kw):
    """After a compiled-autograd backward (which runs the node's backward on a copy of its
    context) the node's saved tensors are freed, as after an eager one, and a second
    backward without retain_graph raises (it once kept them all and ran again)."""
    import gc
    import weakref

    x, r = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    refs = []

    def pack(t):  # (the activations: not the leaves the test holds, nor the dropout seed)
        if t.is_floating_point() and not any(t is u for u in (x, r, w, b)):
            refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = addnorm.add_layer_norm(x, r, 32, w, b, **kw).pow(2).sum()
    assert len(refs) >= 3  # (h or out, mean, rstd; pow's input)
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(lambda: loss.backward(), backend="eager")()
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_compiled_autograd_keeps_an_unused_dropout_seed():
    """A compiled-autograd backward that computed no input gradient (backward(inputs=[w, r]))
    leaves the fused dropout's seed with the graph, as an eager one does: a later backward
    through h alone for the input's gradient runs, with the forward's mask."""
    x, r, w = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True), \
        torch.ones(16, requires_grad=True)
    out, h = torch.ops.addnorm.add_layer_norm(x, r, [16], w, None, return_residual=True,
                                              dropout_p=0.5, dropout_seed=torch.tensor([1, 2]))
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(lambda: out.pow(2).sum().backward(inputs=[w, r]), backend="eager")()
    assert x.grad is None and w.grad is not None
    gx, = torch.autograd.grad(h.sum(), [x])
    torch.testing.assert_close(gx, addnorm.dropout_mask(torch.tensor([1, 2]), [4, 16], 0.5).float() / 0.5)


def test_a_retained_compiled_autograd_backward_leaves_the_node_as_it_was():
    """A compiled-autograd backward with retain_graph=True does not mark the node done: an
    eager backward through h alone afterwards leaves its saved tensors, and one through out
    then works (it once raised "backward through the graph a second time")."""
    x, r = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    out, h = addnorm.add_layer_norm(x, r, 16, return_residual=True)
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(lambda: h.sum().backward(retain_graph=True), backend="eager")()
    h.sum().backward()
    out.pow(2).sum().backward()
    xe, re_ = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    oe, he = addnorm.add_layer_norm(xe, re_, 16, return_residual=True)
    (2 * he.sum() + oe.pow(2).sum()).backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-6, atol=1e-6)
