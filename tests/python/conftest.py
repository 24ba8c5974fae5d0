"""Shared helpers for the addnorm test suite: devices, dtypes, fixtures, data, the ops'
calls, and the check of an op against the reference.

The reference math, the tolerances (``assert_close``) and the accuracy bar live in
reference.py (one module, also used by the self-check of the main job,
benchmarks/selfcheck.py); the names the test files import from here are re-exported.
"""

import functools
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import addnorm  # noqa: E402,F401  (registers torch.ops.addnorm.*)
from reference import (  # noqa: E402,F401  (re-exported: the test files import them from here)
    HALF_DTYPES,
    assert_close,
    h_dtype_for,
    reference_add_norm,
)


def load_benchmark(name):
    """The module benchmarks/<name>.py, loaded from its file (benchmarks/ is no package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- devices

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes: 'bfloat16' instead of 'dtype2'."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


def pytest_runtest_logreport(report):
    """ADDNORM_FAILED_LOG: each failing test's id appended to that file as it fails (by the
    process that prints the results: not in pytest-xdist's workers), for a run stopped before
    pytest's summary (scripts/gpu_check.sh)."""
    path = os.environ.get("ADDNORM_FAILED_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"{report.nodeid} ({report.when})\n")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (tests may reseed explicitly too)."""
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- data


def make_data(shape, dtype, device, *, scale=3.0, offset=5.0, requires_grad=False):
    """randn*scale+offset generated in float32 then cast (the same values for every dtype)."""
    t = (torch.randn(shape, dtype=torch.float32) * scale + offset).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def make_affine(normalized_shape, dtype, device, *, requires_grad=False):
    w = (1.0 + 0.5 * torch.randn(normalized_shape)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(normalized_shape)).to(device=device, dtype=dtype)
    return w.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def half_data_float32_h_failures(n, dtype, fwd, bwd):
    """(seed, rms, result, ratio to torch's error) where the backward of bfloat16/float16 data
    with a float32 residual (a float32 h), rows near a large mean, fails the accuracy bar.
    fwd(x, r, w, b, rms) -> (h, mean, rstd); bwd(dy, h, mean, rstd, w, rms) -> (grad_h,
    grad_weight, grad_bias); results as CPU tensors."""
    from reference import errors_vs_torch, meets_bar
    bad = []
    for seed in range(8):
        torch.manual_seed(seed)
        c = 1000.0
        x = torch.stack([c + torch.randn(n), c + 10 * torch.randn(n), torch.full((n,), c)]).to(dtype)
        r = 0.1 * torch.randn(3, n)
        w, b = torch.randn(n) * 0.5 + 1, torch.randn(n)
        dy = torch.randn(3, n).to(dtype)
        for rms in (False, True):
            bb = None if rms else b
            g = bwd(dy, *fwd(x, r, w, bb, rms), w, rms)
            ours = {"grad_residual": g[0], "grad_weight": g[1]}
            if not rms:
                ours["grad_bias"] = g[2]
            errs, _ = errors_vs_torch(ours, x, r, [n], w, bb, 1e-5, rms, grad_out=dy)
            bad += [(seed, rms, q, round(e / t, 2)) for q, (e, t, m) in errs.items()
                    if not meets_bar(e, t, m, dtype)[0]]
    return bad


def one_element_rms_failures(dtype, fwd, bwd):
    """(seed, eps, result, ratio to torch's error) where the backward of bfloat16/float16
    RMSNorm over one-element rows, whose input gradient g * (1 - xhat^2) * rstd nearly cancels,
    fails the accuracy bar. fwd(x, w, eps) -> (h, mean, rstd); bwd(dy, h, mean, rstd, w, eps)
    -> (grad_h, grad_weight); results as CPU tensors."""
    from reference import errors_vs_torch, meets_bar
    bad = []
    for seed in range(100):
        torch.manual_seed(seed)
        x = torch.randn(64, 1).to(dtype)
        w = (torch.randn(1) * 0.5 + 1).to(dtype)
        dy = torch.randn(64, 1).to(dtype)
        for eps in (1e-6, 1e-3):
            g = bwd(dy, *fwd(x, w, eps), w, eps)
            errs, _ = errors_vs_torch({"grad_x": g[0], "grad_weight": g[1]}, x, None, [1], w,
                                      None, eps, True, grad_out=dy)
            bad += [(seed, eps, q, round(e / t, 2)) for q, (e, t, m) in errs.items()
                    if not meets_bar(e, t, m, dtype)[0]]
    return bad


def float64_short_rows_weight_grad_failures(fwd, bwd):
    """(M, N, rms, seed, ratio to torch's error) where the weight or bias gradient of float64
    rows of a few elements fails the accuracy bar. fwd(x, w, b, rms) -> (mean, rstd);
    bwd(dy, x, mean, rstd, w, rms) -> (grad_h, grad_weight, grad_bias); CPU tensors."""
    from reference import errors_vs_torch, meets_bar
    bad = []
    for m, n in ((200, 2), (200, 8), (4096, 8)):
        for rms in (False, True):
            for seed in range(4):
                torch.manual_seed(seed)
                x = torch.randn(m, n, dtype=torch.float64) * 2 + 1
                w = torch.randn(n, dtype=torch.float64) * 0.5 + 1
                b = None if rms else torch.randn(n, dtype=torch.float64)
                dy = torch.randn(m, n, dtype=torch.float64)
                g = bwd(dy, x, *fwd(x, w, b, rms), w, rms)
                ours = {"grad_weight": g[1]} if rms else {"grad_weight": g[1], "grad_bias": g[2]}
                errs, _ = errors_vs_torch(ours, x, None, [n], w, b, 1e-5, rms, grad_out=dy)
                bad += [(m, n, rms, seed, round(e / t, 2)) for e, t, k in errs.values()
                        if not meets_bar(e, t, k, torch.float64)[0]]
    return bad


def past_float_range_case(m, n, scale, rms, eps, gen):
    """bfloat16 rows of values of about `scale` for the CUDA kernels' float partial sums
    (3e38: a constant row of them first), their weight, bias (None for RMSNorm), eps (0 for
    the small scales, so that the variance counts) and a dy: 3e37 of xhat's sign for the
    large scale (a few g * xhat past float's range), else normal."""
    x = (torch.randn(m, n, generator=gen, dtype=torch.float64) * scale / 3).clamp(-scale, scale)
    huge = scale > 1
    if huge:
        x[0] = scale  # a constant row: its sum overflows in float, its squares are all zero
    x = x.to(torch.bfloat16)
    w, b = make_affine((n,), torch.bfloat16, "cpu")
    eps = eps if huge else 0.0
    if huge:
        h = x.double()
        centered = h - (0.0 if rms else h.mean(-1, keepdim=True))
        dy = centered.sign() * 3e37 * (0.5 + torch.rand(m, n, generator=gen, dtype=torch.float64))
    else:
        dy = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return x, w, None if rms else b, eps, dy.to(torch.bfloat16)


def rstd_past_float_cases(m, n, gen):
    """(label, x, residual, eps) whose rstd lies past float's range, for bfloat16 output:
    bfloat16 rows of float's subnormal size (1e-39, 3e-40) with eps = 0, and rows of 1e-33
    (rstd about 2^110: scaled, but within float's range); the same through a float32
    residual (a float32 h) of 1e-41; constant rows (3.0, 1e-39; a normal row between) with
    eps = 1e-300."""
    def tiny(scale):
        return torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    x = torch.cat([tiny(1e-39), tiny(3e-40), tiny(1e-33)]).to(torch.bfloat16)
    const = torch.stack([torch.full((n,), 3.0), torch.randn(n, generator=gen),
                         torch.full((n,), 1e-39)]).to(torch.bfloat16)
    return [("subnormal rows", x, None, 0.0),
            ("float32 h", torch.zeros(m, n, dtype=torch.bfloat16), tiny(1e-41).float(), 0.0),
            ("constant rows", const, None, 1e-300)]


def assert_stats_close(got, cpu, x, rms):
    """mean and rstd (_norm_fwd's results got, on any device, and the CPU's) within a few
    float ulps of the CPU's, relative to the rows' scale."""
    scale = x.double().abs().mean(-1)
    for k, name, ref_scale in ((2, "mean", scale), (3, "rstd", cpu[3].double().abs())):
        if rms and k == 2:
            continue
        err = (got[k].cpu().double() - cpu[k].double()).abs()
        assert (err <= 2.0**-20 * ref_scale).all(), f"{name}: {err.max()} off"


# --------------------------------------------------------------------------- ops


def philox4x32_10(key, counter):
    """Philox4x32-10 (Salmon et al., the Random123 paper), plain Python integers."""
    m = 0xFFFFFFFF
    c = list(counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & m, p1 & m, ((p0 >> 32) ^ c[3] ^ k1) & m, p0 & m]
    return c


def dropout_bits(seed, e, tie=False):
    """The 16 random bits of element e of a fused dropout keyed by seed (int64 [2]): half
    e % 2 of word (e / 2) % 4 of Philox4x32-10(key = seed[0], counter = (seed[1], e / 8)),
    or of counter (seed[1], e / 8 + 2^63) for the tie draw (the documented definition,
    written independently of the kernels)."""
    s0, s1 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in seed)
    g = (e // 8) | ((1 << 63) if tie else 0)
    words = philox4x32_10((s0 & 0xFFFFFFFF, s0 >> 32),
                          (s1 & 0xFFFFFFFF, s1 >> 32, g & 0xFFFFFFFF, g >> 32))
    w = words[(e // 2) % 4]
    return w >> 16 if e % 2 else w & 0xFFFF


def dropout_keeps(seed, e, threshold):
    """Whether element e is kept at threshold (1 - p) * 2^32 rounded down: its bits below
    the threshold's high 16, or equal to them and the tie draw below its low 16."""
    r, hi = dropout_bits(seed, e), threshold >> 16
    return r < hi if r != hi else dropout_bits(seed, e, tie=True) < (threshold & 0xFFFF)


def p_at_threshold(threshold):
    """The dropout p whose threshold (1 - p) * 2^32, rounded down as the kernels round it,
    is the given integer (checked)."""
    p = 1.0 - (threshold + 0.5) / 2.0**32
    assert int(math.ldexp(1.0 - p, 32)) == threshold
    return p


def tie_p(seed, e, kept):
    """A dropout p at which element e's bits equal the threshold's high 16 (a tie) and its
    tie draw keeps it (kept) or drops it (the threshold one above or at the draw)."""
    u = dropout_bits(seed, e, tie=True)
    assert 0 < u < 0xFFFF, "pick another element: its tie draw is at an end of the range"
    threshold = (dropout_bits(seed, e) << 16) + u + (1 if kept else 0)
    assert dropout_keeps(seed, e, threshold) == kept
    return p_at_threshold(threshold)


# Two elements of one Philox group with equal 16 bits (about one group in 2300 has a pair):
# a seed and its pairs, found by scanning with dropout_bits.
TWO_TIES_SEED = (0x1234567890ABCDEF, -77)
TWO_TIES = [(43834, 43837), (50272, 50275), (53593, 53596), (74965, 74966)]


def two_ties_p(seed, e1, e2):
    """A dropout p at which elements e1 and e2 (one group, equal bits) both tie with the
    threshold and their tie draws keep the one with the lower draw and drop the other.
    Returns p and the kept element."""
    r = dropout_bits(seed, e1)
    assert e1 // 8 == e2 // 8 and dropout_bits(seed, e2) == r, "not a pair of one group"
    u1, u2 = dropout_bits(seed, e1, tie=True), dropout_bits(seed, e2, tie=True)
    assert u1 != u2, "pick another pair: equal tie draws"
    threshold = (r << 16) + min(u1, u2) + 1
    return p_at_threshold(threshold), (e1 if u1 < u2 else e2)


def call_add_norm(rms, x, residual, normalized_shape, weight, bias, eps, *,
                  return_residual=True, residual_in_fp32=False):
    if rms:
        return torch.ops.addnorm.add_rms_norm(
            x, residual, list(normalized_shape), weight, eps,
            return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    return torch.ops.addnorm.add_layer_norm(
        x, residual, list(normalized_shape), weight, bias, 1e-5 if eps is None else eps,
        return_residual=return_residual, residual_in_fp32=residual_in_fp32)


def call_norm(rms, x, normalized_shape, weight, bias, eps):
    if rms:
        return torch.ops.addnorm.rms_norm(x, list(normalized_shape), weight, eps)
    return torch.ops.addnorm.layer_norm(x, list(normalized_shape), weight, bias, 1e-5 if eps is None else eps)


def grads_of(outputs, grad_outputs, named_inputs):
    """autograd.grad over the (name, tensor) pairs that require grad; returns a dict."""
    named = [(n, t) for n, t in named_inputs if t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [t for _, t in named],
                                [g for _, g in pairs], allow_unused=True, retain_graph=True)
    return {"grad_" + n: g for (n, _), g in zip(named, grads)}


def check_add_norm_against_reference(rms, x, residual, normalized_shape, weight, bias, eps, *,
                                     residual_in_fp32=False, return_residual=True,
                                     backward=True, name=""):
    """Runs the add op forward (and backward with gradients into out and h) and compares
    everything with reference_add_norm. Returns the op's outputs."""
    out, h = call_add_norm(rms, x, residual, normalized_shape, weight, bias, eps,
                           return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    hd = h_dtype_for(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    assert out.dtype == x.dtype, f"{name}: out dtype {out.dtype} != input dtype {x.dtype}"
    assert out.shape == x.shape and out.device == x.device
    if return_residual:
        assert h.dtype == hd, f"{name}: h dtype {h.dtype} != {hd}"
        assert h.shape == x.shape and h.device == x.device
    else:
        assert h.numel() == 0, f"{name}: return_residual=False must return an empty h"
    grad_out = grad_h = None
    if backward:
        grad_out = torch.randn(x.shape, device=x.device).to(out.dtype)
        if return_residual:
            grad_h = torch.randn(x.shape, device=x.device).to(hd)
    ref = reference_add_norm(rms, x, residual, normalized_shape, weight, bias, eps,
                             residual_in_fp32=residual_in_fp32, grad_out=grad_out, grad_h=grad_h)
    if return_residual:
        # h is an elementwise add rounded once: bitwise equal to eager x + r.
        assert torch.equal(h.cpu(), ref["h"].cpu()), f"{name}: h differs from eager x + r"
    assert_close(out, ref["out"], name=f"{name} out")
    if backward:
        named = [("x", x), ("residual", residual), ("weight", weight), ("bias", bias)]
        outs = [out, h] if return_residual else [out]
        gos = [grad_out, grad_h] if return_residual else [grad_out]
        ours = grads_of(outs, gos, named)
        for key, g in ours.items():
            t = dict(named)[key[5:]]
            assert g is not None, f"{name}: {key} is None"
            assert g.dtype == t.dtype, f"{name}: {key} dtype {g.dtype} != {t.dtype}"
            assert_close(g, ref[key], reduced=key in ("grad_weight", "grad_bias"), name=f"{name} {key}")
    return out, h


# --------------------------------------------------------------------------- encoder layers


class DropoutFromSeed(torch.nn.Module):
    """Stands in for a torch dropout in a reference nn.TransformerEncoderLayer: in training
    draws a seed from the default generator (addnorm.dropout_seed, the draw of each of
    addnorm's dropouts) and applies its mask (addnorm.dropout_mask), x * mask / (1 - p);
    the masks it used are kept in .masks."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.masks = []

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        seed = addnorm.dropout_seed(x.device)
        mask = addnorm.dropout_mask(seed, list(x.shape), self.p)
        self.masks.append(mask)
        return x * mask / (1 - self.p)


def _self_attention_from_seed(mha, drop, *args, **kwargs):
    """nn.MultiheadAttention.forward for a reference layer's self-attention: torch's module,
    with, in training with dropout on the CPU for float32/float64 q, k, v, its
    scaled_dot_product_attention replaced by torch's own math path
    (aten._scaled_dot_product_attention_math) given the mask of a seed drawn where addnorm's
    layer draws it (recorded in drop.masks; drop is a DropoutFromSeed)."""
    torch_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p == 0.0 or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
            return torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        mask = addnorm.dropout_mask(addnorm.dropout_seed(q.device), list(q.shape[:-1]) + [k.shape[-2]],
                                    dropout_p)
        drop.masks.append(mask)
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, attn_mask, dropout_p, is_causal, dropout_mask=mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa  # what F.multi_head_attention_forward calls
    try:
        return type(mha).forward(mha, *args, **kwargs)
    finally:
        F.scaled_dot_product_attention = torch_sdpa


def with_addnorm_dropouts(model):
    """model's torch nn.TransformerEncoderLayers (in place) with every dropout drawing as
    addnorm.TransformerEncoderLayer does: dropout1, dropout2 and the feed-forward dropout
    become DropoutFromSeed, and the self-attention drops its probabilities in torch's math
    attention with the mask of a seed (_self_attention_from_seed; the masks are recorded in
    the layer's attention_dropout.masks). From the same torch.manual_seed the model then
    draws what the addnorm model draws, in the same order, and applies the same masks.
    Returns model."""
    for m in model.modules():
        if type(m) is torch.nn.TransformerEncoderLayer:
            m.dropout1 = DropoutFromSeed(m.dropout1.p)
            m.dropout2 = DropoutFromSeed(m.dropout2.p)
            m.dropout = DropoutFromSeed(m.dropout.p)
            m.attention_dropout = DropoutFromSeed(m.self_attn.dropout)
            m.self_attn.forward = functools.partial(_self_attention_from_seed, m.self_attn,
                                                    m.attention_dropout)
    return model
