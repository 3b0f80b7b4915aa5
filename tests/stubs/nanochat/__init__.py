"""A tiny stand-in for karpathy/nanochat with the same module names, for tests only.

It mimics what fastsae relies on: model.transformer.h[i] Blocks with .attn, .mlp and .mlp.c_fc,
per-layer residual lambdas mixed in before each block, model(idx, targets=None, kv_cache=None)
where decode steps see (B, 1, D), and checkpoint_manager.build_model.
"""
