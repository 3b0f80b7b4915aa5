"""Stand-in for nanochat.checkpoint_manager: model_{step:06d}.pt + meta_{step:06d}.json."""
import json
import os

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer


def save_checkpoint(checkpoint_dir, step, model_data, meta_data):
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta_data, f)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False):
    model_data = torch.load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), map_location=device,
                            weights_only=True)
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json")) as f:
        meta_data = json.load(f)
    return model_data, None, meta_data


def build_model(checkpoint_dir, step, device, phase):
    assert phase in ("train", "eval")
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device)
    model = GPT(GPTConfig(**meta_data["model_config"]))
    model.load_state_dict(model_data)
    model.to(device)
    model.train(phase == "train")
    return model, get_tokenizer(), meta_data
