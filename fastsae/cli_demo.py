"""``fastsae demo``: the whole pipeline on the embedded default model."""
from __future__ import annotations

import sys
from dataclasses import fields

from fastsae.cli_args import HelpFormatter, add_option, positive_int


def register(sub):
    from fastsae.demo import DemoSettings

    p = sub.add_parser("demo", help="collect, train, evaluate, visualise and export on the default model",
                       formatter_class=HelpFormatter)
    defaults = DemoSettings()
    add_option(p, "output_dir", default=defaults.output_dir)
    add_option(p, "layer", type=int, default=defaults.layer, help="block whose residual output is read")
    add_option(p, "k", type=positive_int, default=defaults.k, help="active latents per token")
    add_option(p, "expansion_factor", "width", type=positive_int, default=defaults.expansion_factor,
               help="d_sae = expansion_factor * d_in")
    add_option(p, "max_tokens", "num_tokens", "num_activations", "tokens", type=positive_int,
               default=defaults.max_tokens, help="tokens to collect")
    add_option(p, "num_epochs", type=positive_int, default=defaults.num_epochs)
    add_option(p, "model", default=None, help="a local Hugging Face model directory")
    add_option(p, "checkpoint", default=None, help="a nanochat checkpoint directory")
    add_option(p, "device", default=defaults.device)
    add_option(p, "quiet", action="store_true", help="no progress bars")
    from fastsae.feature_viz import SHOWCASE_MODES

    add_option(p, "features", choices=SHOWCASE_MODES, default=defaults.features,
               help="which features the dashboard shows: spread over density bands, most readable first (the "
                    "densest 5%% skipped); sparse; dense (most frequent first); all")
    p.set_defaults(handler=run)


def run(args) -> int:
    from fastsae.demo import DemoSettings, run_demo, summary_table
    from fastsae.progress import set_quiet

    set_quiet(args.quiet)
    names = {f.name for f in fields(DemoSettings)}
    settings = DemoSettings(**{k: v for k, v in vars(args).items() if k in names})
    try:
        summary = run_demo(settings)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"fastsae demo: error: {e}", file=sys.stderr)
        return 1
    print()
    print(summary_table(summary))
    print(f"\nOpen the dashboard: {summary['dashboard']}")
    return 0
