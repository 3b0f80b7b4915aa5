"""Peak memory of ``fastsae train --stream`` at two token budgets 10x apart, on the embedded
all-MiniLM-L6-v2: three layers' SAEs trained in lockstep from one forward pass per batch,
nothing written to disk but the SAEs.

Each run is a fresh process; its peak resident set (``VmHWM``) is the figure. The
stream holds one shuffle window (``--stream-window`` rows of the three hook points) whatever
the budget, plus its first 8,192 rows (the SAEs' initialisation sample, kept to start every
epoch), so the peaks should match once both budgets exceed that sample (below it the model
never runs during training); validation is off (``--val-split 0``: held-out rows are kept
in memory and grow with the budget up to 65,536 rows).

Budget: the 10x run's peak at most 1.15x the small run's; the benchmark fails above it.

Run: ``python -m pytest bench/test_bench_stream.py -q``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import shapes

CASE = shapes(ci={"tokens": 16_384}, full={"tokens": 65_536})
BUDGET = 1.15  # peak RSS at 10x the tokens / peak RSS at 1x
REPO = Path(__file__).resolve().parents[1]
# Run fastsae train in this process and report its peak resident set (KiB) on the last line. Not
# ru_maxrss: Linux carries it across exec, so a child spawned by a large parent (pytest after the
# other benchmarks: 2.5 GiB) reports the parent's peak, and both runs read the same figure.
# VmHWM belongs to the process's own address space, made new at exec.
CHILD = ("import json, sys; from fastsae.cli import main; rc = main(sys.argv[1:]); "
         "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')]; "
         "print(json.dumps({'rc': rc, 'peak_kib': int(hwm[0])}))")


def _peak_mib(tokens: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        args = ["train", "--layers", "1,3,5", "--stream", "--stream-window", "4096", "--num-tokens", str(tokens),
                "--batch-size", "1024", "--num-epochs", "1", "--expansion-factor", "1", "--k", "16",
                "--val-split", "0", "--context-length", "128", "--device", "cpu", "--quiet", "--output-dir", out]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["rc"] == 0, done.stderr[-2000:]
        assert not any(Path(out).glob("*/activations"))  # nothing collected to disk
        return result["peak_kib"] / 1024


def test_stream_peak_memory_does_not_grow_with_the_tokens(benchmark):
    benchmark.group = f"stream-3-hooks-{CASE['tokens']}-tokens"
    small = _peak_mib(CASE["tokens"])
    large = benchmark.pedantic(_peak_mib, args=(10 * CASE["tokens"],), rounds=1, iterations=1)
    ratio = large / small
    benchmark.extra_info.update(tokens=[CASE["tokens"], 10 * CASE["tokens"]], peak_mib=[round(small, 1),
                                round(large, 1)], ratio=round(ratio, 3), budget=BUDGET)
    print(f"\n--stream, 3 hook points: peak RSS {small:.0f} MiB at {CASE['tokens']} tokens, {large:.0f} MiB at "
          f"{10 * CASE['tokens']} ({ratio:.3f}x; budget {BUDGET}x)")
    assert ratio <= BUDGET, f"peak RSS grew {ratio:.2f}x with 10x the tokens (budget {BUDGET}x)"
