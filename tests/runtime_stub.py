"""A tiny causal LM with nanochat's module names for the runtime tests.

``model.transformer.wte``, ``model.transformer.h[i]`` (Block with ``.attn`` and ``.mlp``),
``model.lm_head``; ``forward(idx, kv_cache=None)`` returns logits (B, T, V). With a KVCache the
prompt goes in once and then one token per call, so hooks see (B, 1, D) on decode steps.
"""
import torch
import torch.nn.functional as F
from torch import nn


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class KVCache:
    """Keys and values per layer, grown by concatenation."""

    def __init__(self):
        self.kv = {}

    def append(self, layer, k, v):
        if layer in self.kv:
            k = torch.cat([self.kv[layer][0], k], 2)
            v = torch.cat([self.kv[layer][1], v], 2)
        self.kv[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, d, n_head, layer):
        super().__init__()
        self.n_head, self.layer = n_head, layer
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, kv_cache=None):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)
        if T == k.size(2):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a decode step: the new token attends to every cached one
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, d, n_head, layer):
        super().__init__()
        self.attn = Attention(d, n_head, layer)
        self.mlp = MLP(d)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(norm(x), kv_cache)
        return x + self.mlp(norm(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=97, d=32, n_layer=3, n_head=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(vocab, d),
                                          "h": nn.ModuleList([Block(d, n_head, i) for i in range(n_layer)])})
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, kv_cache=None):
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, kv_cache)
        return self.lm_head(norm(x))
