"""Evaluate SAEs on real activations (the nanochat SAE extension's command line).

    python -m scripts.sae_eval --sae_path P | --sae_dir D [--generate_dashboards]
        [--checkpoint base_checkpoints/d20] [--layer L] [--num_tokens N] [--output_dir D]

Same as ``fastsae eval``; see ``--help`` for every option.
"""
import argparse
import sys

from fastsae import cli_eval


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.sae_eval", description=__doc__.splitlines()[0])
    cli_eval.add_arguments(parser)
    return cli_eval.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
