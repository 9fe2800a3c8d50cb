"""A reference of TensorRT-LLM's layer arithmetic on a TensorRT-LLM checkpoint, so a checkpoint can be shown to
reproduce the model it came from where no TensorRT-LLM runs.

`load_reference(folder)` reads `config.json` + every `rank{r}.safetensors`, merges the tensor- and
pipeline-parallel ranks back into whole tensors (the inverse of the split TensorRT-LLM expects, quantkit.trtllm_layout
says which dimension each parameter is split along) and builds a transformers Llama whose linears compute what the
TensorRT-LLM layer of the checkpoint's quant_algo computes from the parameters that layer reads
(quantkit.trtllm_layout.LAYOUTS, the one table; see its citations):
- FP8Linear: x8 = e4m3(x / act_s), y = (x8 * act_s) @ (w8 * w_s)^T.
- Fp8RowwiseLinear: per-token activation scale amax(row) / 448, weight per_channel_scale[out].
- Int8SmoothQuantLinear (W8A8_SQ_PER_CHANNEL): x * prequant, static int8 quantization with act_s, w8 * w_s[out].
- SmoothQuant plugin (…_PER_TOKEN_PLUGIN): SmoothQuantRmsNorm normalizes with the (smoothed) norm weight and
  quantizes each token to int8 with amax(row) / 127; row linears divide their input by `smoother` first;
  y = (x8 @ w8^T) * per_token_scale[M, 1] * per_channel_scale[1, out].
- WeightOnlyGroupwiseQuantLinear (W4A16_AWQ): x * prequant, w = q * s[out, in/group].
- W4A8_AWQ after modeling_utils.preprocess_perlayer_weights: prequant' = prequant / act_s, group scales' =
  fp16(s / s_w2), x8 = e4m3(x * prequant'), w8 = e4m3(q * s'), y = (x8 @ w8^T) * alpha, alpha = act_s * s_w2.
- WeightOnlyQuantLinear (W8A16): the float weight is quantized at load per output channel, amax / 127, as
  TensorRT-LLM's weight_only_quantize does, and dequantized in the GEMM.
- FP8 KV cache: K and V go through e4m3 with one kv_cache_scaling_factor per attention (k/v pairs merged to their
  max, modeling_utils.preprocess_weights.process_kv_scaling_factor).
Arithmetic is float32 on the checkpoint's 16-bit tensors (TensorRT-LLM accumulates in float32 and rounds
activations to the model dtype between layers; that rounding is what the comparison bound allows for).
NVFP4 is not implemented here (its block-scale layout needs TensorRT-LLM's interleave op): load_reference refuses it.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.runtime import FP8_MAX, fake_fp8, per_token_scale, quantize_int8, unpack_modelopt_int4
from quantkit.trtllm_layout import (
    COLUMN_LINEARS,
    GROUP,
    KV_PAIR,
    KV_SCALE,
    PER_IN,
    PER_OUT,
    ROW_IN,
    ROW_LINEARS,
    ROW_OUT,
    layout,
    pp_layers,
)

WHERE = "trtllm_reference"
PLUGIN_SQ = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
SUPPORTED = {None, "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", PLUGIN_SQ, "W4A16_AWQ", "W4A8_AWQ",
             "W8A16"}
# HF Llama module names of TensorRT-LLM's linears (models/llama/convert.py get_prefix_and_param_name_map).
HF_NAMES = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj", "mlp.gate": "mlp.up_proj",
            "mlp.proj": "mlp.down_proj"}


# ----------------------------------------------------------------------------- reading and merging ranks


def _split_dim(param: str, kind: str | None, row: bool) -> int | None:
    """Which dimension of a stored per-rank tensor TensorRT-LLM splits over tensor-parallel ranks (None: copied)."""
    if param == "weight":
        return 1 if row else 0
    if kind == GROUP:
        return 1 if row else 0
    if row:
        return {PER_IN: 0, ROW_IN: 1}.get(kind)
    return {PER_OUT: 0, ROW_OUT: 1}.get(kind)


def _param_kinds(algo: str | None) -> dict[str, str]:
    lay = layout(algo)
    if lay is None:
        return {}
    kinds = {p.name: p.shape for p in lay.params + lay.row_params}
    if lay.pre_quant:
        kinds[lay.pre_quant.name] = lay.pre_quant.shape
    return kinds


def read_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the whole-model tensors (global layer indices, tensor-parallel splits concatenated)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"cannot read {folder / 'config.json'}: {exc}", where=WHERE,
                            fix="point at a TensorRT-LLM checkpoint folder (config.json + rank*.safetensors)") from exc
    mapping = config.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    n_layers = int(config["num_hidden_layers"])
    algo = (config.get("quantization") or {}).get("quant_algo")
    kinds = _param_kinds(algo)
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                             config["num_attention_heads"])
    head = int(config.get("head_size") or config["hidden_size"] // heads)
    if kv_heads % tp:
        raise QuantkitError(f"{kv_heads} KV heads over tp_size {tp}: duplicated KV heads are not merged here",
                            where=WHERE, fix="use a tp_size that divides num_key_value_heads")
    merged: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        layer_ids = pp_layers(n_layers, pp, pp_rank)
        ranks = []
        for tp_rank in range(tp):
            path = folder / f"rank{pp_rank * tp + tp_rank}.safetensors"  # Mapping: rank = pp_rank * tp + tp_rank
            if not path.is_file():
                raise QuantkitError(f"{path.name} is missing for tp_size {tp} x pp_size {pp}", where=WHERE,
                                    fix="re-export the checkpoint; run `quantkit check` on it")
            ranks.append(load_file(str(path)))
        for name in ranks[0]:
            parts = [r[name] for r in ranks]
            glob_name = name
            if ".layers." in name:
                pre, rest = name.split(".layers.", 1)
                local, tail = rest.split(".", 1)
                glob_name = f"{pre}.layers.{layer_ids[int(local)]}.{tail}"
            merged[glob_name] = _merge(name, parts, kinds, config, (heads, kv_heads, head))
    return config, merged


def _merge(name: str, parts: list[torch.Tensor], kinds: dict[str, str], config: dict[str, Any],
           heads: tuple[int, int, int]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    module, param = name.rsplit(".", 1)
    if name in ("transformer.vocab_embedding.weight",) and config.get("use_parallel_embedding"):
        return torch.cat(parts, dim=int(config.get("embedding_sharding_dim", 0)))
    if name == "lm_head.weight":
        return torch.cat(parts, dim=0)
    lin = next((x for x in COLUMN_LINEARS + ROW_LINEARS if module.endswith("." + x)), None)
    dim = _split_dim(param, kinds.get(param), lin in ROW_LINEARS) if lin else None
    if dim is None:
        return parts[0]  # replicated: norms, per-tensor scales, a column linear's per-input scales
    if lin == "attention.qkv":
        # each rank holds its own q, k and v heads, concatenated: regroup as [q; k; v]
        n_q, n_kv, d = heads
        tp = len(parts)
        frac = parts[0].shape[dim] / ((n_q + 2 * n_kv) * d // tp)  # 0.5 for packed int4 rows
        sizes = [int(s * frac) for s in (n_q * d // tp, n_kv * d // tp, n_kv * d // tp)]
        split = [p.split(sizes, dim=dim) for p in parts]
        return torch.cat([torch.cat([s[i] for s in split], dim=dim) for i in range(3)], dim=dim)
    return torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------- layers


class TrtLinear(nn.Module):
    """One TensorRT-LLM linear of the checkpoint's quant_algo, computing from the parameters that layer reads."""

    def __init__(self, algo: str | None, t: dict[str, torch.Tensor], row: bool, group: int) -> None:
        super().__init__()
        self.algo, self.row, self.group = algo, row, group
        self.t = {k: v for k, v in t.items()}
        self.weight_f = self._weight()

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)` moves parameters and buffers only: the checkpoint tensors live in a dict
        self.t = {k: fn(v) for k, v in self.t.items()}
        self.weight_f = fn(self.weight_f)
        return super()._apply(fn, recurse)

    def _weight(self) -> torch.Tensor:
        """The weight the GEMM multiplies, as float32 [out, in] (codes times scales where the GEMM applies them)."""
        t, algo = self.t, self.algo
        w = t["weight"]
        if algo is None:
            return w.float()
        if algo == "FP8":
            return w.view(torch.float8_e4m3fn).float() * t["weights_scaling_factor"].float()
        if algo == "FP8_PER_CHANNEL_PER_TOKEN":
            return w.view(torch.float8_e4m3fn).float() * t["per_channel_scale"].float().reshape(-1, 1)
        if algo == "W8A8_SQ_PER_CHANNEL":
            return w.float() * t["weights_scaling_factor"].float().reshape(-1, 1)
        if algo == PLUGIN_SQ:
            return w.float()  # int8 codes; per_channel_scale is applied to the int32 accumulator
        if algo in ("W4A16_AWQ", "W4A8_AWQ"):
            q = unpack_modelopt_int4(w.view(torch.uint8)).float()
            s = t["weights_scaling_factor"].float()
            if algo == "W4A8_AWQ":
                # preprocess_perlayer_weights: group scales /= weights_scaling_factor_2, stored as float16; the
                # kernel converts q * s' to e4m3 and applies alpha = act_s * s_w2 after the GEMM
                s = (s / t["weights_scaling_factor_2"].float()).half().float()
                return fake_fp8(q * s.repeat_interleave(self.group, dim=1), torch.ones(()))
            return q * s.repeat_interleave(self.group, dim=1)
        if algo == "W8A16":
            # weight_only_quantize (symmetric_quantize_last_axis_of_batched_matrix): per output channel amax / 127
            wf = w.float()
            scale = wf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            return torch.round(wf / scale).clamp_(-127, 127) * scale
        raise QuantkitError(f"quant_algo {algo} is not implemented by the reference", where=WHERE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, algo = self.t, self.algo
        x = x.float()
        if algo == "FP8":
            x = fake_fp8(x, t["activation_scaling_factor"].float())
        elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
            x = fake_fp8(x, per_token_scale(x, FP8_MAX))
        elif algo == "W8A8_SQ_PER_CHANNEL":
            s = t["activation_scaling_factor"].float()
            x = quantize_int8(x * t["prequant_scaling_factor"].float(), s).float() * s
        elif algo == PLUGIN_SQ:
            if self.row:
                x = x / t["smoother"].float().reshape(-1)
            s = per_token_scale(x, 127.0)
            y = quantize_int8(x, s).float() @ self.weight_f.t()
            return y * s * t["per_channel_scale"].float().reshape(1, -1)
        elif algo == "W4A16_AWQ" and "prequant_scaling_factor" in t:
            x = x * t["prequant_scaling_factor"].float().reshape(-1)
        elif algo == "W4A8_AWQ":
            act = t["activation_scaling_factor"].float()
            pqs = t.get("prequant_scaling_factor")
            x = x * (pqs.float().reshape(-1) / act) if pqs is not None else x / act
            x = fake_fp8(x, torch.ones(()))
            return (x @ self.weight_f.t()) * (act * t["weights_scaling_factor_2"].float())
        return x @ self.weight_f.t()

    def rows(self, start: int, end: int) -> TrtLinear:
        """The output channels [start, end) of this linear (q, k, v of the fused qkv)."""
        kinds = _param_kinds(self.algo)
        out = {}
        for name, v in self.t.items():
            dim = _split_dim(name, kinds.get(name), row=False)
            if dim is None:
                out[name] = v
            else:
                f = v.shape[dim] / self.weight_f.shape[0]  # packed int4 weights hold half the rows
                out[name] = v.narrow(dim, int(start * f), int((end - start) * f))
        return TrtLinear(self.algo, out, self.row, self.group)


def _linear_tensors(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    return {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".") and
            "." not in k[len(module) + 1:]}


def _require(tensors: dict[str, torch.Tensor], algo: str | None, module: str, row: bool, pre_quant: bool) -> None:
    lay = layout(algo)
    if lay is None:
        need = ["weight"]
    else:
        need = ["weight", *lay.required(row)]
        if pre_quant and lay.pre_quant:
            need.append(lay.pre_quant.name)
    missing = [n for n in need if f"{module}.{n}" not in tensors]
    if missing:
        raise QuantkitError(f"{module} lacks {', '.join(missing)}, which TensorRT-LLM's {algo} layer reads",
                            where=WHERE, fix="run `quantkit check` on the checkpoint")


def load_reference(folder: str | Path) -> nn.Module:
    """A transformers Llama computing TensorRT-LLM's arithmetic on the checkpoint in `folder` (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, tensors = read_checkpoint(folder)
    q = config.get("quantization") or {}
    algo, kv_algo = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    if config.get("architecture") != "LlamaForCausalLM":
        raise QuantkitError(f"the reference runs Llama-family checkpoints, not {config.get('architecture')}",
                            where=WHERE)
    if algo not in SUPPORTED or kv_algo not in (None, "FP8"):
        raise QuantkitError(f"quant_algo {algo} / kv_cache_quant_algo {kv_algo} is not implemented by the reference",
                            where=WHERE, fix="reproduce it with TensorRT-LLM itself on a GPU")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head = int(config.get("head_size") or config["hidden_size"] // heads)
    # Defaults as TensorRT-LLM's PretrainedConfig / LLaMAConfig take them when the checkpoint omits them.
    hf_cfg = LlamaConfig(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head,
        rms_norm_eps=float(config.get("norm_epsilon", 1e-5)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rope_theta=float(config.get("rotary_base", 10000.0)), tie_word_embeddings=False,
        attention_bias=bool(config.get("bias", False)),
        **({"rope_scaling": config["rotary_scaling"]} if config.get("rotary_scaling") else {}))
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model = model.to_empty(device="cpu").float().eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)  # its buffers were on meta
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(tensors["transformer.vocab_embedding.weight"].float())
        model.model.norm.weight.copy_(tensors["transformer.ln_f.weight"].float())
        model.lm_head.weight.copy_(tensors["lm_head.weight"].float())
    group = int(q.get("group_size", 128))
    pre_quant = bool(q.get("pre_quant_scale", False))
    excluded = q.get("exclude_modules") or []

    for i, layer in enumerate(model.model.layers):
        pre = f"transformer.layers.{i}"
        with torch.no_grad():
            layer.input_layernorm.weight.copy_(tensors[f"{pre}.input_layernorm.weight"].float())
            layer.post_attention_layernorm.weight.copy_(tensors[f"{pre}.post_layernorm.weight"].float())
        for lin in COLUMN_LINEARS + ROW_LINEARS:
            name = f"{pre}.{lin}"
            # smooth_quantize_plugin replaces every decoder layer; the other algos honour exclude_modules
            lin_algo = algo if algo == PLUGIN_SQ or not any(fnmatch.fnmatchcase(name, p) for p in excluded) else None
            _require(tensors, lin_algo, name, lin in ROW_LINEARS, pre_quant)
            mod = TrtLinear(lin_algo, _linear_tensors(tensors, name), lin in ROW_LINEARS, group)
            if lin == "attention.qkv":
                nq, nkv = heads * head, kv_heads * head
                layer.self_attn.q_proj = mod.rows(0, nq)
                layer.self_attn.k_proj = mod.rows(nq, nq + nkv)
                layer.self_attn.v_proj = mod.rows(nq + nkv, nq + 2 * nkv)
            else:
                parent, child = HF_NAMES[lin].split(".")
                setattr(getattr(layer, parent), child, mod)
        if kv_algo == "FP8":
            scale = tensors.get(f"{pre}.attention.{KV_SCALE}")
            if scale is None:
                pair = [tensors.get(f"{pre}.attention.{n}") for n in KV_PAIR]
                if any(p is None for p in pair):
                    raise QuantkitError(f"{pre}.attention has no {KV_SCALE}", where=WHERE,
                                        fix="run `quantkit check` on the checkpoint")
                scale = torch.maximum(*pair)
            for kv in ("quantkit_k_scale", "quantkit_v_scale"):  # buffers: they move with `.to(device)`
                layer.self_attn.register_buffer(kv, scale.float().reshape(()).clone())
    if kv_algo == "FP8":
        from quantkit.runtime import use_quantkit_attention

        use_quantkit_attention(model)
    model.quantkit_trtllm = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo,
                             "ranks": math.prod(int((config.get("mapping") or {}).get(k, 1))
                                                for k in ("tp_size", "pp_size"))}
    return model
