"""One TopK training step, fastsae against EleutherAI sparsify, alternated in one process.

    python -m bench.train_step_compare                            # N 4096, d_in 384, d_sae 6144, k 32
    python -m bench.train_step_compare --shape 4096 768 24576 64 --rounds 4
    FASTSAE_CPU_ENCODE_GEMM=fp32 python -m bench.train_step_compare   # the fp32-GEMM fallback

Each round times one fastsae step and one sparsify step back to back (the steps of
``bench/test_bench_train.py``: fastsae's ``SAETrainer.train_step``, sparsify's SparseCoder step
with Adam as its Trainer runs it), so a shared machine's drift reaches both alike; the
minimum and the median per library and their ratios are printed with the CPU model, and each
library's median count of minor page faults per step (memory the kernel had to map and zero
for it: on a VM their cost varies from hour to hour, and the step that takes more of them
moves more). Larger shapes than the benchmark's CI size fit here (sparsify takes seconds per
step at d_sae 24576).
"""
from __future__ import annotations

import argparse
import resource
import statistics

import torch

from bench.common import alternated_times
from bench.sparsify_recipe import INSTALL_HINT, have_sparsify
from bench.test_bench_train import fastsae_step_fn, sparsify_step_fn


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "unknown CPU"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def counting_faults(step, counts: list):
    """``step``, appending the minor page faults each call takes to ``counts``."""
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[4096, 384, 6144, 32],
                        metavar=("N", "D_IN", "D_SAE", "K"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--aux", action="store_true", help="10%% of the latents dead every step (AuxK runs)")
    args = parser.parse_args(argv)
    if not have_sparsify():
        raise SystemExit(INSTALL_HINT)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    n, d, m, k = args.shape
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    faults: dict[str, list[int]] = {}
    steps = {name: counting_faults(step, faults.setdefault(name, []))
             for name, step in (("fastsae", fastsae_step_fn(x, m, k, aux=args.aux)),
                                ("sparsify", sparsify_step_fn(x, m, k, "adam", args.aux)))}
    times = alternated_times(steps, args.rounds)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; N {n}, d_in {d}, "
          f"d_sae {m}, k {k}{', AuxK on' if args.aux else ''}; {args.rounds} rounds")
    for name, t in times.items():
        print(f"{name:9s} min {min(t):9.1f} ms   median {statistics.median(t):9.1f} ms   "
              f"page faults per step {statistics.median(faults[name][1:]):,.0f}")  # [0]: the warm-up
    fast, slow = times["fastsae"], times["sparsify"]
    print(f"fastsae / sparsify: {min(slow) / min(fast):.2f}x (minima), "
          f"{statistics.median(slow) / statistics.median(fast):.2f}x (medians)")


if __name__ == "__main__":
    main()
