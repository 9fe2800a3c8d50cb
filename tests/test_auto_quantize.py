"""Method auto: ModelOpt's auto_quantize picks formats per layer under an effective-bits budget.

The per-layer record is checked against the exported checkpoint itself (the weight dtype each linear ships in),
and the bits are recounted from the model's weight shapes, not taken from ModelOpt's or quantkit's own sums.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _exports import edit_json
from _runtime_helpers import eval_ids, rel_err, tiny_llama

from quantkit.calibration import CalibrationSet
from quantkit.errors import QuantkitError
from quantkit.quantize import ForwardCounter, quantize_model
from quantkit.recipe import QuantizeSection

BUDGET = 6.0
IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
_cache: dict[str, object] = {}


def _auto(tmp_root: Path):
    """(fake-quantized model, export folder) for the tiny Llama at BUDGET bits, made once."""
    if "model" not in _cache:
        from quantkit.export import export_hf, export_trtllm, prepare_for_deployment

        model = quantize_model(tiny_llama(), QuantizeSection(method="auto", block_size=64, effective_bits=BUDGET),
                               CalibrationSet(IDS, 4, "test"))
        prepare_for_deployment(model)
        export_trtllm(model, tmp_root / "trtllm", dtype="float16")
        export_hf(model, tmp_root / "hf", dtype="float32")
        _cache.update(model=model, root=tmp_root)
    return _cache["model"], _cache["root"]


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    return _auto(tmp_path_factory.mktemp("auto"))


_DTYPE_BITS = {"U8": 4, "I8": 8, "F8_E4M3": 8, "F32": 16, "F16": 16, "BF16": 16}  # U8 = two int4 codes per byte


def test_per_layer_choice_averages_to_the_budget(auto) -> None:
    from quantkit.check import read_safetensors_header

    model, root = auto
    choice = model.quantkit_auto_quantize
    linears = {n: m.weight.numel() for n, m in tiny_llama().named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    assert set(choice["layers"]) == set(linears)
    header = read_safetensors_header(root / "hf" / "model.safetensors")
    shipped = {n: _DTYPE_BITS[header[f"{n}.weight"].dtype] for n in linears}
    named = {"int4_gptq": 4, "fp8": 8, "none": 16}
    assert shipped == {n: named[m] for n, m in choice["layers"].items()}  # the record is what the checkpoint holds
    bits = sum(linears[n] * b for n, b in shipped.items()) / sum(linears.values())
    assert bits == pytest.approx(choice["effective_bits"], abs=1e-4)  # recorded to 4 decimals
    # At or under the budget, and no closer to 16 bits than one layer group's switch (the solver's granularity:
    # the largest group here is gate+up, 2 x 128 x 256 weights, 4 -> 8 bits).
    step = 2 * 128 * 256 * 4 / sum(linears.values())
    assert BUDGET - step <= bits <= BUDGET + 1e-9
    assert len(set(choice["layers"].values())) >= 2  # a real mix, not one format


def test_mixed_checkpoints_pass_the_check_and_fail_when_mislabelled(auto, tmp_path: Path) -> None:
    from quantkit.check import check_checkpoint

    _, root = auto
    assert check_checkpoint(root / "trtllm") == [] and check_checkpoint(root / "hf") == []
    layers = json.loads((root / "trtllm" / "quant_cfg.json").read_text())["quantized_layers"]
    int4 = next(n for n, lc in layers.items() if lc["quant_algo"] == "W4A16_AWQ")
    assert layers[int4]["pre_quant_scale"] is False  # GPTQ writes no pre-quant scales; TensorRT-LLM would ask
    bad = tmp_path / "trtllm"
    shutil.copytree(root / "trtllm", bad)

    def relabel(cfg: dict) -> None:
        cfg["quantized_layers"][int4] = {"quant_algo": "FP8"}

    edit_json(bad / "quant_cfg.json", relabel)
    found = check_checkpoint(bad)
    assert any(v.tensor_or_field.startswith(int4) for v in found), found
    (bad / "quant_cfg.json").unlink()
    assert any(v.rule == "mixed.quant_cfg" for v in check_checkpoint(bad))


def test_runtime_round_trip_reproduces_the_mixed_model(auto) -> None:
    from quantkit.runtime import kernel_summary, load_quantized

    model, root = auto
    loaded, _ = load_quantized(root / "hf", "cpu", torch.float32)
    ids = eval_ids()
    with torch.no_grad():
        err = rel_err(loaded(ids).logits, model(ids).logits)
    assert err < 1e-4
    assert len(kernel_summary(loaded)) >= 2  # int4 and fp8 layers run as such


def test_build_plan_names_the_runtime(auto) -> None:
    from quantkit.build import PYTORCH_LINE, make_build_plan
    from quantkit.recipe import BuildSection

    _, root = auto
    plan = make_build_plan(root / "trtllm", BuildSection())
    assert plan["quant_algo"] == "MIXED_PRECISION" and plan["check"]["violations"] == 0
    assert plan["target"]["line"] == PYTORCH_LINE and "FP8" in plan["target"]["why"]
    assert plan["serve"] is not None


def test_budget_no_candidate_can_meet_is_a_clear_error_before_any_calibration() -> None:
    counter = ForwardCounter()
    with pytest.raises(QuantkitError, match=r"effective_bits 3.5 is below .* \(4.00 bits") as err:
        quantize_model(tiny_llama(), QuantizeSection(method="auto", block_size=64, effective_bits=3.5),
                       CalibrationSet(IDS, 4, "test"), counter)
    assert "quantize.effective_bits" in str(err.value) and counter.batches == 0


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "needs a budget"),
    ({"effective_bits": 5, "candidates": ["int4_awq", "fp8"]}, "cannot be an auto candidate"),
    ({"effective_bits": 5, "candidates": ["int4_rtn", "int4_gptq"]}, "lists one format twice"),
    ({"effective_bits": 5, "candidates": ["int4_gptq", "nope"]}, "unknown method 'nope'"),
])
def test_auto_recipe_validation(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeSection(method="auto", **kw)


def test_pipeline_writes_the_choice_and_resumes_from_it(tmp_path: Path, tiny_model_dir: Path, caplog) -> None:
    """quantkit run with method auto: auto_quantize.json, the summary line, results.json; a rerun restores it."""
    import logging
    import textwrap

    from quantkit.cli import main
    from quantkit.runfolder import read_json

    recipe = tmp_path / "auto.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        metadata: {{name: tiny-auto}}
        model: {{source: "{tiny_model_dir}", dtype: float32}}
        quantize: {{method: auto, effective_bits: 6, block_size: 64}}
        calibration: {{dataset: "builtin:news", n_samples: 4, seq_len: 32, batch_size: 2}}
        export: {{trtllm: {{dtype: float16}}, hf: true}}
        build: {{max_batch_size: 4}}
        evaluate: {{tasks: []}}
        output_dir: "{tmp_path / 'runs'}"
        """))
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny-auto"
    choice = read_json(run / "quantize" / "auto_quantize.json")
    assert choice["effective_bits_target"] == 6 and choice["effective_bits"] <= 6
    results = read_json(run / "results.json")
    assert results["auto_quantize"]["layer_counts"] == choice["layer_counts"]
    assert results["effective_bits"] == choice["effective_bits"]  # what `choose --by bits` reads
    summary = (run / "summary.md").read_text()
    assert f"{choice['effective_bits']:.2f} bits" in summary and "quantize/auto_quantize.json" in summary
    plan = read_json(run / "build" / "plan.json")
    assert plan["quant_algo"] == "MIXED_PRECISION" and plan["check"]["violations"] == 0
    with caplog.at_level(logging.INFO, logger="quantkit"):
        assert main(["run", str(recipe), "--set", "evaluate.tasks=[wiki_ppl]", "--set", "evaluate.limit=1"]) == 0
    assert "calibration skipped" in caplog.text


def test_choose_by_bits_picks_the_fewest_bits_within_the_accuracy_budget() -> None:
    from quantkit.choose import choose, parse_budget

    def run(name: str, method: str, ppl: float, bits: float | None = None) -> dict:
        return {"run": name, "method": method, "sizes": {"hf_bytes": 100},
                "metrics": {"wiki_ppl": {"word_perplexity": ppl, "word_perplexity_stderr": None}},
                "auto_quantize": {"effective_bits": bits} if bits is not None else None}

    base = run("base", "none", 60.0)
    runs = [base, run("auto-4.5", "auto", 75.0, 4.49), run("auto-5", "auto", 64.0, 4.98),
            run("auto-6", "auto", 61.0, 5.97), run("fp8", "fp8", 61.5)]
    c = choose(runs, base, parse_budget(["wiki_ppl.word_perplexity=10%"]), by="bits")
    why = {v.run: v for v in c.verdicts}
    assert c.chosen == "auto-5"  # 4.49 bits is +25%, over budget; 4.98 is the fewest bits left
    assert "over budget" in why["auto-4.5"].reasons[0]
    assert "no effective bits recorded" in why["fp8"].reasons[0]
    assert why["auto-6"].note == "5.97 vs 4.98 effective bits" and why["base"].ok
    assert choose(runs, base, parse_budget(["wiki_ppl.word_perplexity=1%"]), by="bits").chosen == "base"


@pytest.mark.parametrize("method", ["int4_rtn", "fp8", "int8_sq"])
def test_uniform_methods_record_the_bits_their_checkpoint_stores(method: str, tmp_path: Path) -> None:
    """The effective bits a uniform run records (quantize.weight_bits) are the width of the weights its HF
    checkpoint ships, averaged over the quantized linears (lm_head excluded and outside the count, as for auto)."""
    from quantkit.check import read_safetensors_header
    from quantkit.export import export_hf, prepare_for_deployment
    from quantkit.quantize import weight_bits

    model = quantize_model(tiny_llama(), QuantizeSection(method=method, exclude=["lm_head"]),
                           CalibrationSet(IDS, 4, "test"))
    recorded = weight_bits(model)
    prepare_for_deployment(model)
    export_hf(model, tmp_path / "hf", dtype="float32")
    header = read_safetensors_header(tmp_path / "hf" / "model.safetensors")
    linears = {n: m.weight.numel() for n, m in tiny_llama().named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    shipped = sum(linears[n] * _DTYPE_BITS[header[f"{n}.weight"].dtype] for n in linears) / sum(linears.values())
    assert recorded == pytest.approx(shipped) and recorded in (4.0, 8.0)


def test_choose_by_bits_takes_uniform_runs_at_their_width() -> None:
    from quantkit.choose import choose, parse_budget

    def run(name: str, method: str, ppl: float, bits: float | None) -> dict:
        return {"run": name, "method": method, "sizes": {"hf_bytes": 100}, "effective_bits": bits,
                "metrics": {"wiki_ppl": {"word_perplexity": ppl, "word_perplexity_stderr": None}}}

    base = run("base", "none", 60.0, None)
    runs = [base, run("auto-5", "auto", 64.0, 4.98), run("int4_gptq", "int4_gptq", 65.0, 4.0),
            run("fp8", "fp8", 61.0, 8.0)]
    assert choose(runs, base, parse_budget(["wiki_ppl.word_perplexity=10%"]), by="bits").chosen == "int4_gptq"
    assert choose(runs, base, parse_budget(["wiki_ppl.word_perplexity=7%"]), by="bits").chosen == "auto-5"


def test_final_gptq_runs_the_int4_layers_in_activation_order_on_searched_scales(monkeypatch) -> None:
    """auto's INT4 layers get int4_gptq's activation order and block scales (its defaults), its FP8 layers the stored
    column order: the act-order update runs for exactly the layers the search gave int4_gptq, on local_hessian's
    searched block amax (max calibration would give each block's |w| max exactly), and those scales are the ones
    the model keeps."""
    from quantkit import quantize as qz

    ordered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    real = qz._update_weights_act_order

    def spy(helper, *args, **kwargs):  # helper.name is relative to the decoder layer under layer-wise GPTQ
        w = helper.module.weight.detach()
        ordered[id(helper.module)] = (helper.module.weight_quantizer.amax.detach().clone().flatten(),
                                      w.reshape(w.shape[0], -1, 64).abs().amax(-1).flatten().float())
        return real(helper, *args, **kwargs)

    monkeypatch.setattr(qz, "_update_weights_act_order", spy)
    model = quantize_model(tiny_llama(), QuantizeSection(method="auto", block_size=64, effective_bits=BUDGET),
                           CalibrationSet(IDS, 4, "test"))
    choice = model.quantkit_auto_quantize
    assert choice["gptq_act_order"] is True
    assert [a["method"] for a in choice["calibration"]] == ["local_hessian", "gptq"]
    int4 = {n for n, m in choice["layers"].items() if m == "int4_gptq"}
    assert int4 and set(choice["layers"].values()) - {"int4_gptq"}  # a mix, so the FP8 side is exercised
    mods = dict(model.named_modules())
    assert {n for n, m in mods.items() if id(m) in ordered} == int4
    for n in int4:
        amax, block_max = ordered[id(mods[n])]
        assert (amax != block_max).float().mean() > 0.5, n  # searched, not max calibration's
        assert torch.equal(mods[n].weight_quantizer.amax.flatten(), amax), n  # and kept through GPTQ


def test_another_budget_reuses_the_search_and_chooses_what_a_fresh_search_chooses(tmp_path, monkeypatch) -> None:
    """The search state (candidate calibration, layer scores) does not depend on the budget: a second run of the
    same model and data at other effective bits restores it instead of searching again, and picks exactly the
    layers a search from scratch at that budget picks. Other calibration data is another search."""
    from quantkit import quantize as qz

    def run(bits: float, folder: str, ids: torch.Tensor = IDS) -> tuple[dict, int]:
        monkeypatch.setattr(qz, "auto_search_dir", lambda: tmp_path / folder)
        counter = ForwardCounter()
        model = quantize_model(tiny_llama(), QuantizeSection(method="auto", block_size=64, effective_bits=bits),
                               CalibrationSet(ids, 4, "test"), counter)
        return model.quantkit_auto_quantize, counter.batches

    first, passes_first = run(8.0, "shared")
    second, passes_second = run(5.0, "shared")
    fresh, passes_fresh = run(5.0, "fresh")
    assert not first["search"]["reused"] and second["search"]["reused"] and not fresh["search"]["reused"]
    assert second["layers"] == fresh["layers"] and second["effective_bits"] == fresh["effective_bits"]
    assert first["layers"] != second["layers"]  # the budgets really select differently
    # the search: each of the 2 candidates calibrated on every batch, then one scoring pass over them; reused, only
    # the final (layer-wise) calibration of the chosen formats is left
    batches = len(IDS) // 4
    assert passes_first == passes_fresh and passes_first - passes_second == (2 + 1) * batches
    assert [p.suffix for p in (tmp_path / "shared").iterdir()] == [".pth"]  # one complete state, no temporary
    other = torch.randint(0, 256, IDS.shape, generator=torch.Generator().manual_seed(2))
    assert not run(5.0, "shared", other)[0]["search"]["reused"]
    assert len(list((tmp_path / "shared").iterdir())) == 2
