"""What the benchmarks share (bench_norm.py, bench_cuda.py, bench_encoder.py and the main
job, main.py): argument parsing, the machine's description, the implementations compared
(addnorm, torch eager, torch.compile, Liger-Kernel), the clock, the cache flusher, the
copy-bandwidth measurement, the sweep runner with its progress bar, and table formatting.

The sweep (bench_norm.py): addnorm vs torch eager (``h = x + r; F.layer_norm(h, ...)``) vs
torch.compile of that same eager function (vs Liger-Kernel on CUDA when importable), for
forward, backward (the ``.backward()`` call alone, on a fresh forward graph every
repetition) and forward+backward. One repetition runs the forward, then the backward, with
a clock mark in between, so the three modes come from the same runs. Implementations are
interleaved round-robin (rotating order) so that drift hits all of them alike; medians are
reported.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

try:
    import addnorm  # noqa: F401
except ImportError:  # running from a source tree without the package on sys.path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import addnorm  # noqa: F401

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}

MODES = ("fwd", "bwd", "fwdbwd")
MODE_ALIASES = {
    "fwd": "fwd", "forward": "fwd", "f": "fwd",
    "bwd": "bwd", "backward": "bwd", "b": "bwd",
    "fwdbwd": "fwdbwd", "fwd+bwd": "fwdbwd", "forward+backward": "fwdbwd", "fb": "fwdbwd",
    "all": "all",
}
MODE_LABEL = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}

# op name -> (kind, has_residual, returns_h)
OPS: Dict[str, Tuple[str, bool, bool]] = {
    "add_layer_norm": ("ln", True, False),          # post-LN: h not returned
    "add_layer_norm_prenorm": ("ln", True, True),   # pre-LN: h returned (and gets a grad)
    "layer_norm": ("ln", False, False),
    "add_rms_norm": ("rms", True, False),
    "add_rms_norm_prenorm": ("rms", True, True),
    "rms_norm": ("rms", False, False),
    "dropout_add_layer_norm": ("ln", True, False),  # post-LN with dropout on the input
    # post-LN, addnorm with memory_efficient=True (backward from the output; the others as
    # add_layer_norm)
    "add_layer_norm_memory_efficient": ("ln", True, False),
}
# Ops whose input goes through dropout first: eager F.dropout(x, p) + r, addnorm's fused
# dropout_p (mask regenerated in backward, never stored).
DROPOUT_P: Dict[str, float] = {"dropout_add_layer_norm": 0.1}
DEFAULT_OPS = ("add_layer_norm", "add_layer_norm_prenorm", "layer_norm", "add_rms_norm")

IMPL_ORDER = ("addnorm", "eager", "compile", "liger")


def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def parse_shapes(text: str, dims: int = 2, example: str = "4096x768") -> List[Tuple[int, ...]]:
    """A comma list of shapes written AxB (dims numbers joined by x)."""
    shapes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != dims:
            raise ValueError(f"bad shape {item!r}: expected {dims} numbers joined by x, e.g. {example}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_modes(text: str) -> List[str]:
    modes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        m = MODE_ALIASES.get(item.lower())
        if m is None:
            raise ValueError(f"bad mode {item!r}: use fwd, bwd, fwdbwd")
        for mm in (MODES if m == "all" else (m,)):
            if mm not in modes:
                modes.append(mm)
    return [m for m in MODES if m in modes]


def command_line() -> str:
    exe = os.path.basename(sys.executable) or "python"
    return shlex.join([exe, *sys.argv])


def source_revision() -> str:
    """The commit the benchmark ran at: ``git rev-parse`` of this checkout, with "+changes"
    where tracked files differ from it; else ``ADDNORM_SOURCE_REVISION`` (scripts/gpu_check.sh
    sets it from the prebuilt library's record, on a machine with a copy of the tree and no
    git history); else "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=30, check=True).stdout.strip()
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            raise OSError("not this tree's repository")  # (a copy inside another one)
        rev = git("rev-parse", "--short=12", "HEAD")
        return rev + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ADDNORM_SOURCE_REVISION", "unknown")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l3_cache_bytes() -> int:
    for idx in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{idx}"
        try:
            with open(f"{base}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{base}/size") as f:
                txt = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            return int(txt.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
    return 32 << 20


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants (torch.compile's worker processes
    among them; ended children that were waited for count in their parent's), from /proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # (after the name: state ppid ...; utime stime cutime cstime, stat's fields 14-17)
            procs[int(entry)] = (int(rest[1]), sum(int(v) for v in rest[11:15]))
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(procs[pid][1] for pid in tree if pid in procs) / os.sysconf("SC_CLK_TCK")


def _cpus() -> List[int]:
    """The CPUs this process may run on (all of them where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_snapshot():
    """(wall seconds, busy CPU seconds of the CPUs this process may run on, from /proc/stat's
    user, nice and system time, CPU seconds of this process and its descendants), or None
    where /proc/stat is missing: other_cpu_share's start."""
    cpus = set(_cpus())
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    busy += sum(int(v) for v in fields[:3])
        own = _tree_cpu_seconds()
    except (OSError, ValueError):
        return None
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own


def other_cpu_share(start) -> Optional[float]:
    """The share of the cores this process may use that other processes (not this one or its
    children) kept busy since cpu_snapshot() gave start (0: the run had them to itself; 0.5
    on 2 cores: one core taken). The load average before a run misses load that comes
    during it, and load steals from the side whose work is split over more parallel regions
    (eager's more ops), so a ratio measured under it is biased: note_other_cpu_share
    records it for the reports and warns above 5%."""
    end = cpu_snapshot() if start is not None else None
    if end is None or end[0] <= start[0]:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, other) / ((end[0] - start[0]) * len(_cpus())), 3)


def note_other_cpu_share(info: dict, start) -> None:
    """info["other_cpu_share"] = other_cpu_share(start), with a warning above 5%."""
    share = info["other_cpu_share"] = other_cpu_share(start)
    if (share or 0) > 0.05:
        print(f"warning: other processes kept {100 * share:.0f}% of the cores busy during the "
              "run: the ratios are biased (eager, with more parallel ops, loses more to them); "
              "rerun on an idle machine", file=sys.stderr)


def machine_info(device: str) -> dict:
    import addnorm

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "source_revision": source_revision(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "addnorm_version": getattr(addnorm, "__version__", "?"),
        "addnorm_cpu_capability": _safe(addnorm.cpu_capability),
        "addnorm_cuda_available": _safe(addnorm.cuda_available),
        "device": device,
    }
    try:
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if os.environ.get("GLIBC_TUNABLES"):
        info["glibc_tunables"] = os.environ["GLIBC_TUNABLES"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
                    break
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / (1 << 30), 1),
            gpu_sms=p.multi_processor_count,
            torch_cuda=torch.version.cuda,
        )
        try:
            import triton

            info["triton_version"] = triton.__version__
        except Exception:
            pass
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        info["liger_kernel_version"] = version("liger-kernel")
    except Exception:
        pass
    return info


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # pragma: no cover - informational only
        return f"error: {e}"


class Progress:
    """A one-line progress bar on stderr: ``[ 12/96] label  1m02s elapsed, ~3m10s left``.

    ``weights`` are the predicted costs of the items; the time left is extrapolated from
    the elapsed time and the weight done so far.
    """

    def __init__(self, total: int, weights: Optional[Sequence[float]] = None,
                 stream=None, enabled: bool = True):
        self.total = total
        self.weights = list(weights) if weights is not None else [1.0] * total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.i = 0
        self._width = 0

    def step(self, label: str) -> None:
        """Announce item ``self.i + 1`` (about to start)."""
        if not self.enabled:
            self.i += 1
            return
        elapsed = time.perf_counter() - self.t0
        done_w = sum(self.weights[: self.i])
        left_w = sum(self.weights[self.i:])
        eta = f", ~{fmt_duration(elapsed * left_w / done_w)} left" if done_w > 0 and self.i > 0 else ""
        w = len(str(self.total))
        filled = int(20 * self.i / max(1, self.total))
        bar = "#" * filled + "." * (20 - filled)
        line = f"[{self.i + 1:>{w}}/{self.total}] {bar} {label}  ({fmt_duration(elapsed)} elapsed{eta})"
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.stream.write("\r" + line + pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.i += 1

    def done(self) -> None:
        if not self.enabled:
            return
        line = f"[{self.total}/{self.total}] {'#' * 20} done in {fmt_duration(time.perf_counter() - self.t0)}"
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)) + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------

class Impl:
    def __init__(self, name: str, fn: Callable, clone_grads: bool = False,
                 params: Sequence[torch.Tensor] = ()):
        self.name = name
        self.fn = fn                    # fn(x, r, w, b) -> tuple of outputs (out[, h])
        self.clone_grads = clone_grads  # the implementation may overwrite the upstream grads
        self.params = list(params)      # its own parameters whose .grad must be cleared


def _eager_fn(op: str, N: int, eps):
    kind, has_res, prenorm = OPS[op]
    shape = (N,)
    if op in DROPOUT_P:
        p = DROPOUT_P[op]

        def f(x, r, w, b):
            return F.layer_norm(F.dropout(x, p) + r, shape, w, b, eps)
        return f
    if kind == "ln":
        if has_res and prenorm:
            def f(x, r, w, b):
                h = x + r
                return F.layer_norm(h, shape, w, b, eps), h
        elif has_res:
            def f(x, r, w, b):
                h = x + r
                return F.layer_norm(h, shape, w, b, eps)
        else:
            def f(x, r, w, b):
                return F.layer_norm(x, shape, w, b, eps)
    else:
        if has_res and prenorm:
            def f(x, r, w, b):
                h = x + r
                return F.rms_norm(h, shape, w, eps), h
        elif has_res:
            def f(x, r, w, b):
                h = x + r
                return F.rms_norm(h, shape, w, eps)
        else:
            def f(x, r, w, b):
                return F.rms_norm(x, shape, w, eps)
    return f


def _as_tuple(f):
    def g(*args):
        out = f(*args)
        return out if isinstance(out, tuple) else (out,)
    return g


def _addnorm_fn(op: str, N: int, eps):
    import addnorm

    kind, has_res, prenorm = OPS[op]
    shape = (N,)
    if op in DROPOUT_P:
        p = DROPOUT_P[op]
        return lambda x, r, w, b: (addnorm.add_layer_norm(x, r, shape, w, b, eps, dropout_p=p),)
    if op == "add_layer_norm_memory_efficient":
        return lambda x, r, w, b: (addnorm.add_layer_norm(x, r, shape, w, b, eps,
                                                          memory_efficient=True),)
    if kind == "ln":
        if has_res:
            if prenorm:
                return lambda x, r, w, b: addnorm.add_layer_norm(x, r, shape, w, b, eps, return_residual=True)
            return lambda x, r, w, b: (addnorm.add_layer_norm(x, r, shape, w, b, eps),)
        return lambda x, r, w, b: (addnorm.layer_norm(x, shape, w, b, eps),)
    if has_res:
        if prenorm:
            return lambda x, r, w, b: addnorm.add_rms_norm(x, r, shape, w, eps, return_residual=True)
        return lambda x, r, w, b: (addnorm.add_rms_norm(x, r, shape, w, eps),)
    return lambda x, r, w, b: (addnorm.rms_norm(x, shape, w, eps),)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:
        return False


def _liger_impl(op: str, N: int, eps, w, b) -> Optional[Impl]:
    """Liger-Kernel's modules (CUDA/Triton only); the residual add is eager unless Liger has
    a fused add (LigerFusedAddRMSNorm)."""
    kind, has_res, prenorm = OPS[op]
    if op in DROPOUT_P:
        return None  # no fused dropout in Liger-Kernel
    dev, dt = w.device, w.dtype
    try:
        if kind == "ln":
            from liger_kernel.transformers import LigerLayerNorm

            try:
                mod = LigerLayerNorm(N, eps=eps, bias=True)
            except TypeError:
                mod = LigerLayerNorm(N, eps=eps)
            mod = mod.to(device=dev, dtype=dt)
            with torch.no_grad():
                mod.weight.copy_(w)
                mod.bias.copy_(b)
            norm = mod
        else:
            fused = None
            if has_res:
                try:
                    from liger_kernel.transformers import LigerFusedAddRMSNorm

                    fused = LigerFusedAddRMSNorm(N, eps=eps if eps is not None else 1e-6)
                except Exception:
                    fused = None
            if fused is not None:
                mod = fused.to(device=dev, dtype=dt)
                with torch.no_grad():
                    mod.weight.copy_(w)
                if prenorm:
                    fn = lambda x, r, w_, b_: tuple(mod(x, r))
                else:
                    fn = lambda x, r, w_, b_: (mod(x, r)[0],)
                return Impl("liger", fn, clone_grads=True, params=list(mod.parameters()))
            from liger_kernel.transformers import LigerRMSNorm

            mod = LigerRMSNorm(N, eps=eps if eps is not None else torch.finfo(torch.float32).eps)
            mod = mod.to(device=dev, dtype=dt)
            with torch.no_grad():
                mod.weight.copy_(w)
            norm = mod
    except Exception:
        return None
    if has_res and prenorm:
        def fn(x, r, w_, b_):
            h = x + r
            return norm(h), h
    elif has_res:
        def fn(x, r, w_, b_):
            return (norm(x + r),)
    else:
        def fn(x, r, w_, b_):
            return (norm(x),)
    return Impl("liger", fn, clone_grads=True, params=list(norm.parameters()))


def grads_aliased(op: str) -> bool:
    """Whether grad_x and grad_r are one tensor (grad_h), which an ideal kernel writes once:
    with a residual and no dropout (with dropout grad_x is grad_h times the mask)."""
    return OPS[op][1] and op not in DROPOUT_P


def minimal_bytes(op: str, M: int, N: int, dtype, wdtype=None, hdtype=None,
                  grads_alias: bool = False) -> Dict[str, int]:
    """Bytes an ideal kernel must move: every input read once, every output written once.
    fwd: x, r, w, b read; out (and h for pre-LN) written (a post-LN training forward need
    not write h: its backward can start from out, as memory_efficient does).
    bwd: grad_out (+grad_h), h (saved; x for layer_norm) and w read; grad_x, grad_r (once
    when they alias), grad_w, grad_b written. Per-row statistics (M floats) are ignored."""
    kind, has_res, prenorm = OPS[op]
    s = torch.empty((), dtype=dtype).element_size()
    ws = torch.empty((), dtype=wdtype or dtype).element_size()
    hs = torch.empty((), dtype=hdtype or dtype).element_size()
    MN = M * N
    nparam = 2 if kind == "ln" else 1
    fwd = MN * s * (2 if has_res else 1) + N * ws * nparam + MN * s + (MN * hs if prenorm else 0)
    bwd = (MN * s + (MN * hs if prenorm else 0) + MN * hs + N * ws
           + MN * s * (2 if has_res and not grads_alias else 1) + N * ws * nparam)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def capture_cuda_graph(step: Callable, k: int = 1):
    """k calls of step captured in one CUDA graph, after three warm-up calls on a side
    stream (allocations and lazy initialization happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(k):
            step()
    return graph


def saved_bytes(step: Callable, exclude: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during one call of step, but for those
    of the tensors in exclude (a model's parameters and its input, which a step does not
    allocate): the activations the step keeps for backward (the CPU's memory measure)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def step_memory_bytes(step: Callable, cuda: bool, exclude: Sequence[torch.Tensor]) -> int:
    """Memory of one training step: on CUDA the peak of torch.cuda.max_memory_allocated
    above what was allocated before the step; on the CPU saved_bytes(step, exclude)."""
    if not cuda:
        return saved_bytes(step, exclude)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class Clock:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) * 1e-3
        return b - a

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int = 256, reps: Optional[int] = None) -> dict:
    """Median bandwidth of ``dst.copy_(src)`` on a ~mib MiB fp32 tensor; bytes = read + written."""
    n = (mib << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    clock = Clock(device)
    reps = reps or (30 if device == "cuda" else 10)
    for _ in range(3):
        dst.copy_(src)
    clock.sync()
    times = []
    for _ in range(reps):
        a = clock.mark()
        dst.copy_(src)
        b = clock.mark()
        clock.sync()
        times.append(clock.elapsed(a, b))
    med = statistics.median(times)
    del src, dst
    return {"mib": mib, "bytes": 2 * n * 4, "median_s": med, "gbps": 2 * n * 4 / med / 1e9, "reps": reps}


class _Flusher:
    """Evicts the caches between repetitions by writing a buffer larger than them."""

    def __init__(self, device: str, enabled: bool):
        self.buf = None
        if not enabled:
            return
        nbytes = (256 << 20) if device == "cuda" else max(64 << 20, 2 * l3_cache_bytes())
        self.nbytes = nbytes
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        self.buf.zero_()

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


class BenchConfig:
    def __init__(self, device="cpu", modes=MODES, repeat=None, warmup=None, target_s=None,
                 min_reps=None, max_reps=None, compile="static", liger=True, flush=True,
                 fwd_grad=True, seed=0, grad_from_op=False):
        cuda = device == "cuda"
        self.device = device
        self.modes = list(modes)
        self.repeat = repeat
        self.warmup = warmup if warmup is not None else (5 if cuda else 1)
        self.target_s = target_s if target_s is not None else (0.3 if cuda else 1.0)
        # (the CPU's largest shapes fill target_s in a few repetitions: at least 5 of them)
        self.min_reps = min_reps if min_reps is not None else (10 if cuda else 5)
        self.max_reps = max_reps if max_reps is not None else (200 if cuda else 30)
        self.compile = compile          # "static" | "dynamic-m" | "none"
        self.liger = liger and cuda
        self.flush = flush
        self.fwd_grad = fwd_grad        # fwd mode with inputs requiring grad (training forward)
        self.seed = seed
        # backward of sum((out * g).sum()): the gradients reach the norm from mul's backward,
        # tensors only autograd holds (as a model's do), not the caller's g itself
        self.grad_from_op = grad_from_op

    def as_dict(self):
        return dict(self.__dict__)


def _setup_dynamo():
    import torch._dynamo as dynamo

    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, key):
            try:
                setattr(dynamo.config, key, 1024)
            except Exception:
                pass
    if hasattr(dynamo.config, "automatic_dynamic_shapes"):
        dynamo.config.automatic_dynamic_shapes = False


SPOT_CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2.0 ** -6,
                  torch.float16: 2.0 ** -8}


def bench_group(op: str, dtype, M: int, N: int, cfg: BenchConfig, flusher: _Flusher,
                compile_cache: dict) -> dict:
    """Times every implementation for one (op, dtype, shape); all requested modes at once."""
    kind, has_res, prenorm = OPS[op]
    dev = cfg.device
    need_bwd = any(m in ("bwd", "fwdbwd") for m in cfg.modes)
    req_grad = need_bwd or cfg.fwd_grad
    eps = 1e-5 if kind == "ln" else None
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 7919 * M + N)
    x = torch.randn(M, N, device=dev, dtype=dtype, generator=gen)
    r = torch.randn(M, N, device=dev, dtype=dtype, generator=gen) if has_res else None
    w = (1 + 0.1 * torch.randn(N, device=dev, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(N, device=dev, generator=gen)).to(dtype) if kind == "ln" else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(req_grad)
    grads = []
    if need_bwd:
        grads.append(torch.randn(M, N, device=dev, dtype=dtype, generator=gen))
        if prenorm:
            grads.append(torch.randn(M, N, device=dev, dtype=dtype, generator=gen))

    impls: List[Impl] = [Impl("addnorm", _addnorm_fn(op, N, eps)), Impl("eager", _as_tuple(_eager_fn(op, N, eps)))]
    compile_time = None
    if cfg.compile != "none":
        import torch._dynamo as dynamo

        key = (op, dtype, N) if cfg.compile == "dynamic-m" else (op, dtype, M, N)
        if compile_cache.get("key") != key:
            dynamo.reset()
            compile_cache["key"] = key
            compile_cache["fn"] = _as_tuple(torch.compile(_eager_fn(op, N, eps), dynamic=False if cfg.compile == "static" else None))
            compile_cache["fresh"] = True
        else:
            compile_cache["fresh"] = False
        if cfg.compile == "dynamic-m":
            for t in (x, r):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        impls.append(Impl("compile", compile_cache["fn"]))
    if cfg.liger:
        li = _liger_impl(op, N, eps, w.detach(), b.detach() if b is not None else None)
        if li is not None:
            impls.append(li)

    clock = Clock(dev)
    samples = {im.name: {m: [] for m in MODES} for im in impls}
    first_call = {}
    errors = {}
    check = {}

    def run(im: Impl, keep=False):
        gs = [g.clone() for g in grads] if im.clone_grads else grads
        outs = None
        try:
            clock.sync()
            flusher()
            m0 = clock.mark()
            outs = im.fn(x, r, w, b)
            m1 = m1f = clock.mark()
            m2 = None
            kept = outs[0].detach() if keep else None
            if need_bwd:
                # (the forward of mul and sum is not timed; their backward is)
                loss = sum((o * g).sum() for o, g in zip(outs, gs)) if cfg.grad_from_op else None
                if clock.cuda:
                    # The GPU is idle by now: flush first, so that it is still busy while the
                    # host runs autograd and enqueues the backward (the marks then bracket
                    # GPU time, not host time).
                    clock.sync()
                    flusher()
                    m1 = clock.mark()
                elif loss is not None:
                    m1 = clock.mark()
                if loss is not None:
                    loss.backward()
                else:
                    torch.autograd.backward(outs, gs[: len(outs)])
                m2 = clock.mark()
            clock.sync()
        finally:
            del outs, gs
            for t in leaves:
                t.grad = None
            for p in im.params:
                p.grad = None
        t_f = clock.elapsed(m0, m1f)
        t_b = clock.elapsed(m1, m2) if m2 is not None else None
        return t_f, t_b, kept

    def fail(im: Impl, e: Exception):
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        errors[im.name] = f"{type(e).__name__}: {msg}"
        if im in alive:
            alive.remove(im)
        if dev == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:
                pass

    def record(im, t_f, t_b):
        s = samples[im.name]
        s["fwd"].append(t_f)
        if t_b is not None:
            s["bwd"].append(t_b)
            s["fwdbwd"].append(t_f + t_b)

    # first call (compilation for torch.compile) and correctness spot check vs eager
    ref = None
    alive = []
    for im in impls:
        try:
            t0 = time.perf_counter()
            t_f, t_b, kept = run(im, keep=True)
            first_call[im.name] = time.perf_counter() - t0
            if im.name == "eager":
                ref = kept
            elif im.name == "addnorm":
                check["addnorm_out"] = kept
            alive.append(im)
        except Exception as e:
            fail(im, e)
    if ref is not None and "addnorm_out" in check and not op.startswith("dropout"):  # (masks differ)
        a = check.pop("addnorm_out")
        d = (a.float() - ref.float()).abs().max().item() if a.numel() else 0.0
        check["max_abs_diff_vs_eager"] = d
        # (a few units of the dtype's rounding of the largest output: a wrong kernel is far off)
        tol = SPOT_CHECK_TOL.get(dtype, 1e-4) * max(1.0, ref.float().abs().max().item() if ref.numel() else 0.0)
        if not d <= tol:
            errors["spot_check"] = f"max |addnorm - eager| of the output {d:.3g} above {tol:.3g}"
        del a
    check.pop("addnorm_out", None)
    del ref
    if compile_time is None and "compile" in first_call:
        compile_time = first_call["compile"]

    # warm-up; the last warm-up round also sizes the number of repetitions. On the CPU, when
    # one round already takes longer than the target, the first calls were warm-up enough
    # for everything but the freshly compiled function.
    est_round = sum(v for k, v in first_call.items() if k != "compile")
    if "compile" in first_call:
        est_round += first_call.get("eager", 0.0)
    warm_impls = list(alive)
    warmup = cfg.warmup
    if dev != "cuda" and est_round > cfg.target_s:
        warm_impls = [im for im in alive if im.name == "compile"]
        warmup = min(warmup, 1)
    round_s = est_round
    for i in range(warmup):
        this_round = 0.0
        for im in warm_impls:
            if im not in alive:
                continue
            try:
                t_f, t_b, _ = run(im)
                this_round += t_f + (t_b or 0.0)
            except Exception as e:
                fail(im, e)
        if len(warm_impls) == len(alive):
            round_s = this_round
    if cfg.repeat:
        reps = cfg.repeat
    else:
        reps = int(min(cfg.max_reps, max(cfg.min_reps, math.ceil(cfg.target_s / max(round_s, 1e-9)))))
    for rep in range(reps):
        k = rep % max(1, len(alive))
        for im in alive[k:] + alive[:k]:
            try:
                t_f, t_b, _ = run(im)
                record(im, t_f, t_b)
            except Exception as e:
                fail(im, e)
    hdtype = dtype
    grads_alias = grads_aliased(op)
    res = {
        "op": op, "dtype": DTYPE_NAME[dtype], "M": M, "N": N, "reps": reps,
        "first_call_s": first_call, "compile_s": compile_time,
        "compile_fresh": compile_cache.get("fresh") if cfg.compile != "none" else None,
        "errors": errors, **check, "modes": {},
    }
    nbytes = minimal_bytes(op, M, N, dtype, dtype, hdtype, grads_alias)
    for m in cfg.modes:
        entry = {"bytes": nbytes[m], "impls": {}}
        for name, s in samples.items():
            ts = sorted(s[m])
            if not ts:
                continue
            med = statistics.median(ts)
            entry["impls"][name] = {
                "median_s": med,
                "min_s": ts[0],
                "p20_s": ts[int(0.2 * (len(ts) - 1))],
                "p80_s": ts[int(math.ceil(0.8 * (len(ts) - 1)))],
                "n": len(ts),
                "gbps": nbytes[m] / med / 1e9 if med > 0 else None,
            }
        res["modes"][m] = entry
    del x, r, w, b, leaves, grads, impls, alive
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


def predict_group_seconds(op, dtype, M, N, cfg: BenchConfig, copy_gbps: float, n_impls: int,
                          fresh_compile: bool) -> float:
    """A rough cost model, used only for the up-front estimate and the progress ETA."""
    cuda = cfg.device == "cuda"
    need_bwd = any(m in ("bwd", "fwdbwd") for m in cfg.modes)
    b = minimal_bytes(op, M, N, dtype)
    ideal = (b["fwdbwd"] if need_bwd else b["fwd"]) / (copy_gbps * 1e9)
    # multiples of the ideal byte time, measured on a 2-core EPYC (fresh-output page faults
    # dominate; torch's eager CPU rms_norm is a chain of elementwise ops); GPUs: ~2x
    if cuda:
        factors = [2.0] * n_impls
    else:
        eager = 7.0 if OPS[op][0] == "ln" else (30.0 if dtype != torch.float32 else 12.0)
        factors = [5.0, eager] + [7.0] * (n_impls - 2)
    launch = (3 if need_bwd else 1) * (15e-6 if cuda else 30e-6)
    flush = (0.1e-3 if cuda else 3e-3) if cfg.flush else 0.0
    round_s = sum(f * ideal + launch + flush for f in factors)
    reps = cfg.repeat or min(cfg.max_reps, max(cfg.min_reps, math.ceil(cfg.target_s / max(round_s, 1e-9))))
    warm = cfg.warmup if (cuda or round_s <= cfg.target_s) else (1.0 / n_impls)
    t = (reps + warm + 1) * round_s + (0.05 if cuda else 0.02)
    if cfg.compile != "none" and fresh_compile:
        t += (4.0 if cuda else 2.5) * (1.6 if need_bwd else 1.0)
    return t


def plan_sweep(ops, dtypes, shapes, cfg: BenchConfig, copy_gbps: float):
    """The (op, dtype, M, N) groups in run order (N-major so that "dynamic-m" compiles can be
    reused across M), their predicted costs in seconds, and the number of implementations."""
    groups = [(op, dt, M, N) for op in ops for dt in dtypes for (N, M) in sorted((n, m) for m, n in shapes)]
    n_impls = 2 + (cfg.compile != "none") + (1 if (cfg.liger and liger_available()) else 0)
    weights = []
    prev = None
    for op, dt, M, N in groups:
        key = (op, dt, N) if cfg.compile == "dynamic-m" else (op, dt, M, N)
        weights.append(predict_group_seconds(op, DTYPES[dt], M, N, cfg, copy_gbps, n_impls, key != prev))
        prev = key
    if weights and cfg.compile != "none":
        weights[0] += 10.0 if cfg.device == "cpu" else 15.0   # first compilation in the process
    return groups, weights, n_impls


def run_sweep(ops: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Tuple[int, int]],
              cfg: BenchConfig, copy_bw: Optional[dict] = None, progress: bool = True,
              estimate_stream=None) -> dict:
    """Measures the copy bandwidth, then every (op, dtype, shape) group; returns a dict with
    ``copy_bandwidth``, ``results`` (one row per op/dtype/shape/mode) and timing totals."""
    t_start = time.perf_counter()
    dev = cfg.device
    if cfg.compile != "none":
        _setup_dynamo()
    if copy_bw is None:
        copy_bw = copy_bandwidth(dev)
    groups, weights, n_impls = plan_sweep(ops, dtypes, shapes, cfg, copy_bw["gbps"])
    est = sum(weights)
    if estimate_stream is not None:
        estimate_stream.write(
            f"copy bandwidth: {copy_bw['gbps']:.1f} GB/s; {len(groups)} groups x "
            f"{len(cfg.modes)} modes x {n_impls} implementations; estimated time ~{fmt_duration(est)}\n")
        estimate_stream.flush()
    bar = Progress(len(groups), weights, enabled=progress)
    compile_cache: dict = {}
    flusher = _Flusher(dev, cfg.flush)
    rows = []
    group_results = []
    for op, dt, M, N in groups:
        bar.step(f"{op} {dt} {M}x{N} {','.join(MODE_LABEL[m] for m in cfg.modes)}")
        try:
            g = bench_group(op, DTYPES[dt], M, N, cfg, flusher, compile_cache)
        except Exception as e:  # e.g. out of memory while creating the inputs
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            sys.stderr.write(f"\n{op} {dt} {M}x{N}: skipped ({msg})\n")
            g = {"op": op, "dtype": dt, "M": M, "N": N, "reps": 0, "first_call_s": {},
                 "errors": {"setup": msg}, "modes": {}}
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        group_results.append(g)
        for m, entry in g["modes"].items():
            row = {k: g[k] for k in ("op", "dtype", "M", "N", "reps")}
            row["mode"] = m
            row["bytes"] = entry["bytes"]
            row["impls"] = entry["impls"]
            a = entry["impls"].get("addnorm")
            row["speedup"] = {}
            if a:
                for name, v in entry["impls"].items():
                    if name != "addnorm":
                        row["speedup"][name] = v["median_s"] / a["median_s"] if a["median_s"] > 0 else None
                row["addnorm_gbps"] = a["gbps"]
                row["addnorm_frac_copy"] = a["gbps"] / copy_bw["gbps"] if a["gbps"] else None
            row["errors"] = g["errors"]
            row["max_abs_diff_vs_eager"] = g.get("max_abs_diff_vs_eager")
            row["compile_first_call_s"] = g["first_call_s"].get("compile")
            rows.append(row)
    bar.done()
    del flusher
    gc.collect()
    return {
        "copy_bandwidth": copy_bw,
        "results": rows,
        "estimated_s": est,
        "elapsed_s": time.perf_counter() - t_start,
        "config": {**cfg.as_dict(), "ops": list(ops), "dtypes": list(dtypes),
                   "shapes": [f"{m}x{n}" for m, n in shapes]},
    }


def geomean(vals):
    vals = [v for v in vals if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def table_rows(sweep: dict) -> Tuple[List[str], List[List[str]]]:
    rows = sweep["results"]
    others = [n for n in IMPL_ORDER[1:] if any(n in r["impls"] for r in rows)]
    header = (["op", "dtype", "MxN", "mode", "addnorm"] + others
              + [f"x vs {n}" for n in others] + ["addnorm GB/s", "% of copy"])
    out = []
    for r in rows:
        a = r["impls"].get("addnorm")
        line = [r["op"], r["dtype"], f"{r['M']}x{r['N']}", MODE_LABEL[r["mode"]],
                fmt_time(a["median_s"]) if a else "err"]
        for n in others:
            v = r["impls"].get(n)
            line.append(fmt_time(v["median_s"]) if v else ("err" if n in r["errors"] else "-"))
        for n in others:
            s = r["speedup"].get(n)
            line.append(f"{s:.2f}x" if s else "-")
        line.append(f"{r['addnorm_gbps']:.1f}" if r.get("addnorm_gbps") else "-")
        line.append(f"{100 * r['addnorm_frac_copy']:.0f}%" if r.get("addnorm_frac_copy") else "-")
        out.append(line)
    return header, out


def summary_lines(sweep: dict) -> List[str]:
    rows = sweep["results"]
    lines = []
    others = [n for n in IMPL_ORDER[1:] if any(n in r["impls"] for r in rows)]
    for m in MODES:
        sel = [r for r in rows if r["mode"] == m]
        if not sel:
            continue
        parts = []
        for n in others:
            g = geomean([r["speedup"].get(n) for r in sel])
            if g:
                parts.append(f"{g:.2f}x vs {n}")
        fr = [r["addnorm_frac_copy"] for r in sel if r.get("addnorm_frac_copy")]
        if fr:
            parts.append(f"median {100 * statistics.median(fr):.0f}% of copy bandwidth")
        lines.append(f"{MODE_LABEL[m]:>7}: addnorm geomean speedup " + ", ".join(parts))
    return lines


def format_text_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def format_md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def quick_bench(device: str, compile: bool = True, stream=None) -> dict:
    """The short benchmark of the main job (main.py)."""
    stream = stream or sys.stdout
    if device == "cuda":
        shapes = [(4096, 1024), (16384, 4096)]
        cfg = BenchConfig(device, modes=("fwd", "fwdbwd"), compile="static" if compile else "none",
                          target_s=0.1, min_reps=10, max_reps=100, warmup=3)
    else:
        shapes = [(4096, 768), (4096, 4096)]
        cfg = BenchConfig(device, modes=("fwd", "fwdbwd"), compile="static" if compile else "none",
                          target_s=0.25, min_reps=3, max_reps=10, warmup=1)
    ops = ("add_layer_norm", "add_rms_norm")
    sweep = run_sweep(ops, ("fp32", "bf16"), shapes, cfg, estimate_stream=sys.stderr)
    header, rows = table_rows(sweep)
    stream.write(format_text_table(header, rows) + "\n")
    for line in summary_lines(sweep):
        stream.write(line + "\n")
    errs = {(r["op"], r["dtype"], r["M"], r["N"]): r["errors"] for r in sweep["results"] if r["errors"]}
    for k, e in errs.items():
        stream.write(f"errors in {k}: {e}\n")
    stream.flush()
    return sweep
