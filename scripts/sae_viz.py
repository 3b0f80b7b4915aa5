"""Feature dashboards for an SAE (the nanochat SAE extension's command line).

    python -m scripts.sae_viz --sae_path P [--feature i | --all_features]
        [--checkpoint base_checkpoints/d20] [--num_tokens N] [--output_dir D]

Same as ``fastsae viz``; see ``--help`` for every option.
"""
import argparse
import sys

from fastsae import cli_viz


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.sae_viz", description=__doc__.splitlines()[0])
    cli_viz.add_arguments(parser)
    return cli_viz.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
