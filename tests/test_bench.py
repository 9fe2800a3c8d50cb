"""quantkit.bench: the decode loop is right (same tokens as HF generate), capturable (no host sync in a step),
and `quantkit bench RUN` writes sane numbers into RUN/bench/bench.json. CPU, tiny models."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from _runtime_helpers import roundtrip, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from quantkit.bench import Generator, bench_model, bench_run, checkpoint_size, register_cli
from quantkit.recipe import BenchSection, Recipe
from quantkit.runtime import load_quantized

CPU = torch.device("cpu")


def _greedy_hf(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_decode_loop_gives_hf_generate_tokens() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        gen = Generator(model, 2, 32, CPU, cuda_graph=False)
        tokens, ttft, dec = gen.generate(ids, 12)
    assert torch.equal(tokens, _greedy_hf(model, ids, 12))
    assert ttft > 0 and dec > 0


def test_runtime_model_generates_what_the_fake_quantized_model_generates() -> None:
    rt = roundtrip("int8_sq")
    model, _ = load_quantized(rt.hf_dir, "cpu", torch.float32)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        tokens, _, _ = Generator(model, 1, 24, CPU, cuda_graph=False).generate(ids, 8)
    import copy

    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    fake = copy.deepcopy(rt.fake)
    requantize_resmooth_fused_llm_layers(fake)  # the model the HF checkpoint encodes (see _runtime_helpers)
    assert torch.equal(tokens, _greedy_hf(fake, ids, 8))


class _SyncRecorder(TorchDispatchMode):
    """Records ops that read device data on the host (they break CUDA graph capture)."""

    SYNCING: ClassVar[set[str]] = {"_local_scalar_dense", "nonzero", "masked_select", "item", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", [None, "int8_sq", "int4_awq", "fp8_kv"])
def test_decode_step_never_reads_device_values_on_the_host(variant: str | None) -> None:
    model = tiny_llama() if variant is None else load_quantized(roundtrip(variant).hf_dir, "cpu", torch.float32)[0]
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        gen = Generator(model, 2, 24, CPU, cuda_graph=False)
        gen.prefill(ids)
        with _SyncRecorder() as rec:
            gen._step()
            gen._step()
    assert rec.seen == []


def test_bench_model_numbers_are_sane() -> None:
    model, tok = load_quantized(roundtrip("int4_awq").hf_dir, "cpu", torch.float32)
    bench = BenchSection(batch_sizes=[1, 2], input_len=16, output_len=6, warmup=0, repeats=2)
    res = bench_model(model, tok, bench, "cpu", fuse=True)
    assert res["fused_layers"] == 4  # 2 x (q/k/v, gate/up)
    assert [r["batch_size"] for r in res["results"]] == [1, 2]
    for r in res["results"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and 0 < r["ttft_s"] < 60
        assert r["peak_cpu_mb"] > 10 and r["peak_gpu_mb"] is None
        assert r["repeats"] == 2 and len(r["first_tokens"]) == 6
    assert res["kernels"]["int4/prefill:dequant"] == 2 * 4  # per layer: qkv, o, gate_up, down
    assert 0 < res["weight_bytes_per_step"] < 4 * 256 * 128 + 14 * 256 * 128


def test_checkpoint_size(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1" * 100)
    (tmp_path / "y.json").write_text("{}")
    assert checkpoint_size(tmp_path) == 102
    assert checkpoint_size(tmp_path / "y.json") == 2


# ---------------------------------------------------------------- run folders and the CLI


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(folder)


def _run_folder(root: Path, method: str, source: str) -> Path:
    recipe = Recipe.model_validate({
        "metadata": {"name": f"tiny-{method}"},
        "model": {"source": source, "dtype": "float32"},
        "quantize": {"method": method},
        "calibration": {"dataset": "builtin:wiki", "n_samples": 8, "seq_len": 32, "batch_size": 4},
        "export": {"hf": True},
        "build": {"enabled": False},
        "evaluate": {"tasks": []},
        "bench": {"batch_sizes": [1], "input_len": 12, "output_len": 4, "warmup": 0, "repeats": 1},
        "output_dir": str(root),
    })
    run = recipe.run_dir()
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    return run


def test_bench_run_quantized_and_cli(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, "int8_sq", "unused-for-quantized-runs")
    shutil.copytree(roundtrip("int8_sq").hf_dir, run / "export" / "hf")
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["bench", str(run), "--device", "cpu"])
    assert args.func(args) == 0
    data = json.loads((run / "bench" / "bench.json").read_text())
    assert data["method"] == "int8_sq" and data["device"] == "cpu"
    assert data["checkpoint_bytes"] == checkpoint_size(run / "export" / "hf") > 0
    assert data["results"][0]["decode_tok_s"] > 0
    assert not list((run / "bench").glob(".*"))  # no temporary file left behind
    assert "bench" in json.loads((run / "manifest.json").read_text())["stages"]


def test_bench_run_unquantized_baseline(tmp_path: Path) -> None:
    src = tmp_path / "tiny-src"
    tiny_llama().save_pretrained(src)
    _tiny_tokenizer(src)
    run = _run_folder(tmp_path, "none", str(src))
    data = bench_run(run, device="cpu")
    assert data["method"] == "none" and data["kernels"] == {}
    assert data["checkpoint_bytes"] == checkpoint_size(src)
    assert (run / "bench" / "bench.json").is_file()


def test_bench_uses_a_built_engine_only_where_tensorrt_llm_runs(tmp_path: Path, monkeypatch) -> None:
    """With build/engine.json from `quantkit build`, bench runs the engine where TensorRT-LLM and CUDA exist;
    here neither does, so it says so and measures the HF checkpoint with quantkit.runtime."""
    import quantkit.bench as qb

    run = _run_folder(tmp_path, "int8_sq", "unused-for-quantized-runs")
    shutil.copytree(roundtrip("int8_sq").hf_dir, run / "export" / "hf")
    engines = run / "build" / "engines"
    engines.mkdir(parents=True)
    (engines / "rank0.engine").write_bytes(b"\0" * 16)
    (run / "build" / "engine.json").write_text(json.dumps({"engine_dir": str(engines)}))
    assert qb.built_engine_dir(run) == engines
    calls = []
    monkeypatch.setattr(qb, "bench_engine", lambda *a, **k: calls.append(a) or {})
    data = bench_run(run, device="cpu")
    assert calls == [] and data["runtime"] == "quantkit.runtime" and data["loaded"].endswith("export/hf")
    monkeypatch.setattr(qb, "tensorrt_llm_available", lambda: True)  # as on a deployment machine
    monkeypatch.setattr(qb, "bench_engine", lambda *a, **k: {"runtime": "tensorrt_llm engine", "card": "gpu",
                                                             "results": [], "compile": False, "cuda_graph": False})
    data = bench_run(run, device="cuda")
    assert data["runtime"] == "tensorrt_llm engine" and data["loaded"] == str(engines)
