"""The package's layout: six folders by job, whose imports run one way (the order the package's
docstring gives), no import circle between modules or between folders, thin command faces at the
top, and folders whose `__init__.py` names what they offer without importing anything heavy."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cifarlib

PACKAGE = Path(cifarlib.__file__).resolve().parent
FACES = ("train", "runs", "predict", "export", "serve", "notebook")


def _modules() -> dict[str, Path]:
    """Every module by its dotted name; a folder's `__init__.py` is the folder's own name."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = ("cifarlib", *p.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _lazy_names(tree: ast.Module) -> set[str]:
    """The modules a folder's `lazy.exports(__name__, {module: [names]})` hands names on from."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "exports":
            return {k.value for k in node.args[1].keys}
    return set()


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The cifarlib modules that module `name` imports anywhere (at the top, inside functions, under
    TYPE_CHECKING), relative imports resolved, and the modules its lazy names come from."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = {f"{name}.{m}" for m in _lazy_names(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules} - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, done = [], set()

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return circles


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def _order() -> list[str]:
    """The folders in the order the package's docstring lists them, lowest first."""
    return re.findall(r"^    (\w+) {2,}\S", cifarlib.__doc__, re.M)


def test_the_helper_finds_a_circle_and_resolves_relative_imports():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    graph = _graph()
    assert "cifarlib.core.runtime" in graph["cifarlib.training.loop"]  # from ..core import runtime
    assert "cifarlib.model.inference" in graph["cifarlib.training.loop"]  # from ..model.inference import logits
    assert "cifarlib.data.datasets" in graph["cifarlib.data"]  # a lazy name


def test_no_module_of_cifarlib_imports_one_that_imports_it_back():
    assert not _circles(_graph())
    sources = {name: path.read_text() for name, path in _modules().items()}
    assert "import torch" not in sources["cifarlib.training.stopping"]
    assert "replay" in sources["cifarlib.evaluation.runs"] and "Patience" in sources["cifarlib.training.train"]


def test_the_folders_import_one_another_one_way_in_the_docstrings_order():
    order = _order()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert sorted(order) == folders, (order, folders)
    against = sorted((a, b) for a, targets in _graph().items() for b in targets
                     if _folder(a) and _folder(b) and order.index(_folder(b)) > order.index(_folder(a)))
    assert not against, against
    between = {_folder(a): {_folder(b) for b in targets if _folder(b) not in (None, _folder(a))}
               for a, targets in _graph().items() if _folder(a)}
    assert not _circles(between)


def test_the_top_holds_folders_and_thin_command_faces_only():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == sorted(["__init__.py", *(f"{f}.py" for f in FACES)]) and len(FACES) <= 8
    for face in FACES:  # a docstring, the import of its folder's main, and the call
        lines = (PACKAGE / f"{face}.py").read_text().splitlines()
        assert len(lines) <= 10 and any(re.fullmatch(r"from cifarlib\.\w+\.\w+ import main", x) for x in lines), face
    for folder in _order():
        modules = [p for p in (PACKAGE / folder).glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        assert len(modules) <= 12, (folder, len(modules))


@pytest.mark.parametrize("folder", _order())
def test_each_folders_names_are_what_they_say_and_not_its_modules(folder):
    package = importlib.import_module(f"cifarlib.{folder}")
    for name in package.__all__:
        value = getattr(package, name)
        assert not isinstance(value, type(sys)), (folder, name)  # a module would hide the name
        assert name in dir(package)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        package.nothing_here


def test_importing_every_folder_and_the_pictures_rule_loads_no_torch():
    """What the app's pages import, and more: each folder's __init__ imports nothing heavy."""
    code = ("import sys, cifarlib.core, cifarlib.data, cifarlib.model, cifarlib.training, cifarlib.evaluation, "
            "cifarlib.serving, cifarlib.data.pictures, cifarlib.evaluation.heatmap, cifarlib.serving.prediction; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
