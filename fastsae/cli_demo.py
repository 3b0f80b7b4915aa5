"""``fastsae demo``: the whole pipeline on the embedded default model."""
from __future__ import annotations

from dataclasses import fields


def register(sub):
    from fastsae.demo import DemoSettings

    p = sub.add_parser("demo", help="collect, train, evaluate, visualise and export on the default model")
    defaults = DemoSettings()
    p.add_argument("--output_dir", "--output-dir", default=defaults.output_dir)
    p.add_argument("--layer", type=int, default=defaults.layer, help="block whose residual output is read")
    p.add_argument("--k", type=int, default=defaults.k)
    p.add_argument("--expansion_factor", "--width", type=int, default=defaults.expansion_factor,
                   help="d_sae = expansion_factor * d_in")
    p.add_argument("--max_tokens", "--tokens", type=int, default=defaults.max_tokens, help="token budget")
    p.add_argument("--num_epochs", type=int, default=defaults.num_epochs)
    p.add_argument("--model", default=None, help="a local Hugging Face model directory")
    p.add_argument("--checkpoint", default=None, help="a nanochat checkpoint directory")
    p.add_argument("--device", default=defaults.device)
    p.set_defaults(handler=run)


def run(args) -> int:
    from fastsae.demo import DemoSettings, run_demo, summary_table

    names = {f.name for f in fields(DemoSettings)}
    settings = DemoSettings(**{k: v for k, v in vars(args).items() if k in names})
    summary = run_demo(settings)
    print()
    print(summary_table(summary))
    print(f"\nOpen the dashboard: {summary['dashboard']}")
    return 0
