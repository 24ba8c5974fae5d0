"""The Python package: functional API, drop-in modules (LayerNorm, RMSNorm, AddLayerNorm,
AddRMSNorm) with torch's parameters / state_dict / extra_repr, and replace_modules."""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import addnorm
from conftest import DEVICES, assert_close, make_affine, make_data


def _randomize(module, gen_seed=0):
    """Non-trivial affine parameters, so that a wrong mapping would show."""
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


def _ref64(torch_module, x):
    """torch's own module run in float64 (the reference for any dtype)."""
    return copy.deepcopy(torch_module).double()(x.double())


# --------------------------------------------------------------------------- functional


def test_top_level_reexports():
    for name in ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]:
        assert getattr(addnorm, name) is getattr(addnorm.functional, name)
    for name in ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "replace_modules"]:
        assert hasattr(addnorm, name)
    assert isinstance(addnorm.__version__, str) and addnorm.__version__
    assert addnorm.cpu_capability() in ("AVX512", "AVX2", "DEFAULT")
    assert addnorm.cuda_available() in (True, False)
    if not torch.cuda.is_available():
        assert addnorm.cuda_available() is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ns", [8, (8,), [8], torch.Size([8])], ids=["int", "tuple", "list", "size"])
def test_functional_matches_ops(ns, device):
    """The functional forms call the ops (bitwise the same results), accept an int or a
    sequence as normalized_shape, and have the documented defaults."""
    x = make_data((3, 8), torch.float32, device)
    r = make_data((3, 8), torch.float32, device, scale=1.0, offset=0.0)
    w, b = make_affine((8,), torch.float32, device)
    fn = addnorm.functional
    assert torch.equal(fn.layer_norm(x, ns, w, b), torch.ops.addnorm.layer_norm(x, [8], w, b, 1e-5))
    assert torch.equal(fn.layer_norm(x, ns, w, b, 0.1), torch.ops.addnorm.layer_norm(x, [8], w, b, 0.1))
    assert torch.equal(fn.layer_norm(x, ns), torch.ops.addnorm.layer_norm(x, [8], None, None, 1e-5))
    assert torch.equal(fn.rms_norm(x, ns, w), torch.ops.addnorm.rms_norm(x, [8], w, None))
    out = fn.add_layer_norm(x, r, ns, w, b)  # return_residual=False by default: out only
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.ops.addnorm.add_layer_norm(x, r, [8], w, b, 1e-5)[0])
    out, h = fn.add_layer_norm(x, r, ns, w, b, 1e-3, return_residual=True)
    eo, eh = torch.ops.addnorm.add_layer_norm(x, r, [8], w, b, 1e-3)
    assert torch.equal(out, eo) and torch.equal(h, eh)
    out = fn.add_rms_norm(x, r, ns, w)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.ops.addnorm.add_rms_norm(x, r, [8], w, None)[0])
    out, h = fn.add_rms_norm(x.bfloat16(), r, ns, w, return_residual=True, residual_in_fp32=True)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_wrappers_skip_torch_ops_only_where_python_cannot_see_the_call(monkeypatch):
    """The functional forms and modules call the ops through addnorm._C (pybind11 to the
    dispatcher: torch.ops' argument matching costs microseconds a call) with torch.ops'
    results, gradients and errors; a __torch_function__ subclass or mode, and a trace, still
    see torch.ops.addnorm.* called."""
    from torch.overrides import TorchFunctionMode
    fn, C = addnorm.functional, addnorm._C
    direct = []
    for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _real=real, _name=name, **k: (
            direct.append(_name), _real(*a, **k))[1])
    x, r = (make_data((3, 8), torch.float32, "cpu", requires_grad=True) for _ in range(2))
    w, b = (nn.Parameter(t) for t in make_affine((8,), torch.float32, "cpu"))
    g = torch.randn(3, 8)
    seed = torch.tensor([5, 7])
    calls = {  # name: (the wrapper, torch.ops' call with the same arguments)
        "layer_norm": (lambda: fn.layer_norm(x, 8, w, b, 0.1),
                       lambda: torch.ops.addnorm.layer_norm(x, [8], w, b, 0.1)),
        "rms_norm": (lambda: addnorm.RMSNorm(8)(x), lambda: torch.ops.addnorm.rms_norm(
            x, [8], addnorm.RMSNorm(8).weight, None)),
        "add_layer_norm": (lambda: fn.add_layer_norm(x, r, 8, w, b, return_residual=True)[1] * 2
                           + fn.add_layer_norm(x, r, 8, w, b, memory_efficient=True),
                           lambda: torch.ops.addnorm.add_layer_norm(x, r, [8], w, b)[1] * 2
                           + torch.ops.addnorm.add_layer_norm(x, r, [8], w, b, memory_efficient=True)[0]),
        "add_rms_norm": (lambda: addnorm.AddRMSNorm(8, dropout=0.5)(x, r),
                         lambda: torch.ops.addnorm.add_rms_norm(
                             x, r, [8], addnorm.AddRMSNorm(8).weight, None, return_residual=False,
                             dropout_p=0.5, dropout_seed=seed)[0]),
    }
    for name, (ours, theirs) in calls.items():
        results = []
        for f in (ours, theirs):
            with monkeypatch.context() as m:  # the modules' seeds: one fixed draw
                m.setattr(fn, "dropout_seed", lambda *a, **k: seed)
                out = f()
            grads = torch.autograd.grad(out, [x, r, w, b], g, allow_unused=True)
            results.append([out] + [t for t in grads if t is not None])
        assert all(torch.equal(a, e) for a, e in zip(*results)), name
        assert direct.count(name) >= 1, name
    # torch.ops' errors and their types: from _C's call, and where _C declines an argument
    # of other than the plain types (NotImplemented), from the wrapper's call of torch.ops
    kw = dict(return_residual=True, residual_in_fp32=False, dropout_p=0.0, dropout_seed=None,
              memory_efficient=False)
    for args, direct_call in (((x, r, [9], w, b, 1e-5), True), ((x, r, [8], w, b, None), False)):
        errors = []
        for call in (lambda: C.add_layer_norm(*args, **kw) if direct_call else
                     fn.add_layer_norm(*args, return_residual=True),
                     lambda: torch.ops.addnorm.add_layer_norm(*args, **kw)):
            with pytest.raises(RuntimeError) as e:
                call()
            errors.append(str(e.value).splitlines()[0])
        assert errors[0] == errors[1]
        assert direct_call or C.add_layer_norm(*args, **kw) is NotImplemented
    # arguments of other than the plain types go to torch.ops, which converts them, or are
    # refused by name: numpy scalars, a float in the shape, symbolic sizes (kept symbolic)
    assert torch.equal(fn.layer_norm(x, [np.int64(8)], w, b, np.float64(0.1)),
                       torch.ops.addnorm.layer_norm(x, [8], w, b, 0.1))
    with pytest.raises(TypeError, match=r"normalized_shape must be an int or a sequence of ints, got \[8\.0\]"):
        fn.add_layer_norm(x, r, [8.0])
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env) as mode:
        fake = mode.from_tensor(torch.randn(2, 8), symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * 2))
        assert fn.add_rms_norm(fake, fake, fake.shape[-1]).shape == fake.shape
    assert not shape_env.guards  # (a size read as an int would have been guarded)

    # Python-level code that must see the call: a subclass's __torch_function__, a mode, a trace
    seen = []

    class Sub(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    direct.clear()
    fn.add_layer_norm(x.detach().as_subclass(Sub), r, 8, w, b)
    addnorm.LayerNorm(8)(x.detach().as_subclass(Sub))
    with Mode():
        fn.rms_norm(x, 8)
        addnorm.AddLayerNorm(8)(x, r)
    ops = [f for f in seen if isinstance(f, (torch._ops.OpOverloadPacket, torch._ops.OpOverload))]
    assert [str(f).split(".")[1] for f in ops] == [
        "add_layer_norm", "layer_norm", "rms_norm", "add_layer_norm"]
    assert direct == []
    rd = r.detach()
    traced = torch.jit.trace(lambda x: fn.add_layer_norm(x, rd, 8), (x.detach(),))
    assert "addnorm::add_layer_norm" in str(traced.graph)
    y = torch.randn(3, 8)
    assert torch.equal(traced(y), fn.add_layer_norm(y, rd, 8))


# --------------------------------------------------------------------------- LayerNorm / RMSNorm

LN_CONFIGS = [
    dict(normalized_shape=16),
    dict(normalized_shape=(16,), eps=1e-3),
    dict(normalized_shape=[4, 6]),
    dict(normalized_shape=16, elementwise_affine=False),
    dict(normalized_shape=16, bias=False),
    dict(normalized_shape=(2, 8), bias=False, eps=0.1),
]
RMS_CONFIGS = [
    dict(normalized_shape=16),
    dict(normalized_shape=(16,), eps=1e-6),
    dict(normalized_shape=[4, 6]),
    dict(normalized_shape=16, elementwise_affine=False),
    dict(normalized_shape=(2, 8), eps=0.1),
]
MODULE_CASES = [("LayerNorm", nn.LayerNorm, c) for c in LN_CONFIGS] + [
    ("RMSNorm", nn.RMSNorm, c) for c in RMS_CONFIGS]


def _cid(case):
    name, _, cfg = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in cfg.items() if k != "normalized_shape") + \
        f"-{cfg['normalized_shape']}"


def _input_for(module, dtype, device, lead=(3, 5)):
    return make_data(lead + tuple(module.normalized_shape), dtype, device, requires_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MODULE_CASES, ids=[_cid(c) for c in MODULE_CASES])
def test_module_matches_torch_module(case, device):
    """Same attributes, parameter names/shapes/initial values, state_dict keys and extra_repr
    as torch's module; load_state_dict both ways; same forward and gradients."""
    name, torch_cls, cfg = case
    ours_cls = getattr(addnorm, name)
    t = torch_cls(**cfg, device=device)
    o = ours_cls(**cfg, device=device)
    assert o.extra_repr() == t.extra_repr()
    assert o.normalized_shape == t.normalized_shape
    assert o.eps == t.eps and o.elementwise_affine == t.elementwise_affine
    assert [n for n, _ in o.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert list(o.state_dict().keys()) == list(t.state_dict().keys())
    for (_, po), (_, pt) in zip(o.named_parameters(), t.named_parameters()):
        assert po.shape == pt.shape and po.device == pt.device and torch.equal(po, pt)  # reset_parameters
    if hasattr(t, "bias"):
        assert (getattr(o, "bias", None) is None) == (t.bias is None)

    # torch -> addnorm
    _randomize(t, 1)
    o.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(o.state_dict()[k], v)
    x = _input_for(t, torch.float32, device)
    out_o = o(x)
    ref = _ref64(t, x)
    assert_close(out_o, ref, name="out")
    cot = torch.randn(out_o.shape, device=device)
    params_o = list(o.parameters())
    grads_o = torch.autograd.grad(out_o, [x] + params_o, cot)
    x64 = x.detach().double().requires_grad_()
    t64 = copy.deepcopy(t).double()
    grads_t = torch.autograd.grad(t64(x64), [x64] + list(t64.parameters()), cot.double())
    for i, (a, e) in enumerate(zip(grads_o, grads_t)):
        assert_close(a, e, reduced=i > 0, name=f"grad {i}")

    # addnorm -> torch
    _randomize(o, 2)
    t2 = torch_cls(**cfg, device=device)
    t2.load_state_dict(o.state_dict())
    assert_close(o(x), _ref64(t2, x), name="out after load into torch")


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"])
def test_module_factory_kwargs(cls):
    m = getattr(addnorm, cls)(8, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"
    assert torch.equal(m.weight, torch.ones(8, dtype=torch.float64))
    if "LayerNorm" in cls:
        assert torch.equal(m.bias, torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,torch_cls", [("LayerNorm", nn.LayerNorm), ("RMSNorm", nn.RMSNorm)])
def test_module_fp32_params_half_input(name, torch_cls, device):
    """Mixed precision (what autocast / master weights give): fp32 module on bf16 input gives
    bf16 output matching the float64 reference."""
    t = _randomize(torch_cls(32, device=device))
    o = getattr(addnorm, name)(32, device=device)
    o.load_state_dict(t.state_dict())
    x = make_data((4, 32), torch.bfloat16, device)
    out = o(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, _ref64(t, x), name="out")


@pytest.mark.parametrize("name,torch_cls", [("LayerNorm", nn.LayerNorm), ("RMSNorm", nn.RMSNorm)])
def test_autocast_policy_is_torchs(name, torch_cls):
    """torch's autocast policy for its norms: layer_norm runs in float32 under CUDA autocast
    (its float32 list), rms_norm has no policy, and the CPU has none for either. addnorm
    registers AutocastCUDA kernels for layer_norm and add_layer_norm only; CPU autocast
    gives torch's dtype (test_autocast_cuda_dtypes_without_a_gpu runs the CUDA kernels)."""
    ln = name == "LayerNorm"
    for op in (["layer_norm", "add_layer_norm"] if ln else ["rms_norm", "add_rms_norm"]):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"addnorm::{op}", "AutocastCUDA") == ln
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"addnorm::{op}", "AutocastCPU")
    t = _randomize(torch_cls(32))
    o = getattr(addnorm, name)(32)
    o.load_state_dict(t.state_dict())
    x = make_data((4, 32), torch.bfloat16, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert o(x).dtype == t(x).dtype == torch.bfloat16


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_autocast_cuda_dtypes_without_a_gpu(half):
    """The AutocastCUDA kernels run on fake CUDA tensors (no GPU needed): the dtypes of out
    and h against torch's eager F.layer_norm(x + r) / F.rms_norm under CUDA autocast, for a
    half input with a float32 residual (eager's h float32: out float32, as torch's), a half
    residual (h half as eager's; out half, where torch's is float32: docs/semantics.md), another half
    residual (promoted to float32), residual_in_fp32, no residual, and h returned."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    other = torch.bfloat16 if half == torch.float16 else torch.float16
    with FakeTensorMode():
        x = torch.empty(4, 32, dtype=half, device="cuda")
        w = torch.empty(32, device="cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", half)
        try:
            assert addnorm.layer_norm(x, 32, w, w).dtype == _layer_norm(x, w).dtype == torch.float32
            assert addnorm.rms_norm(x, 32, w).dtype == nn.functional.rms_norm(x, [32], w).dtype
            for r_dtype, fp32, out_dtype, h_dtype in [
                    (torch.float32, False, torch.float32, torch.float32),
                    (half, False, half, half),
                    (other, False, torch.float32, torch.float32),
                    (half, True, torch.float32, torch.float32)]:
                r = torch.empty(4, 32, dtype=r_dtype, device="cuda")
                out, h = addnorm.add_layer_norm(x, r, 32, w, w, return_residual=True,
                                                residual_in_fp32=fp32)
                assert (out.dtype, h.dtype) == (out_dtype, h_dtype), (r_dtype, fp32)
                if not fp32:  # eager's h, and eager's out where h is float32
                    assert h.dtype == (x + r).dtype
                    if h_dtype == torch.float32:
                        assert out.dtype == _layer_norm(x + r, w).dtype
                if r_dtype in (torch.float32, half):  # (the other half dtype: refused)
                    rms = addnorm.add_rms_norm(x, r, 32, w, residual_in_fp32=fp32)
                    assert rms.dtype == half  # (no policy: the input's dtype)
            assert addnorm.add_layer_norm(x, None, 32, w, w).dtype == torch.float32
            out, h = addnorm.add_layer_norm(x, None, 32, w, w, return_residual=True)
            assert out.dtype == h.dtype == half  # (h = x, half as eager's)
        finally:
            torch.set_autocast_enabled("cuda", False)


def _layer_norm(h, w):
    return nn.functional.layer_norm(h, [h.shape[-1]], w, w)


# --------------------------------------------------------------------------- Add modules

ADD_CASES = [("AddLayerNorm", nn.LayerNorm, dict(normalized_shape=24)),
             ("AddLayerNorm", nn.LayerNorm, dict(normalized_shape=(2, 12), eps=1e-3, bias=False)),
             ("AddLayerNorm", nn.LayerNorm, dict(normalized_shape=24, elementwise_affine=False)),
             ("AddRMSNorm", nn.RMSNorm, dict(normalized_shape=24)),
             ("AddRMSNorm", nn.RMSNorm, dict(normalized_shape=(2, 12), eps=1e-6, elementwise_affine=False))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("case", ADD_CASES, ids=[_cid(c) for c in ADD_CASES])
def test_add_modules(case, return_residual, device):
    """AddLayerNorm / AddRMSNorm: torch's constructor + return_residual; forward(input,
    residual) = norm(input + residual) [, input + residual]; state_dict as torch's norm."""
    name, torch_cls, cfg = case
    t = _randomize(torch_cls(**cfg, device=device))
    o = getattr(addnorm, name)(**cfg, return_residual=return_residual, device=device)
    assert o.extra_repr().startswith(t.extra_repr())
    assert list(o.state_dict().keys()) == list(t.state_dict().keys())
    o.load_state_dict(t.state_dict())
    x = _input_for(t, torch.float32, device)
    r = _input_for(t, torch.float32, device)
    res = o(x, r)
    h_ref = x + r
    if return_residual:
        out, h = res
        assert torch.equal(h, h_ref)
    else:
        assert isinstance(res, torch.Tensor)
        out = res
    assert_close(out, _ref64(t, h_ref), name="out")
    gx, gr = torch.autograd.grad(out.sum() + (h.sum() * 0.5 if return_residual else 0), [x, r])
    assert torch.equal(gx, gr)


@pytest.mark.parametrize("name", ["AddLayerNorm", "AddRMSNorm"])
def test_add_module_residual_in_fp32(name):
    o = getattr(addnorm, name)(16, return_residual=True, residual_in_fp32=True)
    x = make_data((3, 16), torch.bfloat16, "cpu")
    r = make_data((3, 16), torch.bfloat16, "cpu")
    out, h = o(x, r)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, x.float() + r.float())


# --------------------------------------------------------------------------- replace_modules


class TinyPreLN(nn.Module):
    """A small pre-LN block using every flavor of nn.LayerNorm / nn.RMSNorm."""

    def __init__(self, d=32):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.rms = nn.RMSNorm(d)  # eps=None
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Sequential(
            nn.LayerNorm(d, elementwise_affine=False),
            nn.Linear(d, d),
            nn.LayerNorm(d, bias=False, eps=1e-3),
            nn.GELU(),
            nn.RMSNorm(d, eps=1e-6, elementwise_affine=False),
            nn.Unflatten(-1, (4, d // 4)),
            nn.LayerNorm((4, d // 4)),
            nn.Flatten(-2),
            nn.RMSNorm(d, eps=1e-5),
        )

    def forward(self, x):
        x = x + self.fc1(self.ln1(x))
        x = x + self.fc2(self.rms(x))
        return self.head(x)


def _norm_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm,
                                                                     addnorm.LayerNorm, addnorm.RMSNorm))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replace_modules(dtype, device):
    """Every nn.LayerNorm / nn.RMSNorm becomes addnorm's (in place, same object returned),
    weights/dtype/device/eps kept, same outputs and gradients as before replacement."""
    torch.manual_seed(0)
    model = TinyPreLN()
    for m in _norm_modules(model).values():
        _randomize(m)
    model = model.to(device=device, dtype=dtype)
    original = copy.deepcopy(model)
    before = {n: (type(m), m.extra_repr()) for n, m in _norm_modules(model).items()}
    assert len(before) == 7

    returned = addnorm.replace_modules(model)
    assert returned is model
    after = _norm_modules(model)
    assert set(after) == set(before)
    for n, m in after.items():
        cls = addnorm.LayerNorm if before[n][0] is nn.LayerNorm else addnorm.RMSNorm
        assert isinstance(m, cls), f"{n}: {type(m)}"
        assert type(m) not in (nn.LayerNorm, nn.RMSNorm)
        assert m.extra_repr() == before[n][1]
    assert list(model.state_dict()) == list(original.state_dict())
    for (k, v), (_, v0) in zip(model.state_dict().items(), original.state_dict().items()):
        assert v.dtype == dtype and v.device.type == device and torch.equal(v, v0), k

    x = make_data((2, 5, 32), dtype, device, requires_grad=True)
    cot = torch.randn(2, 5, 32, device=device, dtype=dtype)
    outs, grads = [], []
    for m in (original, model):
        out = m(x)
        outs.append(out)
        names = [n for n, _ in m.named_parameters()]
        g = torch.autograd.grad(out, [x] + [p for _, p in m.named_parameters()], cot)
        grads.append(dict(zip(["input"] + names, g)))
    assert outs[1].dtype == dtype
    assert_close(outs[1], outs[0].double(), name="out")
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k].double(), reduced=k != "input", name=f"grad {k}")
    # The replaced model is really running addnorm's modules.
    assert isinstance(model.head[2], addnorm.LayerNorm) and model.head[2].bias is None
    # torch.fx traces it (the named-tensor check leaves fx's proxies alone): the ops appear
    # in the graph and the traced module gives the same output.
    traced = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert {"addnorm.layer_norm", "addnorm.rms_norm"} <= targets, targets
    assert torch.equal(traced(x), model(x))


def test_replace_modules_warns_about_subclasses_it_leaves():
    """A subclass of a module replace_modules converts (a user's, or the class FSDP's
    fully_shard makes) may change forward: it stays as it is, with a warning naming it, by
    its path in the model and its class's full name (a subclass may share torch's class
    name), pointing at the caller's line. addnorm's own modules, converted ones included,
    are no warning."""

    class LayerNorm(nn.LayerNorm):  # (as timm's)
        pass

    class MyLayer(nn.TransformerEncoderLayer):
        pass

    model = nn.Sequential(LayerNorm(8), MyLayer(8, 2, 16), nn.LayerNorm(8),
                          addnorm.AddLayerNorm(8), addnorm.AddRMSNorm(8), nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        addnorm.replace_modules(model)
    prefix = f"{__name__}.test_replace_modules_warns_about_subclasses_it_leaves.<locals>."
    assert sorted(str(w.message) for w in caught) == [
        f"addnorm.replace_modules: {i} ({prefix}{name}) stays as it is: a subclass, whose forward "
        "may differ" for i, name in ((0, "LayerNorm"), (1, "MyLayer"))]
    assert {w.filename for w in caught} == {__file__}
    assert [type(m) for m in model[:3]] == [LayerNorm, MyLayer, addnorm.LayerNorm]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.replace_modules")
        addnorm.replace_modules(nn.Sequential(*model[2:]))


def test_replace_modules_leaves_norms_with_a_negative_eps():
    """torch's norms take a negative (or NaN) eps, which the op refuses: replace_modules
    leaves such a norm torch's, with a warning, also inside an encoder layer it leaves (a
    torch layer, or addnorm's, which then runs torch's forward): the model runs as before
    (it raised at the first call). A non-negative eps beside them converts."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8)
    model = nn.Sequential(nn.LayerNorm(8, eps=-1e-6), nn.RMSNorm(8, eps=None), nn.LayerNorm(8, eps=0.0),
                          nn.TransformerEncoderLayer(8, 2, 16, 0.0, layer_norm_eps=-1e-6),
                          addnorm.TransformerEncoderLayer(8, 2, 16, 0.0, layer_norm_eps=-1e-6))
    nan_eps = nn.Sequential(nn.RMSNorm(8, eps=float("nan")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (addnorm's layer: torch's forward)
        expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        addnorm.replace_modules(model)
        addnorm.replace_modules(nan_eps)
    left = [str(w.message).split(" ")[1] for w in caught
            if str(w.message).endswith("stays as it is: its eps is negative or NaN, which the op refuses")]
    assert left == ["0", "3.norm1", "3.norm2", "4.norm1", "4.norm2", "0"], [str(w.message) for w in caught]
    assert [type(m) for m in model] == [nn.LayerNorm, addnorm.RMSNorm, addnorm.LayerNorm,
                                        nn.TransformerEncoderLayer, addnorm.TransformerEncoderLayer]
    assert type(nan_eps[0]) is nn.RMSNorm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [nn.LayerNorm, nn.RMSNorm])
def test_replace_modules_says_to_convert_a_parametrized_norm_first(kind):
    """A parametrization makes the module's class a subclass (torch's Parametrized<kind>),
    which replace_modules leaves: the warning says why, and how (convert, then
    parametrize), not that its forward may differ; converted first, it parametrizes and
    runs the parametrized weight as torch's module does."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    ref = kind(8, dtype=torch.float64)
    parametrize.register_parametrization(ref, "weight", Double())
    model = nn.Sequential(copy.deepcopy(ref))
    with pytest.warns(UserWarning) as caught:
        addnorm.replace_modules(model)
    assert [str(w.message) for w in caught] == [
        f"addnorm.replace_modules: 0 (torch.nn.utils.parametrize.Parametrized{kind.__name__}) "
        "stays as it is: parametrized: convert, then parametrize"]
    ours = addnorm.replace_modules(nn.Sequential(kind(8, dtype=torch.float64)))
    parametrize.register_parametrization(ours[0], "weight", Double())
    ours[0].parametrizations.weight.original.data.copy_(ref.parametrizations.weight.original)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert isinstance(ours[0], {nn.LayerNorm: addnorm.LayerNorm, nn.RMSNorm: addnorm.RMSNorm}[kind])
    torch.testing.assert_close(ours[0](x), ref(x), rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():  # (converted, then parametrized: nothing to say)
        warnings.filterwarnings("error", message="addnorm.replace_modules")
        addnorm.replace_modules(ours)

    class Mine(kind):  # a subclass, parametrized: converting first would not help it
        pass

    mine = nn.Sequential(Mine(8))
    parametrize.register_parametrization(mine[0], "weight", Double())
    with pytest.warns(UserWarning, match=r"stays as it is: a subclass, whose forward may differ$"):
        addnorm.replace_modules(mine)


@pytest.mark.parametrize("kind", [nn.LayerNorm, nn.RMSNorm, nn.TransformerEncoderLayer])
def test_replace_modules_leaves_a_forward_set_on_the_instance(kind):
    """A forward set on the instance (accelerate's hooks wrap the bound method so) runs
    whatever the class is: a class swap would report addnorm's class and run torch's
    kernels. Such a module stays as it is, with a warning (it was swapped silently);
    forward hooks, which Module.__call__ runs around the class's forward, are no reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), kind(8, 2, 16) if kind is nn.TransformerEncoderLayer else kind(8))
    wrapped = model[1].forward
    model[1].forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    model[1].register_forward_hook(lambda m, args, out: None)
    with pytest.warns(UserWarning) as caught:
        addnorm.replace_modules(model)
    assert [str(w.message) for w in caught] == [
        f"addnorm.replace_modules: 1 ({kind.__module__}.{kind.__qualname__}) stays as it is: its "
        "forward is set on the instance (as accelerate's hooks do): convert first"]
    assert type(model[1]) is kind
    del model[1].forward
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.replace_modules")
        addnorm.replace_modules(model)
    assert type(model[1]) is {nn.LayerNorm: addnorm.LayerNorm, nn.RMSNorm: addnorm.RMSNorm,
                              nn.TransformerEncoderLayer: addnorm.TransformerEncoderLayer}[kind]


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_replace_modules_warns_about_a_compiled_model(how):
    """A torch.compile'd model run before the conversion keeps its graph, which runs torch's
    modules (Dynamo does not guard on a module's class): the conversion warns (it reported
    addnorm's classes and ran none of its ops). Module.compile guards it: no warning, and
    the next call runs addnorm's op; nor has an uncompiled model one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    x = torch.randn(4, 8)
    compiled = torch.compile(model, backend="eager") if how == "torch.compile" else model
    if how == "Module.compile":
        model.compile(backend="eager")
    torch._dynamo.reset()
    compiled(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        addnorm.replace_modules(compiled)
    assert [str(w.message) for w in caught] == [
        "addnorm.replace_modules: model holds a torch.compile'd module, whose graphs compiled "
        "before the conversion keep running torch's modules: convert, then compile"
    ] * (how == "torch.compile")
    assert type(model[1]) is addnorm.LayerNorm
    with torch.profiler.profile() as prof:
        compiled(x)
    ran = any(e.name.startswith("addnorm::") for e in prof.events())
    assert ran == (how == "Module.compile")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.replace_modules")
        addnorm.replace_modules(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))


def test_setting_the_classes_back_undoes_replace_modules():
    """docs/semantics.md's recipe for ONNX export (the ops have no ONNX form): setting each
    drop-in's class back to its base gives torch's modules, whose export holds no addnorm op
    and gives the converted model's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(TinyPreLN(), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True))
    model = addnorm.replace_modules(model).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(x)
    ours = (addnorm.LayerNorm, addnorm.RMSNorm, addnorm.TransformerEncoderLayer)
    assert sum(type(m) in ours for m in model.modules()) == 10
    for m in model.modules():
        if type(m) in ours:
            m.__class__ = type(m).__bases__[0]
    assert not any(isinstance(m, ours) for m in model.modules())
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("addnorm" in t for t in targets), targets
    assert "aten.layer_norm.default" in targets
    with torch.no_grad():
        assert_close(exported.module()(x), expected.double(), name="out")


@pytest.mark.parametrize("name,layout", [("LayerNorm", torch.strided), ("LayerNorm", torch.jagged),
                                         ("RMSNorm", torch.jagged)])  # (torch's nested support)
def test_nested_tensor_input_runs_torchs_kernel(name, layout):
    """Nested tensors (which torch's norms take, the ops do not) go to torch's kernel, in
    the modules and the functional forms, forward and backward: they raised."""
    torch.manual_seed(0)
    theirs = getattr(nn, name)(8)
    ours = getattr(addnorm, name)(8)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(theirs.weight)
    rows = [torch.randn(n, 8) for n in (3, 5)]
    fn = ((lambda t: addnorm.layer_norm(t, 8, ours.weight, ours.bias)) if name == "LayerNorm"
          else (lambda t: addnorm.rms_norm(t, [8], ours.weight)))
    results = []
    for module in (theirs, ours, fn):
        x = torch.nested.nested_tensor([r.clone() for r in rows], layout=layout,
                                       requires_grad=True)
        out = module(x)
        out.backward(out.detach().clone())
        results.append([out.detach().unbind(), x.grad.unbind()])
    for got in results[1:]:
        for a, e in zip(got, results[0]):
            for ai, ei in zip(a, e):
                torch.testing.assert_close(ai, ei, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("call", ["add_layer_norm", "add_rms_norm", "AddLayerNorm", "AddRMSNorm",
                                  "dropout", "op"])
def test_add_ops_refuse_nested_input_by_name(call, layout):
    """The add ops take no nested tensors: a clear error naming the input (the dispatcher's
    "Could not run ... NestedTensorCPU", NJT's bare NotImplementedError or "NestedTensorImpl
    doesn't support sizes" before), with gradients enabled and in inference mode (jagged:
    the Python functions and modules; NJT's bare NotImplementedError there before)."""
    x = torch.nested.nested_tensor([torch.randn(n, 8) for n in (2, 3)], layout=layout)
    calls = {"add_layer_norm": lambda: addnorm.add_layer_norm(x, x, 8),
             "add_rms_norm": lambda: addnorm.add_rms_norm(x, None, [8]),
             "AddLayerNorm": lambda: addnorm.AddLayerNorm(8)(x),
             "AddRMSNorm": lambda: addnorm.AddRMSNorm(8)(x, x),
             "dropout": lambda: addnorm.add_layer_norm(x, None, 8, dropout_p=0.5),
             "op": lambda: torch.ops.addnorm.layer_norm(x, [8])}
    # (inference mode skips the Autograd kernel; on torch.ops the jagged tensor's own dispatch
    # then raises NotImplementedError naming the op)
    jagged_op = layout == torch.jagged and call == "op"
    for mode in (torch.enable_grad,) + (() if jagged_op else (torch.inference_mode,)):
        with mode(), pytest.raises(RuntimeError, match="input must be a strided tensor, got a nes"):
            calls[call]()


def test_converted_encoder_with_a_hook_on_nested_input():
    """nn.TransformerEncoder hands nested tensors to its layers in eval under no_grad with a
    padding mask; a hook makes torch's layer take its slow path, which calls the norms (the
    converted ones raised there)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    ours = addnorm.replace_modules(copy.deepcopy(ref))
    x = torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, -2:] = True
    outs = []
    for model in (ref, ours):
        model.layers[0].linear1.register_forward_hook(lambda m, i, o: None)
        with torch.no_grad():
            outs.append(model(x, src_key_padding_mask=pad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_rms_norm_takes_a_wider_weight_as_torch_does():
    """torch's RMSNorm takes a float64 weight with float32 (or float16/bfloat16) input and
    returns the input's dtype (replace_modules once turned such a model, which ran, into one
    that raised). The other ops refuse a weight wider than they read; rms_norm's computes what
    torch's does (the norm in float32, times the weight in float64, rounded): the input's
    dtype out, a float64 weight gradient, outputs and gradients torch's to the input's
    precision and as close to float64's, also for an upstream gradient that follows the
    output (the weight gradient a float64 sum), eager and compiled; the op's checks run;
    scripted alike."""
    torch.manual_seed(4)
    theirs = torch.nn.RMSNorm(96).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = addnorm.replace_modules(copy.deepcopy(theirs))
    compiled = torch.compile(lambda x, w, eps=None: addnorm.rms_norm(x, [96], w, eps), fullgraph=True)
    for dtype, coherent in itertools.product((torch.float32, torch.bfloat16, torch.float16), (False, True)):
        x = (torch.randn(2048, 96) * 3 + 1).to(dtype)
        w = theirs.weight
        g = (F.rms_norm(x.double(), [96], w.detach()) if coherent else torch.randn(2048, 96)).to(dtype)

        def run(f, x):  # f(x) -> (out, the weight it used); out and the gradients
            x = x.clone().requires_grad_()
            y, w = f(x)
            return (y, *torch.autograd.grad(y, [x, w], g.to(y.dtype)))

        ref = run(lambda x: (F.rms_norm(x, [96], w, torch.finfo(torch.float32).eps), w), x.double())
        torch_ = run(lambda x: (F.rms_norm(x, [96], w), w), x)
        for f in (lambda x: (ours(x), ours.weight), lambda x: (addnorm.rms_norm(x, [96], w), w),
                  lambda x: (compiled(x, w), w)):
            got = run(f, x)
            assert [t.dtype for t in got] == [t.dtype for t in torch_] == [dtype, dtype, torch.float64]
            for a, t, r in zip(got, torch_, ref):
                torch.testing.assert_close(a.to(dtype), t.to(dtype))  # (torch's, to the input's precision)
                assert (a.double() - r).abs().max() <= (t.double() - r).abs().max() * 1.01 + 1e-12
    # The op's checks run where torch's kernel computes: a negative eps or complex input is
    # refused, eager and compiled, and a weight of another shape.
    x, z = torch.randn(2, 96), torch.randn(2, 96, dtype=torch.complex64)
    for f in (addnorm.rms_norm, compiled):
        with pytest.raises(RuntimeError, match="eps must be a non-negative number"):
            f(x, [96], theirs.weight, -1.0) if f is addnorm.rms_norm else f(x, theirs.weight, -1.0)
        with pytest.raises(RuntimeError, match="input must be a float32.*got ComplexFloat"):
            f(z, [96], theirs.weight) if f is addnorm.rms_norm else f(z, theirs.weight)
    with pytest.raises(RuntimeError, match=r"weight must have shape normalized_shape = \[96\], got \[2, 48\]"):
        addnorm.rms_norm(x, [96], theirs.weight.detach().view(2, 48))
    with pytest.raises(RuntimeError, match="weight must be a strided tensor, got a tensor of layout Sparse"):
        addnorm.rms_norm(x, [96], theirs.weight.detach().to_sparse())  # (torch's full() error before)
    with pytest.raises(RuntimeError, match="input must be a float32, float64, float16 or bfloat16 tensor, got Float8"):
        torch.ops.addnorm.rms_norm(x.to(torch.float8_e4m3fn), [96], theirs.weight)  # (not read as float32)
    # A traced hidden size stays symbolic: one export serves every N.
    class Norm(torch.nn.Module):
        def forward(self, x, w):
            return torch.ops.addnorm.rms_norm(x, [x.shape[-1]], w)

    n = torch.export.Dim("n", min=2)
    args = (torch.randn(3, 8, dtype=torch.float16), torch.rand(8, dtype=torch.float64) + 0.5)
    exported = torch.export.export(Norm(), args, dynamic_shapes=({1: n}, {0: n})).module()
    for width in (8, 24):
        x, w = torch.randn(3, width, dtype=torch.float16), torch.rand(width, dtype=torch.float64) + 0.5
        assert torch.equal(exported(x, w), Norm()(x, w))
    # The op itself computes it, so every way of calling it does: scripted (gradients too),
    # in inference mode and on the meta device, as the eager call.
    scripted = torch.jit.script(ours)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 96, dtype=dtype, requires_grad=True)
        eager, script = ([y, *torch.autograd.grad(y, [x, ours.weight], torch.ones_like(y))]
                         for y in (ours(x), scripted(x)))
        assert [t.dtype for t in eager] == [dtype, dtype, torch.float64]
        assert all(torch.equal(a, b) for a, b in zip(eager, script))
        with torch.inference_mode():
            assert torch.equal(torch.ops.addnorm.rms_norm(x, [96], ours.weight), eager[0])
        meta = torch.ops.addnorm.rms_norm(x.to("meta"), [96], ours.weight.to("meta"))
        assert meta.dtype == dtype and meta.shape == x.shape
