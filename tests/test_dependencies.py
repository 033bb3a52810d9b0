"""Every third-party module the project imports is declared in pyproject.toml, so a fresh
environment made with the README's install commands has it: the library, the entry
points, configs, benchmarks and tools need only the base dependencies at module level,
and an optional extra's package (e.g. `video`'s av) only inside the function that uses
it; the tests and the notebook may also use the `test` extra."""

import ast
import importlib.metadata
import json
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL = {"tokred_jax", "tests", "configs", "benchmarks", "tools", "infer", "train"}
RUNTIME = ["tokred_jax", "configs", "benchmarks", "tools", "infer.py", "train.py"]
TESTS = ["tests", "colab"]
# A module that plugs the project into an extra's own program imports that extra at
# module level (lmms-eval's models subclass its base class); nothing else imports it, so
# it is checked against that extra alone, and the scans of its folder leave it out.
EXTRA_MODULES = {"tokred_jax/eval/lmms.py": "eval"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in extras:
    reqs += project["optional-dependencies"][extra]
  return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def _sources(paths):
  """(file, source text) of every Python file and notebook code cell under `paths`."""
  for p in paths:
    for f in sorted([ROOT / p] if p.endswith(".py") else (ROOT / p).rglob("*")):
      if not p.endswith(".py") and str(f.relative_to(ROOT)) in EXTRA_MODULES:
        continue
      if f.suffix == ".py":
        yield f, f.read_text()
      elif f.suffix == ".ipynb":
        cells = json.loads(f.read_text())["cells"]
        code = ["".join(l for l in c["source"] if not l.lstrip().startswith(("%", "!")))
                for c in cells if c["cell_type"] == "code"]
        yield f, "\n".join(code)


def _imports(paths, lazy: bool | None = None) -> dict[str, set[str]]:
  """Top-level third-party module -> the files importing it; lazy=False only imports
  at module level, True only those inside a function, None both."""
  found = {}
  for f, text in _sources(paths):
    tree = ast.parse(text, str(f))
    nested = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
              for n in ast.walk(fn) if n is not fn}
    for node in ast.walk(tree):
      if lazy is not None and (id(node) in nested) != lazy:
        continue
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
          found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
  return found


def _undeclared(paths, declared: set[str], lazy: bool | None = None) -> list[str]:
  owners = importlib.metadata.packages_distributions()
  bad = []
  for module, files in sorted(_imports(paths, lazy).items()):
    dists = {_norm(d) for d in owners.get(module, [])}
    if not dists:
      bad.append(f"{module} (imported in {sorted(files)[0]}) is not installed: declare it")
    elif not dists & declared:
      bad.append(f"{module} (from {sorted(dists)}, imported in {sorted(files)[0]}) is not "
                 "declared")
  return bad


def _optional_extras() -> list[str]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  return [e for e in project["optional-dependencies"] if e != "test"]


def test_runtime_imports_are_base_dependencies():
  assert _undeclared(RUNTIME, _declared(), lazy=False) == []
  assert _undeclared(RUNTIME, _declared(*_optional_extras()), lazy=True) == []


def test_optional_extras_are_only_imported_lazily():
  # av (the `video` extra) is imported inside load_video: at module level it would fail
  # the first check, which must see it there.
  lazy = _imports(RUNTIME, lazy=True)
  assert "tokred_jax/io/video.py" in lazy.get("av", set())
  assert any(m.startswith("av ") for m in _undeclared(RUNTIME, _declared(), lazy=True))


def test_extra_modules_import_only_base_dependencies_and_their_extra():
  for path, extra in EXTRA_MODULES.items():
    assert _undeclared([path], _declared(extra)) == []


def test_test_imports_are_declared_in_the_test_extra():
  # lmms-eval, the `eval` extra, is installed beside it without its dependencies (the
  # README's test command says why); the test extra holds the few its tests need.
  assert _undeclared(TESTS, _declared("test", "eval")) == []


def test_the_check_sees_an_undeclared_import():
  # `hypothesis` was once imported by tests but declared nowhere: without the test extra
  # it must show up, or this check could not fail.
  missing = _undeclared(TESTS, _declared())
  assert any(m.startswith("hypothesis ") for m in missing), missing
