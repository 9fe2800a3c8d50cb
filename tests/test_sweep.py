"""quantkit sweep / choose: point expansion and names, invalid combinations skipped with a reason, a failing
point recorded while the sweep goes on, and a sweep killed halfway (SIGINT, then SIGKILL) whose rerun finishes
only what is missing and leaves every run folder valid. Tiny random Llama, CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantkit.choose import choose, parse_budget, parse_limit
from quantkit.errors import QuantkitError, RecipeError
from quantkit.runfolder import read_json
from quantkit.runfolder import remove_leftovers as clean_partials
from quantkit.sweep import STATE, load_sweep, plan, point_name, run_sweep

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, model: str, body: str, evaluate: str = "{tasks: []}") -> Path:
    (tmp_path / "base.yaml").write_text(textwrap.dedent(f"""\
        metadata: {{name: tiny-base}}
        model: {{source: "{model}", dtype: float32}}
        quantize: {{method: none, exclude: []}}
        calibration: {{dataset: "builtin:news", n_samples: 2, seq_len: 16, batch_size: 2}}
        export: {{trtllm: {{dtype: float16}}, hf: true}}
        build: {{max_batch_size: 4}}
        evaluate: {evaluate}
        output_dir: "{tmp_path / 'runs'}"
        """))
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(body))
    return path


# ----------------------------------------------------------------------------- expansion, names, validity


def test_points_names_and_invalid_combinations(tmp_path, tiny_model_dir):
    path = write_sweep(tmp_path, str(tiny_model_dir), """\
        name: s1
        base: base.yaml
        set: {quantize.exclude: [lm_head]}
        matrix:
          - {quantize.method: [int4_rtn, int8_sq], quantize.block_size: [32, 256]}
          - {quantize.method: int8_sq, quantize.smoothquant_alpha: [0.5, 1.0], quantize.activations: per_token}
        points:
          - {quantize.method: fp8}
          - {quantize.method: fp8, quantize.kv_cache: null}   # the same recipe as the point above: dropped
          - {quantize.method: none, quantize.kv_cache: fp8}
          - {quantize.method: nvfp4}
        """)
    sweep = load_sweep(path)
    names = [p.name for p in sweep.points]
    assert names == ["none", "int4_rtn-g32", "int4_rtn-g256", "int8_sq-g32", "int8_sq-g256",
                     "int8_sq-a0.5-per_token", "int8_sq-a1.0-per_token", "fp8", "none-kvfp8", "nvfp4"]
    assert sweep.folder == tmp_path / "runs" / "s1"
    fates = plan(sweep, device="cpu")
    assert fates["int4_rtn-g32"] == "run" and fates["none"] == "run"
    assert "does not apply to method 'int8_sq'" in fates["int8_sq-g32"]
    assert "block_size 256 does not divide" in fates["int4_rtn-g256"]  # the model's shapes, checked on meta
    assert "'kv_cache' does not apply to method 'none'" in fates["none-kvfp8"]
    assert "needs a CUDA GPU" in fates["nvfp4"]
    fp8 = next(p for p in sweep.points if p.name == "fp8").recipe
    assert fp8.quantize.exclude == ["lm_head"] and fp8.run_dir() == sweep.folder / "fp8"
    assert point_name({"quantize.method": "int4_awq", "quantize.block_size": 64,
                       "quantize.awq_algorithm": "awq_clip"}) == "int4_awq-clip-g64"
    assert point_name({"calibration.n_samples": 8, "quantize.method": "fp8"}) == "fp8-n_samples_8"
    assert point_name({"quantize.method": "int8_sq", "quantize.smoothquant_alpha": "auto"}) == "int8_sq-alpha_auto"


def test_bad_sweep_file_is_a_recipe_error(tmp_path, tiny_model_dir):
    path = write_sweep(tmp_path, str(tiny_model_dir), "base: base.yaml\nmatrx: {}\n")
    with pytest.raises(RecipeError, match="matrx"):
        load_sweep(path)
    path = write_sweep(tmp_path, str(tiny_model_dir), "base: base.yaml\nset: {calibration.n_sample: 3}\n")
    with pytest.raises(RecipeError, match="n_sample"):
        load_sweep(path)


def test_shipped_sweep_covers_the_issue(tmp_path):
    sweep = load_sweep(REPO / "recipes" / "sweeps" / "smollm2.yaml", output_dir=str(tmp_path))
    names = {p.name for p in sweep.points}
    assert {"none", "int8_sq-a0.5-per_token", "int8_sq-a0.8-per_token", "int8_sq-a1.0-per_token",
            "int4_awq-lite-g32", "int4_awq-lite-g64", "int4_awq-clip-g32", "int4_awq-clip-g64",
            "int4_rtn-g32", "int4_rtn-g64", "fp8", "fp8-kvfp8"} == names
    assert all(p.invalid is None for p in sweep.points)
    assert [lim.text for lim in sweep.limits] == ["wiki_ppl.word_perplexity=3%", "hellaswag.acc_norm=2pt"]


# ----------------------------------------------------------------------------- budget


def _run(name, method, size, ppl, acc, acc_se=0.02, speed=None):
    return {"run": name, "method": method, "sizes": {"hf_bytes": size},
            "metrics": {"wiki_ppl": {"word_perplexity": ppl, "word_perplexity_stderr": None, "n": 3},
                        "hellaswag": {"acc_norm": acc, "acc_norm_stderr": acc_se, "n": 100}},
            "bench": {"results": [{"batch_size": 1, "decode_tok_s": speed}]} if speed else None}


def test_choose_budget_relative_absolute_and_reasons():
    base = _run("base", "none", 300, 60.0, 0.44, speed=100)
    runs = [base, _run("sq", "int8_sq", 160, 60.9, 0.43, speed=120), _run("fp8", "fp8", 159, 62.0, 0.44, speed=150),
            _run("awq", "int4_awq", 115, 80.0, 0.41), _run("rtn", "int4_rtn", 114, 61.0, 0.40)]
    assert parse_limit("wiki_ppl.word_perplexity=1%").relative
    assert parse_limit("hellaswag.acc_norm=2pt").value == pytest.approx(0.02)
    with pytest.raises(QuantkitError, match=r"TASK\.METRIC"):
        parse_limit("wiki_ppl=1%")

    c = choose(runs, base, parse_budget(["wiki_ppl.word_perplexity=2%", "hellaswag.acc_norm=0.02"]))
    assert c.chosen == "sq"  # fp8 is smaller but +3.3% perplexity
    why = {v.run: v for v in c.verdicts}
    assert "over budget (3.33% > 2%)" in why["fp8"].reasons[0]
    assert "over budget" in why["awq"].reasons[0] and why["rtn"].reasons[0].startswith("hellaswag.acc_norm")
    assert "160.0 MiB" in why["base"].note or "MiB" in why["base"].note
    text = c.render()
    assert "CHOSEN   sq" in text and "rejected fp8" in text and "Chosen: sq" in text

    # 3%: fp8 now fits and is smaller; by speed it wins too; runs without speed are rejected with the reason.
    assert choose(runs, base, parse_budget({"wiki_ppl.word_perplexity": "4%"})).chosen == "rtn"
    c = choose(runs, base, parse_budget({"wiki_ppl.word_perplexity": "4%"}), by="speed")
    assert c.chosen == "fp8" and "no speed measured" in {v.run: v for v in c.verdicts}["rtn"].reasons[0]
    # conservative: loss + 2 SE must fit; hellaswag -1 pt with SE 2.8 pts does not fit a 2-pt budget then.
    # Conservative: loss + 2 standard errors must fit. With SE 2.8 points per difference no quantized run can
    # prove a 2-point budget on 100 examples, so the baseline is what remains.
    c = choose(runs, base, parse_budget(["hellaswag.acc_norm=2pt"]), conservative=True)
    assert c.chosen == "base"
    assert choose(runs, base, parse_budget(["hellaswag.acc_norm=2pt"])).chosen == "fp8"
    with pytest.raises(QuantkitError, match="baseline"):
        choose(runs[1:], None, parse_budget(["hellaswag.acc_norm=2pt"]))


# ----------------------------------------------------------------------------- interrupt, kill, resume

KILL_SWEEP = """\
    name: killme
    base: base.yaml
    set: {quantize.exclude: [lm_head]}
    matrix:
      - {quantize.method: int4_rtn, quantize.block_size: 32}
    points:
      - {quantize.method: fp8}
      - {quantize.method: int8_sq, quantize.smoothquant_alpha: 0.5}
      - {quantize.method: fp8, calibration.dataset: no-such-file.txt}   # fails in preflight: recorded, sweep goes on
    budget: {max_loss: {wiki_ppl.word_perplexity: 50%}}
    """


def _start(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "quantkit.cli", "sweep", str(path)], cwd=path.parent, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_stage(proc: subprocess.Popen, run_dir: Path, stage: str, timeout: float = 90) -> None:
    """Block until `stage` of the run in `run_dir` is recorded: the process is then inside a later stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stage in read_json(run_dir / "manifest.json")["stages"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, f"sweep ended early with {proc.returncode}"
        time.sleep(0.02)
    raise AssertionError(f"{run_dir.name} never finished {stage}")


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name != ".sweep.lock"]


def _snapshot(run_dir: Path) -> tuple:
    return read_json(run_dir / "manifest.json"), (run_dir / "results.json").stat().st_mtime_ns


def test_sweep_interrupted_killed_and_resumed(tmp_path, tiny_model_dir):
    from quantkit.check import check_checkpoint
    from quantkit.pipeline import RunCache

    path = write_sweep(tmp_path, str(tiny_model_dir), KILL_SWEEP, evaluate="{tasks: [wiki_ppl], limit: 1}")
    folder = tmp_path / "runs" / "killme"
    order = ["none", "int4_rtn-g32", "fp8", "int8_sq-a0.5", "fp8-dataset_no-such-file.txt"]

    # 1. Ctrl-C while the second point evaluates: exit 130, that point 'interrupted', nothing half-written.
    proc = _start(path, tmp_path / "sigint.log")
    _wait_for_stage(proc, folder / "int4_rtn-g32", "export")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, (tmp_path / "sigint.log").read_text()[-3000:]
    state = {p["name"]: p["status"] for p in read_json(folder / STATE)["points"]}
    assert state["none"] == "done" and state["int4_rtn-g32"] == "interrupted"
    assert {state[n] for n in order[2:]} == {"pending"}
    assert not (folder / "int4_rtn-g32" / "results.json").exists() and _leftovers(folder) == []
    done_before = {"none": _snapshot(folder / "none")}

    # 2. SIGKILL while fp8 evaluates: no handler runs; sweep.json still says 'running' for it.
    proc = _start(path, tmp_path / "sigkill.log")
    _wait_for_stage(proc, folder / "fp8", "export")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    state = {p["name"]: p["status"] for p in read_json(folder / STATE)["points"]}
    assert state["int4_rtn-g32"] == "done" and state["fp8"] == "running" and state["int8_sq-a0.5"] == "pending"
    assert not (folder / "fp8" / "results.json").exists()
    fp8_quantize = read_json(folder / "fp8" / "manifest.json")["stages"]["quantize"]
    done_before["int4_rtn-g32"] = _snapshot(folder / "int4_rtn-g32")
    # What a kill inside a write leaves (a staging folder, a temporary file): the rerun must clear it.
    (folder / "fp8" / "export" / ".trtllm.partial-x1y2z3").mkdir(parents=True)
    (folder / "fp8" / "export" / ".trtllm.partial-x1y2z3" / "rank0.safetensors").write_bytes(b"half")
    (folder / "fp8" / ".results.json.ab12cd34").write_text("{")

    # 3. Rerun (in-process, with a cache to see the sharing): finishes only what is missing.
    sweep = load_sweep(path)
    cache = RunCache()
    state = run_sweep(sweep, cache=cache)
    entries = {e["name"]: e for e in state.entries.values()}
    assert {n: entries[n]["status"] for n in order} == {**dict.fromkeys(order[:-1], "done"), order[-1]: "failed"}
    assert "no-such-file.txt" in entries[order[-1]]["error"]
    for name, snap in done_before.items():  # finished points: not touched at all
        assert entries[name].get("skipped") == "already complete"
        assert _snapshot(folder / name) == snap
    # The killed point resumed after its last finished stage: calibration was not redone.
    assert read_json(folder / "fp8" / "manifest.json")["stages"]["quantize"] == fp8_quantize
    # fp8 and int8_sq ran in this process: one weight load, one tokenization of the calibration set.
    assert cache.hits.get("model", 0) >= 1 and cache.hits.get("calibration", 0) >= 1
    assert _leftovers(folder) == []
    for name in order[:-1]:
        run_dir = folder / name
        assert check_checkpoint(run_dir) == [], name
        results = json.loads((run_dir / "results.json").read_text())
        assert results["metrics"]["wiki_ppl"]["word_perplexity"] > 0
        assert name == "none" or results["baseline"]["run"] == str(folder / "none")
    assert (folder / "compare" / "index.html").is_file() and (folder / "choice.txt").is_file()
    assert read_json(folder / STATE)["choice"]["chosen"] in order

    # 4. A second rerun loads nothing: every finished point is skipped, only the failing one is tried again.
    cache = RunCache()
    state = run_sweep(load_sweep(path), cache=cache)
    assert cache.models == {} and cache.tokenizers == {}
    assert all(e.get("skipped") == "already complete" for e in state.entries.values() if e["status"] == "done")


def test_clean_partials_keeps_finished_files(tmp_path):
    run = tmp_path / "r"
    (run / "export" / "hf").mkdir(parents=True)
    (run / "export" / "hf" / "model.safetensors").write_bytes(b"x")
    (run / "export" / ".hf.partial-abc").mkdir()
    (run / "quantize").mkdir()
    (run / "quantize" / ".modelopt_state.pth.partial").write_bytes(b"x")
    (run / ".manifest.json.k2j4h5g6").write_text("{")
    (run / "manifest.json").write_text("{}")
    removed = clean_partials(run)
    assert len(removed) == 3
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == ["manifest.json", "model.safetensors"]


def test_one_sweep_per_folder(tmp_path, tiny_model_dir):
    import fcntl

    path = write_sweep(tmp_path, str(tiny_model_dir), "name: busy\nbase: base.yaml\n")
    sweep = load_sweep(path)
    sweep.folder.mkdir(parents=True)
    with open(sweep.folder / ".sweep.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        with pytest.raises(QuantkitError, match="another sweep is running"):
            run_sweep(sweep)


def test_choose_cli_on_measured_runs(capsys):
    from quantkit.cli import main

    examples = str(REPO / "notebooks" / "example_runs")
    assert main(["choose", examples, "--max-loss", "wiki_ppl.word_perplexity=3%"]) == 0
    out = capsys.readouterr().out
    assert "Chosen: smollm2-int8-sq-auto-pt" in out  # smallest within +3% (+1.41%), ties broken by loss
    assert "rejected smollm2-fp8: wiki_ppl.word_perplexity loss +4.66%" in out
    assert main(["choose", examples, "--max-loss", "wiki_ppl.word_perplexity=1%", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] == "smollm2-baseline"
    assert main(["choose", examples, "--max-loss", "wiki_ppl.word_perplexity=3%", "--by", "speed"]) == 1
    assert "no speed measured" in capsys.readouterr().out
