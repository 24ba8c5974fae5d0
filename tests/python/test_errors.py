"""Bad inputs raise RuntimeError naming the offending argument (one test per case of the
spec); empty tensors give empty results; NaN/Inf propagate as in torch."""

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import addnorm
from conftest import CUDA_SKIP, DEVICES, assert_close, make_affine, make_data

F32 = torch.float32


def _ln(x, r, ns, w=None, b=None, eps=1e-5):
    return torch.ops.addnorm.layer_norm(x, ns, w, b, eps)


def _rms(x, r, ns, w=None, b=None, eps=None):
    return torch.ops.addnorm.rms_norm(x, ns, w, eps)


def _add_ln(x, r, ns, w=None, b=None, eps=1e-5):
    return torch.ops.addnorm.add_layer_norm(x, r, ns, w, b, eps)


def _add_rms(x, r, ns, w=None, b=None, eps=None):
    return torch.ops.addnorm.add_rms_norm(x, r, ns, w, eps)


OPS = {"layer_norm": _ln, "rms_norm": _rms, "add_layer_norm": _add_ln, "add_rms_norm": _add_rms}
ADD_OPS = ["add_layer_norm", "add_rms_norm"]
LN_OPS = ["layer_norm", "add_layer_norm"]  # the ops with a bias


def _match(arg):
    """Messages start with 'addnorm:' and name the argument."""
    return rf"(?s)addnorm:.*\b{arg}\b"


def _x(shape=(3, 8), dtype=F32, device="cpu"):
    return make_data(shape, dtype, device)


# --------------------------------------------------------------------------- input


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_input_none(op, with_residual):
    """None as input (a residual given or not, one requiring grad or not): a message about
    the input, not the dispatcher's about missing kernels of an internal op."""
    r = _x() if with_residual and op in ADD_OPS else None
    for r_req in ([False, True] if r is not None else [False]):
        rr = None if r is None else r.clone().requires_grad_(r_req)
        with pytest.raises(RuntimeError, match=r"addnorm: input must be a tensor, got None"):
            OPS[op](None, rr, [8])


@pytest.mark.parametrize("rms", [False, True])
def test_input_none_with_dropout(rms):
    """The same message where the fused dropout would draw a seed on the input's device
    (functional form and module in training)."""
    r = _x()
    fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
    module = (addnorm.AddRMSNorm if rms else addnorm.AddLayerNorm)(8, dropout=0.1)
    for call in (lambda: fn(None, r, [8], dropout_p=0.1), lambda: module(None, r)):
        with pytest.raises(RuntimeError, match=r"addnorm: input must be a tensor, got None"):
            call()


def test_named_tensors():
    """Named tensors: torch's answer for its norms (drop the names), from the functional
    forms and the modules, not the TorchScript conversion's message of torch.ops."""
    x = torch.randn(2, 8, names=("N", "C"))
    r = torch.randn(2, 8)
    calls = [
        lambda: addnorm.layer_norm(x, 8), lambda: addnorm.rms_norm(x, [8]),
        lambda: addnorm.add_layer_norm(x, r, 8), lambda: addnorm.add_rms_norm(r, x, 8),
        lambda: addnorm.LayerNorm(8)(x), lambda: addnorm.RMSNorm(8)(x),
        lambda: addnorm.AddLayerNorm(8)(x, r), lambda: addnorm.AddRMSNorm(8)(r, x),
        lambda: addnorm.TransformerEncoderLayer(8, 2, 16)(torch.randn(3, 2, 8, names=("S", "N", "E"))),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"addnorm: named tensors are not supported .*rename\(None\)"):
            call()


@pytest.mark.parametrize("rms", [False, True])
def test_failing_call_with_dropout_draws_no_seed(rms):
    """The fused dropout's seed is drawn after the arguments are checked: a call refused for
    its normalized_shape's type or a named tensor leaves the generator (the given one and
    the default) where it was; the shape's type is reported before the names, as always."""
    fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
    module = (addnorm.AddRMSNorm if rms else addnorm.AddLayerNorm)(8, dropout=0.3)
    x, named = _x(), torch.randn(2, 8, names=("N", "C"))
    gen = torch.Generator().manual_seed(7)
    calls = [(TypeError, "normalized_shape", lambda: fn(x, x, 8.0, dropout_p=0.1, generator=gen)),
             (TypeError, "normalized_shape", lambda: fn(named, x, None, dropout_p=0.1)),
             (RuntimeError, "named tensors", lambda: fn(x, named, 8, dropout_p=0.1, generator=gen)),
             (RuntimeError, "named tensors", lambda: module(named, x))]
    for error, match, call in calls:
        states = (gen.get_state(), torch.get_rng_state())
        with pytest.raises(error, match=match):
            call()
        assert torch.equal(gen.get_state(), states[0]) and torch.equal(torch.get_rng_state(), states[1])


@pytest.mark.parametrize("rms", [False, True])
def test_generator_that_is_not_a_generator_is_refused_by_name(rms):
    """generator= takes a torch.Generator or None, at any dropout_p (with dropout_p > 0 torch's
    randint named itself, not the argument; with 0 the value went unchecked)."""
    fn = addnorm.add_rms_norm if rms else addnorm.add_layer_norm
    x = _x()
    for bad in (5, "cpu", torch.device("cpu")):
        for p in (None, 0.0, 0.3):
            with pytest.raises(TypeError, match=r"addnorm: generator must be a torch.Generator "
                                                r"or None, got " + re.escape(repr(bad))):
                fn(x, x, 8, dropout_p=p, generator=bad)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(fn(x, x, 8, dropout_p=0.3, generator=gen),
                       fn(x, x, 8, dropout_p=0.3, generator=torch.Generator().manual_seed(3)))


def test_normalized_shape_sequence_subclass_is_iterated():
    """A list subclass as normalized_shape is read through its own iteration (list(shape)),
    as any sequence; exact lists, tuples and torch.Size go to the op as they are."""
    class Reversed(list):
        def __iter__(self):
            return reversed(list(list.__iter__(self)))

    x = torch.randn(3, 2, 4)
    expected = torch.nn.functional.layer_norm(x, [2, 4])
    for fn in (addnorm.layer_norm, lambda x, s: addnorm.add_layer_norm(x, torch.zeros_like(x), s)):
        torch.testing.assert_close(fn(x, Reversed([4, 2])), expected)
        torch.testing.assert_close(fn(x, torch.Size([2, 4])), expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("op", list(OPS))
def test_integer_input(op, dtype):
    x = torch.ones(3, 8, dtype=dtype)
    with pytest.raises(RuntimeError, match=_match("input")):
        OPS[op](x, None, [8])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("op", list(OPS))
def test_complex_input(op, dtype):
    x = torch.randn(3, 8, dtype=dtype)
    with pytest.raises(RuntimeError, match=_match("input")):
        OPS[op](x, None, [8])


# --------------------------------------------------------------------------- residual


@pytest.mark.parametrize("r_shape", [(3, 9), (4, 8), (1, 8), (8,), (3, 1, 8), (24,)])
@pytest.mark.parametrize("op", ADD_OPS)
def test_residual_shape_mismatch(op, r_shape):
    """residual must have the input's shape (no broadcasting, no reshaping)."""
    with pytest.raises(RuntimeError, match=_match("residual")):
        OPS[op](_x(), torch.randn(r_shape), [8])


@pytest.mark.parametrize("x_dtype,r_dtype", [
    (F32, torch.float64), (F32, torch.bfloat16), (F32, torch.float16),
    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64),
    (torch.float64, F32), (F32, torch.int64), (F32, torch.complex64),
])
@pytest.mark.parametrize("op", ADD_OPS)
def test_residual_dtype_mismatch(op, x_dtype, r_dtype):
    """residual dtype: the input's or float32 (float32 input: float32 only)."""
    r = torch.ones(3, 8).to(r_dtype)
    with pytest.raises(RuntimeError, match=_match("residual")):
        OPS[op](_x(dtype=x_dtype), r, [8])


# The other device: CUDA, or meta (which runs without a GPU).
OTHER_DEVICES = [pytest.param("cuda", marks=CUDA_SKIP), "meta"]


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op", ADD_OPS)
def test_residual_device_mismatch(op, other):
    with pytest.raises(RuntimeError, match=_match("residual")):
        OPS[op](_x(device=other), torch.randn(3, 8), [8])
    with pytest.raises(RuntimeError, match=_match("residual")):
        OPS[op](_x(), torch.randn(3, 8, device=other), [8])


# --------------------------------------------------------------------------- weight / bias


@pytest.mark.parametrize("x_shape,ns,w_shape", [
    ((3, 8), [8], (9,)),
    ((3, 8), [8], (7,)),
    ((3, 8), [8], (1, 8)),
    ((3, 8), [8], ()),
    ((2, 3, 4), [3, 4], (12,)),  # same numel, different shape
    ((2, 3, 4), [3, 4], (4, 3)),
    ((2, 3, 4), [3, 4], (4,)),
])
@pytest.mark.parametrize("op", list(OPS))
def test_weight_shape_mismatch(op, x_shape, ns, w_shape):
    x = _x(x_shape)
    with pytest.raises(RuntimeError, match=_match("weight")):
        OPS[op](x, torch.zeros_like(x), ns, torch.ones(w_shape))


@pytest.mark.parametrize("x_shape,ns,b_shape", [
    ((3, 8), [8], (9,)),
    ((3, 8), [8], (1, 8)),
    ((2, 3, 4), [3, 4], (12,)),
])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("op", LN_OPS)
def test_bias_shape_mismatch(op, with_weight, x_shape, ns, b_shape):
    x = _x(x_shape)
    w = torch.ones(ns) if with_weight else None
    with pytest.raises(RuntimeError, match=_match("bias")):
        OPS[op](x, torch.zeros_like(x), ns, w, torch.zeros(b_shape))


@pytest.mark.parametrize("x_dtype,w_dtype", [
    (F32, torch.float64), (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
    (F32, torch.int64), (torch.float64, torch.int32),
])
@pytest.mark.parametrize("op", list(OPS))
def test_weight_dtype_not_supported(op, x_dtype, w_dtype):
    """weight dtype: the input's, a narrower float dtype, or float32 (docs/semantics.md,
    mixed precision); a wider one would round the product, an integer one is no weight. But
    rms_norm's float64 weight, which torch's rms_norm takes (test_modules.py checks the values)."""
    x = _x(dtype=x_dtype)
    if op == "rms_norm" and w_dtype == torch.float64:
        assert OPS[op](x, None, [8], torch.ones(8, dtype=w_dtype)).dtype == x_dtype
        return
    with pytest.raises(RuntimeError, match=_match("weight")):
        OPS[op](x, torch.zeros_like(x), [8], torch.ones(8, dtype=w_dtype))


# --------------------------------------------------------------------------- normalized_shape


@pytest.mark.parametrize("x_shape,ns", [
    ((3, 8), [7]),
    ((3, 8), [3]),
    ((3, 8), [3, 9]),
    ((2, 3, 4), [2, 4]),
    ((8,), [2, 8]),       # more dims than the input
    ((3, 8), [3, 8, 1]),
    ((3, 8), []),         # empty
])
@pytest.mark.parametrize("op", list(OPS))
def test_normalized_shape_mismatch(op, x_shape, ns):
    x = _x(x_shape)
    with pytest.raises(RuntimeError, match=_match("normalized_shape")):
        OPS[op](x, torch.zeros_like(x), ns)


def test_functional_normalized_shape_int_mismatch():
    with pytest.raises(RuntimeError, match=_match("normalized_shape")):
        addnorm.functional.add_layer_norm(_x(), _x(), 7)
    with pytest.raises(RuntimeError, match=_match("normalized_shape")):
        addnorm.functional.rms_norm(_x(), 9)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape,kind", [(torch.ones(8), r"tensor\(\[1\., .*\]\)"),
                                        (8.0, "8.0"), ("8", "'8'"), (True, "True"), ([True], r"\[True\]"),
                                        ((8.0,), r"\(8\.0,\)"), ([2, 8.0], r"\[2, 8\.0\]"),
                                        ([np.float32(8.0)], r"\[np\.float32\(8\.0\)\]")])
def test_functional_normalized_shape_not_ints_is_refused(name, shape, kind):
    # The usual slip: the weight where normalized_shape goes. torch's functions refuse a
    # Tensor there; the list of its elements must not reach the op as a shape. A float
    # is named too (not "object is not iterable"), also in a sequence (not the schema's
    # "Expected a value of type 'List[int]'", or numpy's float32 truncated); a str is not read as its characters, and
    # bools are refused as torch's functions refuse them (not taken as 1).
    x = torch.randn(2, 1) if kind.startswith(("True", r"\[True")) else torch.randn(2, 8) if "2" in kind else _x()
    args = (x, shape) if name in ("layer_norm", "rms_norm") else (x, x, shape)
    with pytest.raises(TypeError, match=_match("normalized_shape") + f".*got {kind}$"):
        getattr(addnorm.functional, name)(*args)


@pytest.mark.parametrize("arg", ["residual", "weight"])
def test_functional_non_tensor_argument_is_named(arg):
    # A list where a tensor goes reaches the op's schema check, which names the argument.
    kwargs = {"residual": _x(), "weight": None, arg: [1.0] * 8}
    with pytest.raises(RuntimeError, match=f"for argument '{arg}'"):
        addnorm.add_layer_norm(_x(), kwargs["residual"], 8, kwargs["weight"])


# --------------------------------------------------------------------------- eps


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan"), -float("inf")])
@pytest.mark.parametrize("op", list(OPS))
def test_bad_eps(op, eps):
    x = _x()
    with pytest.raises(RuntimeError, match=_match("eps")):
        OPS[op](x, torch.zeros_like(x), [8], None, None, eps)


@pytest.mark.parametrize("op", list(OPS))
def test_eps_zero_allowed(op):
    x = _x()
    out = OPS[op](x, torch.zeros_like(x), [8], None, None, 0.0)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


def test_weight_and_bias_of_two_allowed_dtypes_are_refused():
    """The kernels read weight and bias in one dtype: a float32 weight with a bfloat16 bias
    of bfloat16 input (each allowed alone, neither narrower than the other's reading) is
    refused by name, by the public op and by the internal one."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w, b = torch.ones(8), torch.zeros(8, dtype=torch.bfloat16)
    msg = r"bias must have the weight's dtype \(Float\), got BFloat16"
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.addnorm._norm_fwd(x, None, [8], w, b, 1e-5, False, False, False)
    with pytest.raises(RuntimeError, match=msg):
        addnorm.layer_norm(x, [8], w, b)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op,which", [(op, "weight") for op in OPS] + [(op, "bias") for op in LN_OPS])
def test_device_mismatch(op, which, other):
    """weight/bias on another device than the input."""
    for dx, dp in [(other, "cpu"), ("cpu", other)]:
        x = _x(device=dx)
        w = torch.ones(8, device=dp if which == "weight" else dx)
        b = torch.zeros(8, device=dp) if which == "bias" else None
        with pytest.raises(RuntimeError, match=_match("device")):
            OPS[op](x, torch.zeros_like(x), [8], w, b)


@pytest.mark.parametrize("kind", ["nested", "sparse", "quantized"])
@pytest.mark.parametrize("op,which", [(op, "residual") for op in ADD_OPS] +
                         [(op, "weight") for op in OPS] + [(op, "bias") for op in LN_OPS])
def test_non_strided_argument_is_named(op, which, kind):
    """A nested, sparse or quantized residual, weight or bias is refused by name, eager and
    under inference mode (where the ops' internal call raised NotImplementedError, or the
    dispatcher's message named the internal op). (A jagged tensor under inference mode
    reaches its own dispatch, which refuses ops it does not know, before the ops' kernels; a
    jagged weight of rms_norm meets torch's nested rms_norm check, which takes the op for
    torch's function by its name and fails as F.rms_norm does there: strided nested there.)"""
    x = _x((2, 8))
    plain = {"residual": x.clone(), "weight": torch.ones(8), "bias": torch.zeros(8)}
    cases = []
    for mode in (torch.enable_grad, torch.inference_mode):
        t = plain[which]
        if kind == "nested":
            jagged = mode is torch.enable_grad and op != "rms_norm"
            layout = torch.jagged if jagged else torch.strided
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (strided nested tensors: a prototype)
                t = torch.nested.nested_tensor(list(t.reshape(-1, 8)), layout=layout)
        elif kind == "sparse":
            t = t.to_sparse()
        else:
            t = torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
        cases.append((mode, dict(plain, **{which: t})))
    got = "a strided tensor, got a nested tensor" if kind == "nested" else (
        "a strided tensor, got a tensor of layout Sparse" if kind == "sparse" else
        r"an unquantized tensor, got a quantized tensor \(QInt8\): dequantize it first")
    for mode, args in cases:
        with mode(), pytest.raises(RuntimeError, match=f"{which} must be {got}"):
            OPS[op](x, args["residual"], [8], args["weight"], args["bias"])


def test_non_strided_input_and_seed_are_named():
    """A sparse, quantized or mkldnn input of every op, and a sparse seed of the separate
    dropout, are refused by name (the dispatcher's message named _norm_fwd)."""
    x = _x((2, 8))
    for t, got in ((x.to_sparse(), "a strided tensor, got a tensor of layout Sparse"),
                   (torch.quantize_per_tensor(x, 0.1, 0, torch.qint8),
                    r"an unquantized tensor, got a quantized tensor \(QInt8\): dequantize"),
                   (x.to_mkldnn(), "a strided tensor, got a tensor of layout Mkldnn")):
        for f in OPS.values():
            with pytest.raises(RuntimeError, match=f"input must be {got}"):
                f(t, x.clone(), [8])
    seed = addnorm.dropout_seed("cpu")
    with pytest.raises(RuntimeError, match="dropout_seed must be a strided tensor, got a tensor "
                                           "of layout Sparse"):
        torch.ops.addnorm._dropout_apply(x, seed.to_sparse(), 0.5)


def test_norm_bwd_weight_dtype_is_checked():
    """The internal backward checks the weight's dtype as the forward does (an integer weight
    raised only once its gradient was asked for; a complex one lost its imaginary part)."""
    h, g, rstd = torch.randn(3, 8), torch.randn(3, 8), torch.ones(3)
    for dtype in (torch.long, torch.complex64, torch.float64):
        for weight_grad in (True, False):
            with pytest.raises(RuntimeError, match="weight must have grad_out's dtype .*got "):
                torch.ops.addnorm._norm_bwd(g, None, h, rstd, rstd, torch.ones(8, dtype=dtype),
                                            False, True, weight_grad, 1e-5)


def test_norm_bwd_statistics_and_residual_gradient_dtypes_are_checked():
    """A mean of another dtype than rstd, or a grad_residual_out of another dtype than h, is
    refused by name (not the kernel's "expected scalar type")."""
    x, g, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    out, h, mean, rstd = torch.ops.addnorm._norm_fwd(x, None, [8], w, None, 1e-5, False, True, False)
    with pytest.raises(RuntimeError, match=r"mean must match rstd \(Float, shape \[4\]\), got Double"):
        torch.ops.addnorm._norm_bwd(g, None, h, mean.double(), rstd, w, False, False)
    with pytest.raises(RuntimeError, match=r"grad_residual_out must match h \(Float, shape \[4, 8\]\), got Double"):
        torch.ops.addnorm._norm_bwd(g, g.double(), h, mean, rstd, w, False, False)


# --------------------------------------------------------------------------- empty tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("shape,ns", [((0, 8), [8]), ((2, 0, 8), [8]), ((0, 3, 4), [3, 4])])
@pytest.mark.parametrize("op", list(OPS))
def test_empty_rows(op, shape, ns, dtype, device):
    """M = 0 rows: empty results of the right shape/dtype; backward gives empty input grads
    and zero weight/bias grads (as torch)."""
    x = make_data(shape, dtype, device, requires_grad=True)
    r = make_data(shape, dtype, device, requires_grad=True)
    w, b = make_affine(ns, dtype, device, requires_grad=True)
    res = OPS[op](x, r, ns, w, b if op in LN_OPS else None)
    outs = res if isinstance(res, tuple) else (res,)
    for o in outs:
        assert o.shape == x.shape and o.numel() == 0
    assert outs[0].dtype == dtype
    torch.autograd.backward(outs[0], torch.zeros_like(outs[0]))
    assert x.grad is not None and x.grad.shape == x.shape
    assert w.grad is not None and w.grad.shape == w.shape and torch.count_nonzero(w.grad) == 0
    if op in LN_OPS:
        assert b.grad is not None and torch.count_nonzero(b.grad) == 0
    if op in ADD_OPS:
        assert r.grad is not None and r.grad.shape == r.shape


# --------------------------------------------------------------------------- NaN / Inf


def _poison(x, r):
    x = x.clone()
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 0] = -float("inf")
    x[4, :] = float("inf")
    x[5, 2] = float("inf")
    x[5, 9] = -float("inf")
    if r is not None:
        r = r.clone()
        r[6, 7] = float("nan")
        r[7, 1] = float("inf")
        r[5, 4] = float("nan")
    return x, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", list(OPS))
def test_nan_inf_propagate_like_torch(op, dtype, device):
    """Rows with NaN / +-Inf: the NaN and Inf positions (and inf signs) of out and h equal
    torch's (eager x + r, then F.layer_norm / F.rms_norm in the same dtype); finite rows and
    finite values agree within the dtype tolerance.

    The oracle is torch's CPU kernels on every device. IEEE arithmetic on the math gives,
    for RMSNorm of a row holding an infinity, rms = inf, so finite elements become 0 and
    the infinite ones NaN: that is what torch's CPU kernels and its vectorized CUDA kernel
    (float32/bfloat16/float16) return. Its other CUDA path (float64, and unaligned or odd N)
    takes the RMS from Welford statistics (rsqrt(var + mean^2 + eps)), and mean = inf makes
    var NaN: the whole row comes out NaN. addnorm computes the sum of squares on every
    device and dtype, so it follows the CPU semantics everywhere."""
    n = 16
    x = make_data((9, n), dtype, device)
    r = make_data((9, n), dtype, device, scale=1.0, offset=0.0) if op in ADD_OPS else None
    x, r = _poison(x, r)
    w, b = make_affine((n,), dtype, device)
    rms = "rms" in op
    xc, rc, wc, bc = (None if t is None else t.cpu() for t in (x, r, w, b))
    h_t = xc if rc is None else xc + rc
    out_t = F.rms_norm(h_t, [n], wc, 1e-6) if rms else F.layer_norm(h_t, [n], wc, bc, 1e-5)
    res = OPS[op](x, r, [n], w, None if rms else b, 1e-6 if rms else 1e-5)
    out = res[0] if isinstance(res, tuple) else res
    assert (~torch.isfinite(out_t)).any()  # the test is not vacuous
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(out_t)), "NaN positions differ from torch"
    assert_close(out, out_t.double(), name="out")
    if isinstance(res, tuple):
        h = res[1].cpu()
        assert torch.equal(torch.isnan(h), torch.isnan(h_t))
        assert torch.equal(h[~torch.isnan(h_t)], h_t[~torch.isnan(h_t)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("n", [37, 64, 1001])
def test_rms_norm_infinite_grad_out_like_torch(n, dtype, device):
    """An infinite grad_out element in an RMSNorm row: the input gradient is +-inf where
    torch's is, NaN at that element (inf - inf), wherever the element sits (a row's vector
    lanes or its scalar tail: the tail once summed g where the lanes do not, and gave NaN
    everywhere). The oracle is torch's CPU autograd of F.rms_norm."""
    x = make_data((3, n), dtype, device)
    w, _ = make_affine((n,), dtype, device)
    for pos in (3, n - 1):
        dy = make_data((3, n), dtype, device, scale=1.0, offset=0.0)
        dy[1, pos] = float("inf")
        xt = x.cpu().clone().requires_grad_()
        F.rms_norm(xt, [n], w.cpu(), 1e-6).backward(dy.cpu())
        xa = x.clone().requires_grad_()
        addnorm.rms_norm(xa, [n], w, 1e-6).backward(dy)
        g, gt = xa.grad.cpu(), xt.grad
        assert gt[1].isinf().sum() > n // 2  # the test is not vacuous
        assert torch.equal(g.isnan(), gt.isnan()), f"NaN positions differ (pos {pos})"
        assert torch.equal(g.isinf(), gt.isinf()), f"inf positions differ (pos {pos})"
        assert torch.equal(g[g.isinf()].sign(), gt[gt.isinf()].sign())
        assert_close(g[[0, 2]], gt[[0, 2]].double(), name="finite rows")
