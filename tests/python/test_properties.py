"""Property-based tests (hypothesis) of the four public ops on CPU: random shapes (leading
dims and a normalized_shape of 1-3 dims), strides (permuted, sliced, expanded, channels_last
inputs; strided weight and bias), dtypes with every mixed combination the ops accept, and
argument subsets (weight, bias, residual, return_residual, residual_in_fp32, eps), forward
and the gradient of every input that requires grad, against the float64 reference of
conftest with its tolerances. Values only: output layouts are not part of the properties.

The examples are derandomized and their number fixed, so every run checks the same ones.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import (
    DTYPES,
    HALF_DTYPES,
    assert_close,
    call_add_norm,
    call_norm,
    grads_of,
    h_dtype_for,
    reference_add_norm,
)

F32 = torch.float32
OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
# Row lengths around the kernels' vector widths (8 and 16 lanes) and their 512-element blocks.
EDGE_N = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 511, 512, 513, 1024, 1025]
# (input, weight and bias, residual) dtypes: every combination the ops accept.
DTYPE_COMBOS = [(d, d, d) for d in DTYPES] + [
    (d, p, r) for d in HALF_DTYPES for p, r in [(d, F32), (F32, d), (F32, F32)]]
MAX_NUMEL = 6000  # elements of the input; keeps an example at a few milliseconds
LAYOUTS = ["contiguous", "permuted", "sliced", "expanded", "channels_last"]
# LayerNorm statistics computed in float32 carry an error of float32's precision relative to
# the row's mean, which rstd scales into out and rstd^2 into grad_input: rows with
# |mean| * rstd^2 above this are outside what float32 tolerances hold (in torch's kernels too).
# Constant rows (their grad_weight is exactly zero, which leaves no tolerance):
# test_ops.py::test_layer_norm_constant_rows.
MAX_MEAN_OVER_VAR = 32.0

SETTINGS = settings(
    max_examples=1000,
    deadline=5000,  # milliseconds; an example takes a few
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- strategies


@st.composite
def normalized_shapes(draw):
    ndim = draw(st.integers(1, 3))
    last = draw(st.one_of(st.sampled_from(EDGE_N), st.integers(1, 1100)))
    if ndim == 1:
        return (last,)
    # Leading normalized dims stay small, so that N = prod(normalized_shape) stays bounded.
    return tuple(draw(st.lists(st.integers(1, 5), min_size=ndim - 1, max_size=ndim - 1))) + (
        min(last, 300),)


@st.composite
def leading_shapes(draw, n):
    """0-3 leading dims with at most MAX_NUMEL / n rows in all."""
    dims = []
    budget = max(1, MAX_NUMEL // n)
    for _ in range(draw(st.integers(0, 3))):
        d = draw(st.integers(1, min(budget, 40)))
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


@st.composite
def layouts(draw, ndim):
    """A layout for a tensor of ndim dims: (kind, parameter)."""
    kinds = [k for k in LAYOUTS if (k != "channels_last" or ndim == 4) and (k != "permuted" or ndim >= 2)]
    if ndim == 4:
        kinds.append("channels_last")  # the layout only 4-D tensors have, drawn more often
    kind = draw(st.sampled_from(kinds))
    if kind == "permuted":
        return kind, tuple(draw(st.permutations(range(ndim))))
    if kind in ("sliced", "expanded"):
        return kind, (draw(st.integers(0, ndim - 1)), draw(st.sampled_from(["step", "offset"])))
    return kind, None


def make_tensor(shape, layout, dtype, gen, *, scale, offset, requires_grad):
    """A tensor of the given shape and layout whose values are randn * scale + offset drawn in
    float32 from gen, then cast. The leaf is its base; the returned tensor views it."""
    kind, param = layout
    base_shape = list(shape)
    if kind == "permuted":
        for i, p in enumerate(param):
            base_shape[p] = shape[i]
    elif kind == "sliced":
        d, how = param
        base_shape[d] = 2 * shape[d] if how == "step" else shape[d] + 1
    elif kind == "expanded":
        base_shape[param[0]] = 1
    base = (torch.randn(base_shape, generator=gen) * scale + offset).to(dtype)
    base.requires_grad_(requires_grad)
    if kind == "permuted":
        t = base.permute(param)
    elif kind == "sliced":
        d, how = param
        t = base.narrow(d, 1, shape[d]) if how == "offset" else base[(slice(None),) * d + (slice(None, None, 2),)]
    elif kind == "expanded":
        t = base.expand(shape)
    elif kind == "channels_last":
        t = base.contiguous(memory_format=torch.channels_last)
    else:
        t = base
    assert tuple(t.shape) == tuple(shape)
    return t


@dataclass
class Case:
    op: str
    shape: Tuple[int, ...]
    normalized_shape: Tuple[int, ...]
    x_dtype: torch.dtype
    param_dtype: torch.dtype
    residual_dtype: Optional[torch.dtype]  # None: no residual
    has_weight: bool
    has_bias: bool
    eps: Optional[float]
    return_residual: bool
    residual_in_fp32: bool
    layouts: dict
    requires_grad: dict  # tensor name -> bool
    grad_into: Tuple[bool, bool]  # (a gradient flows into out, into h)
    offset: float
    seed: int

    @property
    def rms(self):
        return "rms" in self.op

    @property
    def is_add(self):
        return self.op.startswith("add_")


@st.composite
def cases(draw):
    op = draw(st.sampled_from(OPS))
    rms, is_add = "rms" in op, op.startswith("add_")
    ns = draw(normalized_shapes())
    lead = draw(leading_shapes(math.prod(ns)))
    shape = lead + ns
    if draw(st.sampled_from([False] * 19 + [True])):  # an empty tensor: one dim of size 0
        d = draw(st.integers(0, len(shape) - 1))
        shape = shape[:d] + (0,) + shape[d + 1:]
        lead, ns = shape[:len(lead)], shape[len(lead):]
    x_dtype, param_dtype, residual_dtype = draw(st.sampled_from(DTYPE_COMBOS))
    if not (is_add and draw(st.booleans())):
        residual_dtype = None
    has_weight = draw(st.booleans())
    has_bias = not rms and draw(st.booleans())
    if rms:
        eps = draw(st.sampled_from([None, 1e-6, 1e-3, 0.1]))
    else:
        eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 0.0]))
    names = ["x"] + (["residual"] if residual_dtype is not None else []) + \
        (["weight"] if has_weight else []) + (["bias"] if has_bias else [])
    lay = {"x": draw(layouts(len(shape)))}
    if residual_dtype is not None:
        lay["residual"] = draw(layouts(len(shape)))
    for name in ("weight", "bias"):
        lay[name] = draw(layouts(len(ns)))
    requires_grad = {n: draw(st.booleans()) for n in names}
    return_residual = is_add and draw(st.booleans())
    grad_into = (True, False)
    if return_residual:
        grad_into = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    return Case(
        op=op, shape=shape, normalized_shape=ns, x_dtype=x_dtype, param_dtype=param_dtype,
        residual_dtype=residual_dtype, has_weight=has_weight, has_bias=has_bias, eps=eps,
        return_residual=return_residual,
        residual_in_fp32=is_add and draw(st.booleans()),
        layouts=lay, requires_grad=requires_grad, grad_into=grad_into,
        offset=draw(st.sampled_from([0.0, 5.0, -20.0])),
        seed=draw(st.integers(0, 2**31 - 1)))


# --------------------------------------------------------------------------- the property


def _outside_tolerance_domain(h, normalized_shape, eps):
    """Whether some LayerNorm row of h (over the normalized dims, N > 1) is constant or, with
    statistics in float32, has |mean| / (var + eps) above MAX_MEAN_OVER_VAR."""
    n = math.prod(normalized_shape)
    if n < 2 or h.numel() == 0:
        return False
    rows = h.detach().to(torch.float64).reshape(-1, n)
    if bool((rows == rows[:, :1]).all(dim=1).any()):
        return True
    if h.dtype == torch.float64:
        return False
    var, mean = torch.var_mean(rows, dim=1, correction=0)
    return bool((mean.abs() > MAX_MEAN_OVER_VAR * (var + eps)).any())


def run_case(case):
    gen = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    rg = case.requires_grad
    x = make_tensor(case.shape, case.layouts["x"], case.x_dtype, gen, scale=3.0,
                    offset=case.offset, requires_grad=rg["x"])
    r = w = b = None
    if case.residual_dtype is not None:
        r = make_tensor(case.shape, case.layouts["residual"], case.residual_dtype, gen,
                        scale=1.0, offset=0.0, requires_grad=rg["residual"])
    if case.has_weight:
        w = make_tensor(case.normalized_shape, case.layouts["weight"], case.param_dtype, gen,
                        scale=0.5, offset=1.0, requires_grad=rg["weight"])
    if case.has_bias:
        b = make_tensor(case.normalized_shape, case.layouts["bias"], case.param_dtype, gen,
                        scale=0.5, offset=0.0, requires_grad=rg["bias"])
    ns = case.normalized_shape
    if case.is_add:
        out, h = call_add_norm(case.rms, x, r, ns, w, b, case.eps,
                               return_residual=case.return_residual,
                               residual_in_fp32=case.residual_in_fp32)
    else:
        out, h = call_norm(case.rms, x, ns, w, b, case.eps), None
    hd = h_dtype_for(case.x_dtype, case.residual_dtype, case.residual_in_fp32)
    assert out.dtype == case.x_dtype and out.shape == x.shape
    if case.return_residual:
        assert h.dtype == hd and h.shape == x.shape
    elif case.is_add:
        assert h.numel() == 0

    any_grad = any(rg.values())
    assert out.requires_grad == any_grad
    into_out, into_h = case.grad_into
    if case.return_residual:
        assert h.requires_grad == (rg["x"] or rg.get("residual", False))
        if not h.requires_grad:
            into_out, into_h = True, False
    grad_out = grad_h = None
    if any_grad:
        if into_out:
            grad_out = torch.randn(x.shape).to(out.dtype)
        if into_h:
            grad_h = torch.randn(x.shape).to(hd)
    h_eager = x.to(hd) if r is None else x.to(hd) + r.to(hd)
    if not case.rms and _outside_tolerance_domain(h_eager, ns, case.eps):
        assume(False)
    ref = reference_add_norm(case.rms, x, r, ns, w, b, case.eps,
                             residual_in_fp32=case.residual_in_fp32,
                             grad_out=grad_out, grad_h=grad_h)
    if case.return_residual:
        assert torch.equal(h, ref["h"]), "h differs from eager x + r"
    assert_close(out, ref["out"], name="out")
    if not any_grad:
        return
    named = [("x", x), ("residual", r), ("weight", w), ("bias", b)]
    ours = grads_of([out, h], [grad_out, grad_h], named)
    assert set(ours) == {"grad_" + n for n, t in named if t is not None and t.requires_grad}
    for key, g in ours.items():
        t = dict(named)[key[5:]]
        if grad_out is None and key in ("grad_weight", "grad_bias"):
            assert g is None, f"{key}: only h feeds the loss, as in eager the parameters get no gradient"
            continue
        assert g is not None, f"{key} is None"
        assert g.dtype == t.dtype and g.shape == t.shape, f"{key}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, ref[key], reduced=key in ("grad_weight", "grad_bias"), name=key)


@SETTINGS
@given(case=cases())
def test_ops_match_reference(case):
    """Every op, argument subset, dtype combination and layout: out, h and every gradient
    match the float64 reference."""
    run_case(case)
