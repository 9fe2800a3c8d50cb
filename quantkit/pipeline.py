"""`quantkit run`: the stages in order, each reading and writing the run folder.

Inputs are checked before anything is written (model, calibration data, tasks), so bad input
never leaves a run folder behind. Stages whose fingerprint is unchanged are skipped on rerun.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.calibration import CalibrationSet, build_calibration_set, load_texts
from quantkit.errors import QuantkitError, resource_errors
from quantkit.methods import get_method, resolved_settings, run_settings
from quantkit.recipe import Recipe
from quantkit.runfolder import (
    RunFolder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_free_space,
    dir_bytes,
    fingerprint,
    remove_leftovers,
)

log = logging.getLogger("quantkit")

STAGES = ("quantize", "export", "check", "evaluate", "build", "report")


@dataclass
class RunCache:
    """What consecutive runs of one model can share (a sweep): tokenizers, calibration texts and token
    batches, and a CPU copy of the unquantized model when it is small.

    Quantization changes a model in place, so every run gets its own deep copy of the cached weights.
    """

    max_model_bytes: int = 2 * 2**30  # above this, reloading from disk beats holding a second copy in RAM
    tokenizers: dict[tuple, Any] = field(default_factory=dict)
    texts: dict[tuple, list[str]] = field(default_factory=dict)
    calibration_sets: dict[tuple, CalibrationSet] = field(default_factory=dict)
    models: dict[tuple, Any] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)  # what was reused, for logs and tests

    def _hit(self, what: str) -> None:
        self.hits[what] = self.hits.get(what, 0) + 1

    def tokenizer(self, model_path: str, trust_remote_code: bool = False):
        key = (model_path, trust_remote_code)
        if key in self.tokenizers:
            self._hit("tokenizer")
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token  # as models.load_model does
            self.tokenizers[key] = tok
        return self.tokenizers[key]

    def calibration(self, recipe: Recipe, model_path: str) -> CalibrationSet:
        c = recipe.calibration
        key = (model_path, c.dataset, c.text_field, c.n_samples, c.seq_len, c.batch_size, c.seed)
        if key in self.calibration_sets:
            self._hit("calibration")
            return self.calibration_sets[key]
        text_key = (c.dataset, c.text_field)
        if text_key not in self.texts:
            self.texts[text_key] = load_texts(c.dataset, c.text_field)
        tokenizer = self.tokenizer(model_path, recipe.model.trust_remote_code)
        calib = build_calibration_set(self.texts[text_key], tokenizer, c.n_samples, c.seq_len, c.batch_size,
                                      c.seed, c.dataset)
        self.calibration_sets[key] = calib
        return calib

    def load_model(self, recipe: Recipe, device: str, offload_folder: Path | None = None):
        """(fresh unquantized model where the recipe places it, shared tokenizer). Only a small model loaded
        on the CPU is kept: on a GPU, or offloaded, loading straight to the device beats any host copy."""
        from quantkit.models import load_model, resolve_device_map, resolve_model_path

        m = recipe.model
        path = resolve_model_path(m.source)
        tokenizer = self.tokenizer(path, m.trust_remote_code)
        if resolve_device_map(device, m.device_map, m.max_memory) != "cpu":
            model, _ = _load(recipe, device, offload_folder)
            return model, tokenizer
        key = (path, m.dtype)
        if key in self.models:
            self._hit("model")
            return copy.deepcopy(self.models[key]), tokenizer
        model, _ = load_model(m.source, m.dtype, "cpu", trust_remote_code=m.trust_remote_code)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if nbytes <= self.max_model_bytes:
            self.models[key] = model
            model = copy.deepcopy(model)
        return model, tokenizer


def _load(recipe: Recipe, device: str, offload_folder: Path | None = None):
    from quantkit.models import load_model

    m = recipe.model
    return load_model(m.source, m.dtype, device, device_map=m.device_map, max_memory=m.max_memory,
                      offload_folder=offload_folder, trust_remote_code=m.trust_remote_code)


def preflight(recipe: Recipe, cache: RunCache | None = None) -> CalibrationSet | None:
    """Everything that can fail on bad input, done before the run folder is touched."""
    from transformers import AutoConfig

    from quantkit.archs import check_method, trtllm_decoder_type
    from quantkit.evaluate import resolve_tasks
    from quantkit.models import resolve_model_path

    if recipe.evaluate.tasks:  # known names, data present offline or reachable
        resolve_tasks(recipe.evaluate.tasks, recipe.evaluate.include_path)
    model_path = resolve_model_path(recipe.model.source)
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as exc:
        raise QuantkitError(f"could not read the model config of '{recipe.model.source}' "
                            f"({str(exc).splitlines()[0]})", where="model.source",
                            fix="check the Hub id and your network, or give a local model folder") from exc
    if recipe.export.trtllm is not None:
        trtllm_decoder_type(config.model_type)  # no family file or no TensorRT-LLM export: say so now
    check_method(config.model_type, recipe.quantize.method)
    if get_method(recipe.quantize.method).preset is not None:
        from transformers import AutoModelForCausalLM

        from quantkit.quantize import check_shapes

        with torch.device("meta"):  # shapes only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        check_shapes(skeleton, recipe.quantize)
    if not get_method(recipe.quantize.method).uses_calibration_data:
        return None
    if cache is not None:
        return cache.calibration(recipe, model_path)
    from transformers import AutoTokenizer

    c = recipe.calibration
    texts = load_texts(c.dataset, c.text_field)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    return build_calibration_set(texts, tokenizer, c.n_samples, c.seq_len, c.batch_size, c.seed, c.dataset)




def run_recipe(recipe: Recipe, *, force: bool = False, device: str | None = None,
               cache: RunCache | None = None) -> Path:
    """Run every stage that is not current. `cache` shares tokenizer, calibration data and weights between runs."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    calib = preflight(recipe, cache)
    run_dir = recipe.run_dir()
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        return _run(recipe, run_dir, calib, device, t_start, cache)
    except BaseException:
        folder = RunFolder.open(run_dir) if run_dir.exists() else None
        if created and folder is not None and not folder.entries:
            shutil.rmtree(created[-1], ignore_errors=True)  # nothing finished: leave nothing behind
        raise


def _run(recipe: Recipe, run_dir: Path, calib: CalibrationSet | None, device: str, t_start: float,
         cache: RunCache | None = None) -> Path:
    from quantkit import export as export_stage
    from quantkit import resume

    torch.manual_seed(recipe.calibration.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if remove_leftovers(run_dir):
        log.info("removed temporary files of an interrupted run")
    # results.json marks a complete run: it goes until this run has finished (the report stage rewrites it).
    (run_dir / "results.json").unlink(missing_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    folder = RunFolder.open(run_dir)
    method = get_method(recipe.quantize.method)
    m, q, c, e = recipe.model, recipe.quantize, recipe.calibration, recipe.export
    # Placement (device_map, max_memory) decides where the weights sit, not what the checkpoints hold.
    fp_quant = fingerprint(m.model_dump(exclude=set(PLACEMENT_FIELDS)), q.model_dump(), run_settings(q),
                           c.model_dump() if method.uses_calibration_data else None)
    fp_export = fingerprint(fp_quant, e.model_dump())
    # Export preparation re-shares scales of fused layers in place: evaluate the model as it is shipped.
    from quantkit.evaluate import include_path_digest

    fp_eval = fingerprint(fp_quant, recipe.evaluate.model_dump(), e.trtllm is not None, "deploy-v2",
                          include_path_digest(recipe.evaluate.include_path))
    fp_build = fingerprint(fp_export, recipe.build.model_dump())

    eval_pending = bool(recipe.evaluate.tasks) and not folder.done("evaluate", fp_eval)
    export_pending = not folder.done("export", fp_export)
    state_path = run_dir / "quantize" / resume.STATE_FILE
    (run_dir / "quantize" / "modelopt_state.pth").unlink(missing_ok=True)  # older quantkit: a 16 GB weight copy
    resumable = method.preset is not None and folder.done("quantize", fp_quant) and state_path.is_file()
    if export_pending:
        plan = planned_write_bytes(recipe)
        check_free_space(run_dir, plan["export"] + (0 if resumable else plan["quantize"]), "export")
    model = tokenizer = None
    offload_folder = run_dir / ".offload"  # disk-offloaded weights (device_map auto); a dot name: a leftover
    try:
        if eval_pending or export_pending:
            log.info("loading %s (%s), device_map %s", m.source, m.dtype,
                     m.device_map or ("auto" if m.max_memory else device))
            with resource_errors("load", offload_folder):
                if cache is not None:
                    model, tokenizer = cache.load_model(recipe, device, offload_folder)
                else:
                    model, tokenizer = _load(recipe, device, offload_folder)
            if resumable:
                log.info("[quantize] restoring the quantized model from %s (calibration skipped)", state_path)
                model, _ = resume.restore(model, state_path)
            else:
                with folder.stage("quantize", fp_quant, log, method=method.name) as info:
                    model = _quantize(model, recipe, calib, run_dir, info)
            if method.preset is not None:
                with export_stage.offload_aware_fusion(model):
                    export_stage.prepare_for_deployment(model)  # evaluate what the checkpoints hold
                    if e.trtllm is not None:  # and what the TensorRT-LLM exporter would change in place
                        export_stage.share_fused_scales(model)
            if export_pending:
                with folder.stage("export", fp_export, log) as info:
                    _export(model, tokenizer, recipe, run_dir / "export", info, keep_model=eval_pending)
        _check_stage(folder, run_dir, fp_export)
        if eval_pending:
            from quantkit.evaluate import evaluate

            if method.preset is not None:
                import modelopt.torch.quantization as mtq

                # Quantize the weights once instead of at every forward: same numbers, several times faster.
                mtq.fold_weight(model)
            with folder.stage("evaluate", fp_eval, log) as info, resource_errors("evaluate", run_dir / "eval"):
                results = _evaluate_grouped(evaluate, model, tokenizer, recipe)
                atomic_write_json(run_dir / "eval" / "lm_eval.json", results)
                info["tasks"] = sorted(results["tasks"])
    finally:
        del model
        shutil.rmtree(offload_folder, ignore_errors=True)
    _build_stage(folder, run_dir, recipe, fp_build)
    from quantkit.report import write_run_report

    write_run_report(run_dir)
    log.info("run folder %s ready (%.1f s in all)", run_dir, time.perf_counter() - t_start)
    return run_dir


PLACEMENT_FIELDS = ("device_map", "max_memory")


def _gpu_peak_gib() -> float | None:
    """The process's peak GPU allocation so far (recorded at the end of quantize and export: where the peak is)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _quantize(model, recipe: Recipe, calib: CalibrationSet | None, run_dir: Path, info: dict):
    """Calibrate, then write the small resume state (quantizer state and weight folds, no weights)."""
    from quantkit import resume
    from quantkit.moe import record_expert_coverage
    from quantkit.quantize import ForwardCounter, quantize_model, quantizer_summary, weight_bits

    q = recipe.quantize
    method = get_method(q.method)
    counter = ForwardCounter()
    t0 = time.perf_counter()
    source = resume.weight_checksums(model) if method.preset is not None else None
    with resume.record_weight_folds(model) as folds:
        model = quantize_model(model, q, calib, counter)
    info.update(settings=resolved_settings(q), quantizers=quantizer_summary(model),
                calibration_batches=counter.batches, calibration_batch_size=counter.batch_size,
                calibration_pass_s=counter.pass_s,
                calibration_tokens=int(calib.input_ids.numel()) if calib is not None else 0,
                calibration_fingerprint=calib.fingerprint if calib is not None else None,
                quantize_s=round(time.perf_counter() - t0, 2))
    info.update(record_expert_coverage(model, run_dir / "quantize"))  # MoE only
    alphas = getattr(model, "quantkit_smoothquant_alphas", None)
    if alphas:  # alpha: auto — the per-layer choice is part of the run's record
        atomic_write_json(run_dir / "quantize" / "smoothquant_alphas.json", alphas)
        info["smoothquant_alphas"] = "quantize/smoothquant_alphas.json"
    choice = getattr(model, "quantkit_auto_quantize", None)
    if choice:  # method auto: the per-layer formats are part of the run's record
        atomic_write_json(run_dir / "quantize" / "auto_quantize.json", choice)
        info["auto_quantize"] = "quantize/auto_quantize.json"
    # auto counts its 16-bit choices inside the budget, so its own figure; uniform methods their weights' width
    info["effective_bits"] = choice["effective_bits"] if choice else weight_bits(model)
    if method.preset is not None:
        t0 = time.perf_counter()
        state_path = run_dir / "quantize" / resume.STATE_FILE
        blob = resume.state_bytes(model, folds, source_checksums=source)
        with resource_errors("quantize", state_path, len(blob)):
            atomic_write_bytes(state_path, blob)
        info.update(state_bytes=len(blob), state_s=round(time.perf_counter() - t0, 2))
    info["peak_gpu_gib"] = _gpu_peak_gib()
    return model


def _export(model, tokenizer, recipe: Recipe, exports: Path, info: dict, keep_model: bool = True) -> None:
    """Both checkpoints; `keep_model=False` (no evaluation follows) lets the HF exporter consume the model."""
    from quantkit import export as export_stage

    m, e = recipe.model, recipe.export
    if e.trtllm is not None:
        target = exports / "trtllm"
        # TensorRT-LLM's exporter reads weights directly: an offloaded model is materialized for it.
        t0 = time.perf_counter()
        with resource_errors("export", target), export_stage.materialized(model), \
                export_stage.offload_aware_fusion(model):
            export_stage.export_trtllm(model, target, e.trtllm.dtype, e.trtllm.tp_size, e.trtllm.pp_size)
        info.update(trtllm_bytes=dir_bytes(target), trtllm_s=round(time.perf_counter() - t0, 2))
    if e.hf:
        target = exports / "hf"
        t0 = time.perf_counter()
        with resource_errors("export", target), export_stage.offload_aware_fusion(model):
            export_stage.export_hf(model, target, m.dtype, keep_model=keep_model)
            tokenizer.save_pretrained(target)
        info.update(hf_bytes=dir_bytes(target), hf_s=round(time.perf_counter() - t0, 2))
    info["peak_gpu_gib"] = _gpu_peak_gib()


def planned_write_bytes(recipe: Recipe) -> dict[str, int]:
    """What the quantize and export stages will write, from shapes (a meta skeleton) and the method's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.export import checkpoint_bytes
    from quantkit.methods import build_modelopt_config
    from quantkit.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(recipe.model.source),
                                        trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    q, e = recipe.quantize, recipe.export
    # method auto has no single config before its search: bound it by the unquantized size
    cfg = None if q.method == "auto" else build_modelopt_config(q)
    export = (checkpoint_bytes(skeleton, cfg, q.exclude, e.trtllm.dtype) if e.trtllm is not None else 0) + (
        checkpoint_bytes(skeleton, cfg, q.exclude, recipe.model.dtype) if e.hf else 0)
    # Resume state: quantizer scales and fold factors; 1% of the checkpoint bounds it (measured: 0.1-0.3%).
    quantize = (export // 100 + (1 << 20)) if get_method(q.method).preset is not None else 0
    return {"quantize": quantize, "export": export}


def _evaluate_grouped(evaluate, model, tokenizer, recipe: Recipe) -> dict:
    """One lm-eval call per distinct limit (per-task limits win over the section's limit)."""
    ev = recipe.evaluate
    groups: dict[int | None, list[str]] = {}
    for task in ev.tasks:
        groups.setdefault(ev.limits.get(task, ev.limit), []).append(task)
    merged: dict = {"tasks": {}}
    for limit, tasks in groups.items():
        out = evaluate(model, tokenizer, tasks, limit=limit, batch_size=ev.batch_size, seed=recipe.calibration.seed,
                       include_path=ev.include_path, settings={t: ev.lm_eval_settings(t) for t in tasks})
        for key in ("tasks", "subtasks", "settings", "seconds"):
            merged.setdefault(key, {}).update(out[key])
        merged.update({k: v for k, v in out.items() if k not in merged})
    merged["limits"] = {t: ev.limits.get(t, ev.limit) for t in ev.tasks}
    return merged


def _check_stage(folder: RunFolder, run_dir: Path, fp_export: str) -> None:
    try:
        from quantkit.check import check_checkpoint
    except ImportError:  # checker not available in this build
        return
    if folder.done("check", fp_export) or not (run_dir / "export").is_dir():
        return
    with folder.stage("check", fp_export, log) as info:
        violations = check_checkpoint(run_dir)
        info["violations"] = [str(v) for v in violations]
        if violations:
            for v in violations:
                log.error("check: %s", v)
            raise QuantkitError(f"the exported checkpoint breaks {len(violations)} format rule(s); "
                                f"first: {violations[0]}", where=str(run_dir / "export"),
                                fix="this is a quantkit/ModelOpt export bug: report it with the run folder")


def _build_stage(folder: RunFolder, run_dir: Path, recipe: Recipe, fp_build: str) -> None:
    if not recipe.build.enabled or recipe.export.trtllm is None or folder.done("build", fp_build):
        return
    try:
        from quantkit.build import make_build_plan, write_build_files
    except ImportError:
        return
    with folder.stage("build", fp_build, log) as info:
        plan = make_build_plan(run_dir / "export" / "trtllm", recipe.build)
        write_build_files(run_dir, plan)
        info["plan"] = "build/plan.json"
