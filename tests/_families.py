"""Tiny random-weight models of every decoder family quantkit has a file for, built from transformers' own
config classes (offline), plus one family without a file (OLMo) for the generic path."""

from __future__ import annotations

from typing import Any

import torch

COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)

# model_type -> (config class, model class, extra config)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "shared_expert_intermediate_size": 64, **MOE}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "head_dim": 16, **MOE}),
}
GENERIC = {"olmo": ("OlmoConfig", "OlmoForCausalLM", {"pad_token_id": 0, "eos_token_id": 1})}  # no quantkit family file


def tiny_model(model_type: str, seed: int = 0, **over: Any) -> torch.nn.Module:
    import transformers

    cfg_cls, model_cls, extra = {**FAMILIES, **GENERIC}[model_type]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **over})
    model = getattr(transformers, model_cls)(cfg).eval()
    assert model.config.model_type == model_type
    return model
