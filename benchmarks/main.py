#!/usr/bin/env python
"""The main job (`make run`): the install check, the self-check against PyTorch, then a
short benchmark table.

1. `python -m addnorm`'s install check: versions, the CPU kernels' instruction set, the
   CUDA kernels, one parity check per op on each device.
2. Self-check (selfcheck.py): the norm ops (add_layer_norm pre- and post-LN, layer_norm,
   add_rms_norm, rms_norm; without dropout or memory_efficient, which the test suite
   covers), forward and gradients, against PyTorch on the available device(s), several dtypes, shapes and argument combinations, one PASS/FAIL
   line per check with its max error. Exits 1 if any check fails.
3. A short benchmark: addnorm vs torch eager vs torch.compile (2 ops x 2 shapes x fp32/bf16,
   forward and forward+backward), with speedups and bandwidth measured in the same run and
   a progress bar. The full benchmarks are bench_norm.py (CPU) and bench_cuda.py (GPU).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as sc  # noqa: E402  (also puts the source tree's package on the path when needed)

import addnorm  # noqa: E402
import addnorm.__main__ as install_check  # noqa: E402
import selfcheck  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="addnorm install check and self-check against PyTorch, then a short benchmark.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                   help="auto (default): check on every available device and benchmark on CUDA "
                        "if available, else CPU; all: check and benchmark on every device; "
                        "cpu / cuda: only that device")
    p.add_argument("--no-bench", action="store_true", help="run the checks only")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out of the benchmark (it compiles for every shape)")
    p.add_argument("--quiet", action="store_true", help="print only failed checks")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    cuda = addnorm.cuda_available()
    if args.device == "cuda" and not cuda:
        print(f"--device cuda: not available ({install_check.cuda_status()})", file=sys.stderr)
        return 2
    if args.device in ("auto", "all"):
        check_devices = ["cpu"] + (["cuda"] if cuda else [])
        bench_devices = check_devices if args.device == "all" else [check_devices[-1]]
    else:
        check_devices = bench_devices = [args.device]

    print("== install check ==")
    if install_check.main([]) != 0:
        return 1

    print(f"\n== self-check on {', '.join(check_devices)} ==")
    passed, total = selfcheck.run_selfcheck(check_devices, verbose=not args.quiet)
    failed = total - passed
    print(f"self-check: {passed}/{total} passed" + (f", {failed} FAILED" if failed else ""))
    if failed:
        print("benchmark skipped because the self-check failed", file=sys.stderr)
        return 1

    if not args.no_bench:
        for dev in bench_devices:
            print(f"\n== benchmark on {dev}: addnorm vs torch eager"
                  f"{'' if args.no_compile else ' vs torch.compile'} ==")
            print("(median times; 'x vs' = other time / addnorm time, >1 means addnorm is faster; "
                  "GB/s counts each input read once and each output written once)")
            sweep = sc.quick_bench(dev, compile=not args.no_compile)
            print(f"memory-copy bandwidth (dst.copy_(src), 256 MiB): "
                  f"{sweep['copy_bandwidth']['gbps']:.1f} GB/s")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
