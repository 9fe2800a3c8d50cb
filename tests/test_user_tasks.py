"""A team's own lm-eval task folder (`evaluate.include_path`) runs end to end and shows in `compare`; an unknown
task and a task whose data is missing stop in preflight: exit 2, one paragraph, no run folder."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.runfolder import read_json

CAPITALS = [("France", "Paris", ["Paris", "Lyon", "Nice"]), ("Japan", "Tokyo", ["Osaka", "Tokyo", "Kyoto"]),
            ("Italy", "Rome", ["Milan", "Turin", "Rome"]), ("Spain", "Madrid", ["Madrid", "Seville", "Bilbao"])]


def task_folder(tmp_path: Path, data_file: Path | None = None) -> Path:
    """One task of the team's own: multiple choice over a local JSONL file."""
    folder = tmp_path / "team_tasks"
    folder.mkdir()
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"country": c, "choices": ch, "label": ch.index(a)}) + "\n"
                            for c, a, ch in CAPITALS))
    (folder / "capitals.yaml").write_text(textwrap.dedent(f"""\
        task: team_capitals
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data_file or data}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "The capital of {{{{country}}}} is"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          # Declared lower-is-better on purpose: lm-eval's registry says acc_norm is higher-better, so a
          # "↓" in the table can only come from this file through lm-eval's results.
          - metric: acc_norm
            aggregation: mean
            higher_is_better: false
        metadata:
          version: 1.0
        """))
    return folder


def recipe(tmp_path: Path, name: str, model: Path, method: str, evaluate: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        metadata: {{name: {name}}}
        model: {{source: "{model}", dtype: float32}}
        quantize: {{method: {method}}}
        calibration: {{dataset: "builtin:news", n_samples: 2, seq_len: 16, batch_size: 2}}
        export: {{hf: true}}
        build: {{enabled: false}}
        evaluate: {evaluate}
        output_dir: "{tmp_path / 'runs'}"
        """))
    return path


def assert_preflight_error(capsys, tmp_path: Path, path: Path) -> str:
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantkit: error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    return err


def test_own_task_folder_runs_and_shows_in_compare(tmp_path, capsys, tiny_model_dir):
    folder = task_folder(tmp_path)
    ev = f"{{tasks: [team_capitals, piqa], include_path: [{folder}], limits: {{piqa: 3}}}}"
    base = recipe(tmp_path, "base", tiny_model_dir, "none", ev)
    fp8 = recipe(tmp_path, "fp8", tiny_model_dir, "fp8", ev)
    assert main(["validate", str(base)]) == 0
    assert main(["run", str(base)]) == 0 and main(["run", str(fp8)]) == 0
    runs = tmp_path / "runs"
    row = read_json(runs / "fp8" / "eval" / "lm_eval.json")["tasks"]["team_capitals"]
    assert row["n"] == len(CAPITALS) and row["higher_is_better"] == {"acc": True, "acc_norm": False}
    assert row["acc"] in {k / len(CAPITALS) for k in range(len(CAPITALS) + 1)}
    capsys.readouterr()
    assert main(["compare", str(runs / "base"), str(runs / "fp8"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| run"))
    assert "team_capitals acc |" in header and "team_capitals acc_norm ↓" not in header  # first metric shown
    assert "piqa acc" in header
    fp8_line = next(line for line in out.splitlines() if line.startswith("| fp8 "))
    assert f"{100 * row['acc']:.2f}" in fp8_line
    csv_head = (tmp_path / "cmp" / "table.csv").read_text().splitlines()[0]
    assert "team_capitals.acc.delta" in csv_head
    # A budget on the user's metric uses the direction its YAML declared (acc_norm: lower is better).
    capsys.readouterr()
    assert main(["choose", str(runs / "base"), str(runs / "fp8"), "--max-loss", "team_capitals.acc_norm=0.5"]) == 0
    assert "team_capitals.acc_norm may rise by at most" in capsys.readouterr().out


def test_unknown_task_fails_in_preflight(tmp_path, capsys, tiny_model_dir):
    err = assert_preflight_error(capsys, tmp_path, recipe(tmp_path, "r", tiny_model_dir, "fp8",
                                                          "{tasks: [piqa, hellaswagg]}"))
    assert "r.yaml" in err and "evaluate.tasks" in err and "'hellaswagg'" in err and "'hellaswag'" in err


def test_task_with_missing_data_fails_in_preflight(tmp_path, capsys, tiny_model_dir):
    folder = task_folder(tmp_path, data_file=tmp_path / "not_there.jsonl")
    err = assert_preflight_error(capsys, tmp_path, recipe(tmp_path, "r", tiny_model_dir, "fp8",
                                                          f"{{tasks: [team_capitals], include_path: [{folder}]}}"))
    assert "'team_capitals'" in err and "cannot load its data" in err and "not_there.jsonl" in err
    assert "Fix: create that file, or correct data_files" in err


def test_hub_task_offline_fails_in_preflight(tmp_path, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = assert_preflight_error(capsys, tmp_path, recipe(tmp_path, "r", tiny_model_dir, "fp8",
                                                          "{tasks: [gsm8k]}"))
    assert "'gsm8k'" in err and "openai/gsm8k" in err


@pytest.mark.parametrize("evaluate, expected", [
    ("{tasks: [mmlu], task_settings: {mmlu: {num_fewshots: 5}}}", "num_fewshots"),
    ("{tasks: [piqa], task_settings: {mmlu: {num_fewshot: 5}}}", "not in evaluate.tasks"),
    ("{tasks: [piqa], include_path: [/no/such/folder]}", "not a folder of lm-eval task YAMLs"),
])
def test_bad_evaluate_settings(tmp_path, capsys, tiny_model_dir, evaluate, expected):
    err = assert_preflight_error(capsys, tmp_path, recipe(tmp_path, "r", tiny_model_dir, "fp8", evaluate))
    assert expected in err


def test_edited_task_yaml_is_scored_again(tmp_path, tiny_model_dir):
    """The evaluation's fingerprint covers the files of evaluate.include_path: an unchanged rerun skips the
    stage, an edited task YAML scores again (and the new prompt's result replaces the old one)."""
    folder = task_folder(tmp_path)
    path = recipe(tmp_path, "base", tiny_model_dir, "none", f"{{tasks: [team_capitals], include_path: [{folder}]}}")
    manifest = tmp_path / "runs" / "base" / "manifest.json"
    assert main(["run", str(path)]) == 0
    first = read_json(manifest)["stages"]["evaluate"]
    assert main(["run", str(path)]) == 0
    assert read_json(manifest)["stages"]["evaluate"] == first  # skipped: same entry, same finish time
    yaml_file = folder / "capitals.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("The capital of", "Capital city of"))
    assert main(["run", str(path)]) == 0
    again = read_json(manifest)["stages"]["evaluate"]
    assert again["fingerprint"] != first["fingerprint"]
