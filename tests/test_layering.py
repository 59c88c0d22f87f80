"""The package's layering, read from the modules' own imports (lazy ones inside functions included): every module
imports only its own layer or lower ones, and no modules import each other in a cycle. The picture is
docs/layers.md; LAYERS below is its one machine-readable copy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "bigbird_ja"

# module (or package prefix) -> layer; the longest matching prefix wins. The package root `bigbird_ja` is a facade
# (it registers the classes with transformers) and may import anything; nothing inside may import it.
LAYERS = {
    "bigbird_ja.common": 0, "bigbird_ja.version": 0,
    "bigbird_ja.configuration": 1, "bigbird_ja.attention": 1, "bigbird_ja.data": 1, "bigbird_ja.tokenization": 1,
    "bigbird_ja.modeling": 2,
    "bigbird_ja.hub": 3, "bigbird_ja.pipelines": 3, "bigbird_ja.qa": 3, "bigbird_ja.deploy": 3,
    "bigbird_ja.convert": 3, "bigbird_ja.plotting": 3, "bigbird_ja.embeddings": 3,
    "bigbird_ja.lora": 3,
    "bigbird_ja.training": 4, "bigbird_ja.finetune": 4,
    "bigbird_ja.cli": 5,
}
LAYER_NAMES = {0: "common", 1: "configuration, attention, data, tokenization", 2: "model",
               3: "inference (remote code, pipelines, QA, export, convert)", 4: "training and fine-tuning", 5: "CLI"}
FACADE = "bigbird_ja"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package's name for its __init__.py)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file. ``from . import x`` names the module ``x`` when it
    is one, else the package itself."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                       for alias in node.names]
        elif (isinstance(node, ast.Call) and _called_name(node) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            # importlib.import_module(".hub", __package__): an import all the same, only hidden from a reader
            text = node.args[0].value
            level = len(text) - len(text.lstrip("."))
            base = package.split(".")
            targets = [".".join(base[:len(base) - (level - 1)] + [text[level:]]) if level else text]
        else:
            continue
        for target in targets:
            # the longest known module the import names (`import a.b.c` imports a.b.c, whose parents run first)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = module_files(package_dir)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other (strongly connected components of more than one module, or a
    module that imports itself), each sorted; Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        if module == FACADE:
            continue
        for target in sorted(targets):
            if target == FACADE:
                problems.append(f"{module} imports the package root {FACADE} (a facade above every layer): import "
                                f"the module that defines the name")
            elif layer_of(target) > layer_of(module):
                problems.append(f"{module} (layer {layer_of(module)}, {LAYER_NAMES[layer_of(module)]}) imports "
                                f"{target} (layer {layer_of(target)}, {LAYER_NAMES[layer_of(target)]})")
    return problems


# ----------------------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if m != FACADE and layer_of(m) is None]
    assert not unplaced, f"modules with no layer: {unplaced}; add them to LAYERS here and to docs/layers.md"


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(import_graph())
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_modules_import_each_other_in_a_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_docs_picture_names_every_layer_group():
    text = (PACKAGE_DIR.parent / "docs" / "layers.md").read_text(encoding="utf-8")
    missing = [prefix for prefix in LAYERS if prefix.removeprefix("bigbird_ja.") not in text]
    assert not missing, f"docs/layers.md does not mention {missing}"


@pytest.fixture
def toy_package(tmp_path):
    """A throwaway package laid out like bigbird_ja, to show that the checks above find what they look for."""
    package = tmp_path / "bigbird_ja"
    (package / "common").mkdir(parents=True)
    files = {
        "__init__.py": "from .modeling import Model\n",
        "common/__init__.py": "",
        "common/config_io.py": "def load():\n    from ..modeling import Model  # lazy, still upward\n",
        "configuration.py": ("import importlib\nfrom .common import config_io\n"
                             "importlib.import_module('.hub', __package__)\n"),
        "modeling.py": "from .configuration import Config\n",
        "hub.py": "from .configuration import Config\nimport bigbird_ja\n",
    }
    for rel, text in files.items():
        (package / rel).write_text(text, encoding="utf-8")
    return package


def test_the_checks_find_upward_imports_cycles_and_imports_of_the_facade(toy_package):
    graph = import_graph(toy_package)
    assert graph["bigbird_ja.configuration"] == {"bigbird_ja.common.config_io", "bigbird_ja.hub"}
    problems = upward_imports(graph)
    assert any(p.startswith("bigbird_ja.common.config_io (layer 0") and "bigbird_ja.modeling (layer 2" in p
               for p in problems)
    assert any(p.startswith("bigbird_ja.configuration (layer 1") and "bigbird_ja.hub (layer 3" in p
               for p in problems)
    assert any(p.startswith("bigbird_ja.hub imports the package root") for p in problems)
    # config_io -> modeling -> configuration -> config_io; configuration <-> hub; hub -> the facade -> modeling:
    # one set of modules that import each other
    assert cycles(graph) == [["bigbird_ja", "bigbird_ja.common.config_io", "bigbird_ja.configuration",
                              "bigbird_ja.hub", "bigbird_ja.modeling"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == [] and cycles({"a": {"a"}}) == [["a"]]
