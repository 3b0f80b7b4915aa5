"""Compiled-kernel correctness at larger shapes, fp32 and bf16, against fastsae.reference.

Meant for a CUDA machine (bench/gpu_check.sh runs it). Each case records its largest error
and whether it is within tolerance; a crash or out-of-memory in one case is recorded and the
others still run. Exit status 1 if any case fails.

    python bench/gpu_correctness.py --out DIR [--device cuda] [--tiny]

Each case is written to DIR/correctness-<check>-<dtype>-<shape>.json the moment it finishes,
so a run cut short keeps what it measured. ``--tiny`` (the dry run on CPU, interpreted) uses
one small fp32 shape.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from fastsae import ops
from fastsae import reference as R

SHAPES = [(1000, 512, 8191, 32), (257, 1024, 16384, 128), (64, 96, 300, 256)]
TOLERANCE = {torch.float32: 2e-2, torch.bfloat16: 6e-2}  # relative to the output's scale (TF32 / bf16)


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def encoder(n, d_in, d_sae, dtype, device, seed=0, bias_shift=0.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    W = torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_sae, generator=g) * 0.1 + bias_shift
    b_dec = torch.randn(d_in, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, W, b, b_dec)]


def check_topk(n, d_in, d_sae, k, dtype, device, bias_shift=0.0):
    inputs = encoder(n, d_in, d_sae, dtype, device, bias_shift=bias_shift)
    v, i = ops.topk_encode(*inputs[:3], k, inputs[3], backend="triton")
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    pre = torch.relu(R.preactivations(*ref_in[:3], ref_in[3]))
    # Compare by what was selected: the k-th value must match, and the chosen latents' exact
    # pre-activations must be at least the reference k-th value (within tolerance).
    rv, _ = R.stable_topk(pre, k)
    chosen = pre.gather(1, i)
    kth_gap = rel_err(v[:, -1], rv[:, -1])
    selection_gap = float((rv[:, -1:] - chosen).clamp_min(0).max() / rv.abs().max())
    g = torch.randn_like(v)
    (v * g).sum().backward()
    (chosen * g.double()).sum().backward()
    grad_err = max(rel_err(a.grad, b.grad) for a, b in zip(inputs, ref_in))
    return {"values": rel_err(v, rv), "kth": kth_gap, "selection": selection_gap, "grads": grad_err}


def check_topk_trained(n, d_in, d_sae, k, dtype, device):
    """check_topk on an encoder whose negative biases leave about 1.4% of the entries positive, as
    a trained encoder's do: most rows' latent subset then holds fewer than k positive groups, and
    the launcher keeps every positive entry of the full pass."""
    return check_topk(n, d_in, d_sae, k, dtype, device, bias_shift=-2.2)


def check_decode(n, d_in, d_sae, k, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    values = torch.rand(n, k, generator=g).to(device, dtype).requires_grad_()
    indices = torch.randint(0, d_sae, (n, k), generator=g).to(device)
    W = (torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5).to(device, dtype).requires_grad_()
    out = ops.sparse_decode(values, indices, W, backend="triton")
    rv, rW = values.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = R.sparse_decode(rv, indices, rW)
    go = torch.randn_like(out)
    (out * go).sum().backward()
    (ref * go.double()).sum().backward()
    return {"out": rel_err(out, ref), "grad_values": rel_err(values.grad, rv.grad), "grad_W": rel_err(W.grad, rW.grad)}


def check_gated(n, d_in, d_sae, _k, dtype, device):
    x, W, b, b_dec = encoder(n, d_in, d_sae, dtype, device, seed=2)
    r_mag = (torch.randn(d_sae, device=device) * 0.1).to(dtype).requires_grad_()
    b_mag = (torch.randn(d_sae, device=device) * 0.1).to(dtype).requires_grad_()
    mag, pi, idx, off = ops.gated_encode(x, W, b, r_mag, b_mag, b_dec, backend="triton")
    f = R.csr_to_dense(mag.float(), idx, off, d_sae)
    rf, _ = R.gated_codes(*(t.detach().double() for t in (x, W, b, r_mag, b_mag, b_dec)))
    return {"features": rel_err(f, rf), "nnz": int(idx.numel())}


CHECKS = {"topk_encode": check_topk, "topk_encode_trained": check_topk_trained, "sparse_decode": check_decode,
          "gated_encode": check_gated}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="folder for one JSON per case")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="one small fp32 shape (interpreter dry run)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [(9, 16, 600, 4)] if args.tiny else SHAPES
    dtypes = (torch.float32,) if args.tiny else (torch.float32, torch.bfloat16)
    failed = 0
    for name, check in CHECKS.items():
        for dtype in dtypes:
            for shape in shapes:
                row = {"check": name, "dtype": str(dtype), "shape": shape}
                try:
                    errors = check(*shape, dtype, args.device)
                    limit = TOLERANCE[dtype]
                    row.update(errors=errors, ok=all(v <= limit for k, v in errors.items() if k != "nnz"))
                except Exception as e:  # recorded, not fatal: the other cases still run
                    row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=3))
                failed += not row["ok"]
                label = f"{name}-{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"
                (args.out / f"correctness-{label}.json").write_text(json.dumps(row, indent=1))
                print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
