"""Llama-3 models through `transformers`. Nothing here knows about distribution."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from p2p_trainer.config import ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    """The Hugging Face config for a model section; `vocab_size` comes from the tokenizer when 0."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size or vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def build_model(
    cfg: ModelConfig, vocab_size: int, *, seed: int = 0, device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives bit-identical weights on every peer."""
    hf_cfg = llama_config(cfg, vocab_size)
    hf_cfg._attn_implementation = "sdpa"
    if str(device) == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(hf_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_cfg)
    return model.to(device)


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters from the architecture alone, to check the model we build against."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    vocab = cfg.vocab_size or vocab_size
    kv_dim = cfg.num_kv_heads * (d // cfg.num_heads)
    attention = 2 * d * d + 2 * d * kv_dim
    mlp = 3 * d * ff
    per_layer = attention + mlp + 2 * d  # two RMSNorm weights
    head = 0 if cfg.tie_embeddings else vocab * d
    return vocab * d + layers * per_layer + d + head
