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
from quantkit.errors import QuantkitError
from quantkit.methods import get_method, resolved_settings
from quantkit.recipe import Recipe
from quantkit.runfolder import RunFolder, atomic_write_json, atomic_write_text, fingerprint, remove_leftovers

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

    def load_model(self, source: str, dtype: str, device: str, trust_remote_code: bool = False):
        """(fresh unquantized model on `device`, shared tokenizer)."""
        from quantkit.models import load_model, resolve_model_path

        path = resolve_model_path(source)
        key = (path, dtype, trust_remote_code)
        tokenizer = self.tokenizer(path, trust_remote_code)
        if key in self.models:
            self._hit("model")
            return copy.deepcopy(self.models[key]).to(device), tokenizer
        model, _ = load_model(source, dtype, "cpu", trust_remote_code=trust_remote_code)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if nbytes <= self.max_model_bytes:
            self.models[key] = model
            model = copy.deepcopy(model)
        return model.to(device), tokenizer


def preflight(recipe: Recipe, cache: RunCache | None = None) -> CalibrationSet | None:
    """Everything that can fail on bad input, done before the run folder is touched."""
    from transformers import AutoConfig

    from quantkit.archs import check_method, trtllm_decoder_type
    from quantkit.evaluate import TASKS
    from quantkit.models import resolve_model_path

    unknown = [t for t in recipe.evaluate.tasks if t not in TASKS]
    if unknown:
        raise QuantkitError(f"unknown evaluation task(s) {unknown}", where="evaluate.tasks",
                            fix=f"use tasks from: {', '.join(TASKS)}")
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


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


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
    from quantkit.models import load_model
    from quantkit.moe import record_expert_coverage
    from quantkit.quantize import ForwardCounter, quantize_model, quantizer_summary

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
    fp_quant = fingerprint(m.model_dump(), q.model_dump(), c.model_dump() if method.uses_calibration_data else None)
    fp_export = fingerprint(fp_quant, e.model_dump())
    # Export preparation re-shares scales of fused layers in place: evaluate the model as it is shipped.
    fp_eval = fingerprint(fp_quant, recipe.evaluate.model_dump(), e.trtllm is not None, "deploy-v2")
    fp_build = fingerprint(fp_export, recipe.build.model_dump())

    eval_pending = bool(recipe.evaluate.tasks) and not folder.done("evaluate", fp_eval)
    needs_model = eval_pending or not folder.done("export", fp_export)
    model = tokenizer = None
    if needs_model:
        log.info("loading %s (%s) on %s", m.source, m.dtype, device)
        if cache is not None:
            model, tokenizer = cache.load_model(m.source, m.dtype, device, m.trust_remote_code)
        else:
            model, tokenizer = load_model(m.source, m.dtype, device, trust_remote_code=m.trust_remote_code)
        state_path = run_dir / "quantize" / "modelopt_state.pth"
        if method.preset is not None and folder.done("quantize", fp_quant) and state_path.is_file():
            import modelopt.torch.opt as mto

            log.info("[quantize] restoring the quantized model from %s (calibration skipped)", state_path)
            model = mto.restore(model, str(state_path))
        else:
            with folder.stage("quantize", fp_quant, log, method=method.name) as info:
                counter = ForwardCounter()
                t0 = time.perf_counter()
                model = quantize_model(model, q, calib, counter)
                info.update(settings=resolved_settings(q), quantizers=quantizer_summary(model),
                            calibration_batches=counter.batches,
                            calibration_tokens=int(calib.input_ids.numel()) if calib else 0,
                            calibration_fingerprint=calib.fingerprint if calib else None,
                            quantize_s=round(time.perf_counter() - t0, 2))
                info.update(record_expert_coverage(model, run_dir / "quantize"))  # MoE only
                alphas = getattr(model, "quantkit_smoothquant_alphas", None)
                if alphas:  # alpha: auto — the per-layer choice is part of the run's record
                    atomic_write_json(run_dir / "quantize" / "smoothquant_alphas.json", alphas)
                    info["smoothquant_alphas"] = "quantize/smoothquant_alphas.json"
                if method.preset is not None:
                    _save_modelopt_state(model, state_path)
        exports = run_dir / "export"
        if method.preset is not None:
            export_stage.prepare_for_deployment(model)  # evaluate what the checkpoints hold
        if not folder.done("export", fp_export):
            with folder.stage("export", fp_export, log) as info:
                if e.trtllm is not None:
                    export_stage.export_trtllm(model, exports / "trtllm", e.trtllm.dtype, e.trtllm.tp_size,
                                               e.trtllm.pp_size)
                    info["trtllm_bytes"] = _dir_bytes(exports / "trtllm")
                if e.hf:
                    export_stage.export_hf(model, exports / "hf", m.dtype)
                    tokenizer.save_pretrained(exports / "hf")
                    info["hf_bytes"] = _dir_bytes(exports / "hf")
        elif e.trtllm is not None and method.preset is not None:
            # Exports are current but the evaluation is not: reproduce the exporter's in-place changes.
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                export_stage.export_trtllm(model, Path(tmp) / "t", e.trtllm.dtype, e.trtllm.tp_size, e.trtllm.pp_size)
    _check_stage(folder, run_dir, fp_export)
    if eval_pending:
        from quantkit.evaluate import evaluate

        if method.preset is not None:
            import modelopt.torch.quantization as mtq

            # Quantize the weights once instead of at every forward: same numbers, several times faster.
            mtq.fold_weight(model)
        with folder.stage("evaluate", fp_eval, log) as info:
            results = _evaluate_grouped(evaluate, model, tokenizer, recipe)
            atomic_write_json(run_dir / "eval" / "lm_eval.json", results)
            info["tasks"] = sorted(results["tasks"])
    del model
    _build_stage(folder, run_dir, recipe, fp_build)
    from quantkit.report import write_run_report

    write_run_report(run_dir)
    log.info("run folder %s ready (%.1f s in all)", run_dir, time.perf_counter() - t_start)
    return run_dir


def _save_modelopt_state(model, path: Path) -> None:
    """ModelOpt state + weights, so a rerun (other eval tasks, a crash) skips calibration."""
    import modelopt.torch.opt as mto

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    mto.save(model, str(tmp))
    tmp.replace(path)


def _evaluate_grouped(evaluate, model, tokenizer, recipe: Recipe) -> dict:
    """One lm-eval call per distinct limit (per-task limits win over the section's limit)."""
    ev = recipe.evaluate
    groups: dict[int | None, list[str]] = {}
    for task in ev.tasks:
        groups.setdefault(ev.limits.get(task, ev.limit), []).append(task)
    merged: dict = {"tasks": {}}
    for limit, tasks in groups.items():
        out = evaluate(model, tokenizer, tasks, limit=limit, batch_size=ev.batch_size, seed=recipe.calibration.seed)
        merged["tasks"].update(out["tasks"])
        merged.update({k: v for k, v in out.items() if k != "tasks"})
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
