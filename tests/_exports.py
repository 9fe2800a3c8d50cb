"""Tiny real exports (random 2-layer Llama, hidden 128) of every method, made once per test process.

Both checkpoint formats come from the real ModelOpt exporters through quantkit.export, so the checks and
plans are tested against what quantkit actually writes. Each variant takes 0.1-3 s on 2 CPU cores.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

ROOT = Path(tempfile.mkdtemp(prefix="quantkit-test-exports-"))
atexit.register(shutil.rmtree, ROOT, True)

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "int8_sq": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_tensor"},  # static act. scales
    "int8_sq_pt": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"},
    "int4_awq": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_lite"},  # writes pre-quant scales
    "int4_awq_clip": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_clip"},  # the SmolLM2 recipes: none
    "int4_rtn": {"method": "int4_rtn", "block_size": 64},
    "int4_gptq": {"method": "int4_gptq", "block_size": 64, "gptq_block": 64},
    "int4_hessian": {"method": "int4_hessian", "block_size": 64},
    "fp8": {"method": "fp8"},
    "fp8_kv": {"method": "fp8", "kv_cache": "fp8"},
    "w4a8_awq": {"method": "w4a8_awq", "block_size": 64},
}
_done: dict[str, Path] = {}


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def export(variant: str) -> Path:
    """Folder with trtllm/ and hf/ for a variant of VARIANTS (cached for the process)."""
    if variant in _done:
        return _done[variant]
    import torch

    from quantkit.calibration import CalibrationSet
    from quantkit.export import export_hf, export_trtllm, prepare_for_deployment
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection

    model = tiny_model()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model = quantize_model(model, QuantizeSection(**VARIANTS[variant]), CalibrationSet(ids, 4, "test"))
    out = ROOT / variant
    prepare_for_deployment(model)  # as the pipeline does (without it CPU tests missed issue 12's AWQ defect)
    export_trtllm(model, out / "trtllm", dtype="float16")
    export_hf(model, out / "hf")
    _done[variant] = out
    return out


def copy_export(variant: str, fmt: str, dest: Path) -> Path:
    """A private copy of one checkpoint (tests corrupt it)."""
    target = dest / f"{variant}-{fmt}"
    shutil.copytree(export(variant) / fmt, target)
    return target


def edit_tensors(file: Path, fn) -> None:
    """Load a safetensors file, let fn(dict) change it, save it back."""
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_json(file: Path, fn) -> None:
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data, indent=2))


def make_recipe(variant: str, name: str | None = None):
    from quantkit.recipe import Recipe

    q = VARIANTS[variant]
    return Recipe.model_validate({
        "metadata": {"name": name or f"tiny-{variant}", "description": f"tiny random Llama, {variant}"},
        "model": {"source": "tiny-random-llama (test)", "dtype": "float32"},
        "quantize": q,
        "calibration": {"dataset": "builtin:wiki", "n_samples": 8, "seq_len": 32, "batch_size": 4, "seed": 1},
        "export": {"trtllm": {"tp_size": 1, "dtype": "float16"}, "hf": True},
        "build": {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 1152},
        "evaluate": {"tasks": ["wiki_ppl", "arc_easy"], "limit": 50},
    })


def make_run(variant: str, parent: Path, *, results: dict | None = None) -> Path:
    """A run folder as the pipeline leaves it: recipe.yaml, export/{trtllm,hf}, results.json."""
    recipe = make_recipe(variant)
    run = parent / recipe.metadata.name
    (run / "export").mkdir(parents=True)
    for fmt in ("trtllm", "hf"):
        shutil.copytree(export(variant) / fmt, run / "export" / fmt)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    if results is not None:
        (run / "results.json").write_text(json.dumps(results, indent=2))
    return run
