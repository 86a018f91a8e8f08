"""The notebooks run top to bottom on CPU (small, well under a minute each)."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["define_your_own_objective.ipynb", "mqar_comparison.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    # tiny models: one thread per kernel avoids OpenMP contention with the other xdist worker
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
