"""``python -m addnorm``: the main job (``make run``).

1. Self-check: every op (layer_norm, rms_norm, add_layer_norm, add_rms_norm; forward and
   gradients) against PyTorch on the available device(s), several dtypes and shapes, one
   PASS/FAIL line per check with its max error. Exits 1 if any check fails.
2. A short benchmark: addnorm vs torch eager vs torch.compile (2 ops x 2 shapes x fp32/bf16,
   forward and forward+backward), with speedups and bandwidth measured in the same run.
   The full benchmark is ``benchmarks/bench_norm.py``.
"""

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m addnorm",
        description="addnorm self-check against PyTorch, then a short benchmark.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                   help="auto (default): check on every available device and benchmark on CUDA "
                        "if available, else CPU; all: check and benchmark on every device; "
                        "cpu / cuda: only that device")
    p.add_argument("--no-bench", action="store_true", help="run the self-check only")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out of the benchmark (it compiles for every shape)")
    p.add_argument("--quiet", action="store_true", help="print only failed checks")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    import addnorm
    from addnorm import _selfcheck as sc

    cuda = addnorm.cuda_available()
    if args.device == "cuda" and not cuda:
        reason = ("torch sees no CUDA device" if not torch.cuda.is_available()
                  else "addnorm was built without CUDA kernels")
        print(f"--device cuda: not available ({reason})", file=sys.stderr)
        return 2
    if args.device in ("auto", "all"):
        check_devices = ["cpu"] + (["cuda"] if cuda else [])
        bench_devices = check_devices if args.device == "all" else [check_devices[-1]]
    else:
        check_devices = bench_devices = [args.device]

    info = sc.machine_info(bench_devices[-1])
    print(f"addnorm {info['addnorm_version']}  torch {info['torch_version']}  "
          f"python {info['python']}")
    print(f"CPU: {info['cpu_model']} ({info['cpu_cores']} cores, torch threads "
          f"{info['torch_threads']}), addnorm CPU kernels: {info['addnorm_cpu_capability']}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        why = ("no CUDA device visible" if not torch.cuda.is_available()
               else "addnorm built without CUDA kernels")
        print(f"GPU: none used ({why})")

    print(f"\n== self-check on {', '.join(check_devices)} ==")
    passed, total = sc.run_selfcheck(check_devices, verbose=not args.quiet)
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
