"""The notebooks in notebooks/ run end to end; their last cell asserts on the results.

Each notebook runs in a fresh ipykernel ("python3": ipykernel's own spec, which runs this
interpreter), with the working directory notebooks/ and its outputs in a tmp_path given by
BIOFM_NOTEBOOK_DIR. The kernel inherits this process's environment (conftest.py: JAX on
CPU, one device, as this file has): with the other test worker busy on the same two cores,
an XLA:CPU thread has missed an all-reduce rendezvous's 40 s deadline, which aborts the
kernel (seen with 8 devices, and since with 2). A notebook is a user's tour, not a sharding
test (test_parallel.py and each modality's mesh test are).
"""
from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "patient_stratification", "finetune_any_modality")
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_clean(name):
  """Saved without outputs or execution counts, so diffs show only source changes."""
  nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert dict(nb.metadata.kernelspec) == KERNELSPEC
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
  monkeypatch.setenv("BIOFM_NOTEBOOK_DIR", str(tmp_path))
  # The kernel inherits OMP_NUM_THREADS=1 from conftest.py. The persistent compilation cache
  # is off for it: jax 0.10.2's XLA:CPU has aborted loading some programs back from it
  # (see test_multimodal_retrieval.py), and an abort here is a dead kernel.
  monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute()  # raises CellExecutionError, naming the cell, if any cell raises
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
  assert not errors, errors
  assert "all checks passed" in "".join(
      o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
