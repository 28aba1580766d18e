"""Warmup-stable-decay learning-rate schedule (MiniCPM, INTELLECT-1)."""

from __future__ import annotations

import math

from p2p_trainer.config import InnerConfig


def wsd_factor(step: int, cfg: InnerConfig) -> float:
    """Multiplier of the peak lr at inner step `step` (0-based, counted over the whole run)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.total_steps - cfg.decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, cfg.decay_steps))
    shape = progress if cfg.decay_shape == "linear" else math.sqrt(progress)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - shape)
