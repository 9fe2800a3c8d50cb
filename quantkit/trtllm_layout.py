"""The one table of what TensorRT-LLM builds for a checkpoint, per quant_algo: the module class each Llama-family
linear and norm becomes, the parameters it reads from `rank{r}.safetensors` (name, shape, dtype) and what each
means numerically.

The checker (quantkit.check, TensorRT-LLM rules), the exporter's post-processing (quantkit.export) and the
reference of TensorRT-LLM's layer math (quantkit.trtllm_reference) all read this table; none restates it.

Read from NVIDIA/TensorRT-LLM (the stored snapshot: `tensorrt_llm/quantization/layers.py` at 027cd518,
`tensorrt_llm/models/llama/convert.py` at 04a2cacb, `quantization/quantize.py`, `models/modeling_utils.py`, the
1.x TensorRT engine flow; no v1.2 tag could be fetched here, the files are too large to mirror). Each entry names
the function it comes from. Shapes are of the stored (per-rank) tensor, relative to the linear's logical
`[out, in]` on that rank; "checkpoint" shapes are what the file holds before `preprocess_weights` reshapes.

Linears of a Llama decoder layer in TensorRT-LLM names: column (split along `out` over TP ranks) `attention.qkv`
(q, k, v fused; each rank holds its q, k, v heads concatenated), `mlp.fc` (HF gate_proj), `mlp.gate` (HF up_proj);
row (split along `in`) `attention.dense` (o_proj), `mlp.proj` (down_proj). Norms: `input_layernorm`,
`post_layernorm`; `transformer.ln_f` stays a plain RmsNorm for every algo.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shape kinds (quantkit.check._scale_shape_ok turns them into numbers).
SCALAR, PER_OUT, PER_IN, GROUP, ANY = "scalar", "per_out", "per_in", "group", "any"
ROW_OUT, ROW_IN = "[1,out]", "[1,in]"

COLUMN_LINEARS = ("attention.qkv", "mlp.fc", "mlp.gate")
ROW_LINEARS = ("attention.dense", "mlp.proj")
DECODER_NORMS = ("input_layernorm", "post_layernorm")
# The column linears fed by each norm (they share its output: one pre-quant scale / one quantized activation).
NORM_FEEDS = {"input_layernorm": ("attention.qkv",), "post_layernorm": ("mlp.fc", "mlp.gate")}

SRC_LAYERS = "tensorrt_llm/quantization/layers.py"
SRC_QUANTIZE = "tensorrt_llm/quantization/quantize.py"
SRC_MODELING = "tensorrt_llm/models/modeling_utils.py"
SRC_LLAMA_CONVERT = "tensorrt_llm/models/llama/convert.py"


@dataclass(frozen=True)
class Param:
    name: str
    shape: str
    dtypes: tuple[str, ...]
    meaning: str
    source: str


@dataclass(frozen=True)
class Layout:
    """What TensorRT-LLM builds for one quant_algo."""

    column_class: str
    row_class: str
    norm_class: str
    weight: Param                       # the linear's `weight` as the checkpoint stores it
    params: tuple[Param, ...]           # every quantized linear
    row_params: tuple[Param, ...] = ()  # row linears only
    norm_params: tuple[Param, ...] = ()  # input_layernorm / post_layernorm only
    pre_quant: Param | None = None      # required on every linear exactly when config pre_quant_scale is true
    packed_int4: bool = False           # weight holds two int4 per byte along out: [out/2, in]
    builder: str = ""                   # TensorRT-LLM function that swaps the layers in
    writer: str = ""                    # the quantkit method that writes it (for mismatch messages)

    def required(self, row: bool) -> dict[str, str]:
        """Scale name -> shape kind every (column / row) linear must carry."""
        ps = self.params + (self.row_params if row else ())
        return {p.name: p.shape for p in ps}


_PREQUANT_AWQ = Param(
    "prequant_scaling_factor", PER_IN, ("F16", "BF16", "F32"),
    "x is multiplied by it before the GEMM (AWQ smoothing); checkpoint [in], reshaped to [1, in]",
    f"{SRC_LAYERS} WeightOnlyGroupwiseQuantLinear.__init__ (pre_quant_scale); "
    f"{SRC_MODELING} preprocess_perlayer_weights (reshape(1, -1))")
_GROUP_SCALE = Param(
    "weights_scaling_factor", GROUP, ("F16", "BF16", "F32"),
    "int4 group scale: w = q * s[out, in/group] (symmetric, no zero point); transposed at load to "
    "[in/group, out] (the layer's `scale`)",
    f"{SRC_MODELING} preprocess_perlayer_weights (transpose(-1, -2)); {SRC_LAYERS} WeightOnlyGroupwiseQuantLinear")
_INT4_WEIGHT = Param(
    "weight", "[out/2, in]", ("I8",),
    "two int4 codes per byte along out (row 2j low nibble, 2j+1 high, two's complement [-8, 7]); transposed and "
    "interleaved for the mixed GEMM at load (preprocess_weights_for_mixed_gemm)",
    f"{SRC_MODELING} preprocess_perlayer_weights")

LAYOUTS: dict[str, Layout] = {
    "FP8": Layout(
        "FP8Linear", "FP8RowLinear", "RmsNorm",
        Param("weight", "[out, in]", ("F8_E4M3", "I8"), "fp8 codes (int8 is viewed as e4m3 at load)",
              f"{SRC_MODELING} preprocess_perlayer_weights (FP8)"),
        (Param("weights_scaling_factor", SCALAR, ("F32",), "w = w8 * s (per tensor)", f"{SRC_LAYERS} FP8Linear"),
         Param("activation_scaling_factor", SCALAR, ("F32",),
               "static: x8 = e4m3(clamp(x / s, +-448)); y = (x8 * s) @ (w8 * s_w)^T", f"{SRC_LAYERS} FP8Linear")),
        builder=f"{SRC_QUANTIZE} fp8_quantize", writer="fp8"),
    "FP8_PER_CHANNEL_PER_TOKEN": Layout(
        "Fp8RowwiseLinear", "Fp8RowwiseRowLinear", "Fp8RowwiseRmsNorm",
        Param("weight", "[out, in]", ("F8_E4M3",), "fp8 codes", f"{SRC_MODELING} preprocess_perlayer_weights"),
        (Param("per_channel_scale", PER_OUT, ("F32",),
               "w = w8 * s[out]; activations quantized per token at run time (amax(row) / 448)",
               f"{SRC_LAYERS} Fp8RowwiseLinear"),),
        builder=f"{SRC_QUANTIZE} fp8_rowwise_quantize", writer="fp8_pcpt"),
    # The non-plugin SmoothQuant: static per-tensor activation scale, smoothing as a pre-quant multiply.
    "W8A8_SQ_PER_CHANNEL": Layout(
        "Int8SmoothQuantLinear", "Int8SmoothQuantRowLinear", "RmsNorm",
        Param("weight", "[out, in]", ("I8",), "int8 codes", f"{SRC_LAYERS} Int8SmoothQuantLinear"),
        (Param("weights_scaling_factor", PER_OUT, ("F32",), "w = w8 * s[out] (amax / 127)",
               f"{SRC_LAYERS} Int8SmoothQuantLinear.__init__"),
         Param("activation_scaling_factor", SCALAR, ("F32",),
               "x8 = clamp(round((x * prequant) / s), -128, 127) (static per tensor)",
               f"{SRC_LAYERS} Int8SmoothQuantLinear.forward"),
         Param("prequant_scaling_factor", PER_IN, ("F16", "BF16", "F32"), "x * prequant before quantizing",
               f"{SRC_LAYERS} Int8SmoothQuantLinear.forward")),
        builder=f"{SRC_QUANTIZE} smooth_quantize_ootb", writer="int8_sq (activations: per_tensor)"),
    # Per-token SmoothQuant: the plugin layout (TensorRT-LLM's Llama conversion writes it for
    # --smoothquant --per_token --per_channel).
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": Layout(
        "SmoothQuantLinear (in SmoothQuantAttention / SmoothQuantGatedMLP)", "SmoothQuantRowLinear",
        "SmoothQuantRmsNorm",
        Param("weight", "[out, in]", ("I8",),
              "int8 codes; the layer declares float32 [out, in/4] (int8 reinterpreted for the plugin)",
              f"{SRC_LAYERS} SmoothQuantLinear.__init__; {SRC_LLAMA_CONVERT} get_tllm_linear_sq_weight "
              "(cur_weights.t())"),
        (Param("per_channel_scale", ROW_OUT, ("F32",),
               "y = (x8 @ w8^T) * per_token_scale[M, 1] * s[1, out]; s = weight amax / 127 "
               "(scale_w_quant_orig.col); the per-token scale is the norm's / quantize_per_token's output",
               f"{SRC_LAYERS} SmoothQuantLinear.forward (smooth_quant_gemm); {SRC_LLAMA_CONVERT} "
               "get_tllm_linear_sq_weight (per_token, per_channel)"),),
        row_params=(Param("smoother", ROW_IN, ("F32",),
                          "the row linear's input is divided by it before per-token quantization "
                          "(= 1 / ModelOpt's pre_quant_scale)",
                          f"{SRC_LAYERS} SmoothQuantAttention.forward / SmoothQuantGatedMLP.forward "
                          "(x / self.dense|proj.smoother); SmoothQuantRowLinear.__init__ [1, in]"),),
        norm_params=(Param("scale_to_int", "[1]", ("F32", "F16", "BF16"),
                           "unused with dynamic per-token scaling; TensorRT-LLM's conversion writes 1.0. The norm "
                           "weight carries the column linears' smoothing (gamma * pre_quant_scale); the norm emits "
                           "int8 x8 = round(x / (amax(row) / 127)) and the per-token scale",
                           f"{SRC_LAYERS} SmoothQuantRmsNorm.__init__; {SRC_LLAMA_CONVERT} get_tllm_linear_sq_weight "
                           "(results[last_prefix] = 1.0 when per_token)"),),
        # exclude_modules is not honoured for the plugin layers (smooth_quantize_plugin swaps every decoder
        # layer), so quantkit.export refuses per-token SQ with decoder linears excluded. No act_scale /
        # quantization_scaling_factor: those exist only with static activation scaling (has_act_static_scaling).
        builder=f"{SRC_QUANTIZE} smooth_quantize_plugin (RmsNorm, Attention, GatedMLP replaced; ln_f kept)",
        writer="int8_sq (activations: per_token)"),
    "W4A16_AWQ": Layout(
        "WeightOnlyGroupwiseQuantLinear", "WeightOnlyGroupwiseQuantRowLinear", "RmsNorm", _INT4_WEIGHT,
        (_GROUP_SCALE,), pre_quant=_PREQUANT_AWQ, packed_int4=True,
        builder=f"{SRC_QUANTIZE} weight_only_groupwise_quantize", writer="int4_awq / int4_rtn"),
    "W4A8_AWQ": Layout(
        "WeightOnlyGroupwiseQuantLinear (use_w4a8_awq)", "WeightOnlyGroupwiseQuantRowLinear", "RmsNorm",
        _INT4_WEIGHT,
        (_GROUP_SCALE,
         Param("activation_scaling_factor", SCALAR, ("F32",),
               "fp8 activations: x8 = e4m3((x * prequant) / s); at load prequant /= s and alpha = s * s_w2",
               f"{SRC_MODELING} preprocess_perlayer_weights (W4A8_AWQ)"),
         Param("weights_scaling_factor_2", SCALAR, ("F32",),
               "the dequantized int4 weight goes through fp8 with this per-tensor scale; at load the group "
               "scales are divided by it", f"{SRC_MODELING} preprocess_perlayer_weights (W4A8_AWQ)")),
        pre_quant=_PREQUANT_AWQ, packed_int4=True,
        builder=f"{SRC_QUANTIZE} weight_only_groupwise_quantize (use_w4a8_awq)", writer="w4a8_awq"),
    # INT8 weight-only: the plugin reads an interleaved int8 layout that only TensorRT-LLM's own
    # symmetric_quantize_last_axis_of_batched_matrix produces; weight_only_quantize_dict makes it at load from a
    # float weight and leaves int8 weights untouched. So the checkpoint holds the dequantized weight, from which
    # TensorRT-LLM's per-channel amax / 127 quantization recovers ModelOpt's codes exactly.
    "W8A16": Layout(
        "WeightOnlyQuantLinear", "WeightOnlyQuantRowLinear", "RmsNorm",
        Param("weight", "[out, in]", ("F16", "BF16", "F32"),
              "w8 * s dequantized; TensorRT-LLM quantizes it at load to int8 per_channel_scale = amax(w[:, o]) / 127 "
              "(weight_only_quantize), which reproduces ModelOpt's codes",
              f"{SRC_MODELING} preprocess_perlayer_weights -> weight_only_quantize_dict (dtype != int8 only); "
              f"{SRC_LAYERS} WeightOnlyQuantLinear (weight [in, out/4] float32, per_channel_scale [out])"),
        (), builder=f"{SRC_QUANTIZE} weight_only_quantize", writer="int8_wo"),
    "NVFP4": Layout(
        "FP4Linear", "FP4RowLinear", "RmsNorm",
        Param("weight", "[out, in/2]", ("U8", "I8"), "two e2m1 codes per byte along in",
              f"{SRC_MODELING} preprocess_perlayer_weights (NVFP4)"),
        # dtypes of the NVFP4 scales are not pinned: no CPU export exists to read them from (needs CUDA)
        (Param("weights_scaling_factor", ANY, ("F8_E4M3", "F32", "F16", "BF16"), "per-16 block scales (e4m3); renamed "
               "weights_block_scaling_factor and interleaved at load", f"{SRC_MODELING} preprocess_perlayer_weights"),
         Param("weights_scaling_factor_2", SCALAR, ("F32", "F16", "BF16"), "global weight scale",
               f"{SRC_MODELING} (NVFP4)"),
         Param("activation_scaling_factor", SCALAR, ("F32", "F16", "BF16"), "global activation scale; alpha = act * w2",
               f"{SRC_MODELING} (NVFP4)")),
        builder=f"{SRC_QUANTIZE} fp4_quantize", writer="nvfp4"),
}

# KV cache scales per attention (modeling_utils.preprocess_weights.process_kv_scaling_factor): k/v pairs are merged
# into one kv_cache_scaling_factor = max(k, v), used for both K and V; its reciprocal is added when absent.
KV_SCALE = "kv_cache_scaling_factor"
KV_PAIR = ("k_cache_scaling_factor", "v_cache_scaling_factor")


def describe(quant_algo: str | None) -> list[str]:
    """The layout of one quant_algo as markdown lines (the model card's 'TensorRT-LLM layers' section)."""
    lay = layout(quant_algo)
    if lay is None:
        return [f"quant_algo {quant_algo}: plain Linear / RmsNorm layers (no quantization parameters)."]
    out = [f"TensorRT-LLM builds {lay.column_class} for {', '.join(COLUMN_LINEARS)}, {lay.row_class} for "
           f"{', '.join(ROW_LINEARS)} and {lay.norm_class} for {', '.join(DECODER_NORMS)} ({lay.builder}).", "",
           "| module | parameter | shape | dtype | meaning | source |", "|---|---|---|---|---|---|"]
    rows = [("every linear", p) for p in (lay.weight, *lay.params)] + [("row linears", p) for p in lay.row_params]
    rows += [("decoder norms", p) for p in lay.norm_params]
    if lay.pre_quant:
        rows.append(("every linear, when pre_quant_scale is true", lay.pre_quant))
    out += [f"| {where} | `{p.name}` | {p.shape} | {'/'.join(p.dtypes)} | {p.meaning} | {p.source} |"
            for where, p in rows]
    return out


def pp_layers(n_layers: int, pp_size: int, pp_rank: int) -> list[int]:
    """Global indices of the layers pipeline rank `pp_rank` holds; rank files name them 0.. locally
    (tensorrt_llm/mapping.py Mapping.pp_layers: contiguous, earlier ranks take the remainder)."""
    base, extra = divmod(n_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return list(range(start, start + base + (pp_rank < extra)))


def layout(quant_algo: str | None) -> Layout | None:
    return LAYOUTS.get(quant_algo) if quant_algo else None


def scale_suffixes() -> tuple[str, ...]:
    """Every per-linear parameter name in the table (longest first, so `_2` wins over its prefix)."""
    names = {p.name for lay in LAYOUTS.values() for p in lay.params + lay.row_params}
    names |= {lay.pre_quant.name for lay in LAYOUTS.values() if lay.pre_quant}
    return tuple(sorted(names, key=len, reverse=True))
