"""A pytest plugin that swaps the CPU kernels of addnorm's internal ops _norm_fwd, _norm_bwd
and _dropout_apply for the emulated CUDA kernels (emulation.py), so that the suite's CPU
tests run the CUDA device code, through the ops, autograd, the modules and the encoder layer:

    PYTHONPATH=tests/cuda_emulation python -m pytest -p as_cpu_kernels tests/python/test_ops.py -k cpu

Slow (the emulator runs every CUDA thread): leave out the largest shapes (-k "not 65536 and
not 100003") and gradcheck. Where the CUDA kernels differ from the CPU's by design, CPU
tests fail: the backward from the output reads the weight for zeros only on the CPU
(test_memory_efficient.py's test_from_output_op_checks, and the error its
test_weight_below_float_reciprocal_range_keeps_h and test_compile_fullgraph expect), and
only the CPU rescales float64 rows beyond the range of their squares (test_value_range.py's
test_large_float64_inputs and test_eps_zero_tiny_float64_inputs); test_reuse_h.py and
test_reuse_grad_out.py count the CPU allocator's bytes, which the emulation's own buffers
change. The session ends with the number of emulated calls, so a run that never reached the
kernels shows."""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulation  # noqa: E402

import addnorm  # noqa: E402,F401  (registers the ops)

_emu = emulation.load()
_lib = torch.library.Library("addnorm", "IMPL")
_calls = {"_norm_fwd": 0, "_norm_bwd": 0, "_dropout_apply": 0}


def _norm_fwd(input, residual, normalized_shape, weight, bias, eps, is_rms, store_residual,
              residual_in_fp32, dropout_p=0.0, dropout_seed=None):
    _calls["_norm_fwd"] += 1
    return tuple(_emu.norm_fwd(input, residual, [int(s) for s in normalized_shape], weight, bias,
                               eps, is_rms, store_residual, residual_in_fp32, dropout_p,
                               dropout_seed))


def _norm_bwd(grad_out, grad_residual_out, h, mean, rstd, weight, has_bias, is_rms,
              weight_grad=True, eps=None, *, from_output=False, bias=None, h_dtype=None,
              dropout_p=0.0, dropout_seed=None, grad_h_wanted=True):
    _calls["_norm_bwd"] += 1
    return tuple(_emu.norm_bwd(grad_out, grad_residual_out, h, mean, rstd, weight, has_bias,
                               is_rms, weight_grad, eps, from_output, bias, dropout_p,
                               dropout_seed, grad_h_wanted, h_dtype))


def _dropout_apply(input, dropout_seed, p, dtype=None):
    _calls["_dropout_apply"] += 1
    return _emu.dropout_apply(input, dropout_seed, p, dtype)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ("overriding a previously registered kernel")
    _lib.impl("_norm_fwd", _norm_fwd, "CPU")
    _lib.impl("_norm_bwd", _norm_bwd, "CPU")
    _lib.impl("_dropout_apply", _dropout_apply, "CPU")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"emulated CUDA kernel calls: {_calls}")
