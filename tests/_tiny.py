"""A tiny random-weight Llama for fast tests (real transformers model, random weights)."""

from __future__ import annotations

import torch


def make_tiny_llama(hidden: int = 128, layers: int = 2, vocab: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"], rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval()
