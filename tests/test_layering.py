"""The package's import graph: no module imports itself back through others (every import counted, including
those inside functions), and the lower layers never import the higher ones."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "famjax")


def _modules() -> dict[str, str]:
    """Returns {dotted module name: file path} of every module of famjax (packages by their __init__)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
    return out


def _graph() -> dict[str, set[str]]:
    """Returns {module: famjax modules it imports}; `from pkg import name` counts as pkg.name when that is a
    module, else as pkg; package __init__ files (which only gather their submodules' names) are left out."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        if path.endswith("__init__.py"):
            continue
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[mod] = {t for t in targets if t in modules and not modules[t].endswith("__init__.py")}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(mod, path):
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


@pytest.mark.parametrize("lower,higher", [("famjax.ops", "famjax.model"), ("famjax.model", "famjax.train"),
                                          ("famjax.model", "famjax.data"), ("famjax.infer", "famjax.train"),
                                          ("famjax.evals", "famjax.train"), ("famjax.data", "famjax.model"),
                                          ("famjax.restore", "famjax.train"), ("famjax.ops", "famjax.tools"),
                                          ("famjax.model", "famjax.tools"), ("famjax.data", "famjax.tools"),
                                          ("famjax.train", "famjax.tools"), ("famjax.infer", "famjax.tools"),
                                          ("famjax.evals", "famjax.tools"), ("famjax.restore", "famjax.tools")])
def test_lower_layers_do_not_import_higher_ones(lower, higher):
    """ops < model < (restore, infer, evals) and data < train < tools: checked on every import statement (a
    package __init__'s names count as the package's)."""
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        if mod != lower and not mod.startswith(lower + "."):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{mod} imports {n}" for n in names if n == higher or n.startswith(higher + ".")]
    assert not bad, bad
