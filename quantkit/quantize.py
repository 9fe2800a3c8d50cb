"""Quantize stage: recipe → ModelOpt config → `mtq.quantize(model, cfg, forward_loop)`."""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import inspect
import io
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from quantkit.calibration import CPU_AUTO_BATCH, CalibrationSet
from quantkit.errors import OOM_FIX, QuantkitError, is_out_of_memory, out_of_memory
from quantkit.methods import build_modelopt_config, get_method, resolved_settings
from quantkit.models import input_device
from quantkit.moe import ExpertTokenCounter
from quantkit.recipe import QuantizeSection

log = logging.getLogger(__name__)


def _excluded(name: str, patterns: list[str]) -> bool:
    # name + ".": ModelOpt matches the same patterns against quantizer names ("<module>.weight_quantizer"), so a
    # pattern such as "mlp.gate." (a MoE router, not mlp.gate_proj) means the same module in both places
    return any(fnmatch.fnmatch(name + ".", f"*{p}*") for p in patterns)


def with_family_defaults(model: torch.nn.Module, section: QuantizeSection) -> QuantizeSection:
    """The recipe's quantize section plus the family file's default exclusions (MoE routers, ...)."""
    from quantkit.archs import default_exclude

    merged = default_exclude(getattr(model.config, "model_type", ""), section.exclude)
    return section if merged == list(section.exclude) else section.model_copy(update={"exclude": merged})


def quantized_linears(model: torch.nn.Module, exclude: list[str]) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _excluded(n, exclude)}


def check_shapes(model: torch.nn.Module, section: QuantizeSection) -> None:
    """Fail before calibration when a block size does not divide a layer's in-features."""
    settings = resolved_settings(section)
    block = settings.get("block_size")
    if not block:
        return
    section = with_family_defaults(model, section)
    bad = {n: m.in_features for n, m in quantized_linears(model, section.exclude).items() if m.in_features % block}
    if bad:
        dims = sorted(set(bad.values()))
        fits = math.gcd(*dims)
        good = [b for b in (128, 64, 32, 16) if fits % b == 0]
        first = ", ".join(f"{n} ({d})" for n, d in list(bad.items())[:3])
        raise QuantkitError(
            f"block_size {block} does not divide the in-features of {len(bad)} layers, e.g. {first}",
            where="quantize.block_size",
            fix=(f"set quantize.block_size to {good[0]}" if good else "exclude those layers via quantize.exclude")
            + f" (in-features present: {', '.join(map(str, dims))})",
        )


class ForwardCounter:
    """Counts calibration forward passes (a data-free method must make none)."""

    def __init__(self) -> None:
        self.batches = 0
        self.batch_size: int | None = None  # the resolved calibration batch (batch_size: auto)
        self.pass_s: list[float] = []  # wall seconds of each pass over the data (AWQ and SmoothQuant make several)


# ModelOpt's hf_ptq example (get_max_batch_size with --batch_size 0): AWQ and SmoothQuant keep intermediate
# tensors for their search, so one sample costs about twice an inference forward; other methods 1.1x.
SEARCH_MEMORY_RATIO = 2.0
PLAIN_MEMORY_RATIO = 1.1


def resolve_batch_size(model: torch.nn.Module, calib: CalibrationSet, section: QuantizeSection) -> CalibrationSet:
    """`batch_size: auto`: the largest batch that fits on the GPU (capped at n_samples); CPU_AUTO_BATCH on CPU."""
    if calib.batch_size != "auto":
        return calib
    device = input_device(model)
    if device.type != "cuda":
        return calib.with_batch_size(CPU_AUTO_BATCH)
    from modelopt.torch.utils.dataset_utils import get_max_batch_size

    settings = resolved_settings(section)
    searches = settings.get("awq_algorithm") is not None or "smoothquant_alpha" in settings
    ratio = SEARCH_MEMORY_RATIO if searches else PLAIN_MEMORY_RATIO
    try:
        size = get_max_batch_size(model, max_sample_length=calib.input_ids.shape[1], sample_memory_usage_ratio=ratio,
                                  sample_input_single_batch=calib.input_ids[:1].to(device))
    except torch.cuda.OutOfMemoryError as exc:
        raise out_of_memory("quantize", "running one calibration sample", exc,
                            "the model does not fit with one sample: set model.device_map: auto and model.max_memory "
                            "to offload part of it, or shorten calibration.seq_len") from exc
    resolved = calib.with_batch_size(size)
    log.info("calibration batch_size auto -> %d (memory ratio %.1f)", resolved.batch_size, ratio)
    return resolved


def _has_enabled_quantizer(module: torch.nn.Module | None) -> bool:
    return module is not None and any(type(m).__name__.endswith("Quantizer") and getattr(m, "is_enabled", False)
                                      for m in module.modules())


def calibration_forward_kwargs(model: torch.nn.Module) -> dict[str, object]:
    """What a calibration forward can skip without changing any quantizer's statistics.

    No KV cache (ModelOpt's own calibration loop, `dataset_utils._forward_loop`, turns `use_cache` off): nothing
    reads it, and at 8B x batch 8 x 512 tokens it is 0.5 GiB. Logits for the last position only while the output
    head has no enabled quantizer (lm_head is excluded by default): nothing reads the others either, and the
    full-vocabulary logits are 1 GiB of bf16 at that size (128256 x 4096) and the largest single activation.
    Only arguments the model's forward names are passed."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, object] = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "logits_to_keep" in params and head is not None and not _has_enabled_quantizer(head):
        kwargs["logits_to_keep"] = 1
    return kwargs


def make_forward_loop(calib: CalibrationSet, counter: ForwardCounter, desc: str = "calibrate"):
    def forward_loop(model: torch.nn.Module) -> None:
        device = input_device(model)
        kwargs = calibration_forward_kwargs(model)  # per pass: algorithms switch quantizers between passes
        t0 = time.perf_counter()
        # AWQ calls the loop more than once (search, then apply): one bar per pass.
        with torch.no_grad():
            for batch in tqdm(calib.batches(), total=len(calib), desc=desc, unit="batch", leave=False):
                model(batch.to(device), **kwargs)
                counter.batches += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        counter.pass_s.append(round(time.perf_counter() - t0, 2))

    return forward_loop


def _gptq_update_by_group(weight: torch.Tensor, h_inv: torch.Tensor, block_size: int, quantizer,
                          groups: torch.Tensor | None = None) -> None:
    """ModelOpt 0.47's `gptq_blockwise_update`, the same arithmetic, fake-quantizing only the current column's group.

    ModelOpt's unfused update fake-quantizes the whole [out, in] matrix for every column to read one column back
    (O(in^2 * out) per layer). With static block scales (what `gptq` sets from max calibration) a column's codes
    depend only on its own values and its group's amax, so quantizing that [out, group] slice with its amax slice
    gives the same numbers (tests/test_gptq.py: bit-identical weights) in O(in * out * group).

    groups: for activation order, `weight` and `h_inv` are in processing order and `groups[j]` is the stored group
    of processed column j, whose (fixed) amax quantizes it: static groups, so the export needs no g_idx.
    """
    out, cols = weight.shape
    group = quantizer.block_sizes[-1]
    amax = quantizer._amax
    amax_g = amax.reshape(out, cols // group, *amax.shape[1:])
    group_of = groups.tolist() if groups is not None else None  # host ints: no device sync per column on a GPU
    try:
        for bs in range(0, cols, block_size):  # block_size is a multiple of group (gptq_algorithm checks)
            be = min(bs + block_size, cols)
            hb = h_inv[bs:be, bs:be]
            wblk = weight[:, bs:be].clone()
            errs = torch.zeros_like(wblk)
            for i in range(be - bs):
                if group_of is None:
                    g0 = (i // group) * group
                    quantizer._amax = amax_g[:, (bs + g0) // group].reshape(-1, *amax.shape[1:])
                    blocks = wblk[:, g0:g0 + group].reshape(-1, group)
                    q = quantizer._fake_quantize(blocks).reshape(out, group)[:, i - g0]
                else:  # the column alone, repeated to one block: static scales quantize element by element
                    quantizer._amax = amax_g[:, group_of[bs + i]].reshape(-1, *amax.shape[1:])
                    blocks = wblk[:, i:i + 1].expand(out, group).contiguous()
                    q = quantizer._fake_quantize(blocks)[:, 0]
                weight[:, bs + i] = q
                err = (wblk[:, i] - q) / hb[i, i]
                wblk[:, i:].addr_(err, hb[i, i:], alpha=-1)
                errs[:, i] = err
            weight[:, be:].addmm_(errs, h_inv[bs:be, be:], alpha=-1)
    finally:
        quantizer._amax = amax


def _static_int4_blocks(weight: torch.Tensor, block_size: int, quantizer) -> bool:
    """Whether `quantizer` is an INT4 block quantizer with fixed per-group amax that `_gptq_update_by_group` handles."""
    sizes = getattr(quantizer, "block_sizes", None) or {}
    group = sizes.get(-1)
    return bool(quantizer.num_bits == 4 and sizes.get("type") == "static" and group and weight.shape[1] % group == 0
                and block_size % group == 0 and getattr(quantizer, "_amax", None) is not None
                and quantizer._amax.numel() == weight.numel() // group)


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's activation order: input columns by descending Hessian diagonal (stable: ties keep stored order)."""
    return torch.argsort(torch.diag(hessian), descending=True, stable=True)


def _update_weights_act_order(helper, block_size: int, perc_damp: float) -> None:
    """`GPTQHelper.update_weights` with activation order and static groups (GPTQ's `act_order` + `static_groups`).

    The columns with the largest Hessian diagonal (the most input energy) are quantized first, while the later,
    cheaper ones still absorb their error; each column keeps the scale of its stored group, fixed before GPTQ
    (GPTQModel's `static_groups`: `quantizer = groups[perm[i] // group_size]`), so codes, scales and the exported
    layout are those of the plain path. Damping (a fraction of the mean diagonal) is permutation-invariant.
    """
    from modelopt.torch.quantization.utils.calib_utils import compute_hessian_inverse

    module = helper.module
    hessian = helper.hessian.to(module.weight.device)
    weight = module.weight.data.float().clone()
    perm = act_order_permutation(hessian)
    group = module.weight_quantizer.block_sizes[-1]
    helper.weight = weight[:, perm].contiguous()
    helper.h_inv = compute_hessian_inverse(hessian[perm][:, perm], helper.weight, perc_damp)
    _gptq_update_by_group(helper.weight, helper.h_inv, block_size, module.weight_quantizer, groups=perm // group)
    helper.weight = helper.weight[:, torch.argsort(perm)]
    helper._print_mse_error(hessian)
    module.weight.data = helper.weight.reshape(module.weight.shape).to(module.weight.data.dtype)


@contextlib.contextmanager
def group_local_gptq(act_order: bool = False):
    """Within: ModelOpt's GPTQ uses `_gptq_update_by_group` for static INT4 block quantizers (others unchanged).

    act_order: those layers' columns are processed in descending Hessian-diagonal order (`_update_weights_act_order`).
    """
    from modelopt.torch.quantization.utils import calib_utils

    original = calib_utils.gptq_blockwise_update
    original_update_weights = calib_utils.GPTQHelper.update_weights

    def update(weight, h_inv, block_size, quantizer):
        if _static_int4_blocks(weight, block_size, quantizer):
            return _gptq_update_by_group(weight, h_inv, block_size, quantizer)
        return original(weight, h_inv, block_size, quantizer)

    def update_weights(helper, block_size, perc_damp):
        weight = helper.module.weight
        if act_order and _static_int4_blocks(weight.reshape(-1, weight.shape[-1]), block_size,
                                             helper.module.weight_quantizer):
            return _update_weights_act_order(helper, block_size, perc_damp)
        if act_order:  # e.g. auto's FP8 layers: no fixed groups to keep, so the stored order
            log.debug("gptq act_order: %s is not a static INT4 block quantizer; stored column order", helper.name)
        return original_update_weights(helper, block_size, perc_damp)

    calib_utils.gptq_blockwise_update = update
    calib_utils.GPTQHelper.update_weights = update_weights
    try:
        yield
    finally:
        calib_utils.gptq_blockwise_update = original
        calib_utils.GPTQHelper.update_weights = original_update_weights


@contextlib.contextmanager
def kept_weight_scales(model: torch.nn.Module):
    """Within: ModelOpt's `max_calibrate` keeps the amax `model`'s quantizers have now.

    ModelOpt 0.47's `gptq` starts with `max_calibrate` (its "TODO: other scale setting strategies"), which resets
    the block scales an earlier algorithm searched; GPTQ's update then runs on plain max scales. The earlier step
    (local_hessian) max-calibrated every other quantizer on the same data first, so keeping theirs changes nothing;
    an enabled static quantizer without an amax is one that step did not calibrate, and is refused.
    """
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.nn import TensorQuantizer

    calibrated = {id(q) for q in model.modules()
                  if isinstance(q, TensorQuantizer) and q.is_enabled and (q.amax is not None or q._dynamic)}
    original = model_calib.max_calibrate

    def max_calibrate(m: torch.nn.Module, forward_loop=None, *args, **kwargs):
        missing = [n for n, q in m.named_modules()
                   if isinstance(q, TensorQuantizer) and q.is_enabled and id(q) not in calibrated]
        if missing:
            raise QuantkitError(f"GPTQ on searched scales: the scale search left {len(missing)} enabled quantizers "
                                f"without an amax (first: {missing[0]}): the calibration data never reached them",
                                where="calibration",
                                fix="calibrate with data that reaches every layer (more or other samples), or, for "
                                    "int4_gptq, set quantize.gptq_scales: max")

    model_calib.max_calibrate = max_calibrate
    try:
        yield
    finally:
        model_calib.max_calibrate = original


def quantize_in_steps(model: torch.nn.Module, cfg: dict, forward_loop) -> torch.nn.Module:
    """`mtq.quantize`, except that a list of algorithms ending in gptq runs GPTQ on the scales the earlier ones set."""
    import modelopt.torch.quantization as mtq

    algo = cfg.get("algorithm")
    if not (isinstance(algo, list) and len(algo) > 1 and algo[-1].get("method") == "gptq"):
        return mtq.quantize(model, cfg, forward_loop if algo is not None else None)
    model = mtq.quantize(model, {**cfg, "algorithm": algo[:-1]}, forward_loop)
    with kept_weight_scales(model):
        return mtq.calibrate(model, algo[-1], forward_loop)


def quantize_model(model: torch.nn.Module, section: QuantizeSection, calib: CalibrationSet | None,
                   counter: ForwardCounter | None = None) -> torch.nn.Module:
    """Quantize `model` in place (ModelOpt fake quantization) and return it."""
    method = get_method(section.method)
    section = with_family_defaults(model, section)
    if method.name == "auto":
        return auto_quantize_model(model, section, calib, counter)
    cfg = build_modelopt_config(section)
    if cfg is None:
        return model
    if method.needs_cuda and not torch.cuda.is_available():
        raise QuantkitError(f"method '{method.name}' needs a CUDA GPU; this machine has none",
                            where="quantize.method", fix="run it on a GPU machine or pick another method")
    check_shapes(model, section)

    counter = counter or ForwardCounter()
    forward_loop = None
    if method.uses_calibration_data:
        if calib is None:
            raise QuantkitError(f"method '{method.name}' needs calibration data", where="calibration")
        calib = resolve_batch_size(model, calib, section)
        counter.batch_size = calib.batch_size
        forward_loop = make_forward_loop(calib, counter, desc=f"calibrate {method.name}")
        experts = ExpertTokenCounter(model)  # MoE: which experts the calibration data reaches
        forward_loop = experts.wrap(forward_loop)
        if experts.routers:
            model.quantkit_expert_tokens = experts.counts  # recorded in the manifest by the pipeline
    # ModelOpt prints its config and every inserted quantizer: keep that in the debug log, not the terminal.
    settings = resolved_settings(section)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            with group_local_gptq(act_order=bool(settings.get("gptq_act_order"))):
                model = quantize_in_steps(model, cfg, forward_loop)
            if method.name == "int8_sq" and settings["smoothquant_alpha"] == "auto":
                from quantkit.smoothquant import smoothquant_auto

                alphas = smoothquant_auto(model, forward_loop, per_token=settings["activations"] == "per_token")
                model.quantkit_smoothquant_alphas = alphas  # recorded in the manifest by the pipeline
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        batch = (f"calibration batch {calib.batch_size} x {calib.input_ids.shape[1]} tokens" if calib is not None
                 else "no data")
        raise out_of_memory("quantize", f"calibrating {method.name} ({batch})", exc, OOM_FIX["quantize"]) from exc
    log.debug("modelopt output:\n%s", chatter.getvalue())
    for line in chatter.getvalue().splitlines():  # the first run on a machine JIT-builds these (a minute or more)
        if line.startswith("Loaded extension"):
            log.info("modelopt: %s", line)
    if settings.get("activations") == "per_token":
        use_per_token_activations(model)
    return model


def use_per_token_activations(model: torch.nn.Module) -> int:
    """Switch calibrated static int8 input quantizers of linear layers to dynamic per-token scaling.

    SmoothQuant's smoothing factors stay in the weights and pre-quant scales; only the activation scale
    changes from one calibrated number per tensor to one computed per token at run time.
    """
    from quantkit.methods import PER_TOKEN_INT8

    switched = 0
    for name, module in model.named_modules():
        if name.endswith("input_quantizer") and getattr(module, "is_enabled", False) and module.num_bits == 8:
            module.set_from_attribute_config(PER_TOKEN_INT8)
            if hasattr(module, "_amax"):
                delattr(module, "_amax")  # no static scale: exporters then write none
            switched += 1
    return switched


def quantizer_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many quantizers of each kind are enabled (a sanity line for the log and results)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Quantizer") and getattr(module, "is_enabled", False):
            kind = name.rsplit(".", 1)[-1]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def weight_bits(model: torch.nn.Module) -> float | None:
    """Average bits per stored weight element over the layers whose weight quantizer is enabled (what method auto
    counts as effective bits: scales not counted; layers left 16-bit by `exclude` outside), or None if none is."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    def element_bits(q: TensorQuantizer) -> int:
        n = q.num_bits
        return 1 + sum(n) if isinstance(n, tuple) else int(n)  # (E, M) floats: sign + exponent + mantissa

    total = bits = 0
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        w = getattr(module, "weight", None)
        if w is None or not isinstance(q, TensorQuantizer | SequentialQuantizer):
            continue
        parts = [p for p in (q if isinstance(q, SequentialQuantizer) else [q]) if p.is_enabled]
        if parts:  # w4a8: int4 codes then an fp8 step; the stored codes are the narrowest
            total += w.numel()
            bits += w.numel() * min(element_bits(p) for p in parts)
    return round(bits / total, 4) if total else None


def _check_budget(target: float, floor: float, candidates: list[str]) -> None:
    if target < floor - 1e-9:
        raise QuantkitError(
            f"effective_bits {target} is below what the candidates can reach ({floor:.2f} bits with every quantized "
            f"layer in its smallest format among {', '.join(candidates)})", where="quantize.effective_bits",
            fix=f"set quantize.effective_bits to {floor:.2f} or more, or add a smaller format to quantize.candidates")


def auto_search_dir() -> Path:
    """Where method auto keeps ModelOpt's search state (per-candidate calibration and layer scores) for reuse."""
    from quantkit.models import cache_dir

    return cache_dir() / "auto_search"


def _auto_search_file(model: torch.nn.Module, section: QuantizeSection, calib: CalibrationSet,
                      configs: dict[str, Any]) -> Path:
    """The search state's file, named by everything the search depends on and nothing it does not: the weights
    (exact bit sums), dtype and config of the model, the calibration tokens and batching, the candidates' ModelOpt
    configs, the exclusions and the ModelOpt version. Not the budget: the search scores every candidate on every
    layer, the budget only selects among them, so runs of one model at other effective bits reuse it."""
    import hashlib

    from quantkit.resume import weight_checksums
    from quantkit.runfolder import fingerprint, tool_versions

    ids = hashlib.sha256(calib.input_ids.cpu().numpy().tobytes()).hexdigest()
    dtype = str(next(model.parameters()).dtype)
    key = fingerprint(weight_checksums(model), dtype, model.config.to_dict(), ids, calib.batch_size, repr(configs),
                      sorted(section.exclude), tool_versions().get("nvidia-modelopt"))
    return auto_search_dir() / f"{key}.pth"


def auto_quantize_model(model: torch.nn.Module, section: QuantizeSection, calib: CalibrationSet | None,
                        counter: ForwardCounter | None = None) -> torch.nn.Module:
    """Method `auto`: `mtq.auto_quantize` picks a format per layer group under the effective-bits budget.

    The budget counts the quantized layers only (`exclude`d ones such as lm_head stay 16-bit outside it; ModelOpt
    counts them, so the target is converted). The searched model is calibrated once more with the INT4 candidate's
    own algorithm. The choice is left on `model.quantkit_auto_quantize` (the pipeline writes it to the run folder).
    The search state is kept in `auto_search_dir()` and reused by runs that differ only in the budget
    (`_auto_search_file`), so a sweep over effective bits searches once.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import QuantRecipe, _resolve_best_recipe

    from quantkit.methods import auto_act_order, auto_candidate_configs, auto_final_algorithm

    settings = resolved_settings(section)
    if any(get_method(c).needs_cuda for c in settings["candidates"]) and not torch.cuda.is_available():
        raise QuantkitError(f"auto candidates {settings['candidates']} include a CUDA-only format; this machine has "
                            "no GPU", where="quantize.candidates", fix="remove nvfp4 or run on a GPU machine")
    if calib is None:
        raise QuantkitError("method 'auto' needs calibration data", where="calibration")
    check_shapes(model, section)
    counter = counter or ForwardCounter()
    configs = auto_candidate_configs(section)
    names = {QuantRecipe.get_auto_name_for_config(cfg) or f"CUSTOM_{i}": m
             for i, (m, cfg) in enumerate(configs.items())}
    target = settings["effective_bits"]
    bits = {m: 16 * QuantRecipe(cfg, name=m).compression for m, cfg in configs.items()}
    _check_budget(target, min(bits.values()), settings["candidates"])  # before the costly search
    device = input_device(model)
    batches = list(calib.batches())

    def forward_step(m: torch.nn.Module, batch: torch.Tensor):
        counter.batches += 1
        return m(input_ids=batch.to(device), labels=batch.to(device))

    # ModelOpt saves the search as it goes (after calibrating the candidates, after scoring) and restores what a
    # checkpoint holds: it works on a private copy, which replaces the shared file only once the search is complete
    search = _auto_search_file(model, section, calib, configs)
    reused = search.is_file()
    search.parent.mkdir(parents=True, exist_ok=True)
    work = search.with_name(f"{search.stem}.{os.getpid()}.tmp")
    if reused:
        shutil.copyfile(search, work)
        log.info("auto: reusing the search of an earlier run (%s)", search)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            # a first search has no state to restore yet: ModelOpt warns about the missing file
            warnings.filterwarnings("ignore", message=r"(Per-rank checkpoint|Checkpoint) .* (not found|does not exist)")
            model, state = mtq.auto_quantize(
                model, constraints={"effective_bits": 16.0}, quantization_formats=list(configs.values()),
                data_loader=batches, forward_step=forward_step, loss_func=lambda out, _: out.loss,
                disabled_layers=[f"*{p}*" for p in section.exclude], num_calib_steps=len(batches),
                num_score_steps=len(batches), checkpoint=str(work))
        if work.is_file():
            os.replace(work, search)
    finally:
        work.unlink(missing_ok=True)
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()  # auto_quantize switches it on for the gradient scores
    stats = state["candidate_stats"]
    searched = {g: s for g, s in stats.items() if len(s["formats"]) > 1}
    quantized = sum(s["uncompressed_cost"] for s in searched.values())
    fixed = state["cost_denominator"] - quantized  # excluded layers, 16-bit in ModelOpt's count
    floor = 16 * sum(min(s["costs"]) for s in searched.values()) / quantized
    _check_budget(target, floor, settings["candidates"])  # the same with ModelOpt's own per-layer costs
    modelopt_target = (target * quantized + 16 * fixed) / state["cost_denominator"]
    with contextlib.redirect_stdout(chatter):
        best = _resolve_best_recipe(state, {"effective_bits": modelopt_target})  # what get_auto_quantize_config uses
    layers: dict[str, str] = {}
    cost = 0.0
    for group, s in searched.items():
        recipe = best[group]
        i = s["formats"].index(recipe)
        cost += s["costs"][i]
        label = str(recipe).split("(")[0]
        for name in s["module_names"]:
            layers[name] = names.get(label, "none")
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "returned config uses algorithm='max'": we set the algorithm next
        cfg = mtq.get_auto_quantize_config(state, {"effective_bits": modelopt_target})
    cfg["algorithm"] = auto_final_algorithm(section)
    for module in model.modules():  # the search left each candidate's scales: the chosen format sets new ones
        if type(module).__name__.endswith("Quantizer") and hasattr(module, "_amax"):
            delattr(module, "_amax")
    act_order = auto_act_order(section)
    with contextlib.redirect_stdout(chatter), group_local_gptq(act_order=act_order):
        model = quantize_in_steps(model, cfg, make_forward_loop(calib, counter, desc="calibrate auto"))
    log.debug("modelopt output:\n%s", chatter.getvalue())
    counts = dict(collections.Counter(layers.values()))
    model.quantkit_auto_quantize = {
        "effective_bits_target": target, "effective_bits": round(16 * cost / quantized, 4),
        "bits_counted_over": "quantized (non-excluded) linear weights", "floor_bits": round(floor, 4),
        "candidates": settings["candidates"], "calibration": cfg["algorithm"], "gptq_act_order": act_order,
        "search": {"reused": reused, "state": str(search)},
        "layer_counts": counts,
        "layers": layers,
    }
    return model
