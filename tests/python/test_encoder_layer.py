"""addnorm.TransformerEncoderLayer (and the transformer_encoder_layer op under it) against
torch.nn.TransformerEncoderLayer with the same weights: outputs and every gradient for
pre-/post-LN, batch_first, relu/gelu, bias, every mask kind, eval/train (dropout 0); the
fused residual dropouts (statistics, RNG, a reference built from the layer's masks); the
C++ module (addnorm._C) against the Python one; gradcheck; nn.TransformerEncoder;
replace_modules; torch.compile."""

import copy
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import addnorm
from conftest import DropoutFromSeed, with_addnorm_dropouts

E, H, FF, S, N = 16, 4, 32, 5, 3


def _randomize(module, seed=0):
    """Non-trivial parameters (biases and norm affine too), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def _pair(dtype=torch.float32, **kw):
    """(torch's layer, addnorm's layer) with the same weights, in training mode (as built);
    dropout 0 unless given, so the parity tests compare training-mode results with torch's."""
    kw.setdefault("dropout", 0.0)
    ref = _randomize(nn.TransformerEncoderLayer(E, H, FF, dtype=dtype, **kw))
    ours = addnorm.TransformerEncoderLayer(E, H, FF, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _src(batch_first, dtype=torch.float32, n=N, s=S):
    shape = (n, s, E) if batch_first else (s, n, E)
    return torch.randn(shape, dtype=dtype)


def _masks(kind, dtype=torch.float32, n=N, s=S):
    """(src_mask, src_key_padding_mask, is_causal) for a mask kind."""
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, -1] = True
    rand_bool = torch.rand(s, s) < 0.3
    rand_bool.fill_diagonal_(False)  # no fully masked row
    if kind == "none":
        return None, None, False
    if kind == "bool":
        return rand_bool, None, False
    if kind == "float":
        m = torch.randn(s, s, dtype=dtype).masked_fill(rand_bool, float("-inf"))
        return m, None, False
    if kind == "3d":
        m = torch.randn(n * H, s, s, dtype=dtype)
        return m, None, False
    if kind == "padding":
        return None, kpm, False
    if kind == "padding_float":
        return None, torch.zeros(n, s, dtype=dtype).masked_fill(kpm, float("-inf")), False
    if kind == "both":
        return rand_bool, kpm, False
    if kind == "causal":
        return causal, None, True
    if kind == "causal_padding":
        return causal, kpm, True
    if kind == "full_padding":  # every key of the second sequence padded: fully masked rows
        full = kpm.clone()
        full[1] = True
        return None, full, False
    raise AssertionError(kind)


MASK_KINDS = ["none", "bool", "float", "3d", "padding", "padding_float", "both", "causal",
              "causal_padding"]


def _close(actual, expected, name, rtol=1e-5):
    atol = rtol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_parity(ref, ours, x, src_mask, kpm, is_causal, rtol=1e-5, seed=None):
    """Outputs and every gradient of the two layers, ours running addnorm's op (not torch's
    forward); with seed, torch.manual_seed(seed) before each forward."""
    xr = x.clone().requires_grad_()
    xo = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    a = ref(xr, src_mask=src_mask, src_key_padding_mask=kpm, is_causal=is_causal)
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.TransformerEncoderLayer runs torch's")
        b = ours(xo, src_mask=src_mask, src_key_padding_mask=kpm, is_causal=is_causal)
    _close(b, a, "output", rtol)
    g = torch.randn_like(a)
    ref_params = dict(ref.named_parameters())
    our_params = dict(ours.named_parameters())
    assert list(ref_params) == list(our_params)
    names = list(ref_params)
    ga = torch.autograd.grad(a, [xr] + [ref_params[n] for n in names], g)
    gb = torch.autograd.grad(b, [xo] + [our_params[n] for n in names], g)
    for n, u, v in zip(["src"] + names, gb, ga):
        _close(u, v, f"grad {n}", rtol)


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_parity_masks_layouts(mask, norm_first, batch_first):
    ref, ours = _pair(norm_first=norm_first, batch_first=batch_first)
    _check_parity(ref, ours, _src(batch_first), *_masks(mask))


@pytest.mark.parametrize("activation", ["relu", "gelu", F.relu, F.gelu, torch.relu])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_parity_activation_bias_mode(activation, bias, norm_first, training):
    # (eps 0 with bias, which torch's norms and the op take: the op runs; 1e-4 without)
    ref, ours = _pair(activation=activation, bias=bias, norm_first=norm_first,
                      layer_norm_eps=0.0 if bias else 1e-4)
    ref.train(training)
    ours.train(training)
    _check_parity(ref, ours, _src(False), *_masks("both"))


def test_parity_unbatched_and_float64():
    ref, ours = _pair(norm_first=True)
    x = torch.randn(S, E)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-1] = True
    _check_parity(ref, ours, x, None, kpm, False)
    ref, ours = _pair(dtype=torch.float64, batch_first=True)
    _check_parity(ref, ours, _src(True, torch.float64), *_masks("both", torch.float64), rtol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
def test_autocast_dtypes_and_values_match_torch(norm_first):
    # Under autocast the linears return bfloat16 while the residual stream stays float32:
    # the result has torch's dtype and (up to LayerNorm rounding) torch's values.
    ref, ours = _pair(norm_first=norm_first)
    x = _src(False)
    src_mask, kpm, _ = _masks("both")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x, src_mask, kpm), ours(x, src_mask, kpm)
    assert b.dtype == a.dtype == torch.float32
    _close(b, a, "autocast output")


def test_inference_no_grad_matches_torch_fast_path():
    # Under no_grad in eval, torch's layer takes its fused fast path; same math.
    ref, ours = _pair(batch_first=True)
    ref.eval()
    ours.eval()
    x = _src(True)
    _, kpm, _ = _masks("padding")
    with torch.no_grad():
        a, b = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    valid = ~kpm
    _close(b[valid], a[valid], "output", 1e-4)


def _takes_torchs_fused_kernel(layer, *args, **kwargs):
    """(output, whether the call ran torch's fused inference kernel)."""
    with torch.profiler.profile() as prof:
        out = layer(*args, **kwargs)
    return out, any(e.name == "aten::_transformer_encoder_layer_fwd" for e in prof.events())


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_bfloat16_cpu_inference_is_torchs_fast_path(norm_first, activation, eps):
    # bfloat16 inference on the CPU runs torch's fused inference kernel: torch's fast-path
    # result, bit for bit.
    ref, ours = _pair(torch.bfloat16, batch_first=True, norm_first=norm_first,
                      activation=activation, layer_norm_eps=eps)
    ref.eval()
    ours.eval()
    x = _src(True, torch.bfloat16)
    with torch.no_grad():
        out, fused = _takes_torchs_fused_kernel(ours, x)
        _, torch_fused = _takes_torchs_fused_kernel(ref, x)
        expected = ref(x)
    assert fused and torch_fused
    assert torch.equal(out, expected)
    with torch.inference_mode():
        assert _takes_torchs_fused_kernel(ours, x)[1]


@pytest.mark.parametrize("dtype,src_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_cpu_autocast_inference_is_torchs_fast_path(dtype, src_dtype):
    # torch's layer checks CUDA's autocast only: under CPU autocast it takes its fast path,
    # whose result has the autocast dtype, whatever src's dtype and the parameters'. So does
    # the op (it returned float32 for a float32 layer, and for a bfloat16 src of a float32
    # layer torch's other path), bit for bit. With a mask (where torch's fast path runs too)
    # the op runs its own ops, as torch's other path: float32, to autocast's rounding.
    ref, ours = _pair(dtype, batch_first=True)
    ref.eval()
    ours.eval()
    x = _src(True, src_dtype)
    _, kpm, _ = _masks("padding")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, fused = _takes_torchs_fused_kernel(ours, x)
        expected, torch_fused = _takes_torchs_fused_kernel(ref, x)
        masked, masked_fused = _takes_torchs_fused_kernel(ours, x, src_key_padding_mask=kpm)
        prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            masked_expected = ref(x, src_key_padding_mask=kpm)
        finally:
            torch.backends.mha.set_fastpath_enabled(prev)
    assert fused and torch_fused and not masked_fused
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert masked.dtype == masked_expected.dtype
    _close(masked[~kpm], masked_expected[~kpm], "masked output", 5e-2)


def test_a_hook_on_the_layer_keeps_the_fused_kernel_off_as_torchs():
    # torch's fast path is off while the layer has forward hooks; so is the op's use of the
    # fused kernel (under CPU autocast it returned bfloat16 where torch's layer returns float32).
    ref, ours = _pair(batch_first=True)
    ref.eval()
    ours.eval()
    for layer in (ref, ours):
        layer.register_forward_pre_hook(lambda m, args: None)
    x = _src(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, fused = _takes_torchs_fused_kernel(ours, x)
        expected, torch_fused = _takes_torchs_fused_kernel(ref, x)
    assert not fused and not torch_fused
    assert out.dtype == expected.dtype == torch.float32
    _close(out, expected, "hooked layer under autocast", 5e-2)


def test_cpu_autocast_inference_of_a_stack_is_torchs():
    # The second layer gets the first one's bfloat16 output with float32 parameters: torch's
    # fast path takes it, and so does the op (it ran its own ops there: other values).
    theirs = nn.TransformerEncoder(_randomize(nn.TransformerEncoderLayer(E, H, FF, batch_first=True)),
                                   2, enable_nested_tensor=False).eval()
    ours = addnorm.replace_modules(copy.deepcopy(theirs))
    x = _src(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), theirs(x))


def _odd_heads(ref, ours):
    for layer in (ref, ours):
        layer.self_attn.num_heads = 1
        layer.self_attn.head_dim = E
    return ref, ours


@pytest.mark.parametrize("case", ["float32", "float16", "grad", "training", "src_mask", "padding",
                                  "causal", "not_batch_first", "odd_nhead", "no_bias",
                                  "fastpath_disabled", "float32_norms"])
def test_inference_fast_path_only_where_it_applies(case):
    # Everywhere else the layer runs its own ops (and matches torch's math), and so it does
    # with torch.backends.mha.set_fastpath_enabled(False), torch's switch for its layer; also
    # with float32 norms beside bfloat16 (the norm ops take them: their float32 weights).
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(case, torch.bfloat16)
    ref, ours = _pair(dtype, batch_first=case != "not_batch_first", bias=case != "no_bias")
    if case == "odd_nhead":
        _odd_heads(ref, ours)
    if case == "float32_norms":
        for m in (ref.norm1, ref.norm2, ours.norm1, ours.norm2):
            m.float()
    ref.train(case == "training")
    ours.train(case == "training")
    x = _src(case != "not_batch_first", dtype)
    mask, kpm, causal = _masks({"src_mask": "bool", "padding": "padding",
                                "causal": "causal"}.get(case, "none"))
    kwargs = dict(src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)
    prev = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.set_grad_enabled(case == "grad"):
            torch.backends.mha.set_fastpath_enabled(case != "fastpath_disabled")
            out, fused = _takes_torchs_fused_kernel(ours, x, **kwargs)
            torch.backends.mha.set_fastpath_enabled(False)
            expected = ref(x, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    assert not fused
    valid = slice(None) if kpm is None else ~kpm
    atol = 1e-5 if case == "float32" else 5e-2
    torch.testing.assert_close(out[valid], expected[valid], rtol=0, atol=atol)
    if case == "grad":
        out.float().sum().backward()
        assert ours.linear1.weight.grad is not None and ours.linear1.weight.grad.abs().sum() > 0



# On CUDA (these run on a GPU machine: scripts/gpu_check.sh's tests step).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_pair(dtype=torch.float32, **kw):
    return tuple(m.cuda() for m in _pair(dtype, **kw))


def _cuda_masks(kind):
    return tuple(m.cuda() if isinstance(m, torch.Tensor) else m for m in _masks(kind))


@CUDA
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "both", "causal_padding"])
def test_parity_cuda(mask, norm_first, training):
    # float32, dropout 0: output and every gradient as torch's layer (in training the norms
    # take the memory-efficient backward from their output).
    ref, ours = _cuda_pair(norm_first=norm_first, batch_first=True)
    ref.train(training)
    ours.train(training)
    _check_parity(ref, ours, _src(True).cuda(), *_cuda_masks(mask), rtol=1e-4)


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@CUDA
@pytest.mark.parametrize("norm_first", [False, True])
def test_bfloat16_training_cuda_close_to_torch(norm_first):
    # bfloat16 training (dropout 0): output and every gradient of bfloat16 quality, against
    # the float64 layer (relative error of the whole tensor; a wrong mapping is of order 1).
    # Through a whole bfloat16 layer the attention kernels of the two layers round
    # differently: on the CPU, over 20 seeds of this test's data, addnorm's error per tensor
    # was 0.2x to 7.5x torch's and at most 3 * torch's + 1.8e-2 (the norms alone: no worse).
    ref, ours = _cuda_pair(torch.bfloat16, norm_first=norm_first, batch_first=True)
    ref64 = copy.deepcopy(ref).double()
    x = _src(True, torch.bfloat16).cuda()
    _, kpm, _ = _cuda_masks("padding")
    outs = []
    for layer in (ref64, ref, ours):
        xg = x.to(layer.linear1.weight.dtype).requires_grad_()
        y = layer(xg, src_key_padding_mask=kpm)
        g = torch.autograd.grad(y.double().square().sum(), [xg] + list(layer.parameters()))
        outs.append([y] + list(g))
    names = ["output", "grad src"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    for n, exact, a, b in zip(names, *outs):
        assert _rel_err(b, exact) <= 3 * _rel_err(a, exact) + 3e-2, n


@CUDA
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inference_cuda_is_torchs_fast_path(dtype, norm_first):
    # float16/bfloat16 inference on CUDA runs torch's fused inference kernel, as the layer it
    # replaces does: the same result, bit for bit.
    ref, ours = _cuda_pair(dtype, batch_first=True, norm_first=norm_first, activation="gelu")
    ref.eval()
    ours.eval()
    x = _src(True, dtype).cuda()
    with torch.no_grad():
        out, fused = _takes_torchs_fused_kernel(ours, x)
        expected, torch_fused = _takes_torchs_fused_kernel(ref, x)
    assert fused and torch_fused
    assert torch.equal(out, expected)


@CUDA
@pytest.mark.parametrize("case", ["float32", "grad", "training", "padding", "autocast",
                                  "fastpath_disabled"])
def test_cuda_inference_fast_path_only_where_it_applies(case):
    # (autocast: a bfloat16 layer under CUDA autocast, which torch's fast path refuses)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    ref, ours = _cuda_pair(dtype, batch_first=True)
    ref.train(case == "training")
    ours.train(case == "training")
    x = _src(True, dtype).cuda()
    _, kpm, _ = _cuda_masks("padding" if case == "padding" else "none")
    prev = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=case == "autocast"), \
                torch.set_grad_enabled(case == "grad"):
            torch.backends.mha.set_fastpath_enabled(case != "fastpath_disabled")
            out, fused = _takes_torchs_fused_kernel(ours, x, src_key_padding_mask=kpm)
            torch.backends.mha.set_fastpath_enabled(False)
            expected = ref(x, src_key_padding_mask=kpm)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    assert not fused
    valid = slice(None) if kpm is None else ~kpm
    if dtype == torch.float32:
        _close(out[valid], expected[valid], "output", 1e-4)
    else:
        assert _rel_err(out[valid], expected[valid]) < 3e-2


@CUDA
@pytest.mark.parametrize("norm_first", [False, True])
def test_dropout_cuda_follows_manual_seed(norm_first):
    # Training with dropout on CUDA: the same torch.manual_seed gives the same output, the
    # next call other masks.
    _, ours = _cuda_pair(dropout=0.3, norm_first=norm_first, batch_first=True)
    x = _src(True).cuda()
    torch.manual_seed(3)
    a = ours(x)
    b = ours(x)
    torch.manual_seed(3)
    c = ours(x)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    g = torch.autograd.grad(ours(x.clone().requires_grad_()).sum(), list(ours.parameters()))
    assert all(t.isfinite().all() for t in g)


@CUDA
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_step_in_a_cuda_graph(dropout):
    """A training step (forward and backward) captured in a CUDA graph, as
    benchmarks/bench_bert.py's graph mode does: capture raises on a host synchronization;
    with dropout each replay draws new masks (seeds drawn on the device), without it a
    replay gives the eager step's output and gradients."""
    _, ours = _cuda_pair(dropout=dropout, batch_first=True)
    x = _src(True).cuda().requires_grad_()
    params = list(ours.parameters())

    def step():
        y = ours(x)
        return [y] + list(torch.autograd.grad(y.square().sum(), [x] + params))

    # (detached: the eager step's graph would stay alive with its parameters' gradient
    # accumulators, made on the default stream; the captured backward would then sync with
    # that stream, which capture refuses, whichever layer runs)
    eager = [t.detach() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append([t.clone() for t in static])
    if dropout == 0.0:
        names = ["output", "grad src"] + [f"grad {n}" for n, _ in ours.named_parameters()]
        for n, a, b in zip(names, replays[1], eager):
            _close(a, b, n, 1e-4)
    else:
        assert not torch.equal(replays[0][0], replays[1][0])

@pytest.mark.parametrize("norm_first", [False, True])
def test_training_on_the_meta_device_gives_shapes(norm_first):
    """A layer on the meta device (shape inference, deferred initialization) trains as
    torch's: outputs and gradients of the right shapes (the check of autocast for the
    first pre-LN norm once raised for a device type autocast does not know)."""
    layer = addnorm.TransformerEncoderLayer(16, 4, 32, 0.1, batch_first=True,
                                            norm_first=norm_first).to("meta").train()
    x = torch.empty(2, 5, 16, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.norm1.weight.grad.shape == (16,)


def test_submodules_state_dict_and_isinstance():
    ref, ours = _pair(bias=False)
    assert isinstance(ours, nn.TransformerEncoderLayer)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [
        "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
        "linear2.weight", "norm1.weight", "norm2.weight"]
    assert ours.activation_relu_or_gelu == 1 and ours.self_attn.batch_first is False
    with pytest.raises(ValueError, match="activation"):
        addnorm.TransformerEncoderLayer(E, H, activation=torch.tanh)
    with pytest.raises(ValueError, match="activation"):
        addnorm.TransformerEncoderLayer(E, H, activation=nn.GELU(approximate="tanh"))


def test_op_errors():
    ref, ours = _pair()
    x = _src(False)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, is_causal=True)
    with pytest.raises(RuntimeError, match="src_key_padding_mask"):
        ours(x, src_key_padding_mask=torch.zeros(N + 1, S, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="src_mask"):
        ours(x, src_mask=torch.zeros(S, S + 1))
    with pytest.raises(RuntimeError, match="src_mask"):
        ours(x, src_mask=torch.zeros(S, S, dtype=torch.int32))
    # With is_causal the mask's shape is checked too (it was dropped unchecked: a 4-D causal
    # and padding mask lost its padding), and a mask on another device is refused (attention
    # read a meta mask as garbage).
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    padded = causal.expand(N, H, S, S).clone()
    padded[1, :, :, 3:] = float("-inf")
    for mask, match in ((padded, "src_mask must have 2 or 3 dimensions, got 4"),
                        (torch.zeros(S), "src_mask must have 2 or 3 dimensions, got 1"),
                        (causal[:-1], r"the 2-D src_mask must have shape \[5, 5\], got \[4, 5\]"),
                        (padded.view(N * H, S, S)[:-1], r"the 3-D src_mask must have shape \[12, 5, 5\]")):
        for training in (False, True):
            with pytest.raises(RuntimeError, match=match):
                ours.train(training)(x, src_mask=mask, is_causal=True)
    ours.eval()
    for kwargs, name in ((dict(src_mask=torch.zeros(S, S, device="meta")), "src_mask"),
                         (dict(src_key_padding_mask=torch.zeros(N, S, dtype=torch.bool, device="meta")),
                          "src_key_padding_mask")):
        with torch.no_grad(), pytest.raises(RuntimeError, match=f"{name} must be on src's device cpu, got device meta"):
            ours(x, **kwargs)
    sa = ours.self_attn
    args = [x, None, None, False, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight,
            sa.out_proj.bias, ours.linear1.weight, ours.linear1.bias, ours.linear2.weight,
            ours.linear2.bias, ours.norm1.weight, ours.norm1.bias, ours.norm2.weight,
            ours.norm2.bias, H, 0.0, "relu", 1e-5, False, False, False]
    op = torch.ops.addnorm.transformer_encoder_layer
    bad = list(args)
    bad[18] = "tanh"
    with pytest.raises(RuntimeError, match="activation"):
        op(*bad)
    bad = list(args)
    bad[16] = 3
    with pytest.raises(RuntimeError, match="divisible by nhead"):
        op(*bad)
    for eps in (-1.0, float("nan")):
        bad = list(args)
        bad[19] = eps
        with pytest.raises(RuntimeError, match="layer_norm_eps must be a non-negative number"):
            op(*bad)
    bad = list(args)
    bad[8] = torch.randn(FF, E + 1)
    with pytest.raises(RuntimeError, match="linear1_weight"):
        op(*bad)
    bad = list(args)
    bad[0] = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="src must be 3-D"):
        op(*bad)
    # Every weight and bias on src's device, by name (the linears took a meta weight and
    # returned garbage; a meta bias got torch's message without a name).
    names = ["in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
             "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "norm1_weight",
             "norm1_bias", "norm2_weight", "norm2_bias"]
    for i, name in enumerate(names, start=4):
        bad = list(args)
        bad[i] = bad[i].detach().to("meta")
        with torch.no_grad(), pytest.raises(RuntimeError, match=rf"{name}.* must be on src's "
                                                                 "device cpu, got device meta"):
            op(*bad)
    # Every weight and bias in a dtype the layer takes, by name (matmul's "mat1 and mat2
    # must have the same dtype" named none, a norm's error only "weight"). The norms take
    # what the norm ops take: a narrower float dtype, float32 beside 16-bit src; autocast
    # casts the linears' arguments.
    for i, name in enumerate(names, start=4):
        for dtype, got in ((torch.float64, "Double"), (torch.int32, "Int")):
            bad = list(args)
            bad[i] = bad[i].detach().to(dtype)
            with torch.no_grad(), pytest.raises(RuntimeError, match=rf"transformer_encoder_layer: {name} must have "
                                                rf"src's dtype \(Float\).*, got {got}$"):
                op(*bad)
    with torch.no_grad():
        for i, name in enumerate(names, start=4):  # a float layer's narrower norm: taken
            if name.startswith("norm"):
                good = list(args)
                good[i] = good[i].detach().bfloat16()
                assert op(*good).dtype == torch.float32
        half = [a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args]
        for i in range(12, 16):  # bfloat16 src and linears, float32 norms: taken
            half[i] = args[i]
        assert op(*half).dtype == torch.bfloat16
        half[4] = args[4].double()
        with pytest.raises(RuntimeError, match=r"in_proj_weight must have src's dtype \(BFloat16\), got Double"):
            op(*half)
        half[4] = args[4]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert op(*half).dtype == torch.bfloat16
        half[4] = args[4].bfloat16()
        half[12] = args[12].double()
        with pytest.raises(RuntimeError, match=r"norm1_weight must have src's dtype \(BFloat16\), float16, "
                                               r"bfloat16 or float32, got Double"):
            op(*half)
    # dim_feedforward comes from linear1_weight: a bias that disagrees says so.
    bad = list(args)
    bad[8] = torch.randn(FF + 1, E)
    with pytest.raises(RuntimeError, match=rf"linear1_bias \(dim_feedforward from "
                                           rf"linear1_weight\) must have shape \[{FF + 1}\]"):
        op(*bad)


def test_wrong_src_width_blames_src():
    """src whose last dim is not the layer's d_model: the message names src and the width
    expected, as torch's does (not the layer's weights or nhead)."""
    layer = addnorm.TransformerEncoderLayer(12, 3, 24, dropout=0.0)
    with pytest.raises(RuntimeError, match=r"expecting embedding dimension of 12.*src of shape \[2, 5, 16\]"):
        layer(torch.randn(2, 5, 16))
    layer = addnorm.TransformerEncoderLayer(16, 4, 24, dropout=0.0)
    with pytest.raises(RuntimeError, match=r"expecting embedding dimension of 16.*src of shape \[2, 5, 12\]"):
        layer(torch.randn(2, 5, 12))
    # Unbatched src: its own shape (it named the internal [5, 1, 12]).
    with pytest.raises(RuntimeError, match=r"expecting embedding dimension of 16.*src of shape \[5, 12\]"):
        layer(torch.randn(5, 12))


# --------------------------------------------------------------------------- dropout
#
# In training every dropout of the layer draws a seed from torch's generator and drops with
# addnorm's mask of it (the residual-branch dropouts that an Add & Norm follows fused into
# it; the attention-probability and feed-forward dropouts as separate ops whose backward
# regenerates the mask): for the same torch.manual_seed the masks differ from torch's, so
# training with dropout is compared three ways. (1) With dropout 0 every parity test above
# runs in training mode (modules start in it) against torch's layer, results and
# gradients. (2) Statistics of the dropped residual contributions and the RNG behaviour.
# (3) Against torch's layer whose dropouts apply the masks of the seeds the layer drew,
# found by replaying the default generator (conftest.with_addnorm_dropouts).


def test_eval_and_zero_dropout_take_the_no_dropout_path():
    """Eval with dropout > 0 and training with dropout 0 give bitwise the results of eval
    with dropout 0 (gradients too; in training the norms' backward starts from their
    outputs, memory_efficient, so there the gradients agree to rounding) and leave torch's
    generator untouched; eval with dropout > 0 also matches torch's layer."""
    for norm_first in (False, True):
        ref, ours = _pair(dropout=0.3, norm_first=norm_first)
        x = _src(False)
        src_mask, kpm, _ = _masks("both")

        def run(layer, p, training):
            layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = p
            layer.train(training)
            xg = x.clone().requires_grad_()
            state = torch.get_rng_state()
            y = layer(xg, src_mask, kpm)
            assert torch.equal(torch.get_rng_state(), state), "the layer drew from the generator"
            return [y] + list(torch.autograd.grad(y.sum(), [xg] + list(layer.parameters())))

        base = run(ours, 0.0, False)
        for p, training in ((0.0, True), (0.3, False)):
            results = run(ours, p, training)
            assert torch.equal(results[0], base[0]), (p, training)
            for u, v in zip(results[1:], base[1:]):
                if training:
                    torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * v.abs().max().item())
                else:
                    assert torch.equal(u, v), (p, training)
        assert not ours.training and ours.dropout.p == ref.dropout.p == 0.3
        ref.eval()
        _check_parity(ref, ours, x, src_mask, kpm, False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_dropout_changes_per_call_and_follows_manual_seed(norm_first):
    """Training with dropout: successive calls differ; torch.manual_seed reproduces the
    output and every gradient exactly."""
    _, ours = _pair(dropout=0.3, norm_first=norm_first)
    x = _src(False)
    src_mask, kpm, _ = _masks("both")
    a, b = ours(x, src_mask, kpm), ours(x, src_mask, kpm)
    assert not torch.equal(a, b), "dropout mask did not change between calls"
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        xg = x.clone().requires_grad_()
        y = ours(xg, src_mask, kpm)
        outs.append([y] + list(torch.autograd.grad(y.sum(), [xg] + list(ours.parameters()))))
    for u, v in zip(*outs):
        assert torch.equal(u, v), "dropout does not follow torch.manual_seed"


def _branch_layer(norm_first, branch, p, e=64, h=4, ff=32):
    """A layer whose residual branch `branch` ("sa": attention, "ff": feed-forward) is the
    constant 1 in every element and whose other branch is exactly 0: v's projection and
    linear2's weight are zero, so out_proj.bias and linear2.bias are the branches (whatever
    the attention and linear1 dropouts drop)."""
    layer = addnorm.TransformerEncoderLayer(e, h, ff, dropout=p, norm_first=norm_first)
    with torch.no_grad():
        layer.self_attn.in_proj_weight[2 * e:].zero_()
        layer.self_attn.in_proj_bias.zero_()
        layer.self_attn.out_proj.bias.fill_(1.0 if branch == "sa" else 0.0)
        layer.linear2.weight.zero_()
        layer.linear2.bias.fill_(1.0 if branch == "ff" else 0.0)
    return layer.train()


@pytest.mark.parametrize("p", [0.3, 0.5])
@pytest.mark.parametrize("branch", ["sa", "ff"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_residual_dropout_statistics(norm_first, branch, p):
    """Over 64K elements the fraction of the residual branch's contribution that is dropped
    is within 5 sigma of p, and the output is exactly what that keep-mask gives (kept
    elements scaled by 1 / (1 - p)). The branch is the constant 1 (_branch_layer), so the
    mask shows in the output: pre-LN, out = src + mask / (1 - p) (its "ff" branch is torch's
    dropout, not fused, checked the same way); post-LN, with src = 0, out =
    LN2(LN1(mask / (1 - p))) or LN2(mask / (1 - p)), negative where dropped (positive where
    kept)."""
    s, n, e = 32, 32, 64
    layer = _branch_layer(norm_first, branch, p, e)
    src = torch.randn(s, n, e) if norm_first else torch.zeros(s, n, e)
    with torch.no_grad():
        out = layer(src)
    if norm_first:
        dropped = out == src
        expected = src + (~dropped).float() / (1 - p)
    else:
        assert (out != 0).all(), "a row with no element dropped or none kept"
        dropped = out < 0
        expected = F.layer_norm((~dropped).float() / (1 - p), [e])
        if branch == "sa":
            expected = F.layer_norm(expected, [e])
    _close(out, expected, "output from the inferred mask")
    frac = dropped.double().mean().item()
    sigma = (p * (1 - p) / dropped.numel()) ** 0.5
    assert abs(frac - p) < 5 * sigma, f"dropped fraction {frac} vs p = {p}"


@pytest.mark.parametrize("variant", ["relu_bias_float32", "gelu_no_bias_float64"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", ["both", "causal", "causal_padding", "3d", "full_padding"])
def test_dropout_matches_torch_with_the_layers_masks(mask, batch_first, norm_first, variant):
    """Training with dropout 0.3 against a reference built from the masks the layer used:
    torch's nn.TransformerEncoderLayer (same weights) whose dropouts are replaced by ones
    drawing addnorm's seeds (conftest.with_addnorm_dropouts: the residual dropouts, the
    feed-forward dropout, and the attention probabilities' dropout inside torch's own math
    attention, given that mask). Both runs start from the same torch.manual_seed and draw in
    the same order (attention, residual 1, feed-forward, residual 2), so they apply the same
    masks: outputs and every gradient (backward regenerates the layer's masks from its
    seeds) must agree as in the dropout-free parity tests. full_padding has fully masked
    attention rows (their probabilities are 0, as in torch's math path)."""
    act, bias, dtype = {"relu_bias_float32": ("relu", True, torch.float32),
                        "gelu_no_bias_float64": ("gelu", False, torch.float64)}[variant]
    p = 0.3
    ref, ours = _pair(dtype=dtype, dropout=p, activation=act, bias=bias, norm_first=norm_first,
                      batch_first=batch_first)
    with_addnorm_dropouts(ref)
    _check_parity(ref, ours, _src(batch_first, dtype), *_masks(mask, dtype),
                  rtol=1e-5 if dtype == torch.float32 else 1e-12, seed=2024)
    drops = [ref.attention_dropout, ref.dropout1, ref.dropout, ref.dropout2]
    assert [len(d.masks) for d in drops] == [1, 1, 1, 1]
    for d in drops:
        assert not d.masks[0].all() and d.masks[0].any(), "a mask kept or dropped everything"


@pytest.mark.parametrize("norm_first", [False, True])
def test_unbatched_dropout_matches_torch_with_the_layers_masks(norm_first):
    """Unbatched [S, E] input in training with dropout, against the same reference."""
    ref, ours = _pair(dtype=torch.float64, dropout=0.3, norm_first=norm_first)
    with_addnorm_dropouts(ref)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-1] = True
    _check_parity(ref, ours, torch.randn(S, E, dtype=torch.float64), None, kpm, False,
                  rtol=1e-12, seed=7)
    assert len(ref.attention_dropout.masks) == 1


@pytest.mark.parametrize("norm_first", [False, True])
def test_activation_checkpointing_reproduces_every_mask(norm_first):
    """torch.utils.checkpoint (non-reentrant, RNG state preserved) recomputes the layer in
    backward: every dropout draws the same seed again, so the gradients are bitwise those of
    the plain run from the same torch.manual_seed."""
    from torch.utils.checkpoint import checkpoint

    _, ours = _pair(dropout=0.3, norm_first=norm_first)
    x = _src(False)
    src_mask, kpm, _ = _masks("both")
    grads = []
    for ckpt in (False, True):
        xg = x.clone().requires_grad_()
        torch.manual_seed(5)
        y = (checkpoint(ours, xg, src_mask, kpm, use_reentrant=False) if ckpt
             else ours(xg, src_mask, kpm))
        grads.append([y] + list(torch.autograd.grad(y.square().sum(), [xg] + list(ours.parameters()))))
    for u, v in zip(*grads):
        assert torch.equal(u, v)


def test_autocast_attention_stays_torchs():
    """Under CPU autocast (bfloat16 q, k, v) the attention with dropout is torch's
    scaled_dot_product_attention (which computes in float32 there), not the written-out
    path: no softmax in bfloat16 and no _dropout_matmul of the probabilities, which the
    float32 layer has."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((str(func.overloadpacket), args[0] if args and torch.is_tensor(args[0]) else None))
            return func(*args, **(kwargs or {}))

    def probability_drops(rec):
        return [t for op, t in rec.ops if op == "addnorm._dropout_matmul"]

    _, ours = _pair(dropout=0.3)
    with Record() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        ours(_src(False)).float().sum().backward()
    softmax_dtypes = [t.dtype for op, t in rec.ops if op in ("aten._safe_softmax", "aten._softmax")]
    assert softmax_dtypes and torch.bfloat16 not in softmax_dtypes, softmax_dtypes
    assert not probability_drops(rec)
    with Record() as rec:
        ours(_src(False))
    assert [t.dtype for t in probability_drops(rec)] == [torch.float32]


def test_attention_and_feed_forward_dropouts_keep_no_mask():
    """The attention-probability and feed-forward dropouts keep their seeds, not masks, for
    backward: a training step with dropout keeps one tensor of batch x heads x seq x seq (the
    probabilities; without dropout torch's attention kernel keeps none) where torch's layer
    keeps three (the probabilities, a float mask and the dropped copy), and one more
    feed-forward-sized tensor than without dropout (linear2's dropped input) where torch's
    keeps two (and a float mask). Nor is the whole q/k/v projection kept for v's sake."""
    torch.manual_seed(0)
    e, h, ff, s, n = 32, 4, 64, 9, 3

    def saved(layer, p):
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = p
        layer.self_attn.dropout = p
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.numel()
            return t

        x = torch.randn(s, n, e, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        sizes = list(storages.values())
        return sizes.count(n * h * s * s), sizes.count(s * n * ff), sizes.count(3 * s * n * e)

    theirs = nn.TransformerEncoderLayer(e, h, ff).train()
    ours = addnorm.replace_modules(copy.deepcopy(theirs)).train()
    (attn_0, ff_0, _), (attn_p, ff_p, proj_p) = saved(ours, 0.0), saved(ours, 0.2)
    their_attn, their_ff, _ = saved(theirs, 0.2)
    assert (attn_0, attn_p, their_attn) == (0, 1, 3), (attn_0, attn_p, their_attn)
    assert ff_p == ff_0 + 1 and their_ff == ff_p + 1, (ff_0, ff_p, their_ff)
    assert proj_p == 0, "the whole q/k/v projection is kept for v's sake"


# --------------------------------------------------------------------------- C++ module


@pytest.mark.parametrize("norm_first,batch_first,activation,bias",
                         [(False, False, "relu", True), (True, True, "gelu", False)])
def test_cpp_module_matches_python_module(norm_first, batch_first, activation, bias):
    kw = dict(dim_feedforward=FF, dropout=0.2, activation=activation, layer_norm_eps=1e-5,
              batch_first=batch_first, norm_first=norm_first, bias=bias)
    py = _randomize(addnorm.TransformerEncoderLayer(E, H, **kw))
    cpp = addnorm._C.CppTransformerEncoderLayer(E, H, **kw)
    assert [n for n, _ in cpp.named_parameters()] == [n for n, _ in py.named_parameters()]
    for (_, p), (_, q) in zip(cpp.named_parameters(), py.named_parameters()):
        assert p.shape == q.shape
    cpp.load_state_dict({k: v for k, v in py.state_dict().items()})
    x = _src(batch_first)
    src_mask, kpm, _ = _masks("both")
    for training in (False, True):
        py.train(training)
        cpp.train(training)
        assert cpp.training == training
        torch.manual_seed(7)
        a = py(x, src_mask, kpm)
        torch.manual_seed(7)
        b = cpp.forward(x, src_mask, kpm, False)
        assert torch.equal(a, b)
        g = torch.randn_like(a)
        ga = torch.autograd.grad(a, [p for _, p in py.named_parameters()], g)
        gb = torch.autograd.grad(b, [p for _, p in cpp.named_parameters()], g)
        for u, v in zip(ga, gb):
            assert torch.equal(u, v)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("norm_first", [False, True])
def test_gradcheck_float64(norm_first):
    e, h, ff, s, n = 8, 2, 8, 3, 2
    layer = _randomize(nn.TransformerEncoderLayer(e, h, ff, dropout=0.0, dtype=torch.float64))
    names = [k for k, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(s, n, e, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(s, s, dtype=torch.float64)
    kpm = torch.tensor([[False, False, False], [False, False, True]])

    def f(x, *ps):
        p = dict(zip(names, ps))
        return torch.ops.addnorm.transformer_encoder_layer(
            x, mask, kpm, False, p["self_attn.in_proj_weight"], p["self_attn.in_proj_bias"],
            p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"], p["linear1.weight"],
            p["linear1.bias"], p["linear2.weight"], p["linear2.bias"], p["norm1.weight"],
            p["norm1.bias"], p["norm2.weight"], p["norm2.bias"], h, 0.0, "gelu", 1e-5, False,
            norm_first, True)

    assert torch.autograd.gradcheck(f, (x, *params))


# --------------------------------------------------------------------------- in models


def test_stacked_in_transformer_encoder():
    ref_layer, our_layer = _pair(batch_first=True)
    ref = nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=False)
    ours = nn.TransformerEncoder(our_layer, 2, enable_nested_tensor=False)
    assert all(type(m) is addnorm.TransformerEncoderLayer for m in ours.layers)
    ours.load_state_dict(ref.state_dict())
    x = _src(True)
    src_mask, kpm, _ = _masks("both")
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ref(xr, src_mask, kpm)
    b = ours(xo, src_mask, kpm)
    _close(b, a, "encoder output")
    g = torch.randn_like(a)
    _close(torch.autograd.grad(b, xo, g)[0], torch.autograd.grad(a, xr, g)[0], "encoder grad")
    # A causal mask: nn.TransformerEncoder detects it and passes is_causal=True.
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    _close(ours(x, causal), ref(x, causal), "encoder causal")


def test_transformer_encoder_nested_fast_path():
    # enable_nested_tensor=True, eval, no_grad, padding mask: nn.TransformerEncoder feeds
    # nested tensors, which the layer hands to torch's own kernel.
    ref_layer, our_layer = _pair(batch_first=True)
    ref = nn.TransformerEncoder(ref_layer, 2).eval()
    ours = nn.TransformerEncoder(our_layer, 2).eval()
    ours.load_state_dict(ref.state_dict())
    x = _src(True)
    _, kpm, _ = _masks("padding")
    with torch.no_grad():
        a, b = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(b, a)


def test_fx_traces_the_layer_as_a_leaf():
    """torch.fx: FX's default tracer stops in the layer's forward (it branches on its input)
    with FX's own error; docs/semantics.md's tracer, which takes the layer as a leaf as FX
    takes torch's, gives a graph that calls the module and returns its output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), addnorm.TransformerEncoderLayer(E, H, FF, batch_first=True),
                          nn.LayerNorm(E)).eval()
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, addnorm.TransformerEncoderLayer) or super().is_leaf_module(m, name)

    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3
    x = torch.randn(2, 5, E)
    assert torch.equal(gm(x), model(x))


def test_replace_modules_swaps_encoder_layers():
    model = nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0), 2,
                              enable_nested_tensor=False),
        nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=torch.tanh),
        nn.LayerNorm(E),
    ).double()
    _randomize(model)
    ref = copy.deepcopy(model)
    params = [p for p in model.parameters()]
    returned = addnorm.replace_modules(model)
    assert returned is model
    assert all(type(m) is addnorm.TransformerEncoderLayer for m in model[0].layers)
    assert type(model[1]) is nn.TransformerEncoderLayer  # tanh: stays torch's
    assert type(model[2]) is addnorm.LayerNorm
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(S, N, E, dtype=torch.float64)
    _close(model(x), ref(x), "replaced model", rtol=1e-12)


class _LoRALinear(nn.Linear):
    """An nn.Linear whose forward is not its weight's (the pattern of LoRA adapters)."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.a = nn.Parameter(0.3 * torch.randn(2, linear.in_features))
        self.b = nn.Parameter(0.3 * torch.randn(linear.out_features, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.a.T @ self.b.T


def _lora(layer):
    layer.linear1 = _LoRALinear(layer.linear1)


def _hook(layer):
    layer.norm1.register_forward_hook(lambda m, i, o: o * 2)


def _rms_norms(layer):
    layer.norm1, layer.norm2 = nn.RMSNorm(E), nn.RMSNorm(E)


def _norm2_eps(layer):
    layer.norm2.eps = 0.5


def _norm1_weight_none(layer):  # (elementwise_affine still True)
    layer.norm1.weight = None


def _norm2_weight_none(layer):
    layer.norm2.weight = None


def _dropout1(layer):
    layer.dropout1.p = 0.5


def _dropout2(layer):
    layer.dropout2.p = 0.5


def _hooked_dropout2(layer):  # (a hook runs with p = 0 too)
    layer.dropout2.register_forward_hook(lambda m, i, o: o * 2)


def _tanh(layer):
    layer.activation = torch.tanh


def _negative_eps(layer):
    layer.norm1.eps = layer.norm2.eps = -1e-6  # (torch's LayerNorm takes it; the op refuses it)


def _pruned(layer):
    torch.nn.utils.prune.l1_unstructured(layer.linear1, "weight", amount=0.5)


def _hooked_relu(layer):
    layer.activation = nn.ReLU()
    layer.activation.register_forward_hook(lambda m, i, o: o * 2)


def _backward_hooked_relu(layer):
    layer.activation = nn.ReLU()
    layer.activation.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))


def _instance_forward(layer):  # (how device-map and adapter tools wrap a submodule)
    layer.linear2.forward = lambda h, f=layer.linear2.forward: 0.5 * f(h)


def _instance_method_forward(layer):  # (a bound method, as types.MethodType makes)
    layer.linear2.forward = types.MethodType(lambda self, h: 0.5 * nn.Linear.forward(self, h),
                                             layer.linear2)


def _instance_sa_block(layer):
    layer._sa_block = lambda *a, f=layer._sa_block, **k: 0.5 * f(*a, **k)


def _dropout_modes(layer, layer_training=True):
    layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = 0.3
    layer.train(layer_training)
    for m in (layer.self_attn, layer.dropout, layer.dropout1, layer.dropout2):
        m.train(not layer_training)


def _mc_dropout(layer):  # (eval, with the dropouts left training)
    _dropout_modes(layer, layer_training=False)


def _assert_runs_torchs_forward(ref, ours, x):
    """ours(x) warns that it runs torch's forward and gives ref's output and input gradient
    (the same seed before each)."""
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(2)
    expected = ref(xr)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="runs torch's forward"):
        got = ours(xo)
    assert torch.equal(got, expected)
    expected.sum().backward()
    got.sum().backward()
    assert torch.equal(xo.grad, xr.grad)


def test_fallback_warning_names_the_submodules_class_in_full():
    """A submodule of another class is named by its module and class: LoRA adapters' and
    torch.ao's dynamically quantized Linears are classes called Linear, which read as "a
    Linear, not plain"."""
    _, ours = _pair(dropout=0.0)
    ours.linear1 = _LoRALinear(ours.linear1)
    with pytest.warns(UserWarning, match=re.escape(
            f"linear1 is a {__name__}._LoRALinear, not plain")):
        ours(_src(False))
    _, ours = _pair(dropout=0.0)
    torch.ao.quantization.quantize_dynamic(ours, {nn.Linear}, inplace=True)
    with pytest.warns(UserWarning, match=re.escape(
            "linear1 is a torch.ao.nn.quantized.dynamic.modules.linear.Linear, not plain")):
        ours(_src(False))


@pytest.mark.parametrize("change", [_lora, _hook, _rms_norms, _norm2_eps, _norm1_weight_none, _norm2_weight_none,
                                    _dropout1, _dropout2, _hooked_dropout2, _tanh, _negative_eps,
                                    _pruned,
                                    _hooked_relu, _backward_hooked_relu, _instance_forward,
                                    _instance_method_forward, _instance_sa_block, _dropout_modes,
                                    _mc_dropout],
                         ids=lambda f: f.__name__.strip("_"))
def test_layers_changed_after_construction_run_torchs_forward(change):
    """A layer whose submodules or attributes changed after construction in a way the fused
    op cannot run (a submodule whose forward is not its parameters': a subclass, a forward
    or backward hook, a forward set on the instance, a parametrization or pruning; a block
    method set on the instance; a norm that is not a LayerNorm; eps or dropout
    probabilities that differ between the norms or dropouts; a negative eps; a norm's weight
    set to None;
    dropouts in another training
    mode than the layer, either way; another activation) runs
    torch's forward, which calls the submodules, with a warning naming why: the same
    output and gradients as torch's layer with the same change (the op would ignore the
    change). replace_modules leaves such a torch layer as it is."""
    import torch.nn.utils.prune  # noqa: F401

    torch.manual_seed(0)
    ref, ours = _pair(dropout=0.0)
    theirs = copy.deepcopy(ref)
    change(ref)
    torch.manual_seed(1)
    change(ours)
    ours.load_state_dict(ref.state_dict())
    _assert_runs_torchs_forward(ref, ours, _src(False))
    change(theirs)
    with pytest.warns(UserWarning, match=r"^addnorm.replace_modules: model \(torch\.nn\.modules\.transformer\."
                      r"TransformerEncoderLayer\) stays as it is: "):
        assert type(addnorm.replace_modules(theirs)) is nn.TransformerEncoderLayer


@pytest.mark.parametrize("cls, name", [(nn.Linear, "forward"), (nn.LayerNorm, "forward"),
                                       (nn.MultiheadAttention, "forward"),
                                       (nn.TransformerEncoderLayer, "_sa_block"),
                                       (nn.TransformerEncoderLayer, "_ff_block")],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_methods_patched_on_torchs_classes_run_torchs_forward(monkeypatch, cls, name):
    """A method replaced on torch's class after addnorm was imported (as instrumentation and
    fake-quantization tools do, for every instance at once) is one the op would not call:
    the layer runs torch's forward, which calls it, with a warning; the same output and
    gradients as torch's layer under the same patch."""
    torch.manual_seed(0)
    ref, ours = _pair(dropout=0.0)
    x = _src(False)
    original = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, *a, **k: (
        lambda y: 0.5 * y if torch.is_tensor(y) else (0.5 * y[0], *y[1:]))(original(self, *a, **k)))
    _assert_runs_torchs_forward(ref, ours, x)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.TransformerEncoderLayer runs torch's")
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dropout_modes_do_not_matter_at_p_zero():
    """With dropout 0 the dropouts' training modes change nothing: a layer whose dropout
    submodules are in another mode than the layer runs the op, without a warning, and
    replace_modules swaps such a torch layer."""
    ref, ours = _pair(dropout=0.0)
    x = _src(False)
    for m in (ref, ours):
        m.train()
        m.dropout1.eval()
        m.self_attn.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="addnorm.TransformerEncoderLayer runs torch's")
        got = ours(x)
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)
    assert type(addnorm.replace_modules(ref)) is addnorm.TransformerEncoderLayer


def test_fallback_warns_once_per_reason():
    """A layer that falls back to torch's forward warns at its first call for a reason, not
    at every call; a new reason warns again."""
    _, ours = _pair(dropout=0.0)
    x = _src(False)
    ours.norm2.eps = 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(x)
        ours(x)
        assert len(caught) == 1, [str(w.message) for w in caught]
        ours.norm2.eps, ours.dropout1.p = ours.norm1.eps, 0.5
        ours(x)
        ours(x)
    assert len(caught) == 2, [str(w.message) for w in caught]
    assert "dropout" in str(caught[1].message)


def test_eager_nested_input_meets_torchs_checks():
    """Nested input in eager mode goes through torch's forward, so torch's own refusals hold
    (with its fast path off, torch's attention refuses nested tensors), in eval and in
    training."""
    ref, ours = _pair(batch_first=True)
    src = torch.randn(3, 5, E)
    keep = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    nested = torch._nested_tensor_from_mask(src, keep, mask_check=False)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for layer, training in ((ref, False), (ours, False), (ours, True)):
            layer.train(training)
            with torch.no_grad(), pytest.raises(AssertionError, match="does not support Nested"):
                layer(nested)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_global_module_hooks_run_torchs_forward():
    """With a global forward hook (which torch calls for every submodule) the layer builds
    and runs torch's forward, so the hook sees every submodule call, as in torch's layer."""
    calls = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__))
    try:
        ref, ours = _pair()
        x = _src(False)
        expected = ref(x)
        torch_calls, calls[:] = list(calls), []
        with pytest.warns(UserWarning, match="global module hooks"):
            got = ours(x)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    assert calls == torch_calls and "Linear" in calls


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize("dropout,norm_first", [(0.0, True), (0.3, False), (0.3, True)])
def test_torch_compile_fullgraph_forward_backward(dropout, norm_first):
    """The layer compiled with fullgraph (training mode) gives eager's output and gradients.
    With dropout the residual dropouts' seeds are drawn inside the traced op in eager's
    order, so the same torch.manual_seed gives eager's masks (and the compiled backward
    regenerates the forward's)."""
    torch._dynamo.reset()
    _, ours = _pair(dropout=dropout, norm_first=norm_first, batch_first=True)
    ours.train()
    x = _src(True)
    src_mask, kpm, _ = _masks("both")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled(x, src_mask, kpm)  # compile outside the seeded runs
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(31)
    a = ours(xe, src_mask, kpm)
    torch.manual_seed(31)
    b = compiled(xc, src_mask, kpm)
    _close(b, a, "compiled output")
    g = torch.randn_like(a)
    params = list(ours.parameters())
    ga = torch.autograd.grad(a, [xe] + params, g)
    gb = torch.autograd.grad(b, [xc] + params, g)
    for u, v in zip(gb, ga):
        _close(u, v, "compiled grad")
    torch._dynamo.reset()


def test_torch_compile_dynamic_shapes():
    torch._dynamo.reset()
    _, ours = _pair(batch_first=True)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, fullgraph=True, backend=cnt, dynamic=True)
    frames = []
    for n, s in ((2, 5), (3, 7)):
        x = torch.randn(n, s, E)
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[0, -1] = True
        _close(compiled(x, None, kpm), ours(x, None, kpm), f"dynamic n={n} s={s}")
        frames.append(cnt.frame_count)
    assert frames[1] == frames[0], "a second batch size / sequence length recompiled"
    torch._dynamo.reset()


@pytest.mark.parametrize("change", ["linear2.forward", "self_attn.forward", "_ff_block"])
def test_compiled_layer_follows_a_forward_set_after_compiling(change):
    """A forward set on a submodule instance (as adapter tools do), or a block on the layer,
    after torch.compile: the compiled layer recompiles and runs torch's forward, as the eager
    one does (it kept its graph: the check read __dict__, on which Dynamo sets no guard)."""
    torch._dynamo.reset()
    _, ours = _pair(batch_first=True)
    compiled = torch.compile(ours, backend="aot_eager")
    x = _src(True)
    compiled(x)
    if change == "_ff_block":
        ours._ff_block = lambda t: torch.zeros_like(t)
    else:
        module = ours.get_submodule(change.split(".")[0])
        old = module.forward
        module.forward = lambda *a, **k: (lambda y: y * 3 if torch.is_tensor(y) else (y[0] * 3, None))(
            old(*a, **k))
    with pytest.warns(UserWarning, match="runs torch's forward"):
        expected = ours(x)
    _close(compiled(x), expected, f"compiled after setting {change}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------- memory


def _saved_mn_storages(model, x):
    """Distinct storages of the [M, E] tensors autograd keeps for a forward of model."""
    ptrs = set()

    def pack(t):
        if t.numel() == x.numel():
            ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return len(ptrs)


def _training_stacks(L, dropout, batch_first, norm_first, E=32):
    """(torch's stack of L layers and a Linear head, addnorm's copy, an input x), training."""
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(E, 4, 64, dropout, batch_first=batch_first,
                                         norm_first=norm_first) for _ in range(L)]
    theirs = nn.Sequential(*layers, nn.Linear(E, E)).train()
    ours = addnorm.replace_modules(copy.deepcopy(theirs)).train()
    return theirs, ours, torch.randn(5, 7, E, requires_grad=True)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_keeps_two_tensors_fewer_per_layer(norm_first, batch_first, dropout):
    """A training step of 3 layers and a Linear head (float32) keeps at least two [M, E]
    tensors fewer per layer than torch's (one per norm: memory_efficient; the attention's
    projections read x as laid out, no copies kept; with dropout, the fused residual
    dropouts keep no mask), and second derivatives through the training-mode layer are
    refused with a clear error."""
    L = 3
    theirs, ours, x = _training_stacks(L, dropout, batch_first, norm_first)
    n_theirs, n_ours = _saved_mn_storages(theirs, x), _saved_mn_storages(ours, x)
    assert n_theirs - n_ours >= 2 * L, (n_theirs, n_ours)
    with pytest.raises(RuntimeError, match=r"memory_efficient=True keeps no h.*run it in eval "
                                           r"mode.*sdpa_kernel\(SDPBackend.MATH\)"):
        torch.autograd.grad(ours(x).sum(), [x], create_graph=True)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_under_autocast_keeps_no_more_than_torch(norm_first, dropout):
    """Under CPU bfloat16 autocast the projections keep bfloat16 copies of the norms'
    float32 outputs, so keeping an output saves nothing: the bytes of the [M, E] tensors a
    training step keeps (the input aside, which its caller holds) are never more than
    torch's (pre-LN's first norm once kept its output where torch's keeps the input), and
    with dropout at least one float32 [M, E] fewer per layer (the masks)."""
    L = 3
    theirs, ours, x = _training_stacks(L, dropout, True, norm_first)

    def saved_bytes(model):
        storages = {}

        def pack(t):
            if t.numel() == x.numel() and t.untyped_storage().data_ptr() != x.data_ptr():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
        return sum(storages.values())

    fewer = (saved_bytes(theirs) - saved_bytes(ours)) / (x.numel() * 4)
    assert fewer >= (L if dropout else 0), fewer


def test_second_derivatives_in_eval_mode_as_the_refusal_says():
    """What the training-mode refusal points to: in eval mode, on the CPU under the math
    attention (as torch's layer needs there), second derivatives are torch's layer's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dtype=torch.float64).eval()
    ours = addnorm.replace_modules(copy.deepcopy(ref))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in (ref, ours):
        with sdpa_kernel(SDPBackend.MATH):
            g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
            results.append(torch.autograd.grad(g.square().sum(), [x, *layer.parameters()]))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)



@CUDA
@pytest.mark.parametrize("norm_first", [False, True])
def test_training_keeps_less_cuda_memory(norm_first):
    """On CUDA, by torch.cuda.memory_allocated: the memory a training forward of a Linear,
    3 layers and a Linear head (float32, dropout 0) leaves for backward is at least one
    [M, E] float32 tensor per norm below torch's (each norm keeps its output, which the
    next Linear keeps anyway, instead of h; the first Linear makes the first layer's input,
    which a pre-LN norm1 of torch keeps)."""
    torch.manual_seed(0)
    E, L, M = 64, 3, 8 * 16
    layers = [nn.TransformerEncoderLayer(E, 4, 128, 0.0, batch_first=True, norm_first=norm_first)
              for _ in range(L)]
    theirs = nn.Sequential(nn.Linear(E, E), *layers, nn.Linear(E, E)).cuda().train()
    ours = addnorm.replace_modules(copy.deepcopy(theirs)).train()
    x = torch.randn(8, 16, E, device="cuda", requires_grad=True)
    kept = []
    for model in (theirs, ours):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = model(x)
        kept.append(torch.cuda.memory_allocated() - base)
        y.sum().backward()
        del y
    assert kept[0] - kept[1] >= 2 * L * M * E * 4, kept

@pytest.mark.parametrize("norm_first", [False, True])
def test_norms_keep_h_where_the_output_loses_xhat(norm_first):
    """Training-mode float32 norms recover xhat = (y - bias) / weight from their output only
    where that is accurate: with |bias| far above |weight| (a weight shrunk by training,
    ~1e-4, under a bias of 1) or a zero in the weight they keep h, so the gradients stay as
    accurate as torch's float32 layer's (they were 1000x worse), against torch's float64
    layer; with well-conditioned weights they keep the output."""
    torch.manual_seed(0)
    e = 32
    ref = nn.TransformerEncoderLayer(e, 4, 64, 0.0, norm_first=norm_first).double()
    with torch.no_grad():
        for norm in (ref.norm1, ref.norm2):
            norm.weight.copy_(1e-4 * (1 + torch.rand(e)))
            norm.bias.fill_(1.0)
        ref.norm2.weight[3] = 0.0
    theirs = copy.deepcopy(ref).float()
    ours = addnorm.replace_modules(copy.deepcopy(theirs))
    x = torch.randn(9, 4, e, dtype=torch.float64)
    g = torch.randn(9, 4, e, dtype=torch.float64)

    def grads(model, dtype):
        xs = x.to(dtype).clone().requires_grad_()
        (model(xs) * g.to(dtype)).sum().backward()
        return [xs.grad.double()] + [p.grad.double() for p in model.parameters()]

    exact, torch32, ours32 = grads(ref, torch.float64), grads(theirs, torch.float32), grads(ours, torch.float32)
    for name, a, t, r in zip(["src"] + [n for n, _ in ref.named_parameters()], ours32, torch32, exact):
        err, torch_err = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 4 * torch_err + 1e-12, f"{name}: {err:.2e} vs torch's {torch_err:.2e}"
    # Well-conditioned weights: the norm after the residual add keeps its output, which the
    # Linear after it keeps anyway, instead of h: one [M, E] tensor fewer.
    x32 = x.float().requires_grad_()
    kept_h = _saved_mn_storages(ours, x32)
    with torch.no_grad():
        for norm in (ours.norm1, ours.norm2):
            norm.weight.fill_(1.0)
    assert kept_h - _saved_mn_storages(ours, x32) >= 1


def test_compiled_training_with_a_zero_norm_weight():
    """Under torch.compile the layer cannot read its CPU norm weights for free (they are
    traced), so its norms keep h: a zero in a weight trains as in eager mode (it failed in
    the compiled backward), with eager's gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = addnorm.TransformerEncoderLayer(16, 4, 32, dropout=0.0)
    with torch.no_grad():
        layer.norm2.weight[3] = 0.0
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 16)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xe).square().sum().backward()
    eager = [xe.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled(xc).square().sum().backward()
    for a, e in zip([xc.grad] + [p.grad for p in layer.parameters()], eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_half_precision_norms_keep_h():
    """A bfloat16 layer in training keeps h for its norms (memory_efficient only for
    float32/float64 norms, whose output carries xhat precisely enough): with dropout 0 its
    gradients are bitwise those of eval mode, where the norms keep h too."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True, dtype=torch.bfloat16)
    ours = addnorm.replace_modules(copy.deepcopy(theirs))
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for training in (True, False):
        ours.train(training)
        grads.append(torch.autograd.grad(ours(x).float().square().sum(),
                                         [x] + list(ours.parameters())))
    for a, e in zip(*grads):
        assert torch.equal(a, e)


def test_training_under_a_memory_budget_is_refused():
    """The layer's op draws its fused residual dropouts' seeds inside the graph; with
    torch.compile's activation_memory_budget < 1 the partitioner could recompute those draws
    with fresh randomness, so the layer refuses clearly (dropout 0 and eval draw nothing and
    compile as before)."""
    import torch._functorch.config as fconfig

    torch.manual_seed(0)
    layer = addnorm.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with fconfig.patch(activation_memory_budget=0.5):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
        with pytest.raises(Exception, match="the layer's dropout seeds cannot be drawn"):
            compiled(x)
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = 0.0
        torch._dynamo.reset()
        compiled(x).sum().backward()
    torch._dynamo.reset()


@pytest.mark.parametrize("budget", [0.5, 0.0])
def test_op_called_directly_under_a_memory_budget_is_refused(budget):
    """torch.ops.addnorm.transformer_encoder_layer called directly (no Python layer to check
    first): its seeds are drawn in its decomposition, while torch.compile traces it, and that
    draw is refused under activation_memory_budget < 1 (the partitioner recomputed it in
    backward: gradients of other masks, off by up to 8 here). At budget 1 the compiled
    gradients are eager's for the same seed."""
    import torch._functorch.config as fconfig

    torch.manual_seed(0)
    layer = addnorm.TransformerEncoderLayer(16, 2, 32, 0.3, batch_first=True)
    sa, params = layer.self_attn, list(layer.parameters())

    def f(src):
        return torch.ops.addnorm.transformer_encoder_layer(
            src, None, None, False, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight,
            sa.out_proj.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight,
            layer.linear2.bias, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
            layer.norm2.bias, 2, 0.3, "relu", 1e-5, True, False, True, False)

    x, g = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
    grads = []
    for b in (1.0, budget):
        with fconfig.patch(activation_memory_budget=b):
            torch._dynamo.reset()
            torch.manual_seed(123)
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager_decomp_partition")
            if b < 1.0:
                with pytest.raises(Exception, match=r"the encoder layer op's\) cannot be drawn"):
                    compiled(x)
            else:
                grads.append(torch.autograd.grad(compiled(x), [x] + params, g))
    torch._dynamo.reset()
    torch.manual_seed(123)
    for a, e in zip(grads[0], torch.autograd.grad(f(x), [x] + params, g)):
        torch.testing.assert_close(a, e)
    # Eager calls under a dispatch mode (where the check runs) are not refused at any budget.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(123)
    plain = f(x)
    with fconfig.patch(activation_memory_budget=budget), Passthrough():
        torch.manual_seed(123)
        moded = f(x)
    assert torch.equal(moded, plain)


def test_subclass_overriding_a_block_runs_torchs_forward():
    """A subclass that overrides _sa_block or _ff_block (which the op does not call) builds,
    and runs torch's forward, so the override takes effect as in torch's layer."""

    def scaled(base):
        class Scaled(base):
            def _ff_block(self, x):
                return 0.5 * super()._ff_block(x)
        return Scaled

    torch.manual_seed(0)
    ref = _randomize(scaled(nn.TransformerEncoderLayer)(E, H, FF, dropout=0.0))
    ours = scaled(addnorm.TransformerEncoderLayer)(E, H, FF, dropout=0.0)
    ours.load_state_dict(ref.state_dict())
    x = _src(False)
    with pytest.warns(UserWarning, match="_ff_block is overridden"):
        got = ours(x)
    assert torch.equal(got, ref(x))


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bfloat16])
def test_float_masks_of_another_dtype(mask_dtype):
    """A float mask of a dtype attention refuses (numpy's float64, say) is cast to src's,
    as torch's inference fast path takes it (it raised): the result is torch's slow path's
    with the mask in float32 (torch's fast path mishandles a finite float src_mask)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    ours = addnorm.replace_modules(copy.deepcopy(ref))
    x = torch.randn(3, 5, 16)
    kpm = torch.zeros(3, 5)
    kpm[1, -2:] = float("-inf")
    mask = torch.zeros(5, 5)
    mask[0, 1] = -1.5
    expected = ref(x, src_mask=mask, src_key_padding_mask=kpm)  # (grad enabled: slow path)
    with torch.no_grad():
        got = ours(x, src_mask=mask.to(mask_dtype), src_key_padding_mask=kpm.to(mask_dtype))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    ours.train()
    torch.testing.assert_close(ours(x, src_mask=mask.double()), ref.train()(x, src_mask=mask),
                               rtol=1e-5, atol=1e-5)
