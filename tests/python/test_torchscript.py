"""TorchScript: every addnorm module compiles with torch.jit.script and runs the same ops as
in eager mode (bitwise equal outputs and gradients, train and eval), alone, inside scripted
parents, in nn.TransformerEncoder stacks (the nested-tensor inference path included) and in
models converted by replace_modules; scripted models save and load (torch.jit.save /
torch.jit.load); the functional forms layer_norm / rms_norm compile, and what TorchScript
cannot compile raises a clear error."""

import copy
from typing import Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import addnorm
from conftest import DEVICES, DropoutFromSeed, with_addnorm_dropouts

E, H, FF, S, N = 16, 4, 32, 5, 3

# torch 2.11 deprecates torch.jit.script (for torch.compile / torch.export) and warns on
# every call; LibTorch applications still load TorchScript models.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _randomize(module, seed=0):
    """Non-trivial parameters (norm weights around 1), so a wrong mapping would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(module, inputs, cotangents, seed):
    """Forward (seeded, for dropout) and the gradients of inputs that require grad and of
    the parameters, for the given cotangents of the outputs."""
    inputs = [t.clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t
              for t in inputs]
    torch.manual_seed(seed)
    outs = _as_tuple(module(*inputs))
    wrt = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad] + list(module.parameters())
    pairs = [(o, g) for o, g in zip(outs, cotangents) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return outs, grads


def _assert_same(eager, scripted, inputs, seed=0):
    """The scripted module gives bitwise the eager module's outputs and gradients (input and
    parameter gradients), in train and eval mode."""
    for training in (True, False):
        eager.train(training)
        scripted.train(training)
        torch.manual_seed(seed)
        ref = _as_tuple(eager(*inputs))
        gen = torch.Generator().manual_seed(seed + 1)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
                if o.numel() else None for o in ref]
        outs_e, grads_e = _run(eager, inputs, cots, seed)
        outs_s, grads_s = _run(scripted, inputs, cots, seed)
        assert len(outs_s) == len(outs_e)
        for i, (a, b) in enumerate(zip(outs_s, outs_e)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"training={training}: output {i}"
        assert len(grads_s) == len(grads_e)
        for i, (a, b) in enumerate(zip(grads_s, grads_e)):
            assert (a is None) == (b is None), f"training={training}: grad {i}"
            assert a is None or torch.equal(a, b), f"training={training}: grad {i}"


def _ops_in(scripted):
    """The node kinds (op names) of the scripted module's graph with every submodule call
    inlined, branches included."""
    kinds = set()

    def walk(block):
        for node in block.nodes():
            kinds.add(node.kind())
            for b in node.blocks():
                walk(b)

    walk(scripted.inlined_graph)
    return kinds


# --------------------------------------------------------------------------- norm modules

NORM_CASES = [
    ("LayerNorm", dict(normalized_shape=16)),
    ("LayerNorm", dict(normalized_shape=(2, 8), eps=1e-3, bias=False)),
    ("LayerNorm", dict(normalized_shape=16, elementwise_affine=False)),
    ("RMSNorm", dict(normalized_shape=16)),
    ("RMSNorm", dict(normalized_shape=[2, 8], eps=1e-6)),
    ("RMSNorm", dict(normalized_shape=16, elementwise_affine=False)),
]


def _cid(case):
    name, cfg = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NORM_CASES, ids=[_cid(c) for c in NORM_CASES])
def test_norm_modules_script(case, device):
    name, cfg = case
    m = _randomize(getattr(addnorm, name)(**cfg, device=device))
    s = torch.jit.script(m)
    assert str(s.forward.schema.returns[0].type) == "Tensor"
    assert f"addnorm::{'layer_norm' if name == 'LayerNorm' else 'rms_norm'}" in _ops_in(s)
    x = torch.randn((3, 5) + tuple(m.normalized_shape), device=device, requires_grad=True)
    _assert_same(m, s, [x])
    # bf16 input with the module's fp32 parameters (mixed precision).
    _assert_same(m, s, [x.detach().bfloat16().requires_grad_()])


ADD_CASES = [
    ("AddLayerNorm", dict(normalized_shape=16)),
    ("AddLayerNorm", dict(normalized_shape=(2, 8), eps=1e-3, bias=False)),
    ("AddRMSNorm", dict(normalized_shape=16)),
    ("AddRMSNorm", dict(normalized_shape=[2, 8], eps=1e-6, elementwise_affine=False)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("case", ADD_CASES, ids=[_cid(c) for c in ADD_CASES])
def test_add_modules_script(case, return_residual, device):
    """forward returns Tensor or Tuple[Tensor, Tensor] as return_residual says (a precise
    type, not a Union), with eager's values and gradients (into out and h)."""
    name, cfg = case
    m = _randomize(getattr(addnorm, name)(**cfg, return_residual=return_residual, device=device))
    s = torch.jit.script(m)
    expected = "Tuple[Tensor, Tensor]" if return_residual else "Tensor"
    assert str(s.forward.schema.returns[0].type) == expected
    shape = (3, 5) + tuple(m.normalized_shape)
    x = torch.randn(shape, device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    _assert_same(m, s, [x, r])
    _assert_same(m, s, [x, None])  # residual=None: the plain norm
    out = s(x, r)
    assert isinstance(out, tuple) == return_residual


@pytest.mark.parametrize("name", ["AddLayerNorm", "AddRMSNorm"])
def test_add_modules_script_residual_in_fp32(name):
    m = getattr(addnorm, name)(16, return_residual=True, residual_in_fp32=True)
    s = torch.jit.script(m)
    x = torch.randn(3, 16).bfloat16().requires_grad_()
    r = torch.randn(3, 16).bfloat16().requires_grad_()
    out, h = s(x, r)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    _assert_same(m, s, [x, r])


def test_add_module_flags_are_constants_of_the_scripted_module():
    """return_residual decides the scripted forward's type, so it is fixed at scripting."""
    m = addnorm.AddLayerNorm(8)
    s = torch.jit.script(m)
    with pytest.raises(RuntimeError, match="Can't set constant 'return_residual'"):
        s.return_residual = True
    m.return_residual = True  # the eager module changes; a new scripting follows it
    assert str(torch.jit.script(m).forward.schema.returns[0].type) == "Tuple[Tensor, Tensor]"
    assert str(s.forward.schema.returns[0].type) == "Tensor"


class _PreLNBlock(nn.Module):
    """A scripted parent that unpacks AddLayerNorm's (out, h) and uses AddRMSNorm's out."""

    def __init__(self, d=16):
        super().__init__()
        self.norm_a = addnorm.AddLayerNorm(d, return_residual=True)
        self.fc = nn.Linear(d, d)
        self.norm_b = addnorm.AddRMSNorm(d, eps=1e-6)

    def forward(self, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        y, h = self.norm_a(x, residual)
        return self.norm_b(self.fc(y), h) * 2.0, h


def test_scripted_parent_uses_add_module_results():
    m = _randomize(_PreLNBlock())
    s = torch.jit.script(m)
    x = torch.randn(4, 16, requires_grad=True)
    r = torch.randn(4, 16, requires_grad=True)
    _assert_same(m, s, [x, r])


# --------------------------------------------------------------------------- encoder layer


def _layer_pair(device="cpu", **kw):
    layer = _randomize(addnorm.TransformerEncoderLayer(E, H, FF, device=device, **kw))
    return layer, torch.jit.script(layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "gelu", F.gelu, nn.ReLU(), torch.relu],
                         ids=["relu", "gelu", "F.gelu", "nn.ReLU", "torch.relu"])  # (torch.relu: code 0)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_script(norm_first, activation, device):
    """Scripted forward: same values and gradients as eager (dropout included, same seed),
    with padding and causal masks, batch_first or not."""
    for batch_first in (False, True):
        layer, s = _layer_pair(device, dropout=0.1, activation=activation, norm_first=norm_first,
                               batch_first=batch_first)
        src = torch.randn((N, S, E) if batch_first else (S, N, E), device=device, requires_grad=True)
        kpm = torch.zeros(N, S, dtype=torch.bool, device=device)
        kpm[1, -2:] = True
        causal = nn.Transformer.generate_square_subsequent_mask(S, device=device)
        _assert_same(layer, s, [src])
        _assert_same(layer, s, [src, None, kpm])
        _assert_same(layer, s, [src, causal, None, True])
    assert "addnorm::transformer_encoder_layer" in _ops_in(s)


def test_encoder_layer_script_unbatched_and_float64():
    layer, s = _layer_pair(dropout=0.0, dtype=torch.float64)
    _assert_same(layer, s, [torch.randn(S, E, dtype=torch.float64, requires_grad=True)])


def test_encoder_layer_scripting_checks_activation():
    """The scripted forward cannot look at the activation function, so scripting refuses a
    layer whose activation_relu_or_gelu no longer describes its activation, or whose
    activation the op does not run."""
    layer = addnorm.TransformerEncoderLayer(E, H, FF, dropout=0.0)
    layer.activation = F.gelu  # replaced after construction; activation_relu_or_gelu is 1
    with pytest.raises(ValueError, match="activation_relu_or_gelu must be 2 for activation gelu, got 1"):
        torch.jit.script(layer)
    stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="cannot be scripted: activation_relu_or_gelu"):
        torch.jit.script(stack)
    layer.activation_relu_or_gelu = 2
    s = torch.jit.script(layer)
    _assert_same(layer, s, [torch.randn(S, N, E, requires_grad=True)])

    layer.activation = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="activation must be a plain relu or gelu"):
        torch.jit.script(layer)


def test_scripted_layer_refuses_submodule_training_modes_that_differ():
    """Eager, a dropout submodule in another training mode than the layer runs torch's
    forward; the scripted layer cannot, so it raises rather than ignore the mode."""
    layer, s = _layer_pair(dropout=0.1)
    src = torch.randn(S, N, E)
    msg = "training mode differs from the layer's"
    for name in ("self_attn", "dropout", "dropout1", "dropout2"):
        for train in (True, False):
            s.train(train)
            getattr(s, name).train(not train)  # e.g. Monte-Carlo dropout: dropouts on in eval
            with pytest.raises(torch.jit.Error, match=msg):
                s(src)
    s.eval()
    layer.eval()
    assert torch.equal(s(src), layer(src))  # modes agreeing again: runs
    layer0, s0 = _layer_pair(dropout=0.0)
    s0.dropout.eval()  # without dropout the modes change nothing
    assert torch.equal(s0(src), layer0(src))


# --------------------------------------------------------------------------- encoder stacks


def _stack(layer_cls, norm_cls=None, **kw):
    torch.manual_seed(0)
    layer = layer_cls(E, H, FF, dropout=0.1, batch_first=True, **kw)
    norm = None if norm_cls is None else norm_cls(E)
    return _randomize(nn.TransformerEncoder(layer, 2, norm=norm))


def test_transformer_encoder_stack_script_train_and_eval():
    enc = _stack(addnorm.TransformerEncoderLayer, addnorm.LayerNorm)
    s = torch.jit.script(enc)
    src = torch.randn(N, S, E, requires_grad=True)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    _assert_same(enc, s, [src, None, kpm])
    _assert_same(enc, s, [src, nn.Transformer.generate_square_subsequent_mask(S)])


def test_transformer_encoder_stack_script_nested_fast_path():
    """Eval, no_grad, padding mask (post-LN, batch_first): the scripted nn.TransformerEncoder
    hands nested tensors to the layers (padded positions come back as exact zeros), which
    run torch's fused kernel as in eager mode and as torch's own scripted layers do."""
    ours = _stack(addnorm.TransformerEncoderLayer).eval()
    ref = _stack(nn.TransformerEncoderLayer).eval()
    ref.load_state_dict(ours.state_dict())
    s, s_ref = torch.jit.script(ours), torch.jit.script(ref)
    src = torch.randn(N, S, E)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, -1] = True
    with torch.no_grad():
        out = s(src, src_key_padding_mask=kpm)
        eager = ours(src, src_key_padding_mask=kpm)
        torch_out = s_ref(src, src_key_padding_mask=kpm)
    assert torch.equal(out[kpm], torch.zeros_like(out[kpm]))  # the nested path ran
    assert torch.equal(out, eager)
    assert torch.equal(out, torch_out)


def test_scripted_layer_refuses_nested_input_outside_inference():
    """Nested tensors outside torch's inference conditions fail clearly, as in torch's layer
    (which asserts that MultiheadAttention does not support them)."""
    layer, s = _layer_pair(dropout=0.0, batch_first=True)
    src = torch.randn(N, S, E)
    mask = torch.ones(N, S, dtype=torch.bool)
    mask[1, -2:] = False
    nested = torch._nested_tensor_from_mask(src, mask, mask_check=False)
    msg = "nested tensor input is supported only for inference"  # raised in TorchScript
    s.train()
    with torch.no_grad(), pytest.raises(torch.jit.Error, match=msg):
        s(nested)
    s.eval()
    with pytest.raises(torch.jit.Error, match=msg):  # gradients enabled, parameters need them
        s(nested)
    with torch.no_grad(), pytest.raises(torch.jit.Error, match=msg):
        s(nested, torch.zeros(S, S))
    with torch.no_grad():
        out = s(nested)
    assert out.is_nested
    with torch.no_grad():
        assert torch.equal(out.to_padded_tensor(0.0), layer.eval()(nested).to_padded_tensor(0.0))


# --------------------------------------------------------------------------- replace_modules


class _TorchModel(nn.Module):
    """A scriptable torch model using nn.LayerNorm, nn.RMSNorm and nn.TransformerEncoder."""

    def __init__(self, d=E):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, H, FF, dropout=0.1, batch_first=True, norm_first=True),
            2, norm=nn.LayerNorm(d))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.RMSNorm(d), nn.Linear(d, 3))

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = self.rms(self.ln(self.embed(x)))
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(h.mean(dim=1))


def _model_inputs(dtype=torch.float32):
    x = torch.randn(N, S, 8, dtype=dtype, requires_grad=True)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -1] = True
    return x, padding


def test_replace_modules_keeps_model_scriptable():
    """A scriptable torch model stays scriptable after replace_modules; the scripted model runs
    only addnorm's norm ops and equals the eager converted model (and torch's, in float64:
    in training torch's model with the masks of addnorm's dropouts, see
    conftest.with_addnorm_dropouts)."""
    model = _randomize(_TorchModel()).double()
    torch.jit.script(model)  # scriptable before
    ref = with_addnorm_dropouts(copy.deepcopy(model))
    addnorm.replace_modules(model)
    s = torch.jit.script(model)
    ops = _ops_in(s)
    for op in ("addnorm::layer_norm", "addnorm::rms_norm", "addnorm::transformer_encoder_layer"):
        assert op in ops, op
    assert "aten::layer_norm" not in ops and "aten::rms_norm" not in ops
    x, padding = _model_inputs(torch.float64)
    _assert_same(model, s, [x, padding])
    for training in (True, False):
        ref.train(training), s.train(training)
        torch.manual_seed(1)
        a = ref(x, padding)
        torch.manual_seed(1)
        b = s(x, padding)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # Four dropouts per layer (attention, two residual, feed-forward), in the training run.
    assert [len(m.masks) for m in ref.modules() if isinstance(m, DropoutFromSeed)] == [1] * 8


def test_replace_modules_refuses_a_scripted_model():
    """A ScriptModule's submodules are compiled (their types are not torch's): converting it
    would do nothing, silently; replace_modules says to convert before scripting."""
    with pytest.raises(TypeError, match=r"ScriptModule \(compiled\): convert, then script it"):
        addnorm.replace_modules(torch.jit.script(_TorchModel()))


def test_save_load_roundtrip(tmp_path):
    """torch.jit.save / torch.jit.load of a converted model and of an add module: the loaded
    modules run addnorm's ops with the same outputs and gradients."""
    model = addnorm.replace_modules(_randomize(_TorchModel()))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    assert {"addnorm::layer_norm", "addnorm::rms_norm", "addnorm::transformer_encoder_layer"} <= \
        _ops_in(loaded)
    x, padding = _model_inputs()
    _assert_same(model, loaded, [x, padding])

    add = _randomize(addnorm.AddRMSNorm(16, return_residual=True, residual_in_fp32=True))
    path = tmp_path / "add.pt"
    torch.jit.save(torch.jit.script(add), str(path))
    loaded = torch.jit.load(str(path))
    assert str(loaded.forward.schema.returns[0].type) == "Tuple[Tensor, Tensor]"
    x = torch.randn(3, 16).bfloat16().requires_grad_()
    r = torch.randn(3, 16).bfloat16().requires_grad_()
    _assert_same(add, loaded, [x, r])


def test_freeze_keeps_addnorm_ops():
    """torch.jit.freeze (parameters folded into constants, as for deployment) keeps the ops
    and the values of eager inference with constant parameters."""
    model = addnorm.replace_modules(_randomize(_TorchModel())).eval()
    frozen = torch.jit.freeze(torch.jit.script(model))
    ops = _ops_in(frozen)
    assert {"addnorm::layer_norm", "addnorm::rms_norm", "addnorm::transformer_encoder_layer"} <= ops
    # Eager with parameters that do not require grad, as the frozen constants: at::linear
    # picks its kernel by whether the weight requires grad (last-bit differences otherwise).
    const = copy.deepcopy(model).requires_grad_(False)
    x, padding = _model_inputs()
    with torch.no_grad():
        assert torch.equal(frozen(x, padding), const(x, padding))


# --------------------------------------------------------------------------- functional


def _functional_user(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return (addnorm.layer_norm(x, (16,), w, b) + addnorm.layer_norm(x, [16], w, None, 0.1)
            + addnorm.layer_norm(x, x.shape[-1:]) + addnorm.rms_norm(x, [16], w)
            + addnorm.rms_norm(x, (16,), None, 1e-3))


def test_functional_layer_norm_rms_norm_script():
    """layer_norm and rms_norm compile (normalized_shape a list or tuple, as torch's
    functional forms in TorchScript) with eager's defaults, values and gradients."""
    s = torch.jit.script(_functional_user)
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    a, c = _functional_user(x, w, b), s(x, w, b)
    assert torch.equal(a, c)
    g = torch.randn(3, 16)
    for u, v in zip(torch.autograd.grad(c, [x, w, b], g), torch.autograd.grad(a, [x, w, b], g)):
        assert torch.equal(u, v)
    sl = torch.jit.script(addnorm.layer_norm)
    assert torch.equal(sl(x, [16], w, b), addnorm.layer_norm(x, 16, w, b))
    sr = torch.jit.script(addnorm.rms_norm)
    assert torch.equal(sr(x, [16]), addnorm.rms_norm(x, 16))
    # Eager mode still takes an int (and any sequence).
    assert torch.equal(addnorm.layer_norm(x, torch.Size([16]), w, b), sl(x, [16], w, b))


def _functional_int_shape(x: Tensor) -> Tensor:
    return addnorm.layer_norm(x, 16)


def _functional_add_layer_norm(x: Tensor) -> Tensor:
    return addnorm.add_layer_norm(x, x, [16])


class _UsesAddRMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return addnorm.add_rms_norm(x, x, [16])


def test_functional_not_scriptable_raises_clearly():
    with pytest.raises(RuntimeError, match="normalized_shape"):  # TorchScript wants List[int]
        torch.jit.script(_functional_int_shape)
    msg = r"addnorm.add_layer_norm cannot be compiled by TorchScript .* use addnorm.AddLayerNorm"
    with pytest.raises(RuntimeError, match=msg):
        torch.jit.script(addnorm.add_layer_norm)
    with pytest.raises(RuntimeError, match=msg):
        torch.jit.script(_functional_add_layer_norm)
    msg = r"addnorm.add_rms_norm cannot be compiled by TorchScript .* torch.ops.addnorm.add_rms_norm"
    with pytest.raises(RuntimeError, match=msg):
        torch.jit.script(_UsesAddRMSNorm())
    # Eager mode is unaffected.
    x = torch.randn(3, 16)
    assert torch.equal(_functional_add_layer_norm(x), torch.ops.addnorm.add_layer_norm(x, x, [16])[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_trace_functional_forms_with_shape_from_the_input():
    """torch.jit.trace of the functional forms with normalized_shape taken from the input
    (``x.shape[-1:]``, ``[x.size(-1)]``, ``x.shape[-1]``: 0-dim tensors while tracing). The
    trace keeps the value, as torch warns: other leading shapes give eager's results, another
    width the op's shape error (torch's F.layer_norm traces the size itself)."""
    x, r = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    fns = [lambda x, r: addnorm.layer_norm(x, x.shape[-1:]),
           lambda x, r: addnorm.rms_norm(x, [x.size(-1)]),
           lambda x, r: addnorm.add_layer_norm(x, r, x.shape[-1]),
           lambda x, r: addnorm.add_rms_norm(x, r, x.shape[-2:], return_residual=True)[0]]
    for fn in fns:
        with pytest.warns(torch.jit.TracerWarning, match="Python integer"):
            traced = torch.jit.trace(fn, (x, r))
        x2, r2 = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
        assert torch.equal(traced(x2, r2), fn(x2, r2))
        with pytest.raises(RuntimeError, match="normalized_shape"):
            traced(torch.randn(3, 4, 8), torch.randn(3, 4, 8))
