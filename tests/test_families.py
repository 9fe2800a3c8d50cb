"""Every decoder family quantkit has a file for, on tiny random-weight models (transformers' own configs):
quantize with each method that runs on CPU -> HF unified export (and TensorRT-LLM where the family file names a
decoder type) -> quantkit's checker; the HF checkpoint reproduces the model it came from (runtime, per family the
runtime supports); MoE experts quantized, routers not, expert token counts recorded; a family without a file works
for everything that needs no family knowledge and fails in preflight, naming the stage, where it does.

Ground truth comes from outside quantkit: ModelOpt's own model-type table (`get_model_type`) for the TensorRT-LLM
decoder types, ModelOpt's exporter itself for the families it refuses, the checker's rules (TensorRT-LLM and
ModelOpt sources, see quantkit/check.py) and the fake-quantized model's logits for the checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _families import FAMILIES, tiny_model
from safetensors import safe_open

from quantkit.archs import GENERIC as GENERIC_FAMILY
from quantkit.archs import families, family, load_family_file
from quantkit.errors import QuantkitError

# Methods that run on CPU. int4_awq: awq_clip, the shipped default (awq_lite's TensorRT-LLM export loses fused
# pre-quant scales for every family, Llama included: DESIGN.md).
METHODS = {
    "none": {"method": "none"},
    "fp8": {"method": "fp8"},
    "fp8_pcpt": {"method": "fp8_pcpt"},
    "int8_sq": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_tensor"},
    "int8_wo": {"method": "int8_wo"},
    "int4_rtn": {"method": "int4_rtn", "block_size": 64},
    "int4_awq": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_clip"},
    "w4a8_awq": {"method": "w4a8_awq", "block_size": 64},
}
# w4a8_awq writes pre-quant scales that ModelOpt's TensorRT-LLM export then drops for fused layers (DESIGN.md,
# the same for Llama): its TensorRT-LLM checkpoint is not checked here, its HF one is.
TRTLLM_KNOWN_BAD = {"w4a8_awq"}
MOE_TYPES = [t for t in FAMILIES if family(t).moe_router]


def calib():
    from quantkit.calibration import CalibrationSet

    return CalibrationSet(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)), 4, "test")


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))


_made: dict[tuple[str, str], tuple[torch.nn.Module, Path]] = {}


def quantized(model_type: str, method: str, root: Path) -> tuple[torch.nn.Module, Path]:
    """(model as the pipeline evaluates it, folder with hf/ and, where supported, trtllm/), float32."""
    key = (model_type, method)
    if key not in _made:
        from quantkit.export import export_hf, export_trtllm, prepare_for_deployment
        from quantkit.quantize import quantize_model
        from quantkit.recipe import QuantizeSection

        model = quantize_model(tiny_model(model_type), QuantizeSection(**METHODS[method]), calib())
        if method != "none":
            prepare_for_deployment(model)
        out = root / f"{model_type}-{method}"
        if family(model_type).trtllm_decoder_type is not None:
            export_trtllm(model, out / "trtllm", dtype="float16")
        export_hf(model, out / "hf", dtype="float32")
        _made[key] = (model, out)
    return _made[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


# ------------------------------------------------------------------ the family files


def test_every_listed_family_has_a_file_and_llama_keeps_its_decoder_type() -> None:
    assert set(FAMILIES) <= set(families())
    assert family("llama").trtllm_decoder_type == "llama"
    assert family("olmo") is GENERIC_FAMILY


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if family(t).trtllm_decoder_type])
def test_decoder_type_is_what_modelopt_itself_derives(model_type: str) -> None:
    """ModelOpt's model-type table (export/model_utils.py MODEL_NAME_TO_TYPE) is the independent source."""
    from modelopt.torch.export.model_utils import get_model_type

    assert family(model_type).trtllm_decoder_type == get_model_type(tiny_model(model_type))


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if not family(t).trtllm_decoder_type])
def test_families_without_trtllm_export_are_refused_by_modelopt_itself(model_type: str) -> None:
    """The family file says 'no TensorRT-LLM export'; ModelOpt's exporter, given its own decoder type for the
    model, indeed fails (so the file is not hiding a working path)."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    from quantkit.export import export_trtllm

    model = tiny_model(model_type)
    model.config.architectures = [type(model).__name__]
    with pytest.raises(Exception):  # noqa: B017 - whatever ModelOpt raises
        export_tensorrt_llm_checkpoint(model, decoder_type=get_model_type(model), dtype=torch.float16,
                                       export_dir="/tmp/quantkit-never-written")
    with pytest.raises(QuantkitError) as err:
        export_trtllm(model, Path("/tmp/quantkit-never-written-2"))
    assert err.value.where == "export.trtllm" and "export.trtllm: null" in str(err.value)
    assert not Path("/tmp/quantkit-never-written-2").exists()


@pytest.mark.parametrize(("text", "field"), [
    ("model_types: []\ntrtllm_decoder_type: llama\ndefault_exclude: []\n", "model_types"),
    ("model_types: [x]\ntrtllm_decoder_type: null\ndefault_exclude: []\n", "trtllm_unsupported"),
    ("model_types: [x]\ntrtllm_decoder_type: llama\ndefault_exclude: []\nfused_group: []\n", "fused_group"),
    ("model_types: [x]\ntrtllm_decoder_type: llama\ndefault_exclude: []\n"
     "fused_groups: [{parent: mlp, parts: [gate_proj], fused: g}]\n", "fused_groups[0].parts"),
    ("model_types: [x]\ntrtllm_decoder_type: llama\n", "default_exclude"),
])
def test_a_broken_family_file_names_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(QuantkitError) as err:
        load_family_file(path)
    assert "broken.yaml" in str(err.value) and f"'{field}'" in str(err.value)


# ------------------------------------------------------------------ family x method: both exports, the checker


def _applies(model_type: str, method: str) -> bool:
    return method not in family(model_type).unsupported_methods


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_quantizes_exports_and_passes_the_checker(model_type: str, method: str, root: Path) -> None:
    from quantkit.check import check_hf, check_trtllm

    if not _applies(model_type, method):
        pytest.skip(f"{model_type}: {family(model_type).methods_unsupported_reason}")
    _, out = quantized(model_type, method, root)
    assert check_hf(out / "hf") == []
    if family(model_type).trtllm_decoder_type is None:
        assert not (out / "trtllm").exists()
    elif method not in TRTLLM_KNOWN_BAD:
        assert check_trtllm(out / "trtllm") == []
    qc = json.loads((out / "hf" / "config.json").read_text()).get("quantization_config")
    assert (qc is None) == (method == "none")


RUNTIME_TYPES = [t for t in FAMILIES if family(t).runtime_unsupported is None]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
@pytest.mark.parametrize("model_type", RUNTIME_TYPES)
def test_checkpoint_reproduces_the_evaluated_model(model_type: str, method: str, root: Path) -> None:
    """quantkit.runtime loads the HF checkpoint from config.json alone; its logits equal the fake-quantized model
    the pipeline evaluates (float32 CPU bound of tests/test_runtime.py), unfused and with the family's fusion."""
    from quantkit.runtime import QuantLinear, load_quantized

    fake, out = quantized(model_type, method, root)
    with torch.no_grad():
        ref = fake(ids()).logits.float()
    for fuse in (False, True):
        model, _ = load_quantized(out / "hf", "cpu", torch.float32, fuse=fuse)
        assert any(isinstance(m, QuantLinear) for m in model.modules())
        with torch.no_grad():
            got = model(ids()).logits.float()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-4, (model_type, method, fuse, err)


@pytest.mark.parametrize("model_type", RUNTIME_TYPES)
def test_runtime_fuses_what_the_family_file_names(model_type: str, root: Path) -> None:
    from quantkit.runtime import FusedGateUpMLP, load_quantized

    model, _ = load_quantized(quantized(model_type, "fp8", root)[1] / "hf", "cpu", torch.float32, fuse=True)
    groups = family(model_type).fused_groups
    names = [n for n in model.quantkit_kernels if n.endswith(tuple(g.fused for g in groups))]
    assert len(names) == 2 * len(groups)  # 2 layers x each group
    if any(g.down for g in groups):
        assert isinstance(model.model.layers[0].mlp, FusedGateUpMLP)


def test_a_negative_control_breaks_the_reproduction(root: Path) -> None:
    """The 1e-4 bound can fail: scaling a non-Llama checkpoint's weight scales moves the logits far past it."""
    from safetensors.torch import load_file, save_file

    from quantkit.runtime import load_quantized

    fake, out = quantized("qwen2", "int8_wo", root)
    bad = root / "qwen2-bad"
    shutil.copytree(out / "hf", bad)
    f = bad / "model.safetensors"
    t = load_file(str(f))
    save_file({k: v * 1.5 if k.endswith("weight_scale") else v for k, v in t.items()}, str(f),
              metadata={"format": "pt"})
    model, _ = load_quantized(bad, "cpu", torch.float32)
    with torch.no_grad():
        ref, got = fake(ids()).logits, model(ids()).logits
    assert ((got - ref).norm() / ref.norm()).item() > 1e-2


# ------------------------------------------------------------------ mixture of experts


def _dtypes(hf: Path) -> dict[str, str]:
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("method", ["fp8", "int8_sq", "int8_wo"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_experts_quantized_routers_kept(model_type: str, method: str, root: Path) -> None:
    fake, out = quantized(model_type, method, root)
    dt = _dtypes(out / "hf")
    n_experts = fake.config.num_local_experts if model_type == "mixtral" else fake.config.num_experts
    want = {"fp8": "F8_E4M3", "int8_wo": "I8", "int8_sq": "I8"}[method]
    for layer in range(2):
        # per expert: gate/up/down (Mixtral's checkpoint keeps its original names w1/w3/w2)
        experts = [k for k in dt if f"layers.{layer}." in k and ".experts." in k and
                   k.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))]
        assert len(experts) == 3 * n_experts and {dt[k] for k in experts} == {want}, experts
        routers = [k for k in dt if f"layers.{layer}." in k and k.endswith((".gate.weight", "expert_gate.weight"))]
        assert routers and {dt[k] for k in routers} == {"F32"}, routers
    excluded = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert any(e.endswith(".gate") for e in excluded)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_token_counts_cover_the_calibration_tokens(model_type: str, root: Path) -> None:
    """Each layer's router picks top_k experts for every calibration token once: counts sum to tokens x top_k
    (SmoothQuant runs the loop again; the first pass is counted)."""
    from quantkit.moe import coverage

    fake, _ = quantized(model_type, "int8_sq", root)
    counts = fake.quantkit_expert_tokens
    assert len(counts) == 2
    tokens = calib().input_ids.numel()
    for t in counts.values():
        assert int(t.sum()) == tokens * fake.config.num_experts_per_tok
    info = coverage(counts)
    assert info["experts"] == 8 and info["moe_layers"] == 2
    assert info["experts_with_calibration_tokens"] == sum(int((t > 0).sum()) for t in counts.values())


def test_experts_the_router_never_picks_are_reported(caplog) -> None:
    """Router rows (v, -v, 0, 0) with top-1: experts 2 and 3 can never win, so they see no calibration token."""
    from quantkit.moe import record_expert_coverage
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection

    model = tiny_model("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            v = torch.randn(w.shape[1])
            w.copy_(torch.stack([v, -v, torch.zeros_like(v), torch.zeros_like(v)]))
    model = quantize_model(model, QuantizeSection(method="fp8"), calib())
    with caplog.at_level("WARNING"):
        info = record_expert_coverage(model)
    assert info["experts_with_calibration_tokens"] == 4
    assert info["experts_without_calibration_tokens"] == {f"model.layers.{i}.mlp.gate": [2, 3] for i in range(2)}
    assert "4 of 8 experts saw no calibration token" in caplog.text


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_runtime_says_why_it_cannot_run_moe(model_type: str, root: Path) -> None:
    from quantkit.runtime import load_quantized

    with pytest.raises(QuantkitError) as err:
        load_quantized(quantized(model_type, "fp8", root)[1] / "hf")
    assert err.value.where == "runtime" and "fused" in str(err.value)


# ------------------------------------------------------------------ the pipeline: generic model, preflight, MoE


def _model_dir(tmp: Path, model_type: str, tokenizer) -> Path:
    path = tmp / model_type
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(source: Path, method: str, tmp: Path, trtllm: bool, tasks: list[str] | None = None):
    from quantkit.recipe import Recipe

    return Recipe.model_validate({
        "metadata": {"name": f"{source.name}-{method}", "description": "family test"},
        "model": {"source": str(source), "dtype": "float32"},
        "quantize": {"method": method},
        "calibration": {"dataset": "builtin:wiki", "n_samples": 4, "seq_len": 32, "batch_size": 4, "seed": 1},
        "export": {"trtllm": {"tp_size": 1, "dtype": "float16"} if trtllm else None, "hf": True},
        "build": {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 1152},
        "evaluate": {"tasks": tasks or [], "limit": 4},
        "output_dir": str(tmp / "runs"),
    })


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_int4_on_fused_moe_experts_is_refused_and_modelopt_indeed_fails(model_type: str, tmp_path: Path,
                                                                       tokenizer) -> None:
    """The family file says INT4 cannot export fused experts; ModelOpt's own exporter confirms it, and the
    pipeline refuses in preflight, before anything is written."""
    from quantkit.export import export_hf
    from quantkit.pipeline import run_recipe
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection

    model = quantize_model(tiny_model(model_type), QuantizeSection(method="int4_rtn", block_size=64), None)
    with pytest.raises(TypeError, match="has no len"):
        export_hf(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    for method in family(model_type).unsupported_methods:
        recipe = _recipe(_model_dir(tmp_path, model_type, tokenizer), method, tmp_path, trtllm=False)
        with pytest.raises(QuantkitError) as err:
            run_recipe(recipe, device="cpu")
        assert err.value.where == "quantize.method" and "fp8" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_no_trtllm_export_is_a_preflight_error_before_anything_is_written(tmp_path: Path, tokenizer) -> None:
    from quantkit.pipeline import run_recipe

    for model_type in ("gemma2", "olmo"):
        recipe = _recipe(_model_dir(tmp_path, model_type, tokenizer), "none", tmp_path, trtllm=True)
        with pytest.raises(QuantkitError) as err:
            run_recipe(recipe, device="cpu")
        assert err.value.where == "export.trtllm" and "export.trtllm: null" in str(err.value)
        assert model_type in str(err.value)
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["none", "fp8"])
def test_a_model_without_family_file_runs_baseline_and_quantize_end_to_end(tmp_path: Path, tokenizer,
                                                                           method: str) -> None:
    """OLMo has no quantkit family file: baseline and FP8 run, export HF, pass the check and are evaluated;
    only the runtime, which needs the family's layer names, says it cannot run it."""
    from quantkit.pipeline import run_recipe
    from quantkit.runtime import load_quantized

    run = run_recipe(_recipe(_model_dir(tmp_path, "olmo", tokenizer), method, tmp_path, trtllm=False,
                             tasks=["wiki_ppl"]), device="cpu")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert {"quantize", "export", "check", "evaluate"} <= set(stages)
    assert stages["check"]["violations"] == []
    assert (run / "export" / "hf" / "model.safetensors").is_file() and not (run / "export" / "trtllm").exists()
    assert (run / "results.json").is_file()
    if method == "fp8":
        with pytest.raises(QuantkitError, match="family file"):
            load_quantized(run / "export" / "hf")


def test_moe_run_records_expert_coverage_in_the_manifest(tmp_path: Path, tokenizer) -> None:
    from quantkit.pipeline import run_recipe

    run = run_recipe(_recipe(_model_dir(tmp_path, "qwen3_moe", tokenizer), "fp8", tmp_path, trtllm=False),
                     device="cpu")
    info = json.loads((run / "manifest.json").read_text())["stages"]["quantize"]
    assert info["moe_layers"] == 2 and info["experts"] == 8
    assert info["expert_token_counts"] == "quantize/expert_tokens.json"
    table = json.loads((run / "quantize" / "expert_tokens.json").read_text())
    tokens = 4 * 32  # n_samples x seq_len
    assert all(sum(c) == tokens * 2 for c in table.values())


# ------------------------------------------------------------------ model.trust_remote_code


_REMOTE_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "quantkit_remote"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def test_trust_remote_code_reaches_the_model_load(tmp_path: Path, tokenizer) -> None:
    """A model whose modeling code ships in its folder (config.json auto_map) loads only with
    model.trust_remote_code, and then through the whole pipeline (a family without a file: HF export only)."""
    from transformers import LlamaConfig

    from quantkit.models import load_model
    from quantkit.pipeline import run_recipe

    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "remote_model.py").write_text(_REMOTE_CODE)
    import sys

    sys.path.insert(0, str(folder))
    try:
        from remote_model import RemoteConfig, RemoteForCausalLM
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    base = LlamaConfig(**{k: v for k, v in tiny_model("llama").config.to_dict().items()
                          if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads")}, vocab_size=len(tokenizer))
    cfg = RemoteConfig(**base.to_dict())
    cfg.auto_map = {"AutoConfig": "remote_model.RemoteConfig", "AutoModelForCausalLM": "remote_model.RemoteForCausalLM"}
    RemoteForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(folder), "float32")
    model, _ = load_model(str(folder), "float32", trust_remote_code=True)
    assert type(model).__name__ == "RemoteForCausalLM" and model.config.model_type == "quantkit_remote"
    recipe = _recipe(folder, "fp8", tmp_path, trtllm=False)
    recipe.model.trust_remote_code = True
    run = run_recipe(recipe, device="cpu")
    assert json.loads((run / "manifest.json").read_text())["stages"]["check"]["violations"] == []


# ------------------------------------------------------------------ the bundled non-Llama model


def test_bundled_gemma3_converts_with_a_working_tokenizer() -> None:
    """builtin:gemma3-270m (a real Gemma 3, gemma3_text family): the converted folder loads as a normal HF model,
    its tokenizer adds BOS and merges words (transformers' own GGUF Gemma tokenizer splits them into
    characters), and the model predicts held-out Wikipedia text (token perplexity 19.3 measured; with the
    character-splitting tokenizer it is 2300)."""
    import math

    from quantkit.calibration import load_texts
    from quantkit.models import load_model

    model, tok = load_model("builtin:gemma3-270m", "float32")
    assert model.config.model_type == "gemma3_text" and family("gemma3_text").name == "gemma3_text"
    ids = tok("Hello world, this is a test.").input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:3]) == ["Hello", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, this is a test."
    total, n = 0.0, 0
    for text in load_texts("builtin:wiki", "text")[:4]:
        x = tok(text, return_tensors="pt").input_ids[:, :256]
        with torch.no_grad():
            total += model(x, labels=x).loss.item() * (x.shape[1] - 1)
        n += x.shape[1] - 1
    assert math.exp(total / n) < 40, math.exp(total / n)
