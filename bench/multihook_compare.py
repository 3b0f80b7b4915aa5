"""Training SAEs at 1, 3 and 6 hook points from one forward pass per batch: fastsae against
EleutherAI sparsify's own Trainer, on the embedded all-MiniLM-L6-v2 (BERT, 6 layers, d 384).

    python -m bench.multihook_compare                    # 98,304 tokens, d_sae 3072, k 32
    python -m bench.multihook_compare --tokens 262144 --hooks 1 6

Both libraries get the same token rows (the default corpus in windows of 128 tokens, 32 rows
per model batch), the same layers' outputs (sparsify's ``layers``; fastsae's
``blocks.L.hook_resid_post``, the last 1, 3 or 6 layers, so the forward runs through every
layer in every case), width, k and batch of 32 x 128 positions, each library otherwise on its
defaults. fastsae streams the activations straight into the SAEs (``StreamSource`` +
``train_together``, as ``fastsae train --layers ... --stream``); sparsify's ``Trainer.fit``
hooks the model and steps every SAE in the hook. The padding of short rows is excluded from
training in both (sparsify: ``exclude_tokens=[pad]``), and tokens/s counts trained tokens.
Time starts with the model loaded; fastsae's includes tokenizing the corpus, sparsify gets the
tokens as a dataset.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from bench.sparsify_recipe import INSTALL_HINT, import_sparsify
from fastsae import SAEConfig, create_sae
from fastsae.corpus import default_corpus, iter_token_batches
from fastsae.data import ColumnSlice, StreamSource
from fastsae.sources import load_default_model
from fastsae.trainer import SAETrainer, train_together

CONTEXT, ROWS_PER_BATCH = 128, 32


def token_rows(tokenizer, tokens: int) -> torch.Tensor:
    """The model batches fastsae's stream reads for ``tokens`` tokens of the default corpus, as
    [rows, 128] input ids (short rows padded with the tokenizer's pad id)."""
    rows, count = [], 0
    for batch in iter_token_batches(tokenizer, default_corpus(), CONTEXT, ROWS_PER_BATCH):
        rows.append(torch.nn.functional.pad(batch.input_ids, (0, CONTEXT - batch.input_ids.shape[1]),
                                            value=tokenizer.pad_token_id))
        count += int(batch.attention_mask.sum())
        if count >= tokens:
            break
    return torch.cat(rows)


def run_fastsae(model, tokenizer, layers, tokens, expansion, k) -> float:
    hook_points = [f"blocks.{i}.hook_resid_post" for i in layers]
    start = time.perf_counter()
    stream = StreamSource(model, tokenizer, default_corpus(), hook_points, tokens, batch_size=ROWS_PER_BATCH,
                          context_length=CONTEXT)
    trainers = []
    for i, hp in enumerate(hook_points):
        config = SAEConfig(d_in=384, expansion_factor=expansion, k=k, batch_size=ROWS_PER_BATCH * CONTEXT,
                           num_epochs=1, hook_point=hp, dtype="float32")  # one pass, as sparsify's fit
        trainers.append(SAETrainer(create_sae(config), config, ColumnSlice(stream, 384 * i, 384 * (i + 1)),
                                   device="cpu", log_every=10**9, checkpoint_minutes=None))
    train_together(trainers, verbose=False)
    return trainers[0].step * trainers[0].global_batch / (time.perf_counter() - start)


def run_sparsify(model, input_ids, pad_id, layers, expansion, k) -> float:
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    whole = input_ids[:len(input_ids) // ROWS_PER_BATCH * ROWS_PER_BATCH]  # it trains on whole batches
    dataset = Dataset.from_dict({"input_ids": whole.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(SparseCoderConfig(expansion_factor=expansion, k=k), batch_size=ROWS_PER_BATCH,
                          layers=list(layers), exclude_tokens=[pad_id], log_to_wandb=False, save_dir=tmp,
                          save_every=10**9)
        start = time.perf_counter()
        Trainer(cfg, dataset, model).fit()
        seconds = time.perf_counter() - start
    return int((whole != pad_id).sum()) / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=98_304)
    p.add_argument("--hooks", type=int, nargs="+", default=[1, 3, 6], help="how many of the last layers")
    p.add_argument("--expansion_factor", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--libraries", nargs="+", choices=["fastsae", "sparsify"], default=["fastsae", "sparsify"])
    args = p.parse_args(argv)
    if "sparsify" in args.libraries:
        try:
            import_sparsify()
        except ImportError as err:
            raise SystemExit(INSTALL_HINT) from err
    torch.manual_seed(0)
    model, tokenizer, info = load_default_model()
    input_ids, pad_id = token_rows(tokenizer, args.tokens), tokenizer.pad_token_id
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {args.tokens} tokens, "
          f"d_sae {384 * args.expansion_factor}, k {args.k}, batch {ROWS_PER_BATCH} x {CONTEXT}")
    print(f"{'hook points':>11} {'library':<9} {'tokens/s':>9}")
    for n in args.hooks:
        layers = range(info.n_layers - n, info.n_layers)
        for library in args.libraries:
            rate = (run_fastsae(model, tokenizer, layers, args.tokens, args.expansion_factor, args.k)
                    if library == "fastsae" else
                    run_sparsify(model, input_ids, pad_id, layers, args.expansion_factor, args.k))
            print(f"{n:>11} {library:<9} {rate:>9,.0f}", flush=True)


if __name__ == "__main__":
    main()
