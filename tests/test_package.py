"""quantkit package: a self-contained, verifiable bundle with a model card, that quantkit check passes."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _exports import edit_json, make_run

from quantkit.check import check_checkpoint
from quantkit.errors import QuantkitError
from quantkit.package import package_run, register_cli

RESULTS = {
    "metrics": {"wiki_ppl": {"word_perplexity": 31.9, "word_perplexity_stderr": 0.4, "n": 50},
                "arc_easy": {"acc": 0.41, "acc_stderr": 0.02, "acc_norm": 0.39, "alias": "arc_easy"}},
    "baseline": {"wiki_ppl": {"word_perplexity": 30.1}, "arc_easy": {"acc": 0.43}},
}


def test_package_int4_awq(tmp_path: Path) -> None:
    run = make_run("int4_awq", tmp_path / "runs", results=RESULTS)
    out = package_run(run, tmp_path / "bundle")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "recipe.yaml", "results.json", "SHA256SUMS", "build/plan.json", "build/build.sh",
            "checkpoints/trtllm/config.json", "checkpoints/trtllm/rank0.safetensors", "checkpoints/hf/config.json",
            "checkpoints/hf/hf_quant_config.json", "checkpoints/hf/model.safetensors"} <= files
    assert not list(tmp_path.glob(".bundle.partial-*"))

    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, check=True)
    assert len((out / "SHA256SUMS").read_text().splitlines()) == len(files) - 1

    plan = json.loads((out / "build" / "plan.json").read_text())
    assert plan["paths"] == {"trtllm_checkpoint": "checkpoints/trtllm", "hf_checkpoint": "checkpoints/hf",
                             "engine_dir": "build/engines"}
    sh = (out / "build" / "build.sh").read_text()
    assert "--checkpoint_dir checkpoints/trtllm" in sh and str(run) not in sh
    subprocess.run(["bash", "-n", str(out / "build" / "build.sh")], check=True)

    card = (out / "README.md").read_text()
    for needle in ("# tiny-int4_awq", "`int4_awq`", "INT4_AWQ_CFG", "block_size=64", "awq_algorithm=awq_lite",
                   "exclude=['lm_head']", "`builtin:wiki`, 8 samples x 32 tokens = 256 tokens", "W4A16_AWQ",
                   "| wiki_ppl | word_perplexity ↓ | 31.9 ± 0.4 | 30.1 | +1.8 (+6.0%) |",
                   "| arc_easy | acc_norm | 0.39 | not measured | — |", "sha256sum -c SHA256SUMS",
                   "bash build/build.sh", "trtllm-serve checkpoints/hf --backend pytorch", "nvidia-modelopt",
                   "modelopt 0.47", "passes every rule", "`--gemm_plugin` | `auto`"):
        assert needle in card, needle
    assert "| n |" not in card
    assert check_checkpoint(out) == []


def test_package_tolerates_missing_pieces(tmp_path: Path) -> None:
    run = make_run("fp8", tmp_path / "runs")  # no results.json
    shutil.rmtree(run / "export" / "trtllm")
    out = package_run(run, tmp_path / "bundle")
    card = (out / "README.md").read_text()
    assert "Not measured" in card and "| TensorRT-LLM checkpoint | not exported |" in card
    assert not (out / "results.json").exists() and check_checkpoint(out) == []


def test_refuses_nonempty_out_unless_forced(tmp_path: Path) -> None:
    run = make_run("none", tmp_path / "runs")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(QuantkitError, match="not empty"):
        package_run(run, out)
    assert (out / "keep.txt").exists()
    package_run(run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "README.md").exists()
    with pytest.raises(QuantkitError, match="overlaps"):
        package_run(run, run / "export" / "bundle", force=True)


def test_refuses_failing_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run("int8_sq", tmp_path / "runs")
    edit_json(run / "export" / "trtllm" / "config.json", lambda c: c["mapping"].update(tp_size=2, world_size=2))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["package", str(run), str(tmp_path / "bundle")])
    assert args.func(args) == 2
    assert "rank1.safetensors [rank.missing]" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
    args = parser.parse_args(["package", str(run), str(tmp_path / "bundle"), "--allow-violations"])
    assert args.func(args) == 0
    assert "FAILS with 1 violation" in (tmp_path / "bundle" / "README.md").read_text()


def test_model_card_offers_only_runtimes_that_load_the_format(tmp_path: Path) -> None:
    card = (package_run(make_run("fp8", tmp_path / "runs", results=RESULTS), tmp_path / "b1") / "README.md").read_text()
    assert "vllm serve checkpoints/hf --quantization modelopt" in card and "sglang.launch_server" in card
    card = (package_run(make_run("int4_awq", tmp_path / "runs2", results=RESULTS), tmp_path / "b2")
            / "README.md").read_text()
    assert "vllm serve" not in card and "trtllm-serve checkpoints/hf --backend pytorch" in card
    # the layer table of the shipped TensorRT-LLM checkpoint (quantkit.trtllm_layout.describe)
    assert "WeightOnlyGroupwiseQuantLinear" in card and "| every linear | `weights_scaling_factor` |" in card
