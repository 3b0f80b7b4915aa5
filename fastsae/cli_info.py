"""``fastsae info``: versions, device and the backend each op will use."""
from __future__ import annotations

import platform


def register(sub):
    p = sub.add_parser("info", help="show versions, device and the backend each op uses")
    p.add_argument("--device", default=None, help="device to report the backend for (default: cuda if present)")
    p.set_defaults(handler=run)


def info_lines(device=None) -> list[str]:
    import torch

    from fastsae import __version__, kernels, ops

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = [
        f"fastsae  {__version__}",
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__}",
        f"triton   {kernels.TRITON_VERSION or 'not installed'}",
        f"device   {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    chosen = ops.resolve_backend(None, device)
    if chosen == "torch" and device.type == "cpu":
        from fastsae import torch_backend

        for kinds, gemm in torch_backend.cpu_encoder_gemms().items():
            lines.append(f"encoder  {kinds:<22} {gemm}")
    for op in ("topk_encode", "batch_topk_encode", "sparse_decode", "csr_decode", "relu_encode",
               "jumprelu_encode", "gated_encode"):
        lines.append(f"backend  {op:<18} {chosen}")
    if chosen == "auto":
        from fastsae import autotune

        choices = autotune.cached_choices(device)
        lines.append(f"auto     each primitive per shape class on the faster of triton and torch, timed on its first "
                     f"call; {len(choices)} choices cached for this device in {autotune.cache_path()}")
        for cls, entry in sorted(choices.items()):
            times = ", ".join(f"{b} {ms:.3g} ms" for b, ms in entry["ms"].items())
            lines.append(f"auto     {cls}: {entry['backend']} ({times})")
    return lines


def run(args) -> int:
    print("\n".join(info_lines(args.device)))
    return 0
