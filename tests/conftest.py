"""Shared fixtures: a tiny random-weight Llama saved as a real HF folder, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _tiny import make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never use the network: Hub loaders must fail fast with quantkit's error, not hang on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _auto_search_in_tmp(tmp_path_factory):
    """Method auto's reusable search state goes to a folder of this test session, not the user's cache."""
    from quantkit import quantize

    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("auto_search")
        mp.setattr(quantize, "auto_search_dir", lambda: path)
        yield


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
