"""TopK encode: the Triton selection by cutoff (``fastsae.kernels.encode.topk_encode``) and the
torch backend, whose CPU GEMM runs in fp32 or in bf16 (then selection by cutoff, survivors
rescored in fp32; ``torch-bf16`` and ``torch-fp32`` side by side in one run).

All compute ``top-k(relu((x - b_dec) W_enc^T + b_enc))`` per row. The dense torch path writes the
N x d_sae pre-activation (4.3 GB bf16 at the "full" shape) and reads it back for the top-k; the
cutoff paths keep only the survivors. Time comes from pytest-benchmark (synchronized on a GPU);
peak memory allocated during one call goes to ``benchmark.extra_info["peak_bytes"]``, survivors
per row to ``candidates_per_row``; ``test_cpu_bf16_time_split`` splits the bf16 encode into
GEMM, selection and rescoring.

* "full": d_in 4096, d_sae 131072, k 64, N 16384, bf16 (GPU).
* "ci": the torch path at N 2048, d_in 384, d_sae 6144, k 32 (fp32, CPU); the Triton kernel,
  interpreted on CPU, only at a tiny shape (correctness of the harness, not speed).

Run: ``python -m pytest bench/test_bench_topk_encode.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import time

import pytest
import torch

from bench.common import DEVICE, MAIN_SHAPE, ON_GPU, SIZE, peak_memory, synchronized, triton_kernels
from fastsae import torch_backend

triton_backend = triton_kernels("encode")

MAIN = MAIN_SHAPE
# The interpreter runs well under 100 MFLOP/s: this shape keeps one call around a second.
TINY = {"N": 32, "d": 32, "m": 512, "k": 8, "dtype": torch.float32}

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
    names = ["torch"] if ON_GPU else ["torch-fp32", "torch-bf16"]
    if triton_backend is not None and (ON_GPU or case == "tiny"):
        names.append("triton")
    return names


PARAMS = [(case, s, backend, aux) for case, s in CASES for backend in _backends(case) for aux in AUX]


@pytest.mark.parametrize("case,s,backend,aux", PARAMS,
                         ids=[f"{c}-{b}-{'auxk' if a else 'plain'}" for c, _, b, a in PARAMS])
def test_topk_encode(benchmark, monkeypatch, case, s, backend, aux):
    args = _problem(s, aux)
    fn = (triton_backend if backend == "triton" else torch_backend).topk_encode
    if backend.startswith("torch-"):
        monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", backend.removeprefix("torch-"))
    torch_backend.reset_selection_counts()
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
    stats = torch_backend.SURVIVORS
    if stats["rows"]:
        benchmark.extra_info["candidates_per_row"] = round(stats["survivors"] / stats["rows"], 1)
        benchmark.extra_info["signed_row_fraction"] = stats["signed_rows"] / (stats["rows"] + stats["hard_rows"])
        benchmark.extra_info["undecided_row_fraction"] = stats["hard_rows"] / (stats["rows"] + stats["hard_rows"])
    if backend == "triton" and ON_GPU and SIZE == "full":
        # Same winners as torch, up to near-ties reordered by accumulation order.
        ref = torch_backend.topk_encode(*args)
        agree = (torch.sort(result[1], 1).values == torch.sort(ref[1], 1).values).float().mean().item()
        benchmark.extra_info["index_agreement_vs_torch"] = agree


@pytest.mark.skipif(ON_GPU, reason="the CPU bf16 path")
def test_cpu_bf16_time_split(benchmark):
    """The bf16 encode of the main shape, split into its GEMM (in the row blocks it runs in),
    the selection (cut, survivors, top-k among them) and the fp32 rescoring."""
    x, W, b, b_dec, k, _, _ = _problem(MAIN, aux=False)
    lp = torch_backend.LowPrecisionWeights(W, b)
    blocks = torch_backend.bf16_row_blocks(x, W.shape[0])
    xc = (x - b_dec).contiguous()
    xc16 = xc.to(torch.bfloat16)
    rows, cols = torch_backend._topk_bf16_survivors(x, W, b, b_dec, k, lp, blocks)[:2]

    def gemm():
        for r in blocks:
            torch_backend._ONEDNN_LINEAR(xc16[r], lp.W, lp.b, "relu", [], "")

    def rescore():
        torch_backend._rescore(xc, W, b, rows, cols)

    def whole():
        torch_backend.topk_encode(x, W, b, b_dec, k, low_precision=lp)

    times = {}
    for name, fn in (("gemm", gemm), ("rescoring", rescore), ("whole", whole)):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        times[name] = (time.perf_counter() - start) / 3 * 1e3
    times["selection"] = times["whole"] - times["gemm"] - times["rescoring"]
    benchmark.extra_info.update({f"{name}_ms": round(t, 2) for name, t in times.items()},
                                candidates_per_row=round(rows.numel() / x.shape[0], 1), shape=_label(MAIN))
    benchmark.group = f"topk_encode-split-{_label(MAIN)}"
    benchmark.pedantic(whole, rounds=3, iterations=1)


@pytest.mark.skipif(ON_GPU, reason="the CPU bf16 path")
@pytest.mark.parametrize("bias_shift", [-2.2, -2.4])
def test_cpu_bf16_sparse_positive_rows(benchmark, monkeypatch, bias_shift):
    """The main shape with every encoder bias lowered, as training lowers them: about 1.4%
    (-2.2) or 0.8% (-2.4) of the entries positive, so that many rows' group maxima decide
    nothing; those rows are cut from their own k-th value or, within the error of 0, by the
    signed GEMM. Reports the rows each way and the fp32 GEMM's time on the same call."""
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    x, W, b, b_dec, k, _, _ = _problem(MAIN, aux=False)
    b = b + bias_shift
    lp = torch_backend.LowPrecisionWeights(W, b)
    torch_backend.reset_selection_counts()
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k, low_precision=lp)
    stats = dict(torch_backend.SURVIVORS)
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp32")
    start = time.perf_counter()
    fp32_values, fp32_indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    fp32_ms = (time.perf_counter() - start) * 1e3
    assert torch.equal(indices, fp32_indices)
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    benchmark.extra_info.update(
        shape=_label(MAIN), bias_shift=bias_shift, fp32_gemm_ms=round(fp32_ms, 1),
        positive_entry_fraction=round(float(((x[:64] - b_dec) @ W.t() + b > 0).float().mean()), 4),
        group_undecided_row_fraction=stats["own_kth_rows"] / x.shape[0],
        signed_row_fraction=stats["signed_rows"] / x.shape[0], undecided_row_fraction=stats["hard_rows"] / x.shape[0],
        candidates_per_row=round(stats["survivors"] / max(1, stats["rows"]), 1))
    benchmark.group = f"topk_encode-sparse-positives-{_label(MAIN)}"
    benchmark.pedantic(lambda: torch_backend.topk_encode(x, W, b, b_dec, k, low_precision=lp), rounds=3, iterations=1)
