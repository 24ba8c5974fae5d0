"""``python -m addnorm``: a short install check. Prints the versions (addnorm, the torch it
was built against and the one running), the instruction set of the CPU kernels and whether
CUDA kernels are present and usable, then checks each op once on each available device
against torch's own function (forward; and the input's gradient). Exit status 1 when a
check fails. The main job (self-check and benchmarks) is ``make run`` in the source tree.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import addnorm
from addnorm import _build_info


def cuda_status() -> str:
    if not addnorm._C.built_with_cuda():
        return "addnorm was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "built with CUDA kernels; torch sees no CUDA device"
    return f"CUDA kernels on {torch.cuda.get_device_name(0)}"


def _parity(op: str, device: str):
    """Max |addnorm - torch| of the output and of the input's gradient (float32), and the
    tolerance."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=gen).mul(3).add(1).to(device).requires_grad_()
    r = torch.randn(8, 256, generator=gen).to(device)
    w = torch.randn(256, generator=gen).to(device)
    b = torch.randn(256, generator=gen).to(device)
    ln, rms = op.endswith("layer_norm"), op.endswith("rms_norm")
    h = (lambda x: x + r) if op.startswith("add_") else (lambda x: x)
    theirs = ((lambda x: F.layer_norm(h(x), [256], w, b)) if ln
              else (lambda x: F.rms_norm(h(x), [256], w, 1e-6)))
    if op.startswith("add_"):
        ours = ((lambda x: addnorm.add_layer_norm(x, r, 256, w, b)) if ln
                else (lambda x: addnorm.add_rms_norm(x, r, 256, w, 1e-6)))
    else:
        ours = ((lambda x: addnorm.layer_norm(x, 256, w, b)) if ln
                else (lambda x: addnorm.rms_norm(x, [256], w, 1e-6)))
    assert ln != rms
    g = torch.randn(8, 256, generator=gen).to(device)
    errs = []
    for f in (ours, theirs):
        out = f(x)
        (gx,) = torch.autograd.grad(out, [x], g)
        errs.append((out.detach(), gx))
    err = max((a - e).abs().max().item() for a, e in zip(errs[0], errs[1]))
    return err, 1e-4


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m addnorm", description=__doc__).parse_args(argv)
    print(f"addnorm {addnorm.__version__}, built against torch {_build_info.torch_version}; "
          f"running torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"CPU kernels: {addnorm.cpu_capability()}")
    print(f"CUDA: {cuda_status()}")
    devices = ["cpu"] + (["cuda"] if addnorm.cuda_available() else [])
    failed = 0
    for device in devices:
        for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
            try:
                err, tol = _parity(op, device)
                ok = err <= tol
                detail = f"max |addnorm - torch| = {err:.1e} (output and input gradient)"
            except Exception as e:  # a failure, reported
                ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {device:<4} {op:<14} {detail}")
    print("install check: " + ("OK" if not failed else f"{failed} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
