"""quantkit build: per-method trtllm-build options pinned to NVIDIA's settings, the files, the missing-runtime stop.

The expected options are those of NVIDIA/TensorRT-Model-Optimizer examples/llm_ptq/modelopt_to_tensorrt_llm.py
(`build_tensorrt_llm`: gemm_plugin per quant_algo, paged context FMHA, fused MLP, max_num_tokens bound) and
NVIDIA/TensorRT-LLM tensorrt_llm/commands/build.py (fused MLP forced off for quantized non-FP8 checkpoints),
tensorrt_llm/layers/attention.py (FP8 context FMHA only with the FP8 Q/DQ workflow).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _exports import export, make_run

from quantkit.build import build_argv, build_engines, make_build_plan, register_cli, write_build_files
from quantkit.errors import MissingDependencyError, QuantkitError
from quantkit.recipe import BuildSection

COMMON = {"gpt_attention_plugin": "auto", "context_fmha": "enable", "remove_input_padding": "enable",
          "kv_cache_type": "paged", "max_num_tokens": 8192, "reduce_fusion": "enable"}
# variant -> (gemm_plugin, use_paged_context_fmha, use_fp8_context_fmha, use_fused_mlp, target line).
# The DESIGN.md table: none -> model dtype, FP8 -> off (fp8 at batch <= 4), W8A8_SQ -> off, W4A*_AWQ -> auto.
TABLE = {
    "none": ("float16", "enable", "disable", "enable", "pytorch"),
    "int8_sq": ("disable", "disable", "disable", "disable", "engine"),
    "int4_awq": ("auto", "disable", "disable", "disable", "pytorch"),
    "fp8": ("disable", "enable", "disable", "enable", "pytorch"),
    "fp8_kv": ("disable", "enable", "enable", "enable", "pytorch"),
    "w4a8_awq": ("auto", "enable", "disable", "disable", "pytorch"),
}


@pytest.mark.parametrize("variant", list(TABLE))
def test_plugin_settings_per_method(variant: str) -> None:
    gemm, paged_ctx, fp8_ctx, fused, line = TABLE[variant]
    plan = make_build_plan(export(variant) / "trtllm", BuildSection())
    opts = plan["engine"]["options"]
    assert {k: opts[k] for k in COMMON} == COMMON
    assert opts["gemm_plugin"] == gemm
    assert opts["use_paged_context_fmha"] == paged_ctx  # explicit: the default flipped between 0.x and 1.x
    assert opts["use_fp8_context_fmha"] == fp8_ctx
    assert opts["use_fused_mlp"] == fused
    assert "gather_context_logits" not in opts
    assert plan["target"]["line"] == line
    assert set(plan["engine"]["reasons"]) == set(opts)  # every option says why


def test_int8_sq_is_engine_only() -> None:
    plan = make_build_plan(export("int8_sq") / "trtllm", BuildSection())
    assert plan["serve"] is None
    assert "PyTorch backend" in plan["target"]["why"] and "SmoothQuant" in plan["target"]["why"]
    assert any("does not support" in n for n in plan["notes"])


def test_serve_section_for_hf() -> None:
    plan = make_build_plan(export("int4_awq") / "trtllm", BuildSection(max_batch_size=4, max_input_len=512))
    assert plan["serve"]["options"] == {"backend": "pytorch", "max_batch_size": 4, "max_num_tokens": 2048,
                                       "max_seq_len": 1152, "tp_size": 1, "pp_size": 1}
    assert plan["paths"]["hf_checkpoint"].endswith("hf")


def test_fp8_low_batch_uses_fp8_gemm_plugin() -> None:
    plan = make_build_plan(export("fp8") / "trtllm", BuildSection(max_batch_size=4))
    assert plan["engine"]["options"]["gemm_plugin"] == "fp8"


def test_max_num_tokens_capped() -> None:
    plan = make_build_plan(export("none") / "trtllm", BuildSection(max_batch_size=64, max_input_len=2048,
                                                                   max_seq_len=4096))
    assert plan["engine"]["options"]["max_num_tokens"] == 16384


def test_accuracy_build_gathers_context_logits() -> None:
    plan = make_build_plan(export("fp8") / "trtllm", BuildSection(), accuracy_build=True)
    assert "--gather_context_logits" in build_argv(plan)


def test_overrides_win() -> None:
    build = BuildSection(overrides={"gemm_plugin": "float16", "use_paged_context_fmha": None,
                                    "multiple_profiles": "enable", "gemm_plugn": "x"})
    plan = make_build_plan(export("fp8") / "trtllm", build)
    opts = plan["engine"]["options"]
    assert opts["gemm_plugin"] == "float16" and opts["multiple_profiles"] == "enable"
    assert "use_paged_context_fmha" not in opts
    assert plan["engine"]["reasons"]["gemm_plugin"] == "recipe build.overrides"
    assert any("'gemm_plugn'" in n and "gemm_plugin" in n for n in plan["notes"])
    with pytest.raises(QuantkitError, match="output_dir"):
        make_build_plan(export("fp8") / "trtllm", BuildSection(overrides={"output_dir": "/x"}))


def test_write_build_files(tmp_path: Path) -> None:
    run = make_run("fp8_kv", tmp_path)
    plan = make_build_plan(run / "export" / "trtllm", BuildSection(), engine_dir=run / "build" / "engines")
    write_build_files(run, plan)
    sh = run / "build" / "build.sh"
    assert os.access(sh, os.X_OK)
    text = sh.read_text()
    assert "--checkpoint_dir export/trtllm \\\n    --output_dir build/engines \\\n    --max_batch_size 8" in text
    assert "--use_fp8_context_fmha enable" in text and "trtllm-serve export/hf --backend pytorch" in text
    subprocess.run(["bash", "-n", str(sh)], check=True)
    written = json.loads((run / "build" / "plan.json").read_text())
    assert written["paths"] == {"trtllm_checkpoint": "export/trtllm", "hf_checkpoint": "export/hf",
                                "engine_dir": "build/engines"}
    assert sorted(p.name for p in (run / "build").iterdir()) == ["build.sh", "plan.json"]  # no temp leftovers


def test_build_stops_without_tensorrt_llm(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    run = make_run("int4_awq", tmp_path)
    plan = make_build_plan(run / "export" / "trtllm", BuildSection())
    write_build_files(run, plan)
    with pytest.raises(MissingDependencyError) as err:
        build_engines(run, plan)
    msg = str(err.value)
    assert "tensorrt_llm" in msg and str(run.resolve() / "build" / "build.sh") in msg


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run("int8_sq", tmp_path)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["build", run.name, "--accuracy"])  # a relative RUN
    assert args.func(args) == 2  # no TensorRT-LLM here: the plan is written, the build stops with the reason
    captured = capsys.readouterr()
    assert "plan.json" in captured.out and "tensorrt_llm" in captured.err
    assert "--gather_context_logits" in (run / "build" / "build.sh").read_text()
    paths = json.loads((run / "build" / "plan.json").read_text())["paths"]
    assert paths == {"trtllm_checkpoint": "export/trtllm", "hf_checkpoint": "export/hf", "engine_dir": "build/engines"}
    shutil.rmtree(run / "export")
    assert args.func(args) == 2 and "no export" in capsys.readouterr().err


# Which runtime loads each method's HF checkpoint, from their documented formats (TensorRT-LLM
# docs/source/features/quantization.md PyTorch recipes; vLLM docs/features/quantization/modelopt.md: FP8,
# FP8_PER_CHANNEL_PER_TOKEN, NVFP4 via modelopt_fp4; SGLang's ModelOpt FP8 / NVFP4).
CONSUMERS = {
    "none": {"TensorRT-LLM"},
    "int8_sq": set(),
    "int8_sq_pt": set(),
    "int4_awq": {"TensorRT-LLM"},
    "int4_rtn": {"TensorRT-LLM"},
    "w4a8_awq": {"TensorRT-LLM"},
    "fp8": {"TensorRT-LLM", "vLLM", "SGLang"},
}


@pytest.mark.parametrize("variant", list(CONSUMERS))
def test_hf_consumers_per_method(variant: str) -> None:
    plan = make_build_plan(export(variant) / "trtllm", BuildSection())
    runtimes = {c["runtime"].split()[0] for c in plan["hf_consumers"]}
    assert runtimes == CONSUMERS[variant]
    for c in plan["hf_consumers"]:
        assert plan["paths"]["hf_checkpoint"] in c["command"]
    if not runtimes:  # INT8 SmoothQuant: only the engine line serves it
        assert any("No documented runtime loads the HF checkpoint" in n for n in plan["notes"])
    if variant == "fp8":
        assert any("--quantization modelopt" in c["command"] for c in plan["hf_consumers"])
