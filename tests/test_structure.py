"""The package's shape: the library stands without the converters, search without the trainer, no import circle."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("clinvla_jax", "data_prep", "benchmarks")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      parts = list(path.relative_to(REPO).with_suffix("").parts)
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Project modules each module imports, anywhere in its body (imports inside functions count too)."""

  def resolve(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets.update(
          f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
        )
    graph[name] = {t for t in map(resolve, targets) if t and t != name}
  return graph


@pytest.fixture(scope="module")
def graph():
  return _imports(_modules())


def test_the_library_imports_neither_the_converters_nor_search_the_trainer(graph):
  assert not {
    m: sorted(t) for m, ts in graph.items() if m.startswith("clinvla_jax") for t in ts if t.startswith("data_prep")
  }
  assert not [m for m, ts in graph.items() if m.startswith("clinvla_jax.search") and "clinvla_jax.train" in ts]


def test_no_import_circle(graph):
  # Depth-first search for a back edge; a package importing its own submodules is not a circle of modules.
  state, circles = {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        circles.append(stack[stack.index(target) :] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not circles, circles


def test_no_function_over_80_lines():
  long = {}
  for path in _modules().values():
    for node in ast.walk(ast.parse(path.read_text())):
      lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
        long[f"{path.relative_to(REPO)}:{node.name}"] = lines
  assert not long, long
