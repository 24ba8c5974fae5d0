"""`python -m addnorm`: a short install check: versions, CPU kernels' instruction set, CUDA
kernels present and usable, one parity check per op and device against torch (output and
input gradient; exit status 1 on a failure). The main job is `make run` in the source tree."""

import argparse
import sys

import torch
import torch.nn.functional as F

import addnorm
from addnorm import _build_info


def cuda_status() -> str:
    if not addnorm._C.built_with_cuda():
        return "addnorm was built without CUDA kernels"
    return (f"CUDA kernels on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "built with CUDA kernels; torch sees no CUDA device")


def _parity(op: str, device: str):
    """Max |addnorm - torch| of the output and input gradient (float32), and the tolerance."""
    gen = torch.Generator().manual_seed(0)
    x, r, g = (torch.randn(8, 256, generator=gen).to(device) for _ in range(3))
    x = (x * 3 + 1).requires_grad_()
    w, b = (torch.randn(256, generator=gen).to(device) for _ in range(2))
    ln = op.endswith("layer_norm")
    h = (lambda x: x + r) if op.startswith("add_") else (lambda x: x)
    theirs = ((lambda x: F.layer_norm(h(x), [256], w, b)) if ln
              else (lambda x: F.rms_norm(h(x), [256], w, 1e-6)))
    ours = {"layer_norm": lambda x: addnorm.layer_norm(x, 256, w, b),
            "rms_norm": lambda x: addnorm.rms_norm(x, [256], w, 1e-6),
            "add_layer_norm": lambda x: addnorm.add_layer_norm(x, r, 256, w, b),
            "add_rms_norm": lambda x: addnorm.add_rms_norm(x, r, 256, w, 1e-6)}[op]
    results = [(o.detach(), torch.autograd.grad(o, [x], g)[0]) for o in (ours(x), theirs(x))]
    return max((a - e).abs().max().item() for a, e in zip(*results)), 1e-4


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m addnorm", description=__doc__).parse_args(argv)
    print(f"addnorm {addnorm.__version__}, built against torch {_build_info.torch_version}; "
          f"running torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"CPU kernels: {addnorm.cpu_capability()}\nCUDA: {cuda_status()}")
    devices, failed = ["cpu"] + (["cuda"] if addnorm.cuda_available() else []), 0
    for device in devices:
        for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
            try:
                err, tol = _parity(op, device)
                ok, detail = err <= tol, f"max |addnorm - torch| = {err:.1e} (output and input gradient)"
            except Exception as e:  # a failure, reported
                ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {device:<4} {op:<14} {detail}")
    print("install check: " + ("OK" if not failed else f"{failed} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
