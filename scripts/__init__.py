"""Seed-compatible command lines: ``python -m scripts.sae_train``."""
