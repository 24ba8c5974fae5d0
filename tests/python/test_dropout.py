"""The fused dropout of add_layer_norm / add_rms_norm: h = dropout(input, p) + residual.

The keep-mask is a function of a seed tensor the functional forms draw from torch's
generator and pass to the op (ops/dropout_mask.h); it is never stored, and backward
regenerates it. These tests pin the statistics of the mask, the exact forward and backward
against h = x * mask / (1 - p) + r built from the returned mask, the edge probabilities,
the errors, and that every way torch re-runs a forward (seeds, generators, activation
checkpointing, torch.compile and its memory-budget partitioner, CUDA graphs) sees the
forward's mask.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import addnorm
from conftest import (CUDA_SKIP, DEVICES, TWO_TIES, TWO_TIES_SEED, dropout_bits, dropout_keeps,
                      make_affine, make_data, tie_p, two_ties_p)

OPS = ["layer_norm", "rms_norm"]


def _fused(norm, x, r, n, w, b, p, **kw):
    if norm == "layer_norm":
        return addnorm.add_layer_norm(x, r, n, w, b, 1e-5, dropout_p=p, **kw)
    return addnorm.add_rms_norm(x, r, n, w, 1e-6, dropout_p=p, **kw)


def _eager(norm, h, n, w, b):
    if norm == "layer_norm":
        return F.layer_norm(h, [n], w, b, 1e-5)
    return F.rms_norm(h, [n], w, 1e-6)


# --------------------------------------------------------------------------- the mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_independence(p, device):
    """Kept fraction within 5 sigma of 1 - p; rows, columns and successive calls
    uncorrelated (each correlation within 5 sigma of 0 for independent masks)."""
    m, n = 512, 1024
    x = torch.randn(m, n, device=device)
    masks = [_fused("layer_norm", x, None, n, None, None, p, return_dropout_mask=True)[1]
             for _ in range(2)]
    q = 1.0 - p
    for mask in masks:
        kept = mask.double().mean().item()
        sigma = math.sqrt(q * p / mask.numel())
        assert abs(kept - q) < 5 * sigma, f"kept fraction {kept} vs {q}"

    def corr(a, b):
        a = a.double().flatten() - q
        b = b.double().flatten() - q
        return (a * b).mean().item() / (q * p)

    bound = 5 / math.sqrt(m * n / 2)
    mask = masks[0]
    assert abs(corr(mask[0::2], mask[1::2])) < bound, "neighbouring rows correlated"
    assert abs(corr(mask[:, 0::2], mask[:, 1::2])) < bound, "neighbouring columns correlated"
    assert abs(corr(mask[:, :-4], mask[:, 4:])) < 5 / math.sqrt(m * (n - 4)), \
        "columns 4 apart (the next Philox group) correlated"
    assert abs(corr(masks[0], masks[1])) < 5 / math.sqrt(m * n), "successive calls correlated"
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_mask_and_generators(device):
    """torch.manual_seed reproduces the masks; an explicit generator drives them and leaves
    the default generator alone."""
    x = torch.randn(64, 256, device=device)

    def run(**kw):
        return _fused("layer_norm", x, None, 256, None, None, 0.5, return_dropout_mask=True,
                      **kw)[1]

    torch.manual_seed(7)
    a = run()
    torch.manual_seed(7)
    b = run()
    assert torch.equal(a, b)
    g1 = torch.Generator(device=device).manual_seed(3)
    g2 = torch.Generator(device=device).manual_seed(3)
    torch.manual_seed(7)
    c = run(generator=g1)
    d = run()  # the default generator did not advance for c
    assert torch.equal(c, run(generator=g2))
    assert torch.equal(d, a)
    assert not torch.equal(c, a)


@CUDA_SKIP
@pytest.mark.parametrize("p", [0.3, 0.15])
def test_same_seed_same_mask_on_cpu_and_cuda(p):
    """One Philox function on both devices: the same seed gives the same mask and h (also
    where 1 / (1 - p) rounds differently from double and from float: p = 0.15)."""
    seed = addnorm.dropout_seed("cpu")
    cpu = addnorm.dropout_mask(seed, [37, 1029], p)
    gpu = addnorm.dropout_mask(seed.cuda(), [37, 1029], p)
    assert torch.equal(cpu, gpu.cpu())
    x = torch.randn(37, 1029)
    r = torch.randn(37, 1029)
    h_cpu = torch.ops.addnorm.add_layer_norm(x, r, [1029], dropout_p=p, dropout_seed=seed)[1]
    h_gpu = torch.ops.addnorm.add_layer_norm(x.cuda(), r.cuda(), [1029], dropout_p=p,
                                             dropout_seed=seed.cuda())[1]
    assert torch.equal(h_cpu, h_gpu.cpu())


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.3, 0.15])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_h_is_torchs_dropout_then_add(dtype, p, device):
    """h = dropout(x) + r is bitwise what torch's CPU dropout computes from the same mask
    (noise = mask / (1 - p), then x * noise), plus r: each step rounded (in float32 for
    bfloat16, then rounded to bfloat16), not one fused multiply-add, on every device and
    instruction set. (p = 0.15: 1 / (1 - p) rounded once differs from torch's factor.) The
    reference is computed on the CPU: torch's CUDA division by a scalar multiplies by its
    reciprocal, rounded from double (another factor at p = 0.15)."""
    m, n = 37, 1029
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_data((m, n), dtype, device)
    r = make_data((m, n), dtype, device)
    for norm in OPS:
        _, h, mask = _fused(norm, x, r, n, None, None, p, return_residual=True,
                            return_dropout_mask=True)
        noise = mask.cpu().to(acc) / (1 - p)
        expected = (x.cpu().to(acc) * noise + r.cpu().to(acc)).to(dtype)
        assert torch.equal(h.cpu(), expected), norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", OPS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_and_backward_equal_the_mask_reference(dtype, residual, norm, device):
    """out, h and every gradient equal those of h = x * mask / (1 - p) + r with the returned
    mask (float64: to rounding; lower precisions: computed from the same rounded h)."""
    p, m, n = 0.25, 33, 260
    x = make_data((m, n), dtype, device, requires_grad=True)
    r = make_data((m, n), dtype, device, requires_grad=True) if residual else None
    w, b = make_affine((n,), dtype, device, requires_grad=True)
    out, h, mask = _fused(norm, x, r, n, w, b if norm == "layer_norm" else None, p,
                          return_residual=True, return_dropout_mask=True)
    scale = 1.0 / (1.0 - p)
    h_ref = x.double() * mask * scale + (r.double() if residual else 0)
    tol = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(h.double(), h_ref, rtol=tol, atol=tol)
    # The norm of the h addnorm produced, in float64, is what out must match.
    out_ref = _eager(norm, h.detach().double(), n, w.double(),
                     b.double() if norm == "layer_norm" else None)
    torch.testing.assert_close(out.double(), out_ref, rtol=tol, atol=tol * 10)
    g = torch.randn_like(out)
    inputs = [x, w] + ([r] if residual else []) + ([b] if norm == "layer_norm" else [])
    grads = torch.autograd.grad((out * g).sum() + h.sum(), inputs)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rd = r.detach().double().requires_grad_() if residual else None
    bd = b.detach().double().requires_grad_()
    hd = xd * mask * scale + (rd if residual else 0)
    od = _eager(norm, hd, n, wd, bd if norm == "layer_norm" else None)
    ref_inputs = [xd, wd] + ([rd] if residual else []) + ([bd] if norm == "layer_norm" else [])
    ref = torch.autograd.grad((od * g.double()).sum() + hd.sum(), ref_inputs)
    gtol = {torch.float64: 1e-11, torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
    for name, a, e in zip(["x", "w", "r", "b"], grads, ref):
        torch.testing.assert_close(a.double(), e, rtol=gtol, atol=gtol, msg=lambda s: f"{name}: {s}")
    # Dropped elements pass exactly no gradient.
    assert torch.all(grads[0][~mask] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("from_output", [False, True], ids=["from_h", "from_output"])
@pytest.mark.parametrize("grad_h_wanted", [True, False], ids=["grad_h", "no_grad_h"])
@pytest.mark.parametrize("dtypes", [(torch.float64,) * 2, (torch.float32,) * 2,
                                    (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)],
                         ids=["float64", "float32", "bfloat16", "bfloat16_h_float32"])
def test_fused_input_gradient_is_dropout_apply_of_grad_h(dtypes, grad_h_wanted, from_output,
                                                          rms, device):
    """_norm_bwd with the fused dropout writes grad_input in its own pass: bitwise
    _dropout_apply of its grad_h (every dtype pair, from h or from the output, odd N for the
    vector tails), and grad_h, grad_weight, grad_bias bitwise those of the call without
    dropout."""
    x_dtype, h_dtype = dtypes
    n = 203
    x = make_data((9, n), x_dtype, device)
    r = make_data((9, n), h_dtype, device, scale=1.0, offset=0.0)
    w, b = make_affine(n, x_dtype, device)
    b = None if rms else b
    seed = torch.tensor([11, 22], dtype=torch.int64, device=device)
    out, h, mean, rstd = torch.ops.addnorm._norm_fwd(x, r, [n], w, b, 1e-5, rms, True, False,
                                                      0.3, seed)
    g = torch.randn(9, n, device=device).to(x_dtype)
    gres = torch.randn(9, n, device=device).to(h_dtype)
    common = dict(from_output=True, bias=b, h_dtype=h_dtype) if from_output else dict(eps=1e-5)
    saved = out if from_output else h
    plain = torch.ops.addnorm._norm_bwd(g, gres, saved, mean, rstd, w, not rms, rms, **common)
    fused = torch.ops.addnorm._norm_bwd(g, gres, saved, mean, rstd, w, not rms, rms, **common,
                                        dropout_p=0.3, dropout_seed=seed,
                                        grad_h_wanted=grad_h_wanted)
    expected = torch.ops.addnorm._dropout_apply(plain[0], seed, 0.3, x_dtype)
    assert fused[3].dtype == x_dtype and torch.equal(fused[3], expected)
    assert plain[3].numel() == 0
    assert torch.equal(fused[0], plain[0]) if grad_h_wanted else fused[0].numel() == 0
    for a, e in zip(fused[1:3], plain[1:3]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("norm", OPS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("return_residual", [True, False], ids=["h", "no_h"])
def test_gradcheck_and_gradgradcheck(return_residual, residual, norm):
    """float64 first and second derivatives with dropout, through out and h; second
    derivatives also forward-over-reverse (a dual input into a create_graph backward)."""
    seed = addnorm.dropout_seed("cpu")
    n = 8
    x = make_data((3, n), torch.float64, "cpu", requires_grad=True)
    r = make_data((3, n), torch.float64, "cpu", requires_grad=True)
    w, b = make_affine((n,), torch.float64, "cpu", requires_grad=True)

    def fn(x, r, w, b):
        rr = r if residual else None
        if norm == "layer_norm":
            return torch.ops.addnorm.add_layer_norm(x, rr, [n], w, b, 1e-5, return_residual=return_residual,
                                                    dropout_p=0.5, dropout_seed=seed)
        return torch.ops.addnorm.add_rms_norm(x, rr, [n], w, 1e-6, return_residual=return_residual,
                                              dropout_p=0.5, dropout_seed=seed)

    assert gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-6, rtol=1e-4,
                         check_fwd_over_rev=True)


def test_forward_mode_tangent_matches_the_mask_reference():
    seed = addnorm.dropout_seed("cpu")
    x = make_data((4, 16), torch.float64, "cpu")
    r = make_data((4, 16), torch.float64, "cpu")
    t = torch.randn_like(x)
    mask = addnorm.dropout_mask(seed, [4, 16], 0.4)

    def fused(x):
        return torch.ops.addnorm.add_layer_norm(x, r, [16], dropout_p=0.4, dropout_seed=seed)[0]

    def ref(x):
        return F.layer_norm(x * mask / 0.6 + r, [16])

    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = fused(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.func.jvp(ref, (x,), (t,))
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_p0_is_the_no_dropout_path_and_p1_gives_the_residual(dtype, device):
    x = make_data((16, 96), dtype, device, requires_grad=True)
    r = make_data((16, 96), dtype, device, requires_grad=True)
    w, b = make_affine((96,), dtype, device)
    plain = torch.ops.addnorm.add_layer_norm(x, r, [96], w, b, 1e-5)
    zero = torch.ops.addnorm.add_layer_norm(x, r, [96], w, b, 1e-5, dropout_p=0.0,
                                            dropout_seed=addnorm.dropout_seed(device))
    for a, e in zip(zero, plain):
        assert torch.equal(a, e)
    out, h = addnorm.add_layer_norm(x, r, 96, w, b, dropout_p=1.0, return_residual=True)
    assert torch.equal(h, r.detach())
    assert torch.equal(out, torch.ops.addnorm.add_layer_norm(r, None, [96], w, b, 1e-5)[0])
    gx, gr = torch.autograd.grad(out.sum() + h.sum(), [x, r])
    assert torch.equal(gx, torch.zeros_like(gx))
    assert torch.count_nonzero(gr) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1e-6, 1.0 - 1e-6])
def test_p_is_not_rounded_to_16_bits(p, device):
    """An element draws 16 bits, but the keep probability is (1 - p) to 2^-32: at p = 1e-6
    a 16-bit comparison alone would drop none or one in 65536 (15x too many); the dropped
    count of 2^26 elements is within 5 sigma of p * 2^26, and likewise the kept count at
    p = 1 - 1e-6."""
    n = 1 << 26
    seed = torch.tensor([0x3C6EF372FE94F82B, 5], dtype=torch.int64, device=device)
    mask = addnorm.dropout_mask(seed, [n], p)
    rare = 1e-6
    count = int((~mask if p < 0.5 else mask).sum())
    mean, sigma = rare * n, math.sqrt(rare * (1 - rare) * n)
    assert abs(count - mean) < 5 * sigma, f"{count} of {n} where {mean:.0f} +- {sigma:.0f}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 256], ids=["scalar_row", "vector_row"])
def test_p_below_double_rounding_keeps_every_element(n, device):
    """A p so small that 1 - p rounds to 1 (below 2^-53): torch's dropout keeps every
    element and scales by 1, and so does the fused dropout, in the rows' scalar and vector
    code (the vector code once cut the threshold 2^32 to 32 bits, 0, and dropped them all):
    bitwise the p = 0 results, forward and backward; _dropout_apply alike."""
    x = make_data((4, n), torch.float32, device, requires_grad=True)
    r = make_data((4, n), torch.float32, device, requires_grad=True)
    seed = addnorm.dropout_seed(device)
    tiny = torch.ops.addnorm.add_layer_norm(x, r, [n], dropout_p=1e-17, dropout_seed=seed)
    plain = torch.ops.addnorm.add_layer_norm(x, r, [n])
    for a, e in zip(tiny, plain):
        assert torch.equal(a, e)
    g = torch.randn_like(plain[0])
    assert all(torch.equal(a, e) for a, e in zip(torch.autograd.grad(tiny[0], [x, r], g),
                                                  torch.autograd.grad(plain[0], [x, r], g)))
    assert addnorm.dropout_mask(seed, [4, n], 1e-17).all()
    assert torch.equal(torch.ops.addnorm._dropout_apply(x, seed, 1e-17), x)


def test_seed_changed_in_place_before_backward_is_refused():
    """Backward regenerates the mask from the seed tensor: a seed updated in place after
    the forward (a reused seed buffer) would give the gradient of another mask, so backward
    refuses it, naming the versions, as autograd does for saved tensors."""
    x = torch.randn(4, 64, requires_grad=True)
    seed = torch.tensor([123, 456])
    out, _ = torch.ops.addnorm.add_layer_norm(x, torch.randn(4, 64), [64], dropout_p=0.5,
                                              dropout_seed=seed)
    seed.add_(1)
    with pytest.raises(RuntimeError, match=r"dropout_seed was modified by an inplace operation "
                                           r"after the forward \(it is at version 1; expected "
                                           r"version 0 instead\)"):
        out.sum().backward()


def test_seed_drawn_in_inference_mode_trains():
    """A seed made under torch.inference_mode (an inference tensor: no version counter, and
    changeable in place under inference_mode) is used as any other: forward and backward
    run, with the gradient of the forward's mask even when the seed changes in between (the
    op keeps a copy of such a seed)."""
    with torch.inference_mode():
        seed = addnorm.dropout_seed("cpu")
    mask = addnorm.dropout_mask(seed, [4, 64], 0.5)
    x = torch.randn(4, 64, requires_grad=True)
    out, _ = torch.ops.addnorm.add_layer_norm(x, None, [64], dropout_p=0.5, dropout_seed=seed)
    with torch.inference_mode():
        seed.add_(1)
    assert not torch.equal(addnorm.dropout_mask(seed, [4, 64], 0.5), mask)
    (gx,) = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert torch.equal(gx != 0, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_inf_and_nan_give_nan_as_torch_dropout(device):
    """Dropout is x * mask * scale, as F.dropout's product: a dropped inf gives NaN, not 0,
    in _dropout_apply and in the fused h = dropout(x) + r, on every device."""
    seed = addnorm.dropout_seed(device)
    x = torch.full((4, 64), float("inf"), device=device)
    x[:, ::3] = float("nan")
    x[:, 1::3] = -float("inf")
    factor = addnorm.dropout_mask(seed, [4, 64], 0.5).float() * 2.0
    assert (factor == 0).any() and (factor != 0).any()
    expected = x * factor
    out = torch.ops.addnorm._dropout_apply(x, seed, 0.5)
    _, h = torch.ops.addnorm.add_layer_norm(x, torch.zeros_like(x), [64], dropout_p=0.5,
                                            dropout_seed=seed)
    for got in (out, h):
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_probability_is_refused(p):
    """... before anything is drawn: the generators do not advance (as torch's dropout), with
    a ValueError (as torch's; a RuntimeError under TorchScript's interpreter)."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"dropout_p must be a probability in \[0, 1\]"):
        torch.ops.addnorm.add_layer_norm(x, None, [8], dropout_p=p,
                                         dropout_seed=addnorm.dropout_seed("cpu"))
    gen = torch.Generator().manual_seed(1)
    states = torch.get_rng_state(), gen.get_state()
    for g in (None, gen):
        with pytest.raises(ValueError, match=r"dropout_p must be a probability in \[0, 1\]"):
            addnorm.add_rms_norm(x, None, 8, dropout_p=p, generator=g)
    assert torch.equal(torch.get_rng_state(), states[0]) and torch.equal(gen.get_state(), states[1])
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        addnorm.AddLayerNorm(8, dropout=p)
    for cls in (addnorm.AddLayerNorm, addnorm.AddRMSNorm):  # set after the constructor's check
        m = cls(8)
        m.dropout = p
        for module, error in ((m, ValueError), (torch.jit.script(m), RuntimeError)):
            for training in (True, False):  # (in eval too, as torch's dropout)
                with pytest.raises(error, match=r"dropout_p must be a probability in \[0, 1\]"):
                    module.train(training)(x, x)
            assert torch.equal(torch.get_rng_state(), states[0])


def test_probability_of_another_type_or_input_of_none_is_refused_by_name():
    """A dropout_p that is no number (a str) gets an error naming dropout_p (the comparison's
    TypeError named nothing), the module's dropout too, set in the constructor or later; and
    with dropout_p > 0 an input that is no tensor gets the op's error naming input (it had
    "'list' object has no attribute 'device'"). Nothing is drawn for either."""
    x = torch.randn(2, 8)
    state = torch.get_rng_state()
    for p in ("0.1", b"0.1"):
        with pytest.raises(TypeError, match=r"addnorm: dropout_p must be a float or None, got .*0\.1"):
            addnorm.add_layer_norm(x, x, 8, dropout_p=p)
        for cls in (addnorm.AddLayerNorm, addnorm.AddRMSNorm):
            with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got .*0.1"):
                cls(8, dropout=p)
            m = cls(8)
            m.dropout = p
            with pytest.raises(TypeError, match="dropout_p must be a float or None"):
                m(x, x)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got None"):
        addnorm.AddLayerNorm(8, dropout=None)
    for bad in ([[1.0] * 8], 1.0):
        for f in (addnorm.add_layer_norm, addnorm.add_rms_norm):
            with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'input'"):
                f(bad, None, 8, dropout_p=0.1)
    assert torch.equal(torch.get_rng_state(), state)


def test_tensor_like_input_gets_its_seed():
    """An input that is no Tensor but takes torch's calls (__torch_function__) gets the fused
    dropout's seed drawn for it, as a tensor does: its handler sees the op's call with the seed,
    and the result is the tensor's under the same generator state."""
    class Wrapped:
        def __init__(self, t):
            self.t, self.device = t, t.device

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            un = lambda a: a.t if isinstance(a, Wrapped) else a  # noqa: E731
            return func(*map(un, args), **{k: un(v) for k, v in (kwargs or {}).items()})

    x, r = torch.randn(4, 8), torch.randn(4, 8)
    torch.manual_seed(3)
    want = addnorm.add_layer_norm(x, r, 8, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(addnorm.add_layer_norm(Wrapped(x), r, 8, dropout_p=0.5), want)


@pytest.mark.parametrize("cls", [addnorm.AddLayerNorm, addnorm.AddRMSNorm])
def test_modules_take_probability_one(cls):
    """dropout=1.0 is a probability (torch's modules take it): the module drops all of the
    input in training, as in eval with a zero input; scripted too."""
    m = cls(8, dropout=1.0)
    assert m.dropout == 1.0
    x, r = torch.randn(2, 8), torch.randn(2, 8)
    for module in (m, torch.jit.script(m)):
        assert torch.equal(module.train()(x, r), module.eval()(torch.zeros_like(x), r))


def test_seed_is_required_and_checked():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        torch.ops.addnorm.add_layer_norm(x, None, [8], dropout_p=0.5)
    with pytest.raises(RuntimeError, match=r"dropout_seed must be an int64 tensor of 2 elements, got Float"):
        torch.ops.addnorm.add_layer_norm(x, None, [8], dropout_p=0.5, dropout_seed=torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"got Long of shape \[3\]"):
        torch.ops.addnorm.add_layer_norm(x, None, [8], dropout_p=0.5,
                                         dropout_seed=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("seed,match", [
    (torch.zeros(2, dtype=torch.long, device="meta"), "dropout_seed must be on the input's device cpu"),
    (torch.zeros(0, dtype=torch.long), r"got Long of shape \[0\]"),
    (torch.zeros(1, dtype=torch.long), r"got Long of shape \[1\]"),
    (torch.zeros(2), "dropout_seed must be an int64 tensor of 2 elements, got Float")])
def test_seed_given_with_p_zero_is_checked(seed, match):
    """A seed is checked whatever dropout_p is. Unchecked at p = 0, a seed on another device
    took the call to that device's kernel (the meta kernel returned the CPU tensors it made,
    never written), and an empty one was read past its end (a crash in dropout_mask)."""
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    calls = [lambda: torch.ops.addnorm.add_layer_norm(x, r, [8], dropout_p=0.0, dropout_seed=seed),
             lambda: torch.ops.addnorm.add_rms_norm(x, r, [8], dropout_p=0.0, dropout_seed=seed),
             lambda: torch.ops.addnorm._dropout_apply(x, seed, 0.0),
             lambda: torch.ops.addnorm._dropout_matmul(x.view(1, 4, 8), r.view(1, 8, 4), seed, 0.0)]
    if seed.device.type == "cpu":  # (dropout_mask: the seed's device is the mask's)
        calls.append(lambda: addnorm.dropout_mask(seed, [4, 8], 0.0))
    for call in calls:
        with pytest.raises(RuntimeError, match=match):
            call()
    good = addnorm.dropout_seed("cpu")  # (a seed given with p = 0 is otherwise unused)
    torch.testing.assert_close(torch.ops.addnorm._dropout_apply(x, good, 0.0), x, rtol=0, atol=0)
    assert addnorm.dropout_mask(good, [4, 8], 0.0).all()


def test_functorch_transforms_refuse_dropout_clearly():
    x = torch.randn(2, 8)
    seed = addnorm.dropout_seed("cpu")
    with pytest.raises(RuntimeError, match="not supported inside torch.func transforms"):
        torch.func.grad(lambda x: torch.ops.addnorm.add_layer_norm(
            x, None, [8], dropout_p=0.5, dropout_seed=seed)[0].sum())(x)


@pytest.mark.parametrize("randomness", ["error", "different", "same"])
def test_vmap_dropout_follows_randomness(randomness):
    """Under vmap the seeds are drawn as torch's random ops are: 'error' raises torch's error;
    'same' draws one seed, so every entry equals a call on it after the same manual_seed;
    'different' draws one seed per entry (a [B, 2] draw), each entry the call with its seed.
    (Without vmap rules of their own, the encoder layer op and the separate dropout ran
    entry by entry below vmap: 'error' raised nothing and 'same' gave every entry its own
    masks; a layer whose arguments the vmap does not batch ran outside it, one draw for all
    entries.) CPU autocast in training runs. Without dropout, and in eval, vmap runs as
    before."""
    x, r = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    layer = addnorm.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
    src = torch.randn(3, 2, 5, 8)
    fused = [(lambda x, r: addnorm.add_layer_norm(x, r, 8, dropout_p=0.5), "add_layer_norm"),
             (lambda x, r: addnorm.add_rms_norm(x, r, 8, dropout_p=0.5), "add_rms_norm"),
             (lambda x, r: addnorm.AddLayerNorm(8, dropout=0.5)(x, r), "add_layer_norm")]
    vmapped = lambda f: torch.func.vmap(f, randomness=randomness)  # noqa: E731
    shared = lambda t: layer(src[0]) + t  # noqa: E731  (the layer's arguments not batched)
    ts = torch.zeros(3, 1, 1)

    def at_seed(f, *args):
        torch.manual_seed(7)
        return f(*args)

    if randomness == "error":
        for f, _ in fused:
            with pytest.raises(RuntimeError, match="randomness error mode"):
                vmapped(f)(x, r)
        for f, args in ((layer, src), (shared, ts)):
            with pytest.raises(RuntimeError, match="randomness error mode"):
                vmapped(f)(args)
    elif randomness == "same":
        for f, _ in fused:
            y = at_seed(vmapped(f), x, r)
            assert torch.equal(y, torch.stack([at_seed(f, x[b], r[b]) for b in range(3)]))
        # The layer: its outputs and the parameters' gradients (summed over the entries).
        y = at_seed(vmapped(layer), src)
        expected = [at_seed(layer, src[b]) for b in range(3)]
        torch.testing.assert_close(y, torch.stack(expected))
        grads = torch.autograd.grad(y.sum(), list(layer.parameters()))
        expected_grads = torch.autograd.grad(sum(e.sum() for e in expected),
                                             list(layer.parameters()))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)
        assert torch.equal(at_seed(vmapped(shared), ts),
                           at_seed(layer, src[0]).expand(3, -1, -1, -1))
    else:
        for f, name in fused:
            y = at_seed(vmapped(f), x, r)
            seeds = at_seed(torch.randint, 0, 2**63 - 1, [3, 2])
            assert len(set(map(tuple, seeds.tolist()))) == 3
            op = getattr(torch.ops.addnorm, name)
            assert torch.equal(y, torch.stack([op(x[b], r[b], [8], dropout_p=0.5,
                                                  dropout_seed=seeds[b])[0] for b in range(3)]))
        for y in (at_seed(vmapped(layer), src[:1].expand(3, -1, -1, -1)),  # one input, 3 entries
                  at_seed(vmapped(shared), ts)):
            assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2])
        # The separate dropout: each entry its own seed's mask; a batch of none.
        seeds = torch.stack([addnorm.dropout_seed("cpu") for _ in range(3)])
        ones = torch.ones(3, 4, 8)
        masks = torch.func.vmap(torch.ops.addnorm._dropout_apply, in_dims=(0, 0, None))(
            ones, seeds, 0.5)
        for b in range(3):
            assert torch.equal(masks[b] != 0, addnorm.dropout_mask(seeds[b], [4, 8], 0.5))
        assert torch.func.vmap(torch.ops.addnorm._dropout_apply, in_dims=(0, 0, None))(
            ones[:0], seeds[:0], 0.5).shape == (0, 4, 8)
    if randomness != "error":  # (the projection float32 under vmap, the scores' product not)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = at_seed(vmapped(layer), src[:1].expand(3, -1, -1, -1))
        assert y.dtype == torch.float32 and torch.equal(y[0], y[1]) == (randomness == "same")
    torch.testing.assert_close(vmapped(lambda x, r: addnorm.add_layer_norm(x, r, 8))(x, r),
                               F.layer_norm(x + r, (8,)))
    layer.eval()
    torch.testing.assert_close(vmapped(layer)(src), torch.stack([layer(s) for s in src]))


# ------------------------------------------------- the separate dropout (_dropout_apply)
#
# addnorm.TransformerEncoderLayer drops its attention probabilities and feed-forward
# activations with _dropout_apply: out = input * mask / (1 - p), differentiable, its graph
# node keeping the seed tensor only.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float64, None), (torch.float32, None),
                                    (torch.bfloat16, None), (torch.float16, None),
                                    (torch.float32, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=["float64", "float32", "bfloat16", "float16", "float32_to_bfloat16",
                              "float32_to_float16"])
def test_dropout_apply_gradient_is_the_mask(dtypes, device):
    """out = input * (mask / (1 - p)) in the compute type (float32, or float64 for float64;
    the factor rounded as torch's dropout rounds it), and the input's gradient is grad *
    (mask / (1 - p)), in the input's dtype (mask from addnorm.dropout_mask), bitwise; the
    node keeps no tensor but the seed."""
    x_dtype, out_dtype = dtypes
    seed = addnorm.dropout_seed(device)
    x = make_data((5, 37), x_dtype, device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.ops.addnorm._dropout_apply(x, seed, 0.3, out_dtype)
    assert len(saved) == 1 and saved[0] is seed
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    factor = addnorm.dropout_mask(seed, [5, 37], 0.3).to(acc) / (1 - 0.3)
    expected = (x.detach().to(acc) * factor).to(out_dtype or x_dtype)
    assert out.dtype == (out_dtype or x_dtype) and torch.equal(out, expected)
    g = make_data((5, 37), out.dtype, device)
    (gx,) = torch.autograd.grad(out, [x], g)
    assert gx.dtype == x_dtype
    assert torch.equal(gx, (g.to(acc) * factor).to(x_dtype))


def test_dropout_apply_gradcheck_gradgradcheck_and_tangent():
    """float64 first and second derivatives; the forward-mode tangent is the tangent dropped
    with the same mask; torch.func transforms are refused clearly."""
    seed = addnorm.dropout_seed("cpu")
    x = make_data((3, 10), torch.float64, "cpu", requires_grad=True)

    def fn(x):
        return torch.ops.addnorm._dropout_apply(x, seed, 0.5)

    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    import torch.autograd.forward_ad as fwAD
    t = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x.detach(), t))).tangent
    assert torch.equal(tangent, addnorm.dropout_mask(seed, [3, 10], 0.5) * t / 0.5)
    with pytest.raises(RuntimeError, match="not supported inside torch.func transforms"):
        torch.func.grad(lambda x: fn(x).sum())(x.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_matmul_equals_dropout_then_matmul(dtype, device):
    """_dropout_matmul(P, V) is _dropout_apply(P) @ V, values and both gradients bitwise,
    while its node keeps P, V and the seed only (not the dropped copy of P)."""
    seed = addnorm.dropout_seed(device)
    probs = make_data((2, 3, 5, 7), dtype, device, requires_grad=True)
    value = make_data((2, 3, 7, 4), dtype, device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.ops.addnorm._dropout_matmul(probs, value, seed, 0.4)
    assert len(saved) == 3 and saved[0] is probs and saved[1] is value and saved[2] is seed
    ref = torch.ops.addnorm._dropout_apply(probs, seed, 0.4) @ value
    assert torch.equal(out, ref)
    g = make_data(tuple(out.shape), dtype, device)
    for a, e in zip(torch.autograd.grad(out, [probs, value], g),
                    torch.autograd.grad(ref, [probs, value], g)):
        assert torch.equal(a, e)
    # One input needing a gradient: the node keeps what that gradient reads, not the other.
    for p_in, v_in in ((probs, value.detach()), (probs.detach(), value)):
        keeps, wrt = (v_in, p_in) if p_in.requires_grad else (p_in, v_in)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            out = torch.ops.addnorm._dropout_matmul(p_in, v_in, seed, 0.4)
        assert len(saved) == 2 and saved[0] is keeps and saved[1] is seed
        ref = torch.ops.addnorm._dropout_apply(p_in, seed, 0.4) @ v_in
        assert torch.equal(torch.autograd.grad(out, wrt, g)[0], torch.autograd.grad(ref, wrt, g)[0])


def test_dropout_matmul_gradcheck_tangent_and_errors():
    seed = addnorm.dropout_seed("cpu")
    probs = make_data((2, 4, 6), torch.float64, "cpu", requires_grad=True)
    value = make_data((2, 6, 3), torch.float64, "cpu", requires_grad=True)

    def fn(p, v):
        return torch.ops.addnorm._dropout_matmul(p, v, seed, 0.5)

    assert gradcheck(fn, (probs, value))
    assert gradgradcheck(fn, (probs, value))
    import torch.autograd.forward_ad as fwAD
    tp, tv = torch.randn_like(probs), torch.randn_like(value)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(probs.detach(), tp),
                                      fwAD.make_dual(value.detach(), tv))).tangent
    drop = torch.ops.addnorm._dropout_apply
    expected = drop(tp, seed, 0.5) @ value.detach() + drop(probs.detach(), seed, 0.5) @ tv
    torch.testing.assert_close(tangent, expected)
    with fwAD.dual_level():  # one dual input
        t_p = fwAD.unpack_dual(fn(fwAD.make_dual(probs.detach(), tp), value.detach())).tangent
        t_v = fwAD.unpack_dual(fn(probs.detach(), fwAD.make_dual(value.detach(), tv))).tangent
    torch.testing.assert_close(t_p, drop(tp, seed, 0.5) @ value.detach())
    torch.testing.assert_close(t_v, drop(probs.detach(), seed, 0.5) @ tv)
    # One op under autocast: the product in the inputs' dtype, forward and backward.
    p32, v32 = probs.detach().float().requires_grad_(), value.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(p32, v32)
        assert out.dtype == torch.float32
        grads = torch.autograd.grad(out.sum(), [p32, v32])
    ref = drop(p32, seed, 0.5) @ v32
    assert torch.equal(out, ref)
    for a, e in zip(grads, torch.autograd.grad(ref.sum(), [p32, v32])):
        assert torch.equal(a, e)
    with pytest.raises(RuntimeError, match=r"same batch dims and S, got probs of shape \[2, 4, 6\] "
                                           r"and value of shape \[2, 5, 3\]"):
        fn(probs, value[:, :5])
    with pytest.raises(RuntimeError, match="value must have probs' dtype"):
        fn(probs, value.float())
    with pytest.raises(RuntimeError, match="not supported inside torch.func transforms"):
        torch.func.grad(lambda p: fn(p, value.detach()).sum())(probs.detach())


# --------------------------------------------------------------------------- re-running


def _step(layer_fn, x):
    out = layer_fn(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()


def test_activation_checkpointing_recompute_reproduces_the_mask():
    """torch.utils.checkpoint re-runs the forward (seed draw included) with the saved RNG
    state: the gradients equal those of the run without checkpointing."""
    n = 64
    lin = torch.nn.Linear(n, n).double()
    norm = addnorm.AddLayerNorm(n, dropout=0.5).double()

    def block(x):
        return norm(lin(x), x)

    grads = []
    for ckpt in (False, True):
        x = torch.randn(8, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        lin.zero_grad()
        torch.manual_seed(5)
        fn = (lambda x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)) if ckpt else block
        _step(fn, x)
        grads.append((x.grad.clone(), lin.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("case", ["out", "memory_efficient", "h_only"])
def test_checkpointing_without_preserved_rng_takes_the_recomputes_mask(use_reentrant, case):
    """With preserve_rng_state=False the recompute draws the next seed: the norm's backward
    then uses everything of the recompute, its h (or out) and statistics and its mask
    together, as torch's dropout does there: the gradients of that mask, exactly. (The node
    once kept the forward's seed beside the recompute's h under non-reentrant
    checkpointing: gradients of no mask at all.) So does a backward through the returned h
    alone, which reads the saved seed alone, here with h saved by an op after it."""
    n = 64
    x0 = torch.randn(8, n, dtype=torch.float64)
    r = torch.randn(8, n, dtype=torch.float64)
    c = torch.linspace(-1, 1, 8 * n, dtype=torch.float64).view(8, n)

    def block(x, seed=None):
        kw = dict(dropout_p=0.5, return_residual=case == "h_only",
                  memory_efficient=case == "memory_efficient")
        if seed is None:
            out = addnorm.add_layer_norm(x.sin(), r, n, **kw)
        else:
            out = torch.ops.addnorm.add_layer_norm(x.sin(), r, [n], dropout_seed=seed, **kw)
            out = out if case == "h_only" else out[0]
        return out[1].sin() if case == "h_only" else out

    torch.manual_seed(0)
    seeds = [addnorm.dropout_seed("cpu") for _ in range(2)]  # the forward's, the recompute's
    x = x0.clone().requires_grad_()
    torch.manual_seed(0)
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant,
                                            preserve_rng_state=False)
    (out * c).sum().backward()
    grads = []
    for seed in seeds:
        xs = x0.clone().requires_grad_()
        (block(xs, seed) * c).sum().backward()
        grads.append(xs.grad)
    assert not torch.equal(grads[0], grads[1])
    assert torch.equal(x.grad, grads[1])


def test_backward_through_h_alone_reads_no_saved_tensor():
    """A backward through h alone (out unused) gets the gradient of h = dropout(x) + r,
    which needs none of the norm's saved tensors: one changed in place since (h itself,
    out, the weight), as with torch's add and dropout, does not make it raise."""
    for change in ("h", "out", "weight"):
        x, r = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
        seed = addnorm.dropout_seed("cpu")
        out, h = torch.ops.addnorm.add_layer_norm(
            x, r, [8], w, b, return_residual=True, dropout_p=0.5, dropout_seed=seed,
            memory_efficient=change == "out")
        with torch.no_grad():
            {"h": h, "out": out, "weight": w}[change].mul_(2)
        h.sum().backward()
        mask = addnorm.dropout_mask(seed, [4, 8], 0.5)
        assert torch.equal(x.grad, mask * 2.0) and torch.equal(r.grad, torch.ones(4, 8))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_with_an_explicit_generator(use_reentrant):
    """Checkpointing restores the default generators only: a seed drawn from an explicit
    generator would come out different in the recompute (the gradients of another mask), so
    the draw refuses to run there, saying what to do: draw the seed outside and pass it to
    the op, which checkpointing then reproduces exactly."""
    n = 64
    x0 = torch.randn(8, n, dtype=torch.float64)
    r = torch.randn(8, n, dtype=torch.float64)

    def block(x, gen):
        return addnorm.add_layer_norm(x.sin(), r, n, dropout_p=0.5, generator=gen)

    x = x0.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(block, x, torch.Generator().manual_seed(3),
                                            use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match=r"explicit generator in a backward pass .*"
                                           r"addnorm.dropout_seed\(device, generator\)"):
        out.sum().backward()

    def block_seeded(x, seed):
        return torch.ops.addnorm.add_layer_norm(x.sin(), r, [n], dropout_p=0.5,
                                                dropout_seed=seed)[0]

    grads = []
    for ckpt in (False, True):
        x = x0.clone().requires_grad_()
        seed = addnorm.dropout_seed("cpu", torch.Generator().manual_seed(3))
        out = (torch.utils.checkpoint.checkpoint(block_seeded, x, seed, use_reentrant=use_reentrant)
               if ckpt else block_seeded(x, seed))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    # the forward itself (no backward running) takes the explicit generator as always
    assert torch.equal(block(x0, torch.Generator().manual_seed(3)),
                       block_seeded(x0, addnorm.dropout_seed("cpu", torch.Generator().manual_seed(3))))


def _compile_case(n=32):
    x0 = torch.randn(8, n, dtype=torch.float64)
    r0 = torch.randn(8, n, dtype=torch.float64)

    def fn(x, r, seed):
        out, h = torch.ops.addnorm.add_layer_norm(x.sin(), r, [n], return_residual=True,
                                                  dropout_p=0.5, dropout_seed=seed)
        return (out * 3).cos().sum() + h.sum()

    def check(x, r, seed):
        """x.grad and r.grad equal eager's for the same seed (the forward's mask)."""
        xe = x0.clone().requires_grad_()
        re = r0.clone().requires_grad_()
        fn(xe, re, seed).backward()
        torch.testing.assert_close(x.grad, xe.grad)
        torch.testing.assert_close(r.grad, re.grad)

    return x0, r0, fn, check


def test_torch_compile_fullgraph_traces_the_seed_draw_and_keeps_the_mask():
    """torch.compile(fullgraph=True) traces the seed draw and the op without a graph break,
    and the compiled backward uses the forward's mask."""
    x0, r0, fn, check = _compile_case()

    def seeded(x, r):
        seed = addnorm.dropout_seed(x.device)
        return fn(x, r, seed), seed

    torch._dynamo.reset()
    compiled = torch.compile(seeded, fullgraph=True, backend="aot_eager_decomp_partition")
    x = x0.clone().requires_grad_()
    r = r0.clone().requires_grad_()
    loss, seed = compiled(x, r)
    loss.backward()
    check(x, r, seed)


def test_inductor_draws_the_seed_from_the_default_generator_as_eager():
    """Under inductor the seed's randint (its generator overload) stays a call on the
    default generator, where torch's compiled dropout takes inductor's own random numbers:
    after the same manual_seed a compiled call gives the eager call's result and leaves the
    generator where eager leaves it (docs/training.md)."""
    n = 64
    x, r = torch.randn(8, n), torch.randn(8, n)
    fn = lambda x, r: addnorm.add_layer_norm(x, r, n, dropout_p=0.5)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        torch.manual_seed(0)
        results.append((f(x, r), torch.get_rng_state()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(compiled(x, r), results[1][0])  # (and it advances)
    torch._dynamo.reset()


def test_seed_words_are_random_in_all_bits_compiled_too():
    """A seed is two integers in [0, 2^63 - 1), drawn with one randint, in eager and under
    inductor. It was two float64 uniforms times 2^53: inductor drew those as float32, so
    every word had 17 or more trailing zero bits there (about 48 random bits a seed)."""
    torch.manual_seed(0)
    draw = lambda: addnorm.dropout_seed(torch.device("cpu"))  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(draw, fullgraph=True)
    for seeds in (torch.stack([draw() for _ in range(16)]),
                  torch.stack([compiled() for _ in range(16)])):
        assert seeds.dtype == torch.int64 and seeds.shape == (16, 2)
        assert (seeds >= 0).all()
        assert ((seeds & (2 ** 17 - 1)) != 0).all(), seeds
        assert (seeds >= 2 ** 60).any(), seeds  # (the top bits too: all 32 below 2^60 is 8^-32)
        assert seeds.unique().numel() == 32
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("budget", [0.5, 0.0])
def test_memory_budget_partitioner(budget, dynamic):
    """With activation_memory_budget < 1 torch.compile's partitioner recomputes random draws
    in backward with fresh randomness (it does so for torch's own dropout too). A seed drawn
    inside the graph is refused with a clear error (fullgraph), or drawn eagerly at a graph
    break (without fullgraph: gradients of the forward's mask); a seed passed in as a graph
    input is never recomputed, and the gradients belong to the forward's mask at any budget.
    With dynamic=True (the budget, a float, traced as symbolic) addnorm's message was lost
    with fullgraph, and without it the compiled call raised."""
    import torch._functorch.config as fconfig
    x0, r0, fn, check = _compile_case()

    def seeded(x, r):
        return fn(x, r, addnorm.dropout_seed(x.device))

    with fconfig.patch(activation_memory_budget=budget):
        torch._dynamo.reset()
        compiled = torch.compile(seeded, fullgraph=True, dynamic=dynamic,
                                 backend="aot_eager_decomp_partition")
        with pytest.raises(Exception, match=r"addnorm: the fused dropout's seed cannot be drawn inside a "
                                            r"graph compiled with activation_memory_budget < 1"):
            compiled(x0.clone().requires_grad_(), r0.clone().requires_grad_())
        torch._dynamo.reset()
        compiled = torch.compile(seeded, dynamic=dynamic, backend="aot_eager_decomp_partition")
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        torch.manual_seed(7)
        compiled(x, r).backward()
        torch.manual_seed(7)
        check(x, r, addnorm.dropout_seed("cpu"))
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager_decomp_partition")
        seed = addnorm.dropout_seed("cpu")
        x = x0.clone().requires_grad_()
        r = r0.clone().requires_grad_()
        compiled(x, r, seed).backward()
    check(x, r, seed)


@CUDA_SKIP
def test_cuda_graph_replay_draws_a_fresh_mask():
    """A captured call reads its seed on the device: each replay gets a new mask, and the
    replayed h matches the mask of that replay's seed."""
    n = 256
    x = torch.randn(64, n, device="cuda")
    r = torch.randn(64, n, device="cuda")
    static = {}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            addnorm.add_layer_norm(x, r, n, dropout_p=0.5)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        seed = addnorm.dropout_seed(x.device)
        static["h"] = torch.ops.addnorm.add_layer_norm(x, r, [n], dropout_p=0.5,
                                                       dropout_seed=seed)[1]
        static["seed"] = seed
    hs, seeds = [], []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        hs.append(static["h"].clone())
        seeds.append(static["seed"].clone())
    assert not torch.equal(hs[0], hs[1]) and not torch.equal(hs[1], hs[2])
    for h, seed in zip(hs, seeds):
        mask = addnorm.dropout_mask(seed, [64, n], 0.5)
        torch.testing.assert_close(h, x * mask * 2.0 + r)


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("cls", [addnorm.AddLayerNorm, addnorm.AddRMSNorm])
def test_module_dropout_only_in_training(cls):
    """Both modules drop in training only (AddRMSNorm's eval mode went unchecked): in eval h
    is x + r and out the module's without dropout, bit for bit."""
    m = cls(16, dropout=0.5, return_residual=True)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    h_train = m(x, r)[1]
    assert torch.count_nonzero(h_train - r) < x.numel()  # some elements dropped
    m.eval()
    out, h = m(x, r)
    assert torch.equal(h, x + r)
    assert torch.equal(out, cls(16)(x, r))
    assert "dropout=0.5" in repr(m)
    m = cls(16, dropout=0.25).train()
    torch.manual_seed(3)
    a = m(x, r)
    torch.manual_seed(3)
    assert torch.equal(a, m(x, r))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_the_documented_philox_function(device):
    """Element e is kept when its 16 bits, half e % 2 of word (e / 2) % 4 of
    Philox4x32-10(key = seed[0], counter = (seed[1], e / 8)), are below the high half of
    (1 - p) * 2^32 (ties aside, below): checked element by element against an independent
    implementation, across vector-width boundaries and odd lengths."""
    seed = torch.tensor([0x0123456789ABCDEF, -0x0FEDCBA987654321], dtype=torch.int64)
    p = 0.37
    n = 203
    mask = addnorm.dropout_mask(seed.to(device), [n], p).cpu()
    threshold = int(math.ldexp(1.0 - p, 32))
    assert mask.tolist() == [dropout_keeps(seed, e, threshold) for e in range(n)]
    # The fused forward uses the same mask, rows split at any length (one row of n).
    x = torch.rand(3, n, dtype=torch.float64, device=device) + 1.0
    h = torch.ops.addnorm.add_layer_norm(x, None, [n], dropout_p=p, dropout_seed=seed.to(device))[1]
    assert torch.equal((h != 0).cpu(), addnorm.dropout_mask(seed, [3, n], p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1024, 1031])
def test_ties_with_the_threshold_take_the_tie_draw(n, dtype, device):
    """Where an element's 16 bits equal the threshold's high half (once in 2^16 elements),
    the tie draw (counter (seed[1], e / 8 + 2^63)) decides against the threshold's low half,
    so that the keep probability is (1 - p) rounded to 2^-32, not to 2^-16. At p chosen to
    tie at an element and to keep, then drop it by one unit of the threshold: the mask, the
    fused forward's h and the input gradient of its backward, at elements in the kernels'
    vector bodies, their ends and rows' starts (n = 1031 splits rows off Philox groups)."""
    seed = torch.tensor([0x2545F4914F6CDD1D, 31337], dtype=torch.int64)
    m = 3
    x = (torch.rand(m, n, dtype=torch.float64) + 1.0).to(dtype)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    bits = [dropout_bits(seed, i) for i in range(m * n)]
    for e in (5, 100, n - 2, n, n + 1, 2 * n - 60):
        for kept in (True, False):
            p = tie_p(seed, e, kept)
            threshold = int(math.ldexp(1.0 - p, 32))
            mask = addnorm.dropout_mask(seed.to(device), [m, n], p).cpu()
            assert bool(mask.flatten()[e]) == kept, f"element {e}: not {kept} at its tie"
            want = [b < threshold >> 16 if b != threshold >> 16 else dropout_keeps(seed, i, threshold)
                    for i, b in enumerate(bits)]
            assert mask.flatten().tolist() == want
            xd = x.to(device).requires_grad_()
            out, h = torch.ops.addnorm.add_layer_norm(xd, None, [n], dropout_p=p,
                                                      dropout_seed=seed.to(device))
            assert torch.equal((h != 0).cpu(), mask)
            gx, = torch.autograd.grad(out, [xd], dy.to(device))
            assert bool(gx.flatten()[e] != 0) == kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_two_ties_in_one_group(dtype, device):
    """Two elements of one Philox group with equal bits, both tied with the threshold: each
    takes its own tie draw (one kept, one dropped), in the mask, the fused forward's h and
    _dropout_apply; the group's other elements as the reference has them."""
    seed = torch.tensor(TWO_TIES_SEED, dtype=torch.int64)
    m, n = 80, 1024
    x = (torch.rand(m, n, dtype=torch.float64) + 1.0).to(dtype)
    for e1, e2 in TWO_TIES:
        p, kept = two_ties_p(seed, e1, e2)
        threshold = int(math.ldexp(1.0 - p, 32))
        group = range(e1 // 8 * 8, e1 // 8 * 8 + 8)
        want = [dropout_keeps(seed, e, threshold) for e in group]
        assert want[kept % 8] and not want[(e1 + e2 - kept) % 8]
        mask = addnorm.dropout_mask(seed.to(device), [m, n], p).cpu().flatten()
        assert mask[group.start:group.stop].tolist() == want, f"group of {e1}, {e2}"
        h = torch.ops.addnorm.add_layer_norm(x.to(device), None, [n], dropout_p=p,
                                             dropout_seed=seed.to(device))[1]
        assert (h.cpu().flatten()[group.start:group.stop] != 0).tolist() == want
        applied = torch.ops.addnorm._dropout_apply(x.to(device), seed.to(device), p)
        assert (applied.cpu().flatten()[group.start:group.stop] != 0).tolist() == want


def test_same_mask_and_gradients_on_every_instruction_set():
    """The CPU kernels' builds (portable, AVX2, AVX512; those this processor runs, chosen
    with ATEN_CPU_CAPABILITY in fresh processes) draw the same mask: the mask itself, the
    fused forward's h (bitwise: the input times the same factors, plus a residual rounded
    the same way, float32 and float64), the elements the input gradient written by the
    norm backward keeps, and masks at p that tie elements of the vector bodies with the
    threshold (kept, then dropped: the tie draw's path of each build)."""
    import subprocess
    import sys

    seed = torch.tensor([0x0123456789ABCDEF, 977], dtype=torch.int64)
    tie_ps = [tie_p(seed, e, kept) for e in (70, 700, 2000) for kept in (True, False)]
    code = (
        "import torch, addnorm, hashlib\n"
        "seed = torch.tensor([0x0123456789ABCDEF, 977], dtype=torch.int64)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x32 = (torch.rand(5, 1031, generator=g) + 1.0).requires_grad_()\n"
        "dy = torch.randn(5, 1031, generator=g)\n"
        "mask = addnorm.dropout_mask(seed, [5, 1031], 0.3)\n"
        "out, h = torch.ops.addnorm.add_layer_norm(x32, None, [1031], dropout_p=0.3, dropout_seed=seed)\n"
        "gx, = torch.autograd.grad(out, [x32], dy)\n"
        "assert torch.equal(gx != 0, mask) and torch.equal(h != 0, mask)\n"
        "digest = lambda t: hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()\n"
        "r = torch.rand(5, 1031, generator=g) - 0.5  # (randn's values depend on the build)\n"
        "hr = [torch.ops.addnorm.add_layer_norm(x32.detach().to(dt), r.to(dt), [1031], dropout_p=0.3,\n"
        "                                       dropout_seed=seed)[1] for dt in (torch.float32, torch.float64)]\n"
        f"ties = torch.stack([addnorm.dropout_mask(seed, [5, 1031], p) for p in {tie_ps!r}])\n"
        "hr.append(ties)\n"
        "print(addnorm.cpu_capability(), digest(mask), digest(h), digest(gx != 0), *map(digest, hr))\n"
    )
    seen = {}
    for cap in ("default", "avx2", "avx512"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        seen[out[0]] = out[1:]
    assert "DEFAULT" in seen
    values = list(seen.values())
    assert all(v == values[0] for v in values), seen
