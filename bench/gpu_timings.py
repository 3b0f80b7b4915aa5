"""Target-shape timings for the GPU run: each Triton op against torch in the same dtype.

Cases (the roofline shape of KERNEL_NOTES: N 16384, d_in 4096, d_sae 131072, k 64, bf16):
TopK encode (Triton selection by cutoff vs torch bf16 addmm + relu + topk), TopK with AuxK at
1% and 30% dead (k_aux 2048), sparse decode forward + backward vs dense, ReLU threshold encode.
Each case is timed with triton.testing.do_bench (CUDA events, L2 flushed) and written to
OUT/timing-<case>.json as soon as it finishes, with peak memory beyond the inputs, compile
(first call) time and the ratio to torch. ``--tiny`` runs the plumbing on CPU under the
interpreter with the host clock (the dry run).

    python -m bench.gpu_timings --out DIR [--tiny]
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from fastsae import ops
from fastsae.kernels import sparse_matmul

TARGET = dict(N=16384, d=4096, m=131072, k=64, dtype=torch.bfloat16)
TINY = dict(N=16, d=16, m=600, k=4, dtype=torch.float32)


def _timer(fn, on_gpu):
    if on_gpu:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=50)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _peak(fn, on_gpu):
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _problem(s, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(s["N"], s["d"], generator=g).to(device, s["dtype"])
    W = (torch.randn(s["m"], s["d"], generator=g) / s["d"] ** 0.5).to(device, s["dtype"])
    b = (0.1 * torch.randn(s["m"], generator=g)).to(device, s["dtype"])
    b_dec = (0.1 * torch.randn(s["d"], generator=g)).to(device, s["dtype"])
    return x, W, b, b_dec


def cases(s, device):
    x, W, b, b_dec = _problem(s, device)
    k = s["k"]

    def torch_topk():
        pre = torch.relu(torch.addmm(b, x - b_dec, W.t()))
        return torch.topk(pre, k, dim=1)

    yield "topk_encode", lambda: ops.topk_encode(x, W, b, k, b_dec, backend="triton"), torch_topk
    for dead_fraction in (0.01, 0.30):
        dead = torch.rand(s["m"], generator=torch.Generator().manual_seed(1)) < dead_fraction
        dead = dead.to(device)
        k_aux = min(2048, s["m"])

        def torch_aux(dead=dead, k_aux=k_aux):
            pre = torch.relu(torch.addmm(b, x - b_dec, W.t()))
            return torch.topk(pre, k, dim=1), torch.topk(pre.masked_fill(~dead, -1), min(k_aux, s["m"]), dim=1)

        yield (f"topk_auxk_dead{int(dead_fraction * 100)}",
               lambda dead=dead, k_aux=k_aux: ops.topk_encode_aux(x, W, b, k, b_dec, dead, k_aux, backend="triton"),
               torch_aux)
    values, indices = torch.rand(s["N"], k, device=device, dtype=s["dtype"]), torch.randint(
        0, s["m"], (s["N"], k), device=device)
    W_dec = W.clone().requires_grad_()
    values.requires_grad_()

    # The same indices every call: forget their grouping, as a train step's new code would.
    def sparse_decode(indices=indices):
        sparse_matmul._last_grouping = None
        ops.sparse_decode(values, indices, W_dec, b_dec, backend="triton").sum().backward()

    def dense_decode(indices=indices):
        dense = torch.zeros(s["N"], s["m"], device=device, dtype=s["dtype"]).scatter(1, indices, values)
        (dense @ W_dec + b_dec).sum().backward()

    yield "decode_fwd_bwd", sparse_decode, dense_decode
    # One hot latent in every row (N entries on latent 0): its weight gradient is reduced in
    # pieces of SCATTER_CHUNK entries, not by one program.
    hot = indices.clone()
    hot[:, 0] = 0
    hot[:, 1:][hot[:, 1:] == 0] = 1
    yield "decode_fwd_bwd_hot_latent", lambda: sparse_decode(hot), lambda: dense_decode(hot)
    cut = torch.full((s["m"],), 0.5, device=device, dtype=s["dtype"])

    def torch_threshold():
        pre = torch.addmm(b, x - b_dec, W.t())
        return (pre > cut).nonzero()

    yield "threshold_encode", lambda: ops.threshold_encode(x, W, b, cut, b_dec, backend="triton"), torch_threshold


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = "cuda" if on_gpu else "cpu"
    s = TINY if args.tiny else TARGET
    failed = 0
    for name, ours, baseline in cases(s, device):
        row = {"case": name, "shape": {k: str(v) for k, v in s.items()},
               "gpu": torch.cuda.get_device_name(0) if on_gpu else None}
        try:
            start = time.perf_counter()
            ours()  # the first call compiles and autotunes
            if on_gpu:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - start, 2)
            row["fastsae_ms"] = _timer(ours, on_gpu)
            row["fastsae_peak_bytes"] = _peak(ours, on_gpu)
            row["torch_ms"] = _timer(baseline, on_gpu)
            row["torch_peak_bytes"] = _peak(baseline, on_gpu)
            row["speedup_vs_torch"] = row["torch_ms"] / row["fastsae_ms"]
        except Exception as e:  # recorded; the next case still runs
            failed += 1
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
            if on_gpu:
                torch.cuda.empty_cache()
        (args.out / f"timing-{name}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
