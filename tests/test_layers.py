"""The package's layers (docs/architecture.md), read from the source with `ast`: every import of a
rar module goes to the same layer or one below, the modules import each other without a cycle,
and an import inside a function is there for an optional dependency or for the start-up time of
the `rar` command, with a comment saying so."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rar"

# bottom to top: a module may import its own layer and the layers before it
LAYERS = ["core", "model", "decode", "inference", "data", "tokenizer", "metrics", "training", "apps"]
# optional dependencies, imported where they are used
OPTIONAL = ("gradio", "matplotlib", "huggingface_hub", "torch.utils.tensorboard", "mlxtend")
# `rar --help` must not import torch: the CLI imports its commands when they run (its module
# docstring says so once, for all of them)
LAZY_FOR_STARTUP = {"apps/cli.py", "apps/cli_data.py", "apps/cli_flags.py"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer index of `rar.<layer>...`; the package's own `rar` and `rar.__main__` (its public
    facade and entry point) sit above every layer."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def imports_of(path: Path, root: Path):
    """(line, target module, at module level?, has a reason comment) for every import of `path`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [f"{target}.{a.name}" for a in node.names]  # a submodule, or a name in `target`
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for target in names:
            yield node.lineno, target, id(node) in top, _has_reason(lines, node.lineno)


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above its block of import lines."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
        if "#" in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def check_package(root: Path) -> list[str]:
    """Every violation of the rules in the module docstring, one line each."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}

    def resolve(target: str) -> str | None:  # a submodule, or the module a name is imported from
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    problems, graph = [], {m: set() for m in modules}
    for me, path in modules.items():
        where = str(path.relative_to(root))
        for line, target, at_top, reason in imports_of(path, root):
            if target.split(".")[0] != root.name:
                if not at_top and not target.startswith(OPTIONAL) and where not in LAZY_FOR_STARTUP:
                    problems.append(f"{where}:{line} imports {target} inside a function (not optional)")
                elif not at_top and not reason and where not in LAZY_FOR_STARTUP:
                    problems.append(f"{where}:{line} imports {target} inside a function without a comment why")
                continue
            dep = resolve(target)
            if dep is None or dep == me:
                continue
            graph[me].add(dep)
            if layer_of(dep) > layer_of(me) and dep != root.name:
                problems.append(f"{where}:{line} imports {dep}, a layer above {me}")
            if not at_top and where not in LAZY_FOR_STARTUP:
                problems.append(f"{where}:{line} imports {dep} inside a function"
                                + ("" if where in LAZY_FOR_STARTUP else " (only the CLI may, for start-up time)"))
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of the import graph that has one."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph[v]:
                found.append(sorted(part) + [sorted(part)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_a_layer_and_closes_no_cycle():
    assert check_package(PACKAGE) == []


def test_every_module_is_in_a_layer():
    outside = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if layer_of(module_name(p, PACKAGE)) == len(LAYERS) and p.parent != PACKAGE]
    assert outside == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "rar"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


@pytest.mark.parametrize("files,expected", [
    ({"model/a.py": "from ..inference.b import f\n", "inference/b.py": "def f(): pass\n"},
     "model/a.py:1 imports rar.inference.b, a layer above rar.model.a"),
    ({"core/a.py": "import rar.apps.cli\n", "apps/cli.py": ""}, "core/a.py:1 imports rar.apps.cli, a layer above"),
    ({"data/a.py": "from .b import g\ndef f(): pass\n", "data/b.py": "def g():\n    from .a import f\n"},
     "import cycle: rar.data.a -> rar.data.b -> rar.data.a"),
    ({"model/a.py": "def f():\n    from ..core import b\n", "core/b.py": ""},
     "model/a.py:2 imports rar.core.b inside a function (only the CLI may"),
    ({"model/a.py": "def f():\n    import json\n"}, "model/a.py:2 imports json inside a function (not optional)"),
    ({"apps/app.py": "def f():\n    import gradio\n"}, "apps/app.py:2 imports gradio inside a function without a comment"),
])
def test_a_planted_violation_is_reported(tmp_path, files, expected):
    problems = check_package(_plant(tmp_path, files))
    assert any(p.startswith(expected) for p in problems), problems


def test_allowed_imports_pass(tmp_path):
    root = _plant(tmp_path, {
        "inference/a.py": "from ..model.b import f\nfrom ..core import c\n",
        "model/b.py": "def f(): pass\n",
        "core/c.py": "",
        "apps/cli.py": "def main():\n    from .app import serve\n",
        "apps/app.py": "def serve():\n    import gradio  # optional dependency\n",
    })
    assert check_package(root) == []
