"""quantkit check: clean exports of every method pass; corrupted ones fail naming the tensor and the rule."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from _exports import VARIANTS, copy_export, edit_json, edit_tensors, export

from quantkit.check import Violation, check_checkpoint, read_safetensors_header, register_cli, run_check_cli

CLEAN = [(v, f) for v in VARIANTS for f in ("trtllm", "hf")]


def _hits(violations: list[Violation], tensor: str, rule: str) -> list[Violation]:
    return [v for v in violations if v.tensor_or_field == tensor and v.rule == rule]


@pytest.mark.parametrize(("variant", "fmt"), CLEAN)
def test_clean_exports_pass(variant: str, fmt: str) -> None:
    assert check_checkpoint(export(variant) / fmt) == []


def test_int4_rtn_trtllm_prequant_flag(tmp_path: Path) -> None:
    """ModelOpt labels INT4 RTN as W4A16_AWQ with pre_quant_scale: true but writes no pre-quant scales.

    TensorRT-LLM then gives every int4 linear a prequant_scaling_factor parameter that the file does not
    provide, and load() fails ("Required but not provided tensors"). quantkit's export writes the flag as
    false; check catches a checkpoint that says true (as ModelOpt alone writes it).
    """
    ckpt = copy_export("int4_rtn", "trtllm", tmp_path)
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["pre_quant_scale"] is False
    assert check_checkpoint(ckpt) == []
    edit_json(ckpt / "config.json", lambda c: c["quantization"].update(pre_quant_scale=True))
    violations = check_checkpoint(ckpt)
    assert len(violations) == 1  # one finding for the whole checkpoint, not one per linear
    assert _hits(violations, "quantization.pre_quant_scale", "scale.missing")
    assert "none of the 10 quantized linears" in violations[0].message  # 2 layers x qkv, dense, fc, gate, proj


def test_one_prequant_scale_missing(tmp_path: Path) -> None:
    ckpt = copy_export("int4_awq", "trtllm", tmp_path)
    name = "transformer.layers.1.mlp.proj.prequant_scaling_factor"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.pop(name))
    v = check_checkpoint(ckpt)
    assert len(v) == 1 and _hits(v, name, "scale.missing")


# --------------------------------------------------------------------------- corrupted checkpoints


def test_missing_scale(tmp_path: Path) -> None:
    ckpt = copy_export("fp8", "trtllm", tmp_path)
    name = "transformer.layers.0.attention.qkv.weights_scaling_factor"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.pop(name))
    v = check_checkpoint(ckpt)
    hit = _hits(v, name, "scale.missing")
    assert hit and "Required but not provided" in hit[0].message and len(v) == 1


def test_missing_scale_hf(tmp_path: Path) -> None:
    ckpt = copy_export("w4a8_awq", "hf", tmp_path)
    edit_tensors(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale_2"))
    assert _hits(check_checkpoint(ckpt), "model.layers.1.mlp.down_proj.weight_scale_2", "scale.missing")


def test_wrong_weight_dtype(tmp_path: Path) -> None:
    # HF's uint8 packing written into a TensorRT-LLM checkpoint, which wants int8.
    ckpt = copy_export("int4_awq", "trtllm", tmp_path)
    name = "transformer.layers.1.attention.qkv.weight"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: t[name].view(torch.uint8)}))
    v = check_checkpoint(ckpt)
    assert _hits(v, name, "weight.dtype") and "U8" in v[0].message and len(v) == 1


def test_wrong_scale_dtype(tmp_path: Path) -> None:
    ckpt = copy_export("int8_sq", "trtllm", tmp_path)
    name = "transformer.layers.0.mlp.gate.weights_scaling_factor"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: t[name].to(torch.int32)}))
    assert _hits(check_checkpoint(ckpt), name, "scale.dtype")


def test_float_linear_not_excluded(tmp_path: Path) -> None:
    ckpt = copy_export("fp8", "trtllm", tmp_path)
    name = "transformer.layers.0.mlp.proj.weight"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: t[name].to(torch.float16)}))
    v = _hits(check_checkpoint(ckpt), name, "linear.unquantized")
    assert v and "exclude_modules" in v[0].message


def test_wrong_group_scale_shape(tmp_path: Path) -> None:
    ckpt = copy_export("int4_awq", "trtllm", tmp_path)
    name = "transformer.layers.0.mlp.proj.weights_scaling_factor"  # [out=128, in/64=4]
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: t[name].T.contiguous()}))
    v = _hits(check_checkpoint(ckpt), name, "scale.shape")
    assert v and "[128, 4]" in v[0].message and "[4, 128]" in v[0].message


def test_wrong_group_size_hf(tmp_path: Path) -> None:
    # Scales made for group 128 in a checkpoint that says group 64.
    ckpt = copy_export("int4_awq", "hf", tmp_path)
    name = "model.layers.0.mlp.down_proj.weight_scale"  # [128, 256/64=4]
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({name: t[name][:, :2].contiguous()}))
    assert _hits(check_checkpoint(ckpt), name, "scale.shape")


def test_transposed_int4_weight(tmp_path: Path) -> None:
    ckpt = copy_export("int4_awq", "trtllm", tmp_path)
    name = "transformer.layers.0.mlp.proj.weight"  # [out/2=64, in=256] -> [256, 64]
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: t[name].T.contiguous()}))
    v = _hits(check_checkpoint(ckpt), name, "weight.shape")
    assert v and "[out/2, in]" in v[0].message


def test_rank_file_missing(tmp_path: Path) -> None:
    ckpt = copy_export("int8_sq", "trtllm", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["mapping"].update(world_size=2, tp_size=2))
    v = check_checkpoint(ckpt)
    assert _hits(v, "rank1.safetensors", "rank.missing") and len(v) == 1


def test_world_size_mismatch(tmp_path: Path) -> None:
    ckpt = copy_export("fp8", "trtllm", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["mapping"].update(world_size=4))
    assert _hits(check_checkpoint(ckpt), "mapping.world_size", "mapping.world_size")


@pytest.mark.parametrize(("fmt", "file"), [("trtllm", "rank0.safetensors"), ("hf", "model.safetensors")])
def test_truncated_safetensors(tmp_path: Path, fmt: str, file: str) -> None:
    ckpt = copy_export("int4_awq", fmt, tmp_path)
    path = ckpt / file
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)
    v = _hits(check_checkpoint(ckpt), file, "safetensors.header")
    assert v and "truncated" in v[0].message


def test_garbage_safetensors(tmp_path: Path) -> None:
    ckpt = copy_export("none", "trtllm", tmp_path)
    (ckpt / "rank0.safetensors").write_bytes(b"\x05\x00")
    assert _hits(check_checkpoint(ckpt), "rank0.safetensors", "safetensors.header")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_scale(tmp_path: Path, bad: float) -> None:
    ckpt = copy_export("int8_sq", "trtllm", tmp_path)
    name = "transformer.layers.1.attention.dense.activation_scaling_factor"
    edit_tensors(ckpt / "rank0.safetensors", lambda t: t.update({name: torch.full_like(t[name], bad)}))
    v = check_checkpoint(ckpt)
    assert _hits(v, name, "scale.finite") and len(v) == 1


def test_zero_scale(tmp_path: Path) -> None:
    ckpt = copy_export("fp8_kv", "hf", tmp_path)
    name = "model.layers.0.self_attn.v_proj.v_scale"
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({name: torch.zeros_like(t[name])}))
    assert _hits(check_checkpoint(ckpt), name, "scale.positive")


def test_excluded_module_quantized(tmp_path: Path) -> None:
    ckpt = copy_export("int8_sq", "trtllm", tmp_path)
    edit_json(ckpt / "config.json",
              lambda c: c["quantization"]["exclude_modules"].append("transformer.layers.0.mlp.fc"))
    v = check_checkpoint(ckpt)
    assert _hits(v, "transformer.layers.0.mlp.fc.weight", "exclude.quantized")
    assert _hits(v, "transformer.layers.0.mlp.fc.weights_scaling_factor", "exclude.quantized")


def test_excluded_module_quantized_hf(tmp_path: Path) -> None:
    ckpt = copy_export("fp8", "hf", tmp_path)
    edit_json(ckpt / "hf_quant_config.json",
              lambda c: c["quantization"]["exclude_modules"].append("model.layers.*.mlp.up_proj"))
    edit_json(ckpt / "config.json",
              lambda c: c["quantization_config"]["ignore"].append("model.layers.*.mlp.up_proj"))
    v = check_checkpoint(ckpt)
    assert _hits(v, "model.layers.1.mlp.up_proj.weight", "exclude.quantized")
    assert {x.rule for x in v} == {"exclude.quantized"}


def test_quant_algo_does_not_match_tensors(tmp_path: Path) -> None:
    ckpt = copy_export("fp8", "trtllm", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["quantization"].update(quant_algo="W8A8_SQ_PER_CHANNEL"))
    v = _hits(check_checkpoint(ckpt), "quantization.quant_algo", "quant_algo.matches_tensors")
    assert v and "F8_E4M3" in v[0].message and "FP8" in v[0].message


def test_quantized_label_on_float_checkpoint(tmp_path: Path) -> None:
    ckpt = copy_export("none", "hf", tmp_path)
    (ckpt / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null}}')
    edit_json(ckpt / "config.json", lambda c: c.update(quantization_config={"quant_method": "modelopt",
                                                                           "quant_algo": "FP8"}))
    v = _hits(check_checkpoint(ckpt), "quantization.quant_algo", "quant_algo.matches_tensors")
    assert v and "no linear is quantized" in v[0].message


def test_quant_algo_null_but_quantized(tmp_path: Path) -> None:
    ckpt = copy_export("int4_awq", "trtllm", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c["quantization"].update(quant_algo=None))
    assert _hits(check_checkpoint(ckpt), "transformer.layers.0.attention.qkv.weight", "quant_algo.matches_tensors")


def test_kv_scale_missing(tmp_path: Path) -> None:
    ckpt = copy_export("fp8_kv", "trtllm", tmp_path)
    att = "transformer.layers.1.attention"

    def drop(t: dict) -> None:
        for s in ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor"):
            t.pop(f"{att}.{s}", None)

    edit_tensors(ckpt / "rank0.safetensors", drop)
    assert _hits(check_checkpoint(ckpt), f"{att}.kv_cache_scaling_factor", "kv_scale.missing")


def test_hf_quant_config_inconsistent(tmp_path: Path) -> None:
    ckpt = copy_export("fp8_kv", "hf", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(kv_cache_quant_algo=None))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_method="fp8"))
    v = check_checkpoint(ckpt)
    assert _hits(v, "quantization_config.kv_cache_scheme", "hf.quant_config_consistent")
    assert _hits(v, "quantization_config.quant_method", "hf.quant_method")


def test_missing_config_field(tmp_path: Path) -> None:
    ckpt = copy_export("none", "trtllm", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.pop("num_attention_heads"))
    assert _hits(check_checkpoint(ckpt), "num_attention_heads", "config.field")


def test_header_reader_matches_safetensors() -> None:
    from safetensors import safe_open

    path = export("w4a8_awq") / "trtllm" / "rank0.safetensors"
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(header) == set(f.keys())
        name = "transformer.layers.0.attention.qkv.weight"
        assert list(header[name].shape) == f.get_slice(name).get_shape()


# --------------------------------------------------------------------------- run folders and the CLI


def _cli(path: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["check", str(path)])


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    import shutil

    for fmt in ("trtllm", "hf"):
        shutil.copytree(export("fp8") / fmt, run / "export" / fmt)
    args = _cli(run)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().endswith("pass every rule")

    name = "transformer.layers.0.mlp.gate.activation_scaling_factor"
    edit_tensors(run / "export" / "trtllm" / "rank0.safetensors",
                 lambda t: t.update({name: torch.full_like(t[name], math.nan)}))
    assert run_check_cli(args) == 1
    out = capsys.readouterr().out
    assert f"export/trtllm: {name} [scale.finite]" in out and out.strip().splitlines()[-1].startswith("FAILED")

    assert run_check_cli(_cli(tmp_path / "nowhere")) == 2
    (tmp_path / "empty").mkdir()
    assert run_check_cli(_cli(tmp_path / "empty")) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
