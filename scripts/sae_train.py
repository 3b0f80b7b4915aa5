"""Train an SAE on a model's activations (the seed's ``python -m scripts.sae_train``).

    python -m scripts.sae_train --checkpoint base_checkpoints/d20 --layer 10 --activation topk --k 64
    python -m scripts.sae_train --layer 3          # the embedded all-MiniLM-L6-v2

Outputs go to {output_dir}/layer_{L}/; --resume continues an interrupted run. Same flags as
``fastsae train``.
"""
import argparse
import sys

from fastsae.cli_train import add_train_arguments, train_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.sae_train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return train_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
