"""Shared fixtures: a tiny random-weight Llama saved as a real HF folder, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def make_tiny_llama(hidden: int = 128, layers: int = 2, vocab: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"], rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The bundled real model, converted once from GGUF into the cache."""
    from quantkit.models import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (hidden 128, 2 layers) saved with the real tokenizer: a valid model.source."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(1))
