"""Shared helpers for the benchmark suite.

FASTSAE_BENCH_SIZE selects the shapes: "ci" (small, runs on 2 CPU cores in minutes, Triton
kernels under the interpreter) or "full" (the roofline shapes, meant for a GPU).
"""
import importlib
import os
import time

import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SIZE = os.environ.get("FASTSAE_BENCH_SIZE", "ci")
if SIZE not in ("ci", "full"):
    raise ValueError(f"FASTSAE_BENCH_SIZE must be 'ci' or 'full', got {SIZE!r}")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def shapes(ci: dict, full: dict) -> dict:
    """Pick the shape set for the current size."""
    return full if SIZE == "full" else ci


# The roofline problem (../shared/KERNEL_NOTES.md) at "full"; a CPU-sized one at "ci".
MAIN_SHAPE = shapes(
    ci={"N": 2048, "d": 384, "m": 6144, "k": 32, "dtype": torch.float32},
    full={"N": 16384, "d": 4096, "m": 131072, "k": 64, "dtype": torch.bfloat16},
)


def triton_kernels(module: str):
    """``fastsae.kernels.<module>``, or None where Triton cannot be used on this platform."""
    try:
        return importlib.import_module(f"fastsae.kernels.{module}")
    except Exception:  # no usable Triton here: the benches fall back to the other backends
        return None


def synchronized(fn):
    """Wrap fn so the host clock that pytest-benchmark reads includes the GPU work."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if ON_GPU:
            torch.cuda.synchronize()
        return out
    return run


def peak_memory(fn, *args, **kwargs):
    """Peak bytes allocated while fn runs: the CUDA allocator's peak on a GPU; on CPU, a running
    sum of the net allocations of torch's top-level ops, from the profiler."""
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kwargs)
    return _peak_from_events(prof.events())


def _peak_from_events(events):
    current = peak = 0
    # Only top-level ops: a parent's figure already includes its children's allocations.
    for ev in sorted((e for e in events if getattr(e, "cpu_memory_usage", 0) and e.cpu_parent is None),
                     key=lambda e: e.time_range.start):
        current += ev.cpu_memory_usage
        peak = max(peak, current)
    return peak


def alternated_times(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per step of each library, one step of each per round (after one warm-up):
    a machine whose speed drifts slows every library alike, so ratios of these hold."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times
