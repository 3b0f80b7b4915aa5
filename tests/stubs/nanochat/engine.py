"""Stand-in for nanochat's Engine: the calls it makes on a model, nothing more.

One batch-1 prefill of the prompt through ``model.forward`` (not ``model(...)``, so top-level
module hooks never fire), the cache copied to ``num_samples`` rows, then one token per row per
step; it asks the model for ``get_device()`` and ``config``.
"""
import torch

from nanochat.gpt import KVCache


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=8, seed=42):
        device = self.model.get_device()
        assert self.model.config.n_layer >= 1
        prefill = KVCache()
        logits = self.model.forward(torch.tensor([tokens], device=device), kv_cache=prefill)
        cache = prefill.expand(num_samples)
        column = [int(logits[0, -1].argmax())] * num_samples
        for _ in range(max_tokens):
            yield column
            ids = torch.tensor(column, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=cache)
            column = logits[:, -1].argmax(-1).tolist()

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        rows = [list(tokens) for _ in range(num_samples)]
        for column in self.generate(tokens, num_samples, **kwargs):
            for row, token in zip(rows, column):
                row.append(token)
        return rows
