"""``fastsae viz``: feature dashboards for one SAE from real activations of its model.

One pass over the text builds a latent cache; every page is rendered from it. ``--feature i``
(repeatable) shows those features, ``--all_features`` every live one, otherwise ``--top``
features chosen by ``--features`` (spread over density bands by default). The site is
``{output_dir}/layer_{L}/dashboard/index.html``.
"""
from __future__ import annotations

import argparse
import sys

from fastsae.cli_args import HelpFormatter, positive_int
from fastsae.cli_eval import (
    _opt,
    activations_for,
    add_showcase_option,
    add_source_arguments,
    load_selected_saes,
    load_source,
    out_dir,
)


def register(sub) -> None:
    p = sub.add_parser("viz", help="write static HTML feature dashboards for an SAE", formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _opt(p, "sae_path", required=True, help="the SAE (directory or .pt)")
    add_source_arguments(p)
    p.set_defaults(num_tokens=10_000, output_dir="sae_viz")
    which = p.add_mutually_exclusive_group()
    _opt(which, "feature", type=int, action="append", default=None, help="a feature to show (repeatable)")
    _opt(which, "all_features", action="store_true", help="every feature that fires on the text")
    _opt(p, "top", type=positive_int, default=100, help="otherwise, this many features, chosen by --features")
    add_showcase_option(p)
    _opt(p, "neuronpedia", action="store_true", help="also write a Neuronpedia export of these features")


def run(args) -> int:
    from fastsae.cli_eval import write_views
    from fastsae.progress import set_quiet

    set_quiet(args.quiet)
    args.sae_dir = None
    try:
        (hook_point, sae), = load_selected_saes(args).items()
        for f in args.feature or []:
            if not 0 <= f < sae.d_sae:
                raise ValueError(f"--feature {f} is out of range: the SAE has {sae.d_sae} features")
        model, tokenizer, model_name = load_source(args)
        acts, meta = activations_for(args, model, tokenizer, hook_point, sae)
        write_views(args, sae, acts, meta, model, tokenizer, out_dir(args, hook_point),
                    top_n=None if args.all_features else args.top, features=args.feature, model_name=model_name)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"fastsae viz: error: {e}", file=sys.stderr)
        return 2
    return 0
