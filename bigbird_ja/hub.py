"""Hub-ready model folders: `auto_map` and remote-code files generated from the package when a model is saved.

transformers' convention for custom models: config.json maps each Auto class to ``file.Class`` (`auto_map`), and
those files lie beside the weights; `AutoModel.from_pretrained(folder, trust_remote_code=True)` copies them into its
module cache and imports them, with their relative imports (`from .x import y`: a file ``x.py`` in the same folder,
no packages; `dynamic_module_utils.get_relative_imports`). Before running them it checks that every module they
import outside a ``try`` block is installed (`check_imports`).

transformers' own way to ship a class's code (`register_for_auto_class`, then `custom_object_save` on save) copies
the file that defines the class and the files it imports relatively, as they are: it needs a flat folder of modules,
and the package is a tree (``modeling.py`` imports the ``attention`` package). So the package's classes are not
registered for it; instead `write_remote_code` generates, from the package,

  - one file per part of the package that the model's code reaches: ``configuration_bigbird_ja.py`` and
    ``modeling_bigbird_ja.py`` (the names transformers' own custom models use), and a file per subpackage or other
    module, named by its path with ``_`` for ``.`` (``bigbird_ja_attention.py``: the attention package,
    ``bigbird_ja_common.py``: the common helpers modeling reads checksums with, ...);
  - each file is the part's modules concatenated in dependency order, every line as in the package except the
    package's own imports, which are left out: the names they import are defined above in the same file, or imported
    from another generated file by one generated line at its top (``from .bigbird_ja_attention import ...``);
  - ``config.auto_map``: AutoConfig, and every Auto class that `import bigbird_ja` registers (read from
    transformers' registry, so this list and the registration cannot drift apart), to its class in those files;
  - ``pipeline_bigbird_ja.py``: the long-document QA pipeline (`bigbird_ja.pipelines` and the `qa` package it
    reads), and for a question-answering model ``config.custom_pipelines`` naming it, so that
    `pipeline("long-document-question-answering", model=folder, trust_remote_code=True)` runs without the package.
    With the package imported, its registered pipeline answers instead (`_registered_elsewhere`), without
    trust_remote_code, as before folders carried the pipeline.

The generated folder is flat, so a model loaded from it saves again through transformers' own `custom_object_save`,
which copies the files as they are. The copies are generated, never edited: the package stays the one home of the
model. `register_remote_code` (called by `import bigbird_ja`) adds `write_remote_code` (and the writer of the
sentence-transformers files, `bigbird_ja.embeddings`) to `BigBirdJaConfig.save_hooks`: every `save_pretrained` of
the config or of a model (`bigbird-ja export`, `convert`, a fine-tuned model) writes the code before config.json.
The configuration and the model do not import this module: it sits above them.

Rules for the package modules the model's code reaches, each checked when the code is generated, with an error
naming the module, the line and the fix (tests/test_hub.py generates the package's code and breaks each rule):
  1. the package is imported relatively (``from .x import names``), never by name: the copy has no package;
  2. a relative import names the things it uses, not a module (``from .layout import build_layout``, not
     ``from . import layout``), stands on lines of its own, at the top of the module or in a function;
  3. modules that share a generated file share one namespace: they may not give one top-level name two meanings, or
     read a builtin that another of them redefines, and they have the same ``from __future__`` imports;
  4. optional packages (triton, deepspeed, the kernels) are imported only lazily, inside a ``try`` block, so that a
     Python without them runs the blocked PyTorch backend (``attention_backend="auto"`` falls back to it when the
     kernels cannot be imported).

The checksum check of `BigBirdJaPreTrainedModel.from_pretrained` comes along (``bigbird_ja_common.py``): a copy
loaded with trust_remote_code refuses a damaged folder as the package does.

With bigbird_ja imported, the registered classes load such a folder (transformers prefers a registered class that is
not its own over `auto_map`, even with trust_remote_code=True), so the package and the copy never mix in a process.
"""

from __future__ import annotations

import ast
import importlib.util
import symtable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.dynamic_module_utils import get_imports

from .common.atomic_io import atomic_write_text
from .configuration import BigBirdJaConfig
from .version import __version__

PACKAGE = __name__.rpartition(".")[0]  # "bigbird_ja"
# the modules transformers' auto_map and custom_pipelines point at, by their path in the package, and their files
# (the names of transformers' own custom-code repositories)
ROOT_FILES = {"configuration": "configuration_bigbird_ja", "modeling": "modeling_bigbird_ja",
              "pipelines": "pipeline_bigbird_ja"}
PIPELINE_CLASS = "LongDocumentQuestionAnsweringPipeline"  # bigbird_ja.pipelines' class, named in custom_pipelines
MODELING_MODULE = f"{PACKAGE}.modeling"
# imports the copies may make only lazily, inside a try block (transformers refuses a file that imports a missing
# package anywhere else); bigbird_ja itself never
OPTIONAL = ("triton", "deepspeed", "bigbird_ja_kernels")


def file_stem(module: str) -> str:
    """The generated file a package module goes into: ``bigbird_ja.attention.layout`` -> ``bigbird_ja_attention``,
    ``bigbird_ja.common.checksums`` -> ``bigbird_ja_common``; configuration and modeling keep transformers' names."""
    package, _, rest = module.partition(".")
    part = rest.split(".")[0]
    return ROOT_FILES.get(part, f"{package}_{part}")


def remote_code_sources(package: str = PACKAGE) -> dict[str, str]:
    """``{file name: text}`` of the files `write_remote_code` puts in a folder (see the module's docstring); the
    same text as long as the package's files are unchanged (then taken from a cache: saving is frequent)."""
    package_dir = Path(importlib.util.find_spec(package).origin).parent
    cached = _generated.get(package_dir)
    if cached is not None and all(_stat(Path(path)) == stat for path, stat in cached[0].items()):
        return dict(cached[1])
    modules = _collect(package, package_dir)
    origins = _origins(modules)
    stems = list(dict.fromkeys(m.stem for m in modules.values()))
    _check_no_cycle({stem: {modules[i.target].stem for m in modules.values() if m.stem == stem for i in m.imports}
                     - {stem} for stem in stems})
    sources = {}
    for stem in stems:
        members = _ordered([m for m in modules.values() if m.stem == stem], modules)
        _check_shared_namespace(stem, members, origins)
        imported: dict[str, set[str]] = {}  # generated file -> "name" / "name as alias" that this one takes from it
        for m in members:
            for i in m.imports:
                if modules[i.target].stem != stem:
                    imported.setdefault(modules[i.target].stem, set()).update(
                        f"{a.name} as {a.asname}" if a.asname else a.name for a in i.node.names)
        paths = [m.path.relative_to(package_dir.parent).as_posix() for m in members]
        head = [f"# Generated by {__name__} ({PACKAGE} {__version__}) when this model was saved, from the package "
                f"modules",
                "# below in dependency order, each as it is but for its imports of the package: their names are "
                "defined above",
                "# in this file, or imported from the files named at the top. Edit the package, not this copy.",
                *(f"#   {p}" for p in paths), ""]
        if members[0].futures:
            head += [f"from __future__ import {', '.join(sorted(members[0].futures))}", ""]
        head += [f"from .{other} import {', '.join(sorted(names))}" for other, names in sorted(imported.items())]
        body = [f"\n\n# ---- {p} {'-' * max(0, 110 - len(p))}\n\n{_without_package_imports(m).lstrip()}"
                for p, m in zip(paths, members)]
        text = "\n".join(head) + "\n" + "".join(body)
        compile(text, f"{stem}.py", "exec")  # a generator bug shows here, not in a user's process
        sources[f"{stem}.py"] = text
    _generated[package_dir] = ({str(m.path): _stat(m.path) for m in modules.values()}, sources)
    return dict(sources)


# package folder -> (the stats of the files read, the sources generated from them)
_generated: dict[Path, tuple[dict[str, tuple], dict[str, str]]] = {}


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _Import:
    """A package-relative ``from .x import names`` of a module."""

    node: ast.ImportFrom
    target: str  # the module it names, e.g. bigbird_ja.attention.layout
    at_import: bool  # runs when the module is imported (not inside a function)


@dataclass
class _Module:
    """One package module as the generator sees it."""

    name: str  # bigbird_ja.attention.layout
    path: Path
    source: str
    tree: ast.Module
    imports: list[_Import] = field(default_factory=list)
    futures: frozenset[str] = frozenset()
    # top-level name -> what the module binds it to: (module, name) for its own definitions, ("import", dotted
    # path) for another package's, ("package", module, name) for a package import (resolved by `_origins`)
    defines: dict[str, set[tuple]] = field(default_factory=dict)
    reads: set[str] = field(default_factory=set)  # every name it reads as a global, in any function or class
    sole: set[int] = field(default_factory=set)  # ids of the package imports that are alone in their block

    @property
    def stem(self) -> str:
        return file_stem(self.name)


def _statements(body: list[ast.stmt], scope: str = "module"):
    """Every statement under ``body``, at any depth, as ``(statement, its block, "module" / "class" /
    "function")``; expressions are not entered (imports are statements), which keeps this cheap."""
    for node in body:
        yield node, body, scope
        inner = "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
            "class" if isinstance(node, ast.ClassDef) and scope != "function" else scope
        for block in (getattr(node, "body", None), getattr(node, "orelse", None), getattr(node, "finalbody", None),
                      *(h.body for h in getattr(node, "handlers", ())), *(c.body for c in getattr(node, "cases", ()))):
            if isinstance(block, list):
                yield from _statements(block, inner)


def _check_imports(module: str, tree: ast.Module) -> None:
    """Rule 1: a copy must not import the package by name (it has no package beside it)."""
    package = module.split(".")[0]
    for node, _, _ in _statements(tree.body):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            if name.split(".")[0] == package:
                raise ValueError(f"{module}, line {node.lineno}: `{name}` is imported absolutely; inside the package "
                                 f"use a relative import, which a saved model folder's copy can resolve")


def _read(package_dir: Path, module: str) -> _Module:
    rel = Path(*module.split(".")[1:])
    path = package_dir / rel / "__init__.py" if (package_dir / rel).is_dir() else package_dir / f"{rel}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{module}: no Python source at {path} to generate a saved model folder's code from")
    source = path.read_text(encoding="utf-8")
    m = _Module(module, path, source, ast.parse(source, filename=str(path)))
    _check_imports(module, m.tree)
    anchor = module if path.name == "__init__.py" else module.rpartition(".")[0]
    blocks = {}  # id of a package import -> the statements it stands among
    for node, block, scope in _statements(m.tree.body):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            m.futures |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module is None:
                raise ValueError(f"{module}, line {node.lineno}: `from {'.' * node.level} import "
                                 f"{node.names[0].name}` imports a module; the generated copy has no modules of the "
                                 f"package, only their names: write `from .{node.names[0].name} import names`")
            if scope == "class" or any(a.name == "*" for a in node.names):
                raise ValueError(f"{module}, line {node.lineno}: `{ast.unparse(node)}`: import the names you use, at "
                                 f"the top of the module or in the function that uses them")
            target = importlib.util.resolve_name("." * node.level + node.module, anchor)
            m.imports.append(_Import(node, target, scope == "module"))
            blocks[id(node)] = block
            if scope == "module":
                for a in node.names:
                    m.defines.setdefault(a.asname or a.name, set()).add(("package", target, a.name))
        elif isinstance(node, ast.ImportFrom) and scope == "module":
            for a in node.names:
                m.defines.setdefault(a.asname or a.name, set()).add(("import", f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import) and scope == "module":
            for a in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                bound = a.name if a.asname else a.name.split(".")[0]
                m.defines.setdefault(a.asname or bound, set()).add(("import", bound))
    # a block of nothing but package imports keeps a `pass` where its first one was
    m.sole = {id(b[0]) for b in blocks.values() if all(id(s) in blocks for s in b)}
    table = symtable.symtable(source, str(path), "exec")
    scopes = [table]
    while scopes:
        scope = scopes.pop()
        scopes += scope.get_children()
        top = scope is table
        for sym in scope.get_symbols():
            name = sym.get_name()
            if sym.is_referenced() and (top or sym.is_global()):
                m.reads.add(name)
            # definitions at top level, and `global x` then `x = ...` in a function
            if sym.is_assigned() and not sym.is_imported() and (top or sym.is_declared_global()):
                m.defines.setdefault(name, set()).add((module, name))
    return m


def _collect(package: str, package_dir: Path) -> dict[str, _Module]:
    """The configuration, modeling and pipeline modules and every package module they import relatively, at any
    depth, lazy imports included (as the code would run them), in the order they are found."""
    # the pipeline is optional (a package without one ships the model alone)
    modules, pending = {}, [f"{package}.{part}" for part in ROOT_FILES
                            if part != "pipelines" or (package_dir / f"{part}.py").is_file()]
    while pending:
        name = pending.pop(0)
        if name not in modules:
            modules[name] = _read(package_dir, name)
            pending += [i.target for i in modules[name].imports]
    return modules


def _origins(modules: dict[str, _Module]) -> dict[str, dict[str, set]]:
    """Per module, every name it binds in the generated file (its top-level names and those of its lazy package
    imports, which become globals there) with what it binds them to, package imports resolved to the module that
    defines the name. An imported name that is not defined at the top level of its module is an error (rule 2)."""

    def resolve(origin: tuple, seen: tuple = ()) -> set:
        if origin[0] != "package":
            return {origin}
        _, target, name = origin
        if name not in modules[target].defines:
            raise ValueError(f"`{name}` is not defined at the top level of {target} (a module? import the names you "
                             f"use from it: the generated copy has the package's names, not its modules)")
        if (target, name) in seen:
            raise ValueError(f"`{name}` is imported in a cycle through {', '.join(t for t, _ in seen)}")
        return set().union(*(resolve(o, (*seen, (target, name))) for o in modules[target].defines[name]))

    resolved = {}
    for m in modules.values():
        binds = {name: set(what) for name, what in m.defines.items()}
        for i in m.imports:
            if not i.at_import:
                for a in i.node.names:
                    binds.setdefault(a.asname or a.name, set()).add(("package", i.target, a.name))
        try:
            resolved[m.name] = {name: set().union(*map(resolve, what)) for name, what in binds.items()}
        except ValueError as err:
            raise ValueError(f"{m.name}: {err}") from None
    return resolved


def _check_shared_namespace(stem: str, members: list[_Module], origins: dict[str, dict[str, set]]) -> None:
    """Rule 3: the modules concatenated into ``stem``.py give each name one meaning, as each has in the package."""
    if len({m.futures for m in members}) > 1:
        raise ValueError(f"{stem}.py: its modules have different `from __future__` imports "
                         f"({', '.join(f'{m.name}: {sorted(m.futures)}' for m in members)}); they share one generated "
                         f"file, so give them the same ones")
    meanings: dict[str, dict[str, set]] = {}
    for m in members:
        for name, what in origins[m.name].items():
            if name == "__all__":  # nothing star-imports a generated file: each module's own list may differ
                continue
            meanings.setdefault(name, {})[m.name] = what
    for name, by_module in meanings.items():
        if len(by_module) > 1 and len(set().union(*by_module.values())) > 1:
            raise ValueError(f"{stem}.py: `{name}` is defined by {' and '.join(by_module)} as different things; they "
                             f"share one namespace in the generated file, so rename one of them")
    for m in members:
        for name in sorted(m.reads - set(m.defines)):
            others = [o for o in meanings.get(name, {}) if o != m.name]
            if others:
                raise ValueError(f"{stem}.py: {m.name} reads `{name}`, which it does not define (a builtin?), and "
                                 f"{others[0]} defines `{name}`; they share one namespace in the generated file, so "
                                 f"rename the one in {others[0]}")


def _ordered(members: list[_Module], modules: dict[str, _Module]) -> list[_Module]:
    """``members`` with every module after those it imports at import time (its lazy imports run later)."""
    done, order, active = set(), [], []

    def visit(m: _Module) -> None:
        if m.name in done:
            return
        if m.name in active:
            raise ValueError(f"{m.stem}.py: its modules import each other in a cycle: {' -> '.join(active)} -> "
                             f"{m.name}; make one of the imports lazy (inside the function that uses it)")
        active.append(m.name)
        for i in m.imports:
            if i.at_import and modules[i.target].stem == m.stem:
                visit(modules[i.target])
        active.pop()
        done.add(m.name)
        order.append(m)

    for m in members:
        visit(m)
    return order


def _check_no_cycle(needs: dict[str, set[str]]) -> None:
    """The generated files import each other at their top (``needs``: file -> the files it imports from), so they
    may not do so in a cycle."""
    done: set[str] = set()

    def visit(stem: str, path: tuple[str, ...]) -> None:
        if stem in path:
            raise ValueError(f"the generated files would import each other in a cycle ({' -> '.join(path + (stem,))}"
                             f"): a package import between those parts, even a lazy one, is an import at the top of "
                             f"the generated file; move the shared code to the lower part")
        if stem not in done:
            for other in sorted(needs[stem]):
                visit(other, path + (stem,))
            done.add(stem)

    for stem in needs:
        visit(stem, ())


def _without_package_imports(m: _Module) -> str:
    """``m``'s source, every line as it is except its imports of the package and of ``__future__`` (which the
    generated file has at its top). An import that renames (``from .x import a as b``) leaves ``b = a`` in its
    place, one that was alone in its block leaves ``pass``."""
    dropped = [(i.node, [f"{a.asname} = {a.name}" for a in i.node.names if a.asname]
                or (["pass"] if id(i.node) in m.sole else [])) for i in m.imports]
    dropped += [(n, []) for n in m.tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    lines = m.source.splitlines(keepends=True)
    for node, replacement in sorted(dropped, key=lambda d: d[0].lineno, reverse=True):
        first, last = lines[node.lineno - 1].encode(), lines[node.end_lineno - 1].encode()  # offsets are in bytes
        indent, rest = first[:node.col_offset].decode(), last[node.end_col_offset:].decode().strip()
        if indent.strip() or (rest and not rest.startswith("#")):
            raise ValueError(f"{m.name}, line {node.lineno}: put `{ast.unparse(node)}` on lines of its own (no `;`), "
                             f"so that the generated copy can leave it out")
        lines[node.lineno - 1:node.end_lineno] = [f"{indent}{text}\n" for text in replacement]
    return "".join(lines)


def auto_map() -> dict[str, str]:
    """``{"AutoConfig": "configuration_bigbird_ja.BigBirdJaConfig", "AutoModel": "modeling_bigbird_ja.BigBirdJaModel",
    ...}``: every Auto class the package registers its config with (`bigbird_ja/__init__.py`)."""
    import transformers.models.auto.modeling_auto as modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    mapping = {"AutoConfig": f"{ROOT_FILES['configuration']}.{BigBirdJaConfig.__name__}"}
    for name, auto in sorted(vars(modeling_auto).items()):
        if not (isinstance(auto, type) and issubclass(auto, _BaseAutoModelClass)) or name != auto.__name__:
            continue
        mapping_of = getattr(auto, "_model_mapping", None)
        if mapping_of is None or BigBirdJaConfig not in mapping_of:
            continue
        model_class = mapping_of[BigBirdJaConfig]
        if model_class.__module__ != MODELING_MODULE:
            raise ValueError(f"{name} is registered with {model_class.__module__}.{model_class.__qualname__}; a saved "
                             f"folder ships only {MODELING_MODULE} as its model code: define the class there")
        mapping[name] = f"{ROOT_FILES['modeling']}.{model_class.__name__}"
    return mapping


def write_remote_code(config, folder) -> list[Path]:
    """Write the remote-code files into ``folder`` and set ``config.auto_map`` (config.json is written after this,
    by `BigBirdJaConfig.save_pretrained`). Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in remote_code_sources().items():
        path = folder / name
        atomic_write_text(path, text, durable=False)  # no fsync, as transformers writes the weights
        refused = sorted(set(get_imports(path)) & {PACKAGE, *OPTIONAL})
        if refused:
            raise ValueError(f"{path}: imports {refused} outside a try block, so a folder loaded with "
                             f"trust_remote_code would need them installed; import them where used, inside "
                             f"`try: ... except ImportError` (see attention/triton_backend.py `_kernels`)")
        written.append(path)
    config.auto_map = auto_map()
    # ours follows the head being saved (one config may serve several heads); any other custom pipeline stays
    from .pipelines import QA_TASK

    pipelines = {task: info for task, info in (config.__dict__.get("custom_pipelines") or {}).items()
                 if task != QA_TASK}
    pipelines.update(custom_pipelines(config))
    if pipelines:
        config.custom_pipelines = pipelines
    else:
        config.__dict__.pop("custom_pipelines", None)
    return written


def custom_pipelines(config) -> dict:
    """``config.custom_pipelines`` of a question-answering model: the long-document QA pipeline, whose code is
    ``pipeline_bigbird_ja.py`` beside it, so that `pipeline(QA_TASK, model=folder, trust_remote_code=True)` runs
    without the package. Other heads get none: `pipeline(model=folder)` without a task would pick it for them."""
    from .pipelines import QA_TASK

    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForQuestionAnswering") for a in architectures):
        return {}
    return {QA_TASK: {"impl": f"{ROOT_FILES['pipelines']}.{PIPELINE_CLASS}", "pt": ["AutoModelForQuestionAnswering"],
                      "tf": [], "type": "text"}}


def _registered_elsewhere(config) -> dict:
    """What transformers reads as a package config's `custom_pipelines`: the saved ones minus the tasks this process
    has registered (`import bigbird_ja` registers QA_TASK), so `pipeline(QA_TASK, model=folder)` runs the package's
    class without trust_remote_code, as it did before folders carried the pipeline's code. config.json keeps them
    all (`to_dict` reads the instance's own dict)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    saved = config.__dict__.get("custom_pipelines") or {}
    return {task: info for task, info in saved.items() if task not in PIPELINE_REGISTRY.supported_tasks}


def _keep_custom_pipelines(config, value) -> None:
    config.__dict__["custom_pipelines"] = value


def register_remote_code() -> None:
    """Make every `save_pretrained` of the package's config and models write the remote code and the
    sentence-transformers module files (`bigbird_ja.embeddings`; `import bigbird_ja` calls this, beside registering
    the Auto classes), and let the package's registered pipeline answer for a folder's copy of it
    (`_registered_elsewhere`)."""
    from .embeddings import write_sentence_transformers_files

    for hook in (write_remote_code, write_sentence_transformers_files):
        if hook not in BigBirdJaConfig.save_hooks:
            BigBirdJaConfig.save_hooks.append(hook)
    # the package's config class only: a folder's copy reads its custom_pipelines as saved
    BigBirdJaConfig.custom_pipelines = property(_registered_elsewhere, _keep_custom_pipelines)
