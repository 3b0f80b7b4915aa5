"""Fused TopK encode (``fastsae.kernels.topk_encode``) vs the torch path (addmm + relu + topk).

Both compute ``top-k(relu((x - b_dec) W_enc^T + b_enc))`` per row. The torch path writes the
N x d_sae pre-activation (4.3 GB bf16 at the "full" shape) and reads it back for the top-k; the
fused kernel keeps it in registers. Time comes from pytest-benchmark (synchronized on a GPU);
peak memory allocated during one call goes to ``benchmark.extra_info["peak_bytes"]``.

* "full": d_in 4096, d_sae 131072, k 64, N 16384, bf16 (GPU).
* "ci": the torch path at N 2048, d_in 384, d_sae 6144, k 32 (fp32, CPU); the Triton kernel,
  interpreted on CPU, only at a tiny shape (correctness of the harness, not speed).

Run: ``python -m pytest bench/test_bench_topk_encode.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import pytest
import torch

from bench.common import DEVICE, MAIN_SHAPE, ON_GPU, SIZE, peak_memory, synchronized, triton_kernels
from fastsae import torch_backend

triton_backend = triton_kernels("topk_encode")

MAIN = MAIN_SHAPE
# The interpreter runs well under 100 MFLOP/s: this shape keeps one call around a second.
TINY = {"N": 32, "d": 32, "m": 256, "k": 8, "dtype": torch.float32}

CASES = [("main", MAIN)] + ([] if ON_GPU or SIZE == "full" else [("tiny", TINY)])
# AuxK alongside (k_aux = 2k over a dead half of the latents), as a training step calls it.
AUX = [False, True]


def _label(s):
    return f"N{s['N']}-d{s['d']}-m{s['m']}-k{s['k']}-{str(s['dtype']).removeprefix('torch.')}"


def _problem(s, aux):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n, d, m, dtype = s["N"], s["d"], s["m"], s["dtype"]
    x = torch.randn(n, d, device=DEVICE, generator=gen).to(dtype)
    W = (torch.randn(m, d, device=DEVICE, generator=gen) / d ** 0.5).to(dtype)
    b = (0.1 * torch.randn(m, device=DEVICE, generator=gen)).to(dtype)
    b_dec = (0.1 * torch.randn(d, device=DEVICE, generator=gen)).to(dtype)
    dead = (torch.rand(m, device=DEVICE, generator=gen) < 0.5) if aux else None
    return x, W, b, b_dec, s["k"], dead, 2 * s["k"] if aux else 0


def _backends(case):
    names = ["torch"]
    if triton_backend is not None and (ON_GPU or case == "tiny"):
        names.append("triton")
    return names


PARAMS = [(case, s, backend, aux) for case, s in CASES for backend in _backends(case) for aux in AUX]


@pytest.mark.parametrize("case,s,backend,aux", PARAMS,
                         ids=[f"{c}-{b}-{'auxk' if a else 'plain'}" for c, _, b, a in PARAMS])
def test_topk_encode(benchmark, case, s, backend, aux):
    args = _problem(s, aux)
    fn = (triton_backend if backend == "triton" else torch_backend).topk_encode
    if backend == "triton" and not ON_GPU:
        # One interpreted call is slow; a handful of rounds is plenty for a harness check.
        benchmark.extra_info["interpreted"] = True
    # Warm up (compile / autotune) outside the timed and the memory-measured calls.
    out = synchronized(fn)(*args)
    benchmark.group = f"topk_encode-{case}-{'auxk' if aux else 'plain'}-{_label(s)}"
    benchmark.extra_info.update(backend=backend, shape=_label(s), device=str(DEVICE),
                                gpu=torch.cuda.get_device_name(0) if ON_GPU else None)
    benchmark.extra_info["peak_bytes"] = peak_memory(fn, *args)
    rounds = dict(rounds=2, iterations=1) if (backend == "triton" and not ON_GPU) else dict(rounds=5, iterations=1)
    if SIZE == "full":
        rounds = dict(rounds=3, iterations=1)
    result = benchmark.pedantic(synchronized(fn), args=args, **rounds)
    assert result[0].shape == out[0].shape == (s["N"], s["k"])
    if backend == "triton" and ON_GPU and SIZE == "full":
        # Same winners as torch, up to near-ties reordered by accumulation order.
        ref = torch_backend.topk_encode(*args)
        agree = (torch.sort(result[1], 1).values == torch.sort(ref[1], 1).values).float().mean().item()
        benchmark.extra_info["index_agreement_vs_torch"] = agree
