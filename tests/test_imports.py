"""The reading order has no circle: each top-level module imports alone, and the graph of imports
between the project's modules (read from their source with ast) has no cycle. Shared code lives
below the scripts that share it (eval.py never imports train.py)."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(module):
    """The project modules that `module` imports anywhere in its source (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(names & set(MODULES) - {module})


def test_the_import_graph_has_no_cycle():
    graph = {m: project_imports(m) for m in MODULES}
    assert "train" not in graph["eval"] and graph["cli"] == [] and graph["maspo"] == []
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = "done"
    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
