"""Bad input ends with one paragraph naming what and where, exit code 2, and no partial run folder."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path: Path, model: str, dataset: str = "builtin:news", extra: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        metadata: {{name: cli-test}}
        model: {{source: "{model}", dtype: float32}}
        quantize: {{method: fp8}}
        calibration: {{dataset: "{dataset}", n_samples: 2, seq_len: 16, batch_size: 2}}
        export: {{hf: true}}
        build: {{enabled: false}}
        evaluate: {{tasks: []}}
        output_dir: "{tmp_path / 'runs'}"
        """) + extra)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_paragraph(err: str) -> None:
    text = err.strip()
    assert text.startswith("quantkit: error:") and "\n\n" not in text and "Traceback" not in text


def test_missing_model_path(tmp_path, capsys):
    code, err = run_cli(capsys, "run", str(recipe(tmp_path, str(tmp_path / "no-such-model"))))
    assert code == 2
    assert_one_paragraph(err)
    assert "r.yaml:2: model.source" in err and "does not exist" in err and "Fix:" in err
    assert not (tmp_path / "runs").exists()


def test_empty_calibration_file(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, err = run_cli(capsys, "run", str(recipe(tmp_path, str(tiny_model_dir), str(empty))))
    assert code == 2
    assert_one_paragraph(err)
    assert "calibration.dataset" in err and "holds no text" in err
    assert not (tmp_path / "runs").exists()


def test_recipe_typo(tmp_path, capsys, tiny_model_dir):
    path = recipe(tmp_path, str(tiny_model_dir))
    path.write_text(path.read_text().replace("quantize: {method: fp8}", "quantize: {method: fp8, exclud: [lm_head]}"))
    code, err = run_cli(capsys, "run", str(path))
    assert code == 2
    assert_one_paragraph(err)
    assert "r.yaml:3: field 'quantize.exclud': unknown key 'exclud'; did you mean 'exclude'?" in err
    assert not (tmp_path / "runs").exists()


def test_too_little_calibration_text_suggests_a_size(tmp_path, capsys, tiny_model_dir):
    small = tmp_path / "small.txt"
    small.write_text("A short text.\n\nAnother short one.")
    code, err = run_cli(capsys, "validate", str(recipe(tmp_path, str(tiny_model_dir), str(small))))
    assert code == 2 and "n_samples x seq_len = 2 x 16 = 32" in err
    code, err = run_cli(capsys, "run", str(recipe(tmp_path, str(tiny_model_dir), str(small))))
    assert code == 2 and "lower calibration.n_samples" in err
    assert not (tmp_path / "runs").exists()


def test_failed_rerun_keeps_the_earlier_run(tmp_path, capsys, tiny_model_dir):
    path = recipe(tmp_path, str(tiny_model_dir))
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "cli-test"
    before = sorted(p.name for p in run_dir.iterdir())
    code, err = run_cli(capsys, "run", str(path), "--set", "calibration.dataset=/nope.txt")
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / "export" / "hf" / "model.safetensors").is_file()


def test_validate_checks_block_size_against_the_model(tmp_path, capsys, tiny_model_dir):
    path = recipe(tmp_path, str(tiny_model_dir))
    code, err = run_cli(capsys, "validate", str(path), "--set", "quantize.method=int4_awq",
                        "--set", "quantize.block_size=256")
    assert code == 2 and "quantize.block_size" in err and "set quantize.block_size to 128" in err


@pytest.mark.parametrize("name", ["baseline", "int8_sq", "int4_awq", "int4_rtn", "int4_gptq", "int4_hessian",
                                  "auto", "fp8", "fp8_kv",
                                  "demo", "demo_baseline"])
def test_shipped_recipes_pass_validate(capsys, name):
    code, err = run_cli(capsys, "validate", str(REPO / "recipes" / f"{name}.yaml"))
    assert code == 0, err


def test_interrupted_run_leftovers_are_cleaned_and_results_mean_complete(tmp_path, capsys, tiny_model_dir):
    path = recipe(tmp_path, str(tiny_model_dir))
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "cli-test"
    # What SIGKILL can leave: a half-written file and a staging folder.
    (run_dir / ".results.json.x1y2").write_text("{")
    (run_dir / "export" / ".hf.partial-abc").mkdir()
    (run_dir / "export" / ".hf.partial-abc" / "model.safetensors").write_bytes(b"\0" * 10)
    assert (run_dir / "results.json").stat().st_mode & 0o777 == 0o644
    assert main(["run", str(path)]) == 0
    assert not list(run_dir.rglob(".*"))
    assert (run_dir / "results.json").is_file()


def test_alpha_auto_choices_are_recorded_in_the_run_folder(tmp_path, tiny_model_dir):
    path = recipe(tmp_path, str(tiny_model_dir))
    path.write_text(path.read_text().replace("quantize: {method: fp8}",
                                             "quantize: {method: int8_sq, smoothquant_alpha: auto}"))
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "cli-test"
    alphas = json.loads((run_dir / "quantize" / "smoothquant_alphas.json").read_text())
    assert len(alphas) == 14 and all(0.0 < a < 1.0 for a in alphas.values())  # 2 layers x 7 linears
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["quantize"]["smoothquant_alphas"] == "quantize/smoothquant_alphas.json"
    assert stages["quantize"]["settings"]["activations"] == "per_token"


def test_hub_model_and_hub_dataset_offline_give_clear_errors(tmp_path, capsys, tiny_model_dir):
    code, err = run_cli(capsys, "validate", str(recipe(tmp_path, "HuggingFaceTB/SmolLM2-135M")))
    assert code == 2 and "model.source" in err and "network" in err
    assert_one_paragraph(err)
    code, err = run_cli(capsys, "validate", str(recipe(tmp_path, str(tiny_model_dir), "wikitext")))
    assert code == 2 and "calibration.dataset" in err and "could not load Hub dataset 'wikitext'" in err
    assert_one_paragraph(err)
