"""Comparison outputs: deltas with standard errors and noise marks, markdown/CSV/self-contained HTML, PNG plots
(size always, speed where `quantkit bench` numbers exist), on the measured example runs bundled with the notebook."""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.report import compare_table, expand_run_dirs, load_runs, make_cell, write_compare

EXAMPLES = Path(__file__).resolve().parents[1] / "notebooks" / "example_runs"


def _run(name, acc, se=0.022, n=500, ppl=60.0, method="int8_sq"):
    return {"run": name, "method": method, "settings": {}, "sizes": {"hf_bytes": 100 * 2**20},
            "metrics": {"wiki_ppl": {"word_perplexity": ppl, "word_perplexity_stderr": None, "n": 21},
                        "hellaswag": {"acc_norm": acc, "acc_norm_stderr": se, "n": n}}}


def test_cells_carry_stderr_and_mark_noise():
    base = _run("base", 0.44, method="none")
    close, far, fewer = _run("close", 0.43), _run("far", 0.30, ppl=66.0), _run("fewer", 0.43, n=100)
    c = make_cell(close, base, "hellaswag", "acc_norm", False)
    assert c.delta == pytest.approx(-0.01) and c.delta_se == pytest.approx((2 * 0.022**2) ** 0.5)
    assert c.noise is True and c.markdown() == "~ 43.00 (-1.00 ± 3.11)"
    f = make_cell(far, base, "hellaswag", "acc_norm", False)
    assert f.noise is False and f.markdown() == "30.00 (-14.00 ± 3.11)"
    p = make_cell(far, base, "wiki_ppl", "word_perplexity", True)
    assert p.noise is None and p.markdown() == "66.000 (+10.0%)"  # no stderr: no mark either way
    assert make_cell(fewer, base, "hellaswag", "acc_norm", False).markdown().endswith("†")
    table = compare_table([base, close, far, fewer], base)
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(rows) == 5 and "~ 43.00" in rows[2]
    assert "No standard error for wiki_ppl" in table and "`~` marks" in table and "`†`" in table


def test_compare_out_dir_writes_markdown_csv_html_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(EXAMPLES), "--out", str(out), "--max-loss", "wiki_ppl.word_perplexity=3%",
                 "--metric", "wiki_ppl.word_perplexity", "--metric", "hellaswag.acc_norm"]) == 0
    printed = capsys.readouterr().out
    assert "Chosen: smollm2-int8-sq-auto-pt" in printed  # the smallest run within +3%: the shipped default
    names = sorted(p.name for p in out.iterdir())
    assert names == ["hellaswag.acc_norm_vs_size.png", "index.html", "table.csv", "table.md",
                     "wiki_ppl.word_perplexity_vs_size.png"]  # no speed plot: the example runs have no bench
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 1000 and height >= 700  # readable at full size
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<style>" in html
    assert not re.search(r"""(src|href)=["']?(https?:|//|[\w./-]+\.(png|css|js))""", html)  # self-contained
    assert 'class="noise"' in html and "CHOSEN" in html
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert len(rows) == 17
    fp8 = next(r for r in rows if r["run"] == "smollm2-fp8")
    assert float(fp8["wiki_ppl.word_perplexity.delta"]) == pytest.approx(66.382 - 63.425, abs=1e-3)
    assert fp8["hellaswag.acc_norm.within_noise"] == "True" and float(fp8["hellaswag.acc_norm.delta_se"]) > 0
    md = (out / "table.md").read_text()
    assert "~ 42.40 (-1.20 ± 3.13)" in md and "![wiki_ppl.word_perplexity_vs_size.png]" in md


def test_speed_plot_and_choice_by_speed_when_bench_is_present(tmp_path):
    speeds = {"smollm2-baseline": 170.0, "smollm2-fp8": 240.0, "smollm2-int8-sq-a0.5-pt": 150.0,
              "smollm2-int4-awq": 230.0}
    for name, speed in speeds.items():
        run = shutil.copytree(EXAMPLES / name, tmp_path / "runs" / name)
        results = json.loads((run / "results.json").read_text())
        results["bench"] = {"results": [{"batch_size": 1, "decode_tok_s": speed},
                                        {"batch_size": 8, "decode_tok_s": 4 * speed}]}
        (run / "results.json").write_text(json.dumps(results))
    from quantkit.choose import parse_budget

    out = write_compare([tmp_path / "runs"], tmp_path / "cmp", limits=parse_budget(["wiki_ppl.word_perplexity=5%"]),
                        by="speed")
    assert (tmp_path / "cmp" / "wiki_ppl.word_perplexity_vs_speed.png").is_file()
    assert out["choice"].chosen == "smollm2-fp8"  # +4.7% fits 5%, and it is the fastest that does
    header = next(ln for ln in out["markdown"].splitlines() if ln.startswith("| run |"))
    assert "| decode tok/s (b=1) |" in header and "| 240.0 |" in out["markdown"]


def test_compare_md_file_and_run_expansion(tmp_path, capsys):
    target = tmp_path / "t.md"
    runs = [str(EXAMPLES / "smollm2-fp8"), str(EXAMPLES / "smollm2-baseline")]
    assert main(["compare", *runs, "--out", str(target)]) == 0
    assert target.read_text().startswith("| run | method |") and list(tmp_path.iterdir()) == [target]
    assert len(expand_run_dirs([EXAMPLES])) == 17
    runs_, baseline = load_runs([EXAMPLES / "smollm2-fp8"], EXAMPLES / "smollm2-baseline")
    assert baseline["run"] == "smollm2-baseline" and [r["run"] for r in runs_] == ["smollm2-baseline", "smollm2-fp8"]


def test_compare_out_without_matplotlib_says_so_and_writes_the_rest(tmp_path, capsys, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec None, import fails
    out = tmp_path / "cmp"
    assert main(["compare", str(EXAMPLES), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "table.csv", "table.md"]
    assert "No plots: matplotlib is not installed" in (out / "table.md").read_text()
    assert len(list(csv.DictReader((out / "table.csv").open()))) == 17
    notes = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
