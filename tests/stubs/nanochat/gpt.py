"""Stand-in for nanochat.gpt: GPTConfig, GPT, Block, CausalSelfAttention, MLP."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    sequence_len: int = 64
    vocab_size: int = 257
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 16
    window_pattern: str = "L"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2) for lin in (self.c_q, self.c_k, self.c_v))
        if kv_cache is not None:  # append to this layer's cache; attend to everything so far
            k, v = kv_cache.append(self.layer_idx, k, v)
        causal = kv_cache is None or T > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and k.size(2) == T)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(norm(x), kv_cache)
        return x + self.mlp(norm(x))


class KVCache:
    """Per-layer key/value store: prefill with (B, T) tokens, then decode one token at a time."""

    def __init__(self):
        self.kv = {}

    def expand(self, rows):
        """A cache for ``rows`` samples continuing this batch-1 prefill."""
        out = KVCache()
        out.kv = {layer: (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for layer, (k, v) in self.kv.items()}
        return out

    def append(self, layer, k, v):
        if layer in self.kv:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # nanochat mixes the embedding back into the residual before every block
        self.resid_lambdas = nn.Parameter(torch.linspace(1.0, 0.5, config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.linspace(0.1, 0.3, config.n_layer))

    def get_device(self):
        return self.transformer.wte.weight.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, kv_cache)
        logits = self.lm_head(norm(x))
        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction=loss_reduction)
        return logits
