"""The package's shape: imports flow one way between layers, no module imports itself back
through others, imports inside functions are only the optional heavy dependencies (each
saying why), and every modality folder is one registered row."""
from __future__ import annotations

import ast
import pathlib

from biofm_jax.modalities import registry

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "biofm_jax"
# Lower layers never import higher ones; a layer may import itself and anything below.
LAYERS = {"export_loader": 0, "parallel": 0, "hardware": 0, "host_memory": 0, "config": 1, "data": 2, "models": 3,
          "objectives": 3, "modalities": 4, "train": 5, "generate": 5, "eval": 6, "export": 6, "cli": 7,
          "configs": 7}
# Imports left inside functions: optional, heavy, and only some commands need them.
LAZY = ("tensorflow_datasets", "anndata", "jax", "jax.experimental.topologies", "tiledbsoma", "apache_beam",
        "apache_beam.options.pipeline_options")


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    yield name, path, ast.parse(path.read_text())


def _imported(node: ast.AST, name: str) -> list[str]:
  """The biofm_jax modules an import statement names (`from a import b` may name module a.b)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith("biofm_jax")]
  if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("biofm_jax"):
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return []


def _graph() -> dict[str, set[str]]:
  modules = {name: tree for name, _, tree in _modules()}
  return {name: {m for node in ast.walk(tree) for m in _imported(node, name) if m in modules and m != name}
          for name, tree in modules.items()}


def _layer(module: str) -> int:
  parts = module.split(".")
  return LAYERS[parts[1]] if len(parts) > 1 else -1


def test_imports_never_reach_a_higher_layer():
  upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                  if _layer(a) >= 0 and _layer(b) > _layer(a))
  assert not upward, upward


def test_no_import_circles_counting_imports_inside_functions():
  graph, state, circles = _graph(), {}, []

  def visit(node, path):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        circles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not circles, circles


def test_imports_inside_functions_are_optional_heavy_ones_that_say_why():
  found = []
  for name, path, tree in _modules():
    lines = path.read_text().splitlines()
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and node.col_offset > 0:
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        if module == "loader":  # a usage example inside export_loader's docstring
          continue
        if module not in LAZY or "#" not in lines[node.lineno - 1]:
          found.append(f"{name}:{node.lineno} {module}")
  assert not found, found


def test_every_modality_folder_is_one_registered_row():
  folders = {p.name for p in (PACKAGE / "modalities").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert folders == set(registry.MODALITIES)
  for name, row in registry.MODALITIES.items():
    assert row.name == name and row.objectives, name
    assert row.data.__module__.startswith(f"biofm_jax.modalities.{name}."), (name, row.data.__module__)


def test_every_module_imports():
  import importlib
  for name, _, _ in _modules():
    importlib.import_module(name)
