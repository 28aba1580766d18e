"""Checkpoint -> Hugging Face folder (safetensors, config, tokenizer) for `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch

from p2p_trainer import checkpoint
from p2p_trainer.config_file import from_dict
from p2p_trainer.data import build_tokenizer
from p2p_trainer.model import build_model


def load_model_from_checkpoint(path: str | Path):
    """(model with θ of the checkpoint, tokenizer, config) from a checkpoint file or folder."""
    path = Path(path)
    if path.is_dir():
        latest = checkpoint.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in folder: {path}")
        path = latest
    file = checkpoint.open_checkpoint(path)
    try:
        cfg = from_dict(checkpoint.extra(file, "config"), source=str(path))
        tokenizer = build_tokenizer(cfg.data)
        model = build_model(cfg.model, len(tokenizer))
        numel = sum(p.numel() for p in model.parameters())
        if numel != file.numel:
            raise ValueError(f"checkpoint {path} holds {file.numel} values, the model {numel}")
        offset = 0
        with torch.no_grad():
            for p in model.parameters():  # one parameter at a time: θ is never whole in memory twice
                p.copy_(file.read("master", offset, offset + p.numel()).view(p.shape))
                offset += p.numel()
    finally:
        file.close()
    return model, tokenizer, cfg


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    model, tokenizer, _ = load_model_from_checkpoint(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
