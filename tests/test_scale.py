"""Production scale on CPU: placement (offload), small resume state, no copy at export, full disks, OOM.

Ground truth is always another path through the real libraries: the offloaded model must export what the in-memory
model exports, a resumed run what an uninterrupted run writes, the model after export what it was before.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import make_tiny_llama
from safetensors.torch import load_file

from quantkit.calibration import CalibrationSet
from quantkit.cli import main
from quantkit.recipe import QuantizeSection
from quantkit.runfolder import read_json

# A placement that keeps the second decoder layer off the device (accelerate disk offload): the CPU stand-in for
# a model larger than the GPU (on CPU there is no accelerator for max_memory to spill from).
OFFLOADED = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _recipe(tmp: Path, name: str, model_dir: Path, quantize: dict, out: Path, **model: object) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "metadata": {"name": name},
        "model": {"source": str(model_dir), "dtype": "bfloat16", **model},
        "quantize": quantize,
        "calibration": {"dataset": "builtin:news", "n_samples": 4, "seq_len": 32, "batch_size": 2},
        "export": {"trtllm": {"dtype": "bfloat16"}, "hf": True},
        "build": {"max_batch_size": 4},
        "evaluate": {"tasks": []},
        "output_dir": str(out),
    }))
    return path


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_tensors(a: Path, b: Path) -> list[str]:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    return [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
            or not torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8))]


@pytest.mark.parametrize("method", [{"method": "fp8"}, {"method": "int8_sq"}])
def test_offloaded_model_exports_the_same_tensors(tmp_path, tiny_model_dir, method):
    """Calibration through accelerate's offload hooks, export preparation and both exports on an offloaded model
    give the in-memory path's checkpoints, bit for bit (int8_sq also writes smoothed weights back to the offload)."""
    name = method["method"]
    mem = _recipe(tmp_path, f"mem-{name}", tiny_model_dir, method, tmp_path / "runs")
    off = _recipe(tmp_path, f"off-{name}", tiny_model_dir, method, tmp_path / "runs", device_map=OFFLOADED)
    assert main(["run", str(mem)]) == 0
    assert main(["run", str(off)]) == 0
    a, b = tmp_path / "runs" / f"mem-{name}" / "export", tmp_path / "runs" / f"off-{name}" / "export"
    assert _same_tensors(a / "trtllm" / "rank0.safetensors", b / "trtllm" / "rank0.safetensors") == []
    assert _same_tensors(a / "hf" / "model.safetensors", b / "hf" / "model.safetensors") == []
    assert not (tmp_path / "runs" / f"off-{name}" / ".offload").exists()  # offloaded weights are temporary


def test_load_model_places_weights_where_asked(tiny_model_dir, tmp_path, monkeypatch):
    """from_pretrained places the weights (device_map); nothing loads on the CPU and then moves with .to()."""
    from quantkit.models import load_model

    def no_move(self, *args, **kwargs):
        raise AssertionError("load_model must not move a loaded model")

    monkeypatch.setattr(torch.nn.Module, "to", no_move)
    model, _ = load_model(str(tiny_model_dir), "bfloat16", "cpu", device_map=OFFLOADED, offload_folder=tmp_path)
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert model.model.layers[1].mlp.up_proj.weight.is_meta and not model.model.layers[0].mlp.up_proj.weight.is_meta


class Killed(BaseException):
    """Stands in for SIGKILL after calibration: not an Exception, so nothing catches it on the way out."""


@pytest.mark.parametrize("quantize", [{"method": "fp8"}, {"method": "int8_sq"},
                                      {"method": "int4_awq", "block_size": 64}], ids=["fp8", "int8_sq", "int4_awq"])
def test_run_killed_after_calibration_resumes_from_small_state(tmp_path, tiny_model_dir, monkeypatch, quantize,
                                                              caplog):
    """The resume state holds no weights (<= 2% of the checkpoint) and a resumed run writes byte-identical exports.
    int8_sq and awq_lite fold scales into the weights: the state replays those folds onto the source weights."""
    from quantkit import export as export_stage
    from quantkit.resume import STATE_FILE

    whole = _recipe(tmp_path, "run", tiny_model_dir, quantize, tmp_path / "whole")
    assert main(["run", str(whole)]) == 0

    resumed = _recipe(tmp_path, "run", tiny_model_dir, quantize, tmp_path / "resumed")
    real_export = export_stage.export_trtllm

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(export_stage, "export_trtllm", killed)
    with pytest.raises(Killed):
        main(["run", str(resumed)])
    run = tmp_path / "resumed" / "run"
    state = run / "quantize" / STATE_FILE
    assert state.is_file() and not (run / "export").exists()
    monkeypatch.setattr(export_stage, "export_trtllm", real_export)
    caplog.set_level("INFO")
    assert main(["run", str(resumed)]) == 0
    assert "calibration skipped" in caplog.text

    want, got = _files(tmp_path / "whole" / "run" / "export"), _files(run / "export")
    assert got == want
    ckpt = sum((run / "export" / f).stat().st_size for f in got if f.startswith("trtllm/"))
    assert state.stat().st_size <= 0.02 * ckpt
    assert read_json(run / "manifest.json")["stages"]["quantize"]["state_bytes"] == state.stat().st_size


def test_awq_lite_folds_replay_bit_for_bit(tmp_path, calib_ids):
    """awq_lite folds its scales into the weights (its TensorRT-LLM export is issue 12's, so this checks the restored
    model itself): restored onto fresh source weights, every tensor matches the calibrated model."""
    from quantkit import resume
    from quantkit.export import prepare_for_deployment
    from quantkit.quantize import quantize_model

    model = make_tiny_llama().to(torch.bfloat16)
    section = QuantizeSection(method="int4_awq", block_size=64, awq_algorithm="awq_lite")
    with resume.record_weight_folds(model) as folds:
        quantize_model(model, section, CalibrationSet(calib_ids[:2], 2, "x"))
    assert folds  # awq_lite wrote scaled weights
    path = tmp_path / resume.STATE_FILE
    path.write_bytes(resume.state_bytes(model, folds))
    restored, _ = resume.restore(make_tiny_llama().to(torch.bfloat16), path)
    want, got = prepare_for_deployment(model).state_dict(), prepare_for_deployment(restored).state_dict()
    assert set(want) == set(got) and all(want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]) for k in want)


def test_resume_state_refuses_changed_source_weights(tmp_path, calib_ids):
    """The state is restored onto the source weights: if those changed, the checksums say so (exit-2 error)."""
    from quantkit import resume
    from quantkit.errors import QuantkitError
    from quantkit.quantize import quantize_model

    model = make_tiny_llama().to(torch.bfloat16)
    with resume.record_weight_folds(model) as folds:
        quantize_model(model, QuantizeSection(method="int8_sq"), CalibrationSet(calib_ids, 4, "x"))
    assert len(folds) == 14  # every quantized linear of the 2-layer model was smoothed
    path = tmp_path / resume.STATE_FILE
    path.write_bytes(resume.state_bytes(model, folds))
    other = make_tiny_llama(seed=1).to(torch.bfloat16)
    with pytest.raises(QuantkitError, match="does not reproduce the calibrated weights"):
        resume.restore(other, path)


def _quantized(method: dict, calib_ids: torch.Tensor):
    from quantkit.export import prepare_for_deployment
    from quantkit.quantize import quantize_model

    model = quantize_model(make_tiny_llama().to(torch.bfloat16), QuantizeSection(**method),
                           CalibrationSet(calib_ids, 4, "x"))
    return prepare_for_deployment(model)


@pytest.mark.parametrize("method", [{"method": "fp8"}, {"method": "int8_sq", "activations": "per_tensor",
                                                        "smoothquant_alpha": 0.5}], ids=["fp8", "int8_sq_static"])
def test_hf_export_without_a_copy_leaves_the_model_as_it_was(tmp_path, calib_ids, monkeypatch, method):
    """ModelOpt's HF exporter packs weights in place; export_hf undoes that by rebinding, not by a deep copy."""
    from quantkit import export as export_stage

    model = _quantized(method, calib_ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(calib_ids[:1]).logits
    reference = copy.deepcopy(model)
    real_deepcopy = copy.deepcopy

    def no_copy(obj, *args, **kwargs):
        assert not isinstance(obj, torch.nn.Module), "export_hf must not copy the model"
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(export_stage.copy, "deepcopy", no_copy)
    export_stage.export_hf(model, tmp_path / "a")
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(calib_ids[:1]).logits, logits)
    monkeypatch.undo()
    export_stage.export_hf(reference, tmp_path / "b")  # the exporter consuming a model of its own
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("method", [{"method": "fp8"}, {"method": "int4_awq", "awq_algorithm": "awq_lite",
                                                        "block_size": 32}], ids=["fp8", "int4_awq_lite"])
def test_hf_export_that_may_consume_the_model_frees_each_weight_it_packs(tmp_path, calib_ids, method):
    """No evaluation after export (the pipeline's keep_model=False): the 16-bit weights go as the exporter packs them,
    as in a plain ModelOpt export (kept, they sat next to the packed ones: the 8B table's extra peak GPU), and the
    checkpoint is the same bytes."""
    import weakref

    from quantkit import export as export_stage

    model = _quantized(method, calib_ids)
    reference = copy.deepcopy(model)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    originals = [weakref.ref(m.weight) for m in linears]
    export_stage.export_hf(model, tmp_path / "consumed", keep_model=False)
    assert all(r() is None for r in originals)
    kept = [(m, m.weight) for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    export_stage.export_hf(reference, tmp_path / "kept")  # keep_model=True: the same tensors are given back
    assert all(m.weight is w for m, w in kept)
    assert _files(tmp_path / "consumed") == _files(tmp_path / "kept")


@pytest.mark.parametrize("method", [{"method": "fp8"}, {"method": "fp8", "kv_cache": "fp8"}, {"method": "int8_sq"}],
                         ids=["fp8", "fp8_kv", "int8_sq"])
def test_share_fused_scales_is_what_the_trtllm_exporter_does(tmp_path, calib_ids, method):
    """An evaluation-only rerun no longer re-exports into a temporary folder to get the exporter's in-place
    changes (FP8 q/k/v and gate/up share one amax): share_fused_scales makes them, and the exporter then changes
    nothing."""
    from quantkit.export import export_trtllm, share_fused_scales

    exported = _quantized(method, calib_ids)
    shared = copy.deepcopy(exported)
    export_trtllm(exported, tmp_path / "t")
    share_fused_scales(shared)
    want, got = exported.state_dict(), shared.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    if method["method"] == "fp8":  # the ground truth moved: this checks something
        q, k = (shared.model.layers[0].self_attn.q_proj, shared.model.layers[0].self_attn.k_proj)
        assert torch.equal(q.weight_quantizer.amax, k.weight_quantizer.amax)
    export_trtllm(shared, tmp_path / "t2")
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in got.items())


@pytest.mark.parametrize("method", ["none", "fp8", "int4_awq", "int8_sq", "int4_rtn"])
def test_checkpoint_bytes_estimate_bounds_the_real_checkpoint(tmp_path, calib_ids, method):
    """The free-space check's estimate (from shapes and the ModelOpt config) is at least what the exporters write,
    and not far above it."""
    from quantkit.export import checkpoint_bytes, export_hf, export_trtllm, prepare_for_deployment
    from quantkit.methods import build_modelopt_config
    from quantkit.quantize import quantize_model

    section = QuantizeSection(method=method, **({"block_size": 64} if "int4" in method else {}))
    if method == "int4_awq":
        section = QuantizeSection(method=method, block_size=64, awq_algorithm="awq_lite")
    model = make_tiny_llama().to(torch.bfloat16)
    with torch.device("meta"):
        skeleton = make_tiny_llama()
    cfg = build_modelopt_config(section)
    model = prepare_for_deployment(quantize_model(model, section, CalibrationSet(calib_ids[:2], 2, "x")))
    export_trtllm(model, tmp_path / "t", "bfloat16")
    export_hf(model, tmp_path / "h", "bfloat16")
    for folder in ("t", "h"):
        real = sum(p.stat().st_size for p in (tmp_path / folder).rglob("*") if p.is_file())
        est = checkpoint_bytes(skeleton, cfg, section.exclude, "bfloat16")
        # HF drops the tied lm_head copy the estimate counts (TensorRT-LLM writes it): at most one embedding over.
        slack = skeleton.model.embed_tokens.weight.numel() * 2 if folder == "h" else 0
        assert real <= est <= 1.15 * real + slack + (2 << 20), (folder, real, est)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); CI runs as root")


@pytest.fixture()
def small_fs(tmp_path):
    mounts = []

    def make(size: str) -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        _mount_tmpfs(path, size)
        mounts.append(path)
        return path

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".")] if folder.exists() else []


def test_too_little_space_is_found_before_writing(tmp_path, tiny_model_dir, small_fs, capsys):
    out = small_fs("1m")
    recipe = _recipe(tmp_path, "full", tiny_model_dir, {"method": "fp8"}, out)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "free but the export stage will write about" in err and "Fix: free space there, or set output_dir" in err
    assert "Traceback" not in err
    assert not (out / "full").exists()


@pytest.mark.parametrize("stage,size", [("quantize", "16k"), ("export", "2m")])
def test_disk_filling_up_during_a_stage_is_one_paragraph(tmp_path, tiny_model_dir, small_fs, monkeypatch, capsys,
                                                         stage, size):
    """Another writer fills the disk after the free-space check: the stage that hits it ends with one paragraph,
    exit 2, and no partial file or checkpoint (a finished quantize state stays: it is whole and resumable)."""
    from quantkit import pipeline
    from quantkit.resume import STATE_FILE

    monkeypatch.setattr(pipeline, "check_free_space", lambda *a, **k: None)
    out = small_fs(size)
    recipe = _recipe(tmp_path, "full", tiny_model_dir, {"method": "fp8"}, out)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{stage}: the {stage} stage ran out of disk space writing to" in err and "Traceback" not in err
    assert "its partial files were removed" in err and "Fix: free space there" in err
    run = out / "full"
    assert _leftovers(out) == []
    if stage == "quantize":
        assert not run.exists()
    else:
        assert (run / "quantize" / STATE_FILE).is_file() and not (run / "export").exists()
        assert "export" not in read_json(run / "manifest.json")["stages"]


def test_out_of_memory_during_calibration_names_the_batch_and_the_fix(calib_ids, monkeypatch):
    from quantkit.errors import ResourceError
    from quantkit.quantize import quantize_model

    model = make_tiny_llama()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.model, "forward", oom)
    with pytest.raises(ResourceError) as info:
        quantize_model(model, QuantizeSection(method="fp8"), CalibrationSet(calib_ids, 4, "x"))
    text = str(info.value)
    assert text.startswith("quantize: the quantize stage ran out of memory calibrating fp8 (calibration batch 4 x 32")
    assert "lower calibration.batch_size" in text and "model.max_memory" in text and info.value.exit_code == 2


def test_batch_size_auto(calib_ids):
    """Recipes take `auto`; on CPU it resolves to CPU_AUTO_BATCH, capped at n_samples (GPU: bench/pipeline_cost.py)."""
    from quantkit.calibration import CPU_AUTO_BATCH
    from quantkit.quantize import resolve_batch_size
    from quantkit.recipe import CalibrationSection

    assert CalibrationSection(dataset="builtin:news", batch_size="auto").batch_size == "auto"
    with pytest.raises(ValueError):
        CalibrationSection(dataset="builtin:news", batch_size=0)
    model = make_tiny_llama()
    section = QuantizeSection(method="fp8")
    big = CalibrationSet(torch.zeros(3 * CPU_AUTO_BATCH, 8, dtype=torch.long), "auto", "x")
    assert resolve_batch_size(model, big, section).batch_size == CPU_AUTO_BATCH
    small = CalibrationSet(calib_ids[:3], "auto", "x")
    assert resolve_batch_size(model, small, section).batch_size == 3


def test_resource_errors_name_the_stage_and_pass_other_errors_through():
    """torch.save's full-disk traceback (the issue's `basic_ios::clear: iostream error`) and a CUDA OOM wrapped by
    the TensorRT-LLM export's own error become one paragraph; anything else is not disguised."""
    from quantkit.errors import QuantkitError, ResourceError, resource_errors

    disk = pytest.raises(ResourceError, match=r"^quantize: the quantize stage ran out of disk space writing to 's'")
    with disk, resource_errors("quantize", "s"):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 "
                           "basic_ios::clear: iostream error")
    oom = pytest.raises(ResourceError, match=r"^export: the export stage ran out of memory writing 't'.*Fix: set "
                                             r"model.device_map: auto")
    with oom, resource_errors("export", "t"):
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        except RuntimeError as exc:
            raise QuantkitError("TensorRT-LLM export failed for llama", where="export.trtllm") from exc
    with pytest.raises(ValueError, match="not a resource problem"), resource_errors("export", "t"):
        raise ValueError("not a resource problem")


def test_resume_state_of_awq_clip_costs_one_byte_per_block(tmp_path):
    """awq_clip's searched block amax are stored as one-byte codes (block max x a shrink ratio), not 4-byte floats;
    beyond that the state holds a fixed ~1.5 KB per quantizer. At Llama-3.1-8B shapes, block 128: 5.5e7 blocks +
    ~700 quantizers = ~56 MB against a ~5.7 GB TensorRT-LLM checkpoint, 1%."""
    import io

    from quantkit import resume
    from quantkit.quantize import quantize_model

    model = make_tiny_llama(hidden=128, vocab=512).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with resume.record_weight_folds(model) as folds:
        quantize_model(model, QuantizeSection(method="int4_awq", block_size=64, awq_algorithm="awq_clip"),
                       CalibrationSet(ids, 2, "x"))
    blob = resume.state_bytes(model, folds)
    state = torch.load(io.BytesIO(blob), weights_only=False)
    specs = state["derived_amax"]
    blocks = sum(torch.Size(s["shape"]).numel() for s in specs.values())
    assert blocks == sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and "lm_head" not in n) // 64
    assert any(s["ratios"] for s in specs.values())  # clipped blocks exist, and are coded
    coded = sum((s["codes"].numel() if s["codes"] is not None else 0) + 4 * s["rest"].numel() for s in specs.values())
    assert coded <= 1.05 * blocks
    assert len(blob) <= coded + 1536 * len(state["quantizers"])


def test_weight_checksums_are_exact_and_need_no_int64_copy_of_a_weight(monkeypatch):
    """`sum(dtype=int64)` casts its whole input first (an 8B embedding: a 4 GiB temporary, the 8B table's extra peak
    GPU); the chunked sum is the same integer (numpy's int64 sum is the ground truth) with a bounded temporary."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from quantkit import resume

    model = make_tiny_llama()  # float32: its bits are summed as int32
    embed = model.get_input_embeddings().weight
    chunk = 1 << 15
    monkeypatch.setattr(resume, "CHECKSUM_CHUNK", chunk)
    truth = {n: int(p.detach().view(torch.int32).numpy().astype(np.int64).sum()) for n, p in model.named_parameters()}

    def biggest_allocation(fn) -> tuple[object, int]:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        return out, max(e.self_cpu_memory_usage for e in prof.events())

    got, peak = biggest_allocation(lambda: resume.weight_checksums(model))
    assert got == truth
    assert peak <= chunk * 8
    _, old_peak = biggest_allocation(lambda: int(embed.detach().view(torch.int32).sum(dtype=torch.int64)))
    assert old_peak >= embed.numel() * 8 > 50 * peak  # what the unchunked sum allocated


@pytest.mark.parametrize("method", [{"method": "fp8", "kv_cache": "fp8"},
                                    {"method": "int4_awq", "awq_algorithm": "awq_lite", "block_size": 32}],
                         ids=["fp8_kv", "int4_awq_lite"])
def test_calibration_without_kv_cache_and_full_logits_finds_the_same_scales(calib_ids, method):
    """The calibration loop skips the KV cache and all but the last position's logits (lm_head excluded): the
    quantizer state must be bit-identical to a plain `model(batch)` loop over the same data (the direct job)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    from quantkit.methods import build_modelopt_config
    from quantkit.quantize import quantize_model

    section = QuantizeSection(**method)
    calib = CalibrationSet(calib_ids, 4, "x")
    head_tokens: list[int] = []
    ours = make_tiny_llama().to(torch.bfloat16)
    ours.lm_head.register_forward_pre_hook(lambda _m, args: head_tokens.append(args[0].shape[1]))
    ours = quantize_model(ours, section, calib)
    assert head_tokens and set(head_tokens) == {1}

    def plain(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calib.batches():
                m(batch)

    direct = mtq.quantize(make_tiny_llama().to(torch.bfloat16), build_modelopt_config(section), plain)
    a, b = get_quantizer_state_dict(ours), get_quantizer_state_dict(direct)
    assert set(a) == set(b)
    for name in a:
        assert set(a[name]) == set(b[name]), name
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert all(torch.equal(x, y) for x, y in zip(ours.state_dict().values(), direct.state_dict().values(),
                                                 strict=True))


def test_calibration_keeps_full_logits_when_the_output_head_is_quantized(calib_ids):
    """A recipe that quantizes lm_head needs its input statistics over every position."""
    from quantkit.quantize import ForwardCounter, make_forward_loop, quantize_model

    model = quantize_model(make_tiny_llama().to(torch.bfloat16), QuantizeSection(method="fp8"),
                           CalibrationSet(calib_ids, 4, "x"))
    model.lm_head.input_quantizer.enable()  # as with lm_head quantized (ModelOpt's presets keep it off)
    head_tokens: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: head_tokens.append(args[0].shape[1]))
    counter = ForwardCounter()
    make_forward_loop(CalibrationSet(calib_ids, 4, "x"), counter)(model)
    assert set(head_tokens) == {calib_ids.shape[1]} and counter.batches == 2 and len(counter.pass_s) == 1


@pytest.mark.parametrize("method", [{"method": "int8_sq", "smoothquant_alpha": 0.5}, {"method": "int8_wo"}],
                         ids=["int8_sq_per_token", "int8_wo"])
def test_trtllm_layout_is_made_before_the_shards_are_written_once(tmp_path, calib_ids, monkeypatch, method):
    """The plugin / weight-only layouts are applied between ModelOpt's conversion and its write: no shard is read
    back, and the tensors are those of ModelOpt's own shards converted afterwards (the flow this replaced)."""
    import json

    import safetensors.torch

    from quantkit import export as export_stage

    model = _quantized(method, calib_ids)
    raw = copy.deepcopy(model)
    reads: list[str] = []
    real_load = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: reads.append(path) or real_load(path))
    export_stage.export_trtllm(model, tmp_path / "once", dtype="bfloat16")
    assert reads == []
    monkeypatch.setattr(export_stage, "layout_tensors", lambda t, cfg: None)  # ModelOpt's own tensors
    export_stage.export_trtllm(raw, tmp_path / "raw", dtype="bfloat16")
    cfg = json.loads((tmp_path / "once" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] in ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A16")
    monkeypatch.undo()
    converted = real_load(str(tmp_path / "raw" / "rank0.safetensors"))
    export_stage.layout_tensors(converted, {**json.loads((tmp_path / "raw" / "config.json").read_text()), "rank": 0})
    once = real_load(str(tmp_path / "once" / "rank0.safetensors"))
    assert set(once) == set(converted)
    assert all(once[k].dtype == converted[k].dtype and torch.equal(once[k], converted[k]) for k in once)


def test_a_changed_method_default_recomputes_instead_of_reusing_the_run_folder(tmp_path, tiny_model_dir, monkeypatch,
                                                                                caplog):
    """A run folder made under other method defaults (an upgraded quantkit) is not taken as done: the rerun quantizes
    again and the checkpoint shows the new default (one INT4 scale per block of the block size now in force)."""
    from quantkit.methods import METHODS

    recipe = _recipe(tmp_path, "run", tiny_model_dir, {"method": "int4_rtn"}, tmp_path / "out")
    shard = tmp_path / "out" / "run" / "export" / "hf" / "model.safetensors"
    name = "model.layers.0.mlp.down_proj.weight_scale"  # in_features 256
    assert main(["run", str(recipe)]) == 0
    assert load_file(shard)[name].shape[-1] == 256 // METHODS["int4_rtn"].defaults["block_size"]

    monkeypatch.setitem(METHODS["int4_rtn"].defaults, "block_size", 64)
    caplog.set_level("INFO")
    assert main(["run", str(recipe)]) == 0
    assert "calibration skipped" not in caplog.text
    assert load_file(shard)[name].shape[-1] == 256 // 64
