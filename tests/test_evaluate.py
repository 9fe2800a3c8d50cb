"""quantkit.evaluate on a tiny random Llama with the real SmolLM2 tokenizer (seconds on 2 CPU cores)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.evaluate import METRICS, TASKS, evaluate, prepare_tasks


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantkit.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _check(result: dict, tasks: list[str], limit: int) -> None:
    json.dumps(result, allow_nan=False)  # plain JSON values only
    assert result["limit"] == limit and result["lm_eval_version"].startswith("0.4")
    assert set(result["tasks"]) == set(tasks)
    for task in tasks:
        row = result["tasks"][task]
        assert row["n"] == limit
        for metric in METRICS[task]:
            value = row[metric]
            assert isinstance(value, float) and math.isfinite(value), (task, metric, value)
            if metric.startswith("acc"):
                assert 0.0 <= value <= 1.0
            elif "perplexity" in metric:
                assert value > 1.0
            assert f"{metric}_stderr" in row


def test_choice_and_lambada_tasks(tiny) -> None:
    model, tokenizer = tiny
    tasks = ["hellaswag", "lambada", "winogrande"]
    result = evaluate(model, tokenizer, tasks, limit=5, batch_size=4)
    _check(result, tasks, 5)
    # Same seed, same model: same numbers.
    again = evaluate(model, tokenizer, ["winogrande"], limit=5, batch_size=4)
    assert again["tasks"]["winogrande"] == result["tasks"]["winogrande"]


def test_wiki_perplexity(tiny) -> None:
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ["wiki_ppl"], limit=1, batch_size=4, max_length=512)
    _check(result, ["wiki_ppl"], 1)
    assert result["max_length"] == 512
    assert result["tasks"]["wiki_ppl"]["bits_per_byte"] > 0


def test_unknown_task_names_the_field() -> None:
    with pytest.raises(QuantkitError) as err:
        evaluate(None, None, ["hellaswag", "mmlu"])
    assert err.value.where == "evaluate.tasks"
    assert "mmlu" in str(err.value) and all(name in err.value.fix for name in TASKS)


def test_generated_tasks_are_concrete() -> None:
    folder = prepare_tasks()
    assert prepare_tasks() == folder  # reused, not rebuilt
    names = {p.stem for p in folder.glob("*.yaml")}
    assert names == set(TASKS)
    for yaml_file in folder.glob("*.yaml"):
        assert "${" not in yaml_file.read_text()
    assert len((folder / "data" / "lambada.jsonl").read_text().splitlines()) == 5153
