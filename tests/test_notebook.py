"""notebooks/compare_methods.ipynb runs headless from top to bottom (nbclient, kernel python3) on the bundled
example runs, shows the table, two plots and the budget's choices, and no cell errors."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_methods.ipynb"


def test_notebook_executes(monkeypatch):
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is needed to execute the notebook: pip install -e .[dev]")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("QUANTKIT_RUNS", raising=False)  # the notebook's own default: example_runs/
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (with the cell and traceback) if any cell fails.
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "17 runs; baseline: smollm2-baseline" in text
    assert "Chosen: smollm2-int8-sq-auto-pt" in text and "Chosen: smollm2-baseline (the baseline" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # accuracy vs size for two metrics; no speed plot without bench numbers
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and "~ 42.40 (-1.20 ± 3.13)" in tables[0]["data"]["text/markdown"]
