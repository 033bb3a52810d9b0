"""The package's folders are its layers: each imports only the ones below it, no model
knows a method, and a method's file knows no other method (they meet in recipes)."""

import ast
import pathlib

import tokred_jax

PACKAGE = pathlib.Path(tokred_jax.__file__).parent
# Each folder (and the top-level cli.py) -> the folders its modules may import.
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "methods": {"core", "models"},
    "io": {"core", "models"},
    "data": {"core", "models", "io"},
    "engine": {"core", "models", "methods", "io"},
    "train": {"core", "models", "methods", "io", "data", "engine", "cli"},
    "eval": {"core", "models", "methods", "io", "data", "engine"},
    "proj": {"core", "models", "methods", "io", "data", "engine", "train", "cli"},
    "cli": {"core"},
}
# What every method file may use of methods/: the protocol and the shared prune stage.
SHARED_METHOD_FILES = {"base", "prune"}


def imports(path: pathlib.Path) -> set[str]:
  """The tokred_jax modules a file imports (at its top or inside functions), dotted."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
        and node.module.split(".")[0] == "tokred_jax":
      if node.module == "tokred_jax":
        out |= {f"tokred_jax.{a.name}" for a in node.names}
      else:
        out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "tokred_jax"}
  return out


def layer_of(module: str) -> str | None:
  """The folder a dotted tokred_jax module lives in ("cli" for tokred_jax/cli.py)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def library_files():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) > 1 or rel.stem == "cli":
      yield rel, path


def test_every_folder_imports_only_the_layers_below_it():
  bad = []
  for rel, path in library_files():
    layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    for module in imports(path):
      target = layer_of(module)
      if target and target != layer and target not in ALLOWED[layer]:
        bad.append(f"{rel} imports {module}")
  assert not bad, "\n".join(bad)
  assert set(ALLOWED) - {"cli"} == {p.name for p in PACKAGE.iterdir()
                                   if p.is_dir() and (p / "__init__.py").exists()}


def test_no_model_imports_a_method_and_methods_meet_only_in_recipes():
  for rel, path in library_files():
    used = imports(path)
    if rel.parts[0] == "models":
      assert not any(layer_of(m) == "methods" for m in used), rel
    if rel.parts[0] == "methods" and rel.stem not in {"registry", "__init__"}:
      others = {m.split(".")[2] for m in used
                if layer_of(m) == "methods" and len(m.split(".")) > 2}
      assert others <= SHARED_METHOD_FILES, (rel, others - SHARED_METHOD_FILES)


def test_the_check_sees_a_forbidden_import(tmp_path):
  """The parser finds imports inside functions too, so a lazy import cannot hide one."""
  path = tmp_path / "vit.py"
  path.write_text("def f():\n  from tokred_jax.methods import aim\n  return aim\n")
  assert layer_of(next(iter(imports(path)))) == "methods"
