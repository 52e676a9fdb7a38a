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
          "configs": 7, "weights": 7}
# Imports left inside functions: optional, heavy, and only some commands need them.
LAZY = ("safetensors", "safetensors.numpy", "tensorboardX", "tensorflow_datasets", "anndata", "jax", "jax.experimental.topologies", "tiledbsoma", "apache_beam",
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


def test_the_loop_asks_nothing_about_the_kind_of_run():
  """The loop and the pre-training command name no modality, objective or model class and
  probe nothing with getattr/isinstance: what differs per run comes from the data module,
  the objective and the model (tests/test_contracts.py walks every row through it)."""
  names = set(registry.MODALITIES) | {o for row in registry.MODALITIES.values() for o in row.objectives} | {
      "multimodal", "contrastive"}
  plain = {"dict", "list", "tuple", "str", "int", "float", "bool"}  # isinstance on plain values is no probe
  for path in (PACKAGE / "train" / "loop.py", PACKAGE.parent / "experiments" / "pretrain.py"):
    tree = ast.parse(path.read_text())
    strings = sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str) and node.value in names})
    probes = sorted({ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "isinstance")
                     and not (node.func.id == "isinstance" and ast.unparse(node.args[1]) in plain)})
    imported = sorted(m for node in ast.walk(tree) for m in _imported(node, "") if m.startswith(
        ("biofm_jax.models", "biofm_jax.objectives.", "biofm_jax.modalities.")) and m != "biofm_jax.modalities.registry")
    assert not strings and not probes and not imported, (path.name, strings, probes, imported)


def test_no_modality_folder_imports_another():
  """What two modalities share lives in data/, models/ or objectives/; only the registry
  (and the cohort that generates every modality at once) names several."""
  crossing = []
  for name, targets in _graph().items():
    parts = name.split(".")
    if len(parts) < 4 or parts[1] != "modalities":
      continue
    crossing += [f"{name} -> {t}" for t in targets
                 if t.split(".")[1:2] == ["modalities"] and len(t.split(".")) >= 3
                 and t.split(".")[2] in registry.MODALITIES and t.split(".")[2] != parts[2]]
  assert not crossing, crossing


def test_models_and_objectives_do_not_import_each_other():
  """Both sit on data/: an objective reads a model's outputs by name, a model's heads gather
  at the slots `data/masking.py` computes, so neither needs the other's code."""
  part = lambda module: module.split(".")[1] if "." in module else ""  # noqa: E731
  between = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                   if {part(a), part(b)} == {"models", "objectives"})
  assert not between, between
