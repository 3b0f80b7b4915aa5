"""A causal transformer shaped like nanochat's d20, for the runtime overhead benchmark.

Same module names and per-token work as nanochat's GPT: ``transformer.wte``, ``transformer.h[i]``
blocks with ``.attn`` (rotary, QK norm) and ``.mlp`` (relu^2, 4x), per-layer residual lambdas,
an untied ``lm_head`` with logit soft-capping, and a preallocated KV cache so that a decode
step sees (B, 1, D) at every block. Weights are random: only the cost matters here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ToyConfig:
    n_layer: int = 20
    n_embd: int = 1280
    n_head: int = 10
    vocab_size: int = 65536
    sequence_len: int = 2048


D20 = ToyConfig()


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)


class KVCache:
    """Preallocated keys/values [L, B, H, T_max, hd]; ``pos`` advances after the last layer."""

    def __init__(self, config: ToyConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layer, self.pos = config.n_layer, 0

    def insert(self, layer, k, v):
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        d = config.n_embd
        self.c_q, self.c_k, self.c_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, kv_cache):
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, -1) for lin in (self.c_q, self.c_k, self.c_v))
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer, k, v)
        # Prefill is causal over the prompt; a decode step attends to everything cached.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T == k.shape[2] and T > 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class ToyGPT(nn.Module):
    def __init__(self, config: ToyConfig = D20, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        head_dim = config.n_embd // config.n_head
        freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.sequence_len).float(), freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, idx, kv_cache: KVCache | None = None):
        T = idx.shape[1]
        start = 0 if kv_cache is None else kv_cache.pos
        cos, sin = self.cos[:, start:start + T].to(self.lm_head.weight.dtype), self.sin[:, start:start + T]
        sin = sin.to(cos.dtype)
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(norm(x))
        return 15 * torch.tanh(logits / 15)
