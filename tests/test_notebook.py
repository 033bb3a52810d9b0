"""The Colab notebook runs top to bottom in a fresh kernel and shows what it should."""

import os
import re

import nbformat
from nbclient import NotebookClient

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOK = os.path.join(_ROOT, "colab", "quickstart.ipynb")
_METHODS = ("none", "aim", "fastv", "tome", "random", "pooling", "mustdrop-64", "pmod")


def _kernel_env() -> dict[str, str]:
  """This process's environment without conftest's 8 simulated devices (the notebook
  runs on one, as on a Colab CPU; conftest's quick-compile flags and cache stay),
  importing this checkout whatever is installed."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.pop("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  return env


def _texts(nb) -> list[str]:
  """Every text output: streams, plain text and Markdown displays."""
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.output_type == "stream":
        out.append(o.text)
      elif o.output_type in ("display_data", "execute_result"):
        out += [o.data[k] for k in ("text/plain", "text/markdown") if k in o.data]
  return out


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_and_shows_every_method(tmp_path):
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute(env=_kernel_env())

  text = "\n".join(_texts(nb))
  assert "parameters:" in text
  # The package was importable, so the install cell installed nothing.
  assert f"tokred_jax from {os.path.join(_ROOT, 'tokred_jax')}" in text
  for name in ("dense",) + _METHODS:
    assert re.search(rf"^\[{re.escape(name)}\] answer: ", text, re.M), name
  table = [o for o in _texts(nb) if o.startswith("| method |")]
  assert len(table) == 1
  rows = [line for line in table[0].splitlines()[2:] if line.startswith("| ")]
  assert [row.split("|")[1].strip() for row in rows[:len(_METHODS)]] == list(_METHODS)
  images = [o for cell in nb.cells for o in cell.get("outputs", [])
            if o.output_type == "display_data" and "image/png" in o.data]
  # The sample image, then one survival figure per method.
  assert len(images) >= 1 + len(_METHODS)
