"""Compile every kernel configuration the dispatcher can choose for sm_90 (H100/H200), with no
GPU, and read the machine code: registers, spills, shared memory, wgmma.

Per kernel, mode, dtype and config it prints compile time, registers per thread and spill
bytes (cuobjdump -res-usage: LOCAL + STACK), shared memory (bytes of the compiled kernel) and
whether the main loop uses Hopper's warp-group MMA (HGMMA in the SASS, ``warp_group_dot`` in
the TTGIR). The tools are the ones the triton wheel ships. It exits 1 when
a config spills, needs more than 227 KB of shared memory, or an encode GEMM in bf16 or TF32
has no wgmma. ``--json PATH`` writes the table.

Run: ``python -m bench.gpu_static`` (about two minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, never interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from fastsae.kernels import encode, sparse_matmul  # noqa: E402

SHARED_LIMIT = 232_448  # bytes per block on sm_90
TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FLOAT = {"bf16": "*bf16", "fp32": "*fp32"}


def _signature(fn, pointer_types, constexprs):
    sig = {name: pointer_types.get(name, "i32") for name in fn.arg_names}
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _resource_usage(cubin: bytes) -> tuple[int, int, bool]:
    """(registers, spill bytes, HGMMA in the SASS) of a compiled kernel, from cuobjdump.
    Spills show as per-thread local memory (LOCAL) and stack frame (STACK) use."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, spills, "HGMMA" in sass


def compile_one(fn, pointer_types, constexprs, num_warps, num_stages):
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    start = time.perf_counter()
    src = ASTSource(fn=fn, signature=_signature(fn, pointer_types, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=TARGET, options=options.__dict__)
    seconds = time.perf_counter() - start
    regs, spills, hgmma = _resource_usage(kernel.asm["cubin"])
    return {"compile_s": round(seconds, 2), "registers": regs, "spill_bytes": spills,
            "shared_bytes": int(kernel.metadata.shared), "wgmma": hgmma and "warp_group_dot" in kernel.asm["ttgir"]}


def encode_cases():
    """The one encode kernel: every mode, bf16 and fp32 (TF32), every CUDA config."""
    fn = encode._encode_kernel.fn
    modes = {"threshold": encode.THRESHOLD.value, "gated": encode.GATED.value,
             "topk-survivors": encode.ROW_CUT.value, "topk-group-max": encode.GROUP_MAX.value}
    for dtype in ("bf16", "fp32"):
        pointers = {name: "*fp32" for name in fn.arg_names if name.endswith("_ptr")}
        pointers.update(x_ptr=FLOAT[dtype], w_ptr=FLOAT[dtype], count_ptr="*i32", idx_ptr="*i32")
        for mode_name, mode in modes.items():
            for cfg in encode.configs_for(encode.CUDA_CONFIGS, dtype == "fp32"):
                constexprs = dict(MODE=mode, HAS_L1=mode == encode.GATED.value, PRECISION="tf32",
                                  GROUP=encode.GROUP_SIZE, **cfg.kwargs)
                label = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                yield (f"encode/{mode_name}", dtype, f"{label} w{cfg.num_warps} s{cfg.num_stages}", True,
                       fn, pointers, constexprs, cfg)


def sparse_cases():
    kernels = {
        "gather": (sparse_matmul._gather_kernel.fn, sparse_matmul.GATHER_CONFIGS, ("values_ptr", "w_ptr", "out_ptr"),
                   {"K": 64, "HAS_BIAS": True}),
        "gather_dot": (sparse_matmul._gather_dot_kernel.fn, sparse_matmul.GATHER_DOT_CONFIGS,
                       ("g_ptr", "w_ptr", "out_ptr"), {"K": 64}),
        "scatter_add": (sparse_matmul._scatter_kernel.fn, sparse_matmul.SCATTER_CONFIGS,
                        ("values_ptr", "g_ptr", "out_ptr"), {"CHUNK": sparse_matmul.SCATTER_CHUNK}),
        "scatter_combine": (sparse_matmul._scatter_combine_kernel.fn, sparse_matmul.SCATTER_CONFIGS,
                            ("out_ptr",), {"CHUNK": sparse_matmul.SCATTER_CHUNK}),
    }
    for name, (fn, configs, float_ptrs, extra) in kernels.items():
        for dtype in ("bf16", "fp32"):
            pointers = {p: (FLOAT[dtype] if p in float_ptrs else "*i64") for p in fn.arg_names if p.endswith("_ptr")}
            pointers["bias_ptr"] = FLOAT[dtype]
            pointers["partial_ptr"] = "*fp32"  # the scatter's partial sums are always float32
            for csr in ((False, True) if "IS_CSR" in fn.arg_names else (None,)):
                for cfg in configs:
                    constexprs = dict(extra, **cfg.kwargs)
                    if csr is not None:
                        constexprs["IS_CSR"] = csr
                    label = f"D{cfg.kwargs['BLOCK_D']} K{cfg.kwargs['BLOCK_K']} w{cfg.num_warps}" + (
                        "" if csr is None else (" csr" if csr else " fixed"))
                    yield (f"sparse/{name}", dtype, label, False, fn, pointers, constexprs, cfg)


def problems(row) -> list[str]:
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes")
    if row["shared_bytes"] > SHARED_LIMIT:
        found.append(f"needs {row['shared_bytes']} bytes of shared memory (limit {SHARED_LIMIT})")
    if row["needs_wgmma"] and not row["wgmma"]:
        found.append("no wgmma in the GEMM")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_90 (shared limit {SHARED_LIMIT} B)")
    print(f"{'kernel':24} {'dtype':5} {'config':22} {'regs':>4} {'spill':>5} {'smem KB':>7} {'wgmma':>5} {'s':>5}")
    rows, failed = [], False
    for kernel, dtype, label, needs_wgmma, fn, pointers, constexprs, cfg in (*encode_cases(), *sparse_cases()):
        if args.only not in kernel:
            continue
        row = dict(kernel=kernel, dtype=dtype, config=label, needs_wgmma=needs_wgmma,
                   **compile_one(fn, pointers, constexprs, cfg.num_warps, cfg.num_stages))
        bad = problems(row)
        failed |= bool(bad)
        rows.append(dict(row, problems=bad))
        print(f"{kernel:24} {dtype:5} {label:22} {row['registers']:>4} {row['spill_bytes']:>5} "
              f"{row['shared_bytes'] / 1024:>7.1f} {('yes' if row['wgmma'] else '-'):>5} {row['compile_s']:>5.1f}"
              + (f"  FAIL: {'; '.join(bad)}" if bad else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    print("FAILED" if failed else f"ok: {len(rows)} configurations")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
