"""Round-trip fixtures for tests/test_runtime.py and tests/test_bench.py: quantize -> export -> load_quantized.

The device comes from QUANTKIT_TEST_DEVICE (default cpu; `cuda` on the GPU machine). On CPU everything is float32,
so the reloaded checkpoint must reproduce the fake-quantized model to float32 rounding. On CUDA the fake model and
its export stay float32 (exact scales and codes) and the checkpoint is loaded in bf16, so the real kernels run as
they do in deployment.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(tempfile.mkdtemp(prefix="quantkit-test-runtime-"))
atexit.register(shutil.rmtree, ROOT, True)

VARIANTS: dict[str, dict[str, Any]] = {
    "int8_sq": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_tensor"},  # static input_scale
    "int8_sq_pt": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"},  # dynamic per token
    "fp8_pcpt": {"method": "fp8_pcpt"},  # per-channel weights, dynamic per-token activations
    "int4_awq": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_lite"},  # with pre-quant scales
    "int4_rtn": {"method": "int4_rtn", "block_size": 64},
    "int4_gptq": {"method": "int4_gptq", "block_size": 64, "gptq_block": 64},
    "int4_hessian": {"method": "int4_hessian", "block_size": 64},
    "fp8": {"method": "fp8"},
    "fp8_kv": {"method": "fp8", "kv_cache": "fp8"},
    "w4a8_awq": {"method": "w4a8_awq", "block_size": 64},
    "int8_wo": {"method": "int8_wo"},
}


def device_under_test() -> torch.device:
    return torch.device(os.environ.get("QUANTKIT_TEST_DEVICE", "cpu"))


def load_dtype() -> torch.dtype:
    return torch.bfloat16 if device_under_test().type == "cuda" else torch.float32


def tiny_config(**over: Any):
    from transformers import LlamaConfig

    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, architectures=["LlamaForCausalLM"])
    kw.update(over)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **over: Any):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**over)).eval()


def eval_ids(batch: int = 2, seq: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float().cpu(), ref.float().cpu()
    return ((got - ref).norm() / ref.norm()).item()


@dataclass
class RoundTrip:
    variant: str
    fake: torch.nn.Module     # the fake-quantized model as the pipeline leaves it (after both exports)
    hf_dir: Path

    def reference_logits(self, ids: torch.Tensor, *, as_shipped: bool = True) -> torch.Tensor:
        """Logits of the fake-quantized model.

        as_shipped: apply the HF exporter's own pre-export rewrite (q/k/v and gate/up share one pre-quant scale and
        input amax; AWQ scales folded into the norms) to a copy first, i.e. the fake model the HF checkpoint encodes.
        quantkit's pipeline applies the same rewrite to the live model (export.prepare_for_deployment), so applying
        it again is a no-op and both references agree.
        """
        import copy

        model = self.fake
        if as_shipped:
            from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

            model = copy.deepcopy(self.fake)
            requantize_resmooth_fused_llm_layers(model)
        dev = next(model.parameters()).device
        with torch.no_grad():
            return model(ids.to(dev)).logits.float().cpu()


_done: dict[str, RoundTrip] = {}


def roundtrip(variant: str) -> RoundTrip:
    """Quantize a float32 tiny Llama on the test device, export TensorRT-LLM then HF (float32), cached per process."""
    if variant in _done:
        return _done[variant]
    from quantkit.calibration import CalibrationSet
    from quantkit.export import export_hf, export_trtllm, prepare_for_deployment
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection

    if device_under_test().type == "cuda":
        # ModelOpt would JIT-build its fake-quant CUDA extension (minutes); its PyTorch path computes the same
        from modelopt.torch.quantization import extensions as ext

        for fn in (ext.get_cuda_ext, ext.get_cuda_ext_fp8, ext.get_cuda_ext_mx):
            fn.extension = None
    model = tiny_llama().to(device_under_test())
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model = quantize_model(model, QuantizeSection(**VARIANTS[variant]), CalibrationSet(ids, 4, "test"))
    out = ROOT / variant
    prepare_for_deployment(model)  # as the pipeline does: fused layers share their scales, in place
    export_trtllm(model, out / "trtllm", dtype="float16")
    # float32 export: ModelOpt's FP8 packer divides in the export dtype, so a bf16 export rounds twice (bf16, then
    # e4m3) and ships ~3% of FP8 codes one step off the fake-quantized model's; float32 keeps the codes exact.
    export_hf(model, out / "hf", dtype="float32")
    _done[variant] = RoundTrip(variant, model, out / "hf")
    return _done[variant]


def perturbed_copy(hf_dir: Path, name: str, edit) -> Path:
    """A copy of an HF checkpoint with `edit(key, tensor) -> tensor` applied to every tensor."""
    from safetensors.torch import load_file, save_file

    target = ROOT / "perturbed" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(hf_dir, target)
    for f in target.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({k: edit(k, v) for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
    return target


def tune_table(tmp_path: Path, monkeypatch, module, file_attr: str, *cached):
    """Fixture body: yields write(rows), which makes `module` read `rows` as its kernel tune table (file_attr names
    the path constant, `cached` the functools caches over it), and clears those caches again afterwards."""
    import json

    def write(rows: dict) -> None:
        path = tmp_path / "tune_table.json"
        path.write_text(json.dumps(rows))
        monkeypatch.setattr(module, file_attr, path)
        for fn in cached:
            fn.cache_clear()

    yield write
    for fn in cached:
        fn.cache_clear()
