"""Hub-ready model folders: `auto_map` and remote-code files generated from the package when a model is saved.

transformers' convention for custom models: config.json maps each Auto class to ``file.Class`` (`auto_map`), and
those files lie beside the weights; `AutoModel.from_pretrained(folder, trust_remote_code=True)` copies them into its
module cache and imports them, with their relative imports (`from .x import y`: a file ``x.py`` in the same folder,
no packages; `dynamic_module_utils.get_relative_imports`). Before running them it checks that every module they
import outside a ``try`` block is installed (`check_imports`).

`BigBirdJaConfig.save_pretrained` (so every model's `save_pretrained`: `bigbird-ja export`, `convert`, a
fine-tuned model) calls `write_remote_code` before config.json is written. It

  1. copies `bigbird_ja.configuration`, `bigbird_ja.modeling` and every package module they import relatively, at
     any depth (the attention package, ...), flat into the folder: ``configuration_bigbird_ja.py``,
     ``modeling_bigbird_ja.py`` (the names transformers' own custom models use) and the module path with ``_`` for
     ``.`` for the others (``bigbird_ja_attention.py`` is ``attention/__init__.py``, ``bigbird_ja_attention_layout.py``,
     ...), each package-relative import rewritten to the flat name (``from .layout import`` in the attention package
     becomes ``from .bigbird_ja_attention_layout import``); nothing else in the text changes;
  2. sets ``config.auto_map``: AutoConfig, and every Auto class that `import bigbird_ja` registers (read from
     transformers' registry, so this list and the registration cannot drift apart), to its class in those files.

The copies are generated, never edited: the package stays the one home of the model. They must not import
bigbird_ja, and optional packages (triton, the kernels, deepspeed) only lazily inside a ``try`` block, so that a
Python without them runs the blocked PyTorch backend (``attention_backend="auto"`` falls back to it when the
kernels cannot be imported); a save that would break this is an error naming the file and the import.

With bigbird_ja imported, the registered classes load such a folder (transformers prefers a registered class that is
not its own over `auto_map`, even with trust_remote_code=True), so the package and the copy never mix in a process.
A model loaded from the copies saves again through transformers' own `custom_object_save`, which copies the flat
files as they are.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

PACKAGE = __name__.rpartition(".")[0]  # "bigbird_ja"
CONFIG_MODULE = f"{PACKAGE}.configuration"
MODELING_MODULE = f"{PACKAGE}.modeling"
# the two files transformers' auto_map points at; names as in transformers' own custom-code repositories
ROOT_FILES = {CONFIG_MODULE: "configuration_bigbird_ja", MODELING_MODULE: "modeling_bigbird_ja"}
# imports the copies may make only lazily, inside a try block (transformers refuses a file that imports a missing
# package anywhere else); bigbird_ja itself never
OPTIONAL = ("triton", "deepspeed", "bigbird_ja_kernels")

_IMPORT_HEAD = re.compile(r"from\s+\.+[\w.]*\s+import\b")


def flat_name(module: str) -> str:
    """The file stem of a package module in a saved folder: ``bigbird_ja.attention.layout`` ->
    ``bigbird_ja_attention_layout``; configuration and modeling keep transformers' names."""
    return ROOT_FILES.get(module, module.replace(".", "_"))


def _spec(module: str):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"{module}: no Python source to copy into a saved model folder (found {spec!r})")
    return spec


def _relative_imports(module: str, tree: ast.Module, is_package: bool) -> list[tuple[ast.ImportFrom, str]]:
    """Every package-relative ``from .x import y`` in ``tree`` (at any depth: lazy ones too), with the module it
    names."""
    anchor = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module is None:
                raise ValueError(f"{module}: `from {'.' * node.level} import {node.names[0].name}` (line "
                                 f"{node.lineno}) cannot be copied flat into a model folder; write "
                                 f"`from .{node.names[0].name} import ...`")
            found.append((node, importlib.util.resolve_name("." * node.level + node.module, anchor)))
    return found


def _rewrite(module: str, source: str, imports: list[tuple[ast.ImportFrom, str]]) -> str:
    """``source`` with the head of each relative import (``from .x``) pointing at the flat file of its module."""
    lines = source.splitlines(keepends=True)
    for node, target in sorted(imports, key=lambda item: (item[0].lineno, item[0].col_offset), reverse=True):
        line = lines[node.lineno - 1]
        head = _IMPORT_HEAD.match(line, node.col_offset)
        if head is None:
            raise ValueError(f"{module}, line {node.lineno}: write the relative import as `from .module import "
                             f"names` on one line, so it can be rewritten for a saved folder: {line.strip()!r}")
        lines[node.lineno - 1] = f"{line[:head.start()]}from .{flat_name(target)} import{line[head.end():]}"
    return "".join(lines)


def _check_imports(module: str, tree: ast.Module) -> None:
    """A copy must not import the package by name: only relative imports are rewritten to the flat files."""
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            if name.split(".")[0] == PACKAGE:
                raise ValueError(f"{module}, line {node.lineno}: `{name}` is imported absolutely; inside the package "
                                 f"use a relative import, which a saved model folder's copy can resolve")


def remote_code_sources() -> dict[str, str]:
    """``{file name: text}`` of the files `write_remote_code` puts in a folder: the configuration and modeling
    modules and, transitively, every package module they import relatively."""
    from . import __version__

    sources, pending, seen = {}, [CONFIG_MODULE, MODELING_MODULE], set()
    while pending:
        module = pending.pop(0)
        if module in seen:
            continue
        seen.add(module)
        spec = _spec(module)
        source = Path(spec.origin).read_text(encoding="utf-8")
        tree = ast.parse(source, filename=spec.origin)
        _check_imports(module, tree)
        imports = _relative_imports(module, tree, spec.submodule_search_locations is not None)
        pending += [target for _, target in imports]
        origin = Path(spec.origin).relative_to(Path(_spec(PACKAGE).origin).parent.parent).as_posix()
        header = (f"# Generated by {PACKAGE}.hub from {origin} ({PACKAGE} {__version__}) when this model was saved.\n"
                  f"# Edit the package, not this copy.\n")
        sources[f"{flat_name(module)}.py"] = header + _rewrite(module, source, imports)
    return sources


def auto_map() -> dict[str, str]:
    """``{"AutoConfig": "configuration_bigbird_ja.BigBirdJaConfig", "AutoModel": "modeling_bigbird_ja.BigBirdJaModel",
    ...}``: every Auto class the package registers its config with (`bigbird_ja/__init__.py`)."""
    import transformers.models.auto.modeling_auto as modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    from .configuration import BigBirdJaConfig

    mapping = {"AutoConfig": f"{flat_name(CONFIG_MODULE)}.{BigBirdJaConfig.__name__}"}
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
        mapping[name] = f"{flat_name(MODELING_MODULE)}.{model_class.__name__}"
    return mapping


def write_remote_code(config, folder) -> list[Path]:
    """Write the remote-code files into ``folder`` and set ``config.auto_map`` (config.json is written after this,
    by `BigBirdJaConfig.save_pretrained`). Returns the files written."""
    from transformers.dynamic_module_utils import get_imports

    from .common.atomic_io import atomic_write_text

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
    return written
