"""The package's imports, read from the source with `ast`: no import cycles, no hidden in-function imports.

Every `import` / `from ... import` of every module of solidmark_jax/ counts, the ones inside functions
included, relative imports resolved. The graph has an edge A -> B when module A imports module B of
the package (importing a package's submodule does not count as importing the package itself).
In-function imports are for heavy optional third-party libraries only, each with a trailing
`# lazy: <why>` comment; an in-function import of the package's own modules hides a dependency (and
often a cycle) and is not allowed.
"""

from __future__ import annotations

import ast
import os
import re

PACKAGE = "solidmark_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
# third-party libraries heavy or optional enough to import in a function, on first use
LAZY_OK = ("torch", "tensorflow", "tensorflow_datasets", "pyarrow", "diffusers", "transformers", "safetensors",
           "matplotlib", "tensorboardX")
LAZY_COMMENT = re.compile(r"#\s*lazy:\s*\S")


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the package."""
  out = {}
  for root, dirs, files in os.walk(ROOT):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(ROOT))[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(root, f)
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> list[tuple[str, int, bool]]:
  """(absolute imported name, line, inside a function) of every import in module `name`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_pkg = os.path.basename(path) == "__init__.py"
  out = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        if child.level:  # relative: from the module's package, up level - 1
          base = name.split(".") if is_pkg else name.split(".")[:-1]
          base = base[:len(base) - (child.level - 1)]
          mod = ".".join(base + ([child.module] if child.module else []))
        else:
          mod = child.module or ""
        for a in child.names:  # `from pkg import submodule` imports the submodule
          sub = f"{mod}.{a.name}"
          out.append((sub if sub in MODULES else mod, child.lineno, in_function))
      visit(child, inner)

  visit(tree, False)
  return out


def _graph() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {m: set() for m in MODULES}
  for name, path in MODULES.items():
    for target, _, _ in _imports(name, path):
      while target and target not in MODULES and target.startswith(PACKAGE + "."):
        target = target.rsplit(".", 1)[0]  # `import pkg.mod.attr` style: the module that holds it
      if target in MODULES and target != name:
        graph[name].add(target)
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if state.get(start):
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif not state.get(nxt):
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph[nxt])))
  return None


def test_the_walk_sees_the_package():
  assert "solidmark_jax.data.sources" in MODULES and "solidmark_jax.marks" in MODULES
  graph = _graph()
  assert "solidmark_jax.marks" in graph["solidmark_jax.data.instances"]
  assert "solidmark_jax.data.images" in graph["solidmark_jax.data.shards"]


def test_find_cycle_finds_one():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
  cycle = _find_cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _in_function_problems(name: str, path: str) -> list[str]:
  """What is wrong with module `name`'s in-function imports, one line each."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  bad = []
  for target, line, in_function in sorted(set(_imports(name, path)), key=lambda t: t[1]):
    if not in_function:
      continue
    where = f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}"
    if target == PACKAGE or target.startswith(PACKAGE + "."):
      bad.append(f"{where}: imports {target} inside a function (import it at the top of the module)")
    elif target.split(".")[0] not in LAZY_OK:
      bad.append(f"{where}: imports {target} inside a function; only heavy optional libraries {LAZY_OK} may be")
    elif not LAZY_COMMENT.search(lines[line - 1]):
      bad.append(f"{where}: the in-function import of {target} needs a trailing '# lazy: <why>' comment")
  return bad


def test_in_function_imports_are_lazy_third_party_only():
  bad = [p for name, path in sorted(MODULES.items()) for p in _in_function_problems(name, path)]
  assert not bad, "\n".join(bad)


def test_imports_inside_functions_and_relative_ones_are_read(tmp_path):
  path = tmp_path / "mod.py"
  path.write_text("import os\nfrom . import marks\n\n\ndef f():\n  from .data import sources  # lazy: no\n"
                  "  from ..x import y\n")
  found = _imports("solidmark_jax.m", str(path))
  assert ("os", 1, False) in found and ("solidmark_jax.marks", 2, False) in found
  assert ("solidmark_jax.data.sources", 6, True) in found
