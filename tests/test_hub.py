"""Hub-ready folders: `save_pretrained` writes `auto_map` and the remote-code files (`bigbird_ja.hub`), so a saved
folder loads with `trust_remote_code=True` in a Python where bigbird_ja cannot be imported, with the package's
outputs; and with the package imported, its own registered classes load the folder, silently."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.dynamic_module_utils import get_imports, get_relative_imports

import bigbird_ja
from conftest import random_batch, randomize_, subprocess_env, tiny_config

REPO = Path(__file__).resolve().parents[1]

# auto class name -> the package's class it loads (what `import bigbird_ja` registers)
HEADS = {
    "AutoModel": bigbird_ja.BigBirdJaModel,
    "AutoModelForMaskedLM": bigbird_ja.BigBirdJaForMaskedLM,
    "AutoModelForQuestionAnswering": bigbird_ja.BigBirdJaForQuestionAnswering,
    "AutoModelForSequenceClassification": bigbird_ja.BigBirdJaForSequenceClassification,
    "AutoModelForMultipleChoice": bigbird_ja.BigBirdJaForMultipleChoice,
    "AutoModelForTokenClassification": bigbird_ja.BigBirdJaForTokenClassification,
}
# also in auto_map, loaded from the folders above (as for DeBERTa-v2)
ALIASES = {"AutoModelForPreTraining": "AutoModelForMaskedLM", "AutoModelForTextEncoding": "AutoModel"}
BLOCKED = ("bigbird_ja", "bigbird_ja_kernels")

def flat_outputs(model, batch) -> dict:
    """A model's outputs on ``batch`` as one flat dict: hidden_states.0, hidden_states.1, ... beside the tensors
    (the parent and the children both call it; the children get its source)."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    flat = {}
    for key, value in out.items():
        if isinstance(value, tuple):
            flat.update({f"{key}.{i}": v.cpu() for i, v in enumerate(value)})
        else:
            flat[key] = value.cpu()
    return flat


# Every child starts with this: a fresh Python whose sys.path holds no folder of the repository and whose import
# system refuses the job's "blocked" packages (ahead of the editable install's finder), checked before anything else.
ISOLATION = r"""
import importlib, importlib.abc, json, os, sys

job = json.loads(open(sys.argv[1], encoding="utf-8").read())


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in job["blocked"]:
            raise ModuleNotFoundError(f"No module named {name!r} (refused by tests/test_hub.py)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
# the repository's folders (its root, kernels/); the virtual environment may live inside it and stays
repo = job["repo"]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in (repo, os.path.join(repo, "kernels"))]
for name in job["blocked"]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the child: the isolation failed")

import torch
import transformers
""" + inspect.getsource(flat_outputs)  # the children flatten outputs as the parent does: the same function

# Loads each folder with trust_remote_code where neither bigbird_ja nor the kernels can be imported.
EVERY_HEAD = ISOLATION + r"""
inputs = torch.load(job["inputs"])
results = {"outputs": {}, "classes": {}}
config = transformers.AutoConfig.from_pretrained(job["folders"]["AutoModel"], trust_remote_code=True)
results["config"] = {"module": type(config).__module__, "class": type(config).__name__,
                     "block_size": config.block_size, "attention_backend": config.attention_backend}
for auto_name, folder in job["folders"].items():
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    results["classes"][auto_name] = [type(model).__module__, type(model).__name__]
    results["outputs"][auto_name] = flat_outputs(model, inputs[auto_name])
for alias, auto_name in job["aliases"].items():
    model = getattr(transformers, alias).from_pretrained(job["folders"][auto_name], trust_remote_code=True)
    results["classes"][alias] = [type(model).__module__, type(model).__name__]

# "auto" picks the blocked PyTorch path when the kernels cannot be imported, even for a CUDA device
package = type(model).__module__.rpartition(".")[0]
attention = sys.modules[package + ".bigbird_ja_attention"]
results["auto_backend_on_cuda"] = attention.resolve_backend("auto", torch.device("cuda"))

# a model loaded from the folder saves again as one (transformers' own custom_object_save), outputs unchanged
qa = transformers.AutoModelForQuestionAnswering
first = qa.from_pretrained(job["folders"]["AutoModelForQuestionAnswering"], trust_remote_code=True).eval()
first.save_pretrained(job["resaved"])
again = qa.from_pretrained(job["resaved"], trust_remote_code=True).eval()
batch = inputs["AutoModelForQuestionAnswering"]
results["resaved_max_diff"] = max(float((a - b).abs().max()) for a, b in
                                  zip(flat_outputs(first, batch).values(), flat_outputs(again, batch).values()))

results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in job["blocked"])
torch.save(results, job["results"])
"""

# Loads one folder with trust_remote_code where bigbird_ja cannot be imported but the kernels can.
TRITON = ISOLATION + r"""
model = transformers.AutoModelForQuestionAnswering.from_pretrained(
    job["folder"], trust_remote_code=True, attention_backend="triton").eval().to(job["device"])
batch = {k: v.to(job["device"]) for k, v in torch.load(job["inputs"]).items()}
results = {"outputs": flat_outputs(model, batch), "kernels": "bigbird_ja_kernels" in sys.modules,
           "imported": sorted(m for m in sys.modules if m.split(".")[0] == "bigbird_ja")}
torch.save(results, job["results"])
"""


def run_child(script: str, job: dict, tmp_path: Path) -> dict:
    """Run ``script`` in a fresh Python (cwd ``tmp_path``, its own module cache, offline) and return its results."""
    job = dict(job, repo=str(REPO), results=str(tmp_path / "results.pt"))
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    (tmp_path / "child.py").write_text(script, encoding="utf-8")
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "results.pt")


def head_inputs(auto_name: str, config) -> dict:
    """A padded batch with labels (so the loss is compared too); [B, C, N] for multiple choice. 75 tokens in
    blocks of 8: 10 blocks, more than the 6 a query block sees, so the attention is sparse."""
    ids, mask = random_batch(3, 75, config.vocab_size, seed=11)
    gen = torch.Generator().manual_seed(12)
    if auto_name == "AutoModelForMultipleChoice":
        other_ids, other_mask = random_batch(3, 75, config.vocab_size, seed=13)
        return dict(input_ids=torch.stack([ids, other_ids], 1), attention_mask=torch.stack([mask, other_mask], 1),
                    labels=torch.tensor([0, 1, 1]))
    batch = dict(input_ids=ids, attention_mask=mask)
    if auto_name == "AutoModelForMaskedLM":
        batch["labels"] = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    elif auto_name == "AutoModelForQuestionAnswering":
        batch.update(start_positions=torch.tensor([2, 5, 0]), end_positions=torch.tensor([4, 9, 0]))
    elif auto_name == "AutoModelForSequenceClassification":
        batch["labels"] = torch.tensor([0, 2, 1])
    elif auto_name == "AutoModelForTokenClassification":
        batch["labels"] = torch.where(mask.bool(), torch.randint(0, 3, ids.shape, generator=gen), -100)
    return batch


@pytest.fixture(scope="module")
def saved_heads(tmp_path_factory):
    """One saved folder per head (random weights, attention_backend "auto"), its inputs and the package's outputs."""
    root = tmp_path_factory.mktemp("hub")
    config = tiny_config(num_labels=3, attention_backend="auto")
    folders, inputs, expected = {}, {}, {}
    for seed, (auto_name, model_class) in enumerate(HEADS.items()):
        model = randomize_(model_class(config), seed=seed).eval()
        folders[auto_name] = str(root / auto_name)
        model.save_pretrained(folders[auto_name])
        inputs[auto_name] = head_inputs(auto_name, config)
        expected[auto_name] = flat_outputs(model, inputs[auto_name])
    return root, folders, inputs, expected


def test_saved_folder_has_auto_map_for_every_registered_auto_class_and_self_contained_code(saved_heads):
    _, folders, _, _ = saved_heads
    folder = Path(folders["AutoModelForQuestionAnswering"])
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8"))["auto_map"]
    expected = {"AutoConfig": "configuration_bigbird_ja.BigBirdJaConfig"}
    expected.update({name: f"modeling_bigbird_ja.{cls.__name__}" for name, cls in HEADS.items()})
    expected.update({alias: expected[target] for alias, target in ALIASES.items()})
    assert auto_map == expected
    code = sorted(p.name for p in folder.glob("*.py"))
    print("remote-code files:", code)
    assert {"configuration_bigbird_ja.py", "modeling_bigbird_ja.py", "bigbird_ja_attention.py"} <= set(code)
    for path in folder.glob("*.py"):
        # what transformers checks before running the code: every package it imports outside a try block must be
        # installed, every relative import must be a file beside it
        assert not set(get_imports(path)) & {*BLOCKED, "triton", "deepspeed"}, path.name
        for module in get_relative_imports(path):
            assert (folder / f"{module}.py").is_file(), f"{path.name} imports .{module}, which is not in the folder"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in BLOCKED, (path.name, node.module)


def test_folder_loads_with_trust_remote_code_where_bigbird_ja_cannot_be_imported_with_the_same_outputs(
        saved_heads, tmp_path):
    _, folders, inputs, expected = saved_heads
    torch.save(inputs, tmp_path / "inputs.pt")
    results = run_child(EVERY_HEAD, dict(blocked=BLOCKED, folders=folders, aliases=ALIASES,
                                         inputs=str(tmp_path / "inputs.pt"), resaved=str(tmp_path / "resaved")),
                        tmp_path)

    assert results["imported"] == []
    assert results["config"]["module"].startswith("transformers_modules.")
    assert results["config"]["class"] == "BigBirdJaConfig" and results["config"]["block_size"] == 8
    assert results["config"]["attention_backend"] == "auto"
    assert results["auto_backend_on_cuda"] == "blocked"
    for auto_name, model_class in HEADS.items():
        module, name = results["classes"][auto_name]
        assert module.startswith("transformers_modules.") and name == model_class.__name__, (auto_name, module)
    for alias, target in ALIASES.items():
        assert results["classes"][alias][1] == HEADS[target].__name__
    worst = {}
    for auto_name, want in expected.items():
        got = results["outputs"][auto_name]
        assert set(got) == set(want), auto_name
        worst[auto_name] = max(float((got[k] - want[k]).abs().max()) for k in want)
    print("max |remote - package| per head:", worst, "re-saved:", results["resaved_max_diff"])
    assert max(worst.values()) <= 1e-6
    assert results["resaved_max_diff"] <= 1e-6


@pytest.mark.parametrize("trust_remote_code", [None, True], ids=["unset", "trusted"])
def test_with_bigbird_ja_imported_its_registered_classes_load_the_folder_without_warnings(saved_heads,
                                                                                         trust_remote_code):
    _, folders, inputs, expected = saved_heads
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": True}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = transformers.AutoConfig.from_pretrained(folders["AutoModel"], **kwargs)
            loaded = {name: getattr(transformers, name).from_pretrained(folders[name], **kwargs).eval()
                      for name in HEADS}
    finally:
        logger.removeHandler(handler)
    assert type(config) is bigbird_ja.BigBirdJaConfig
    for name, model_class in HEADS.items():
        assert type(loaded[name]) is model_class, name
        got = flat_outputs(loaded[name], inputs[name])
        for key, value in expected[name].items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6)
    assert [r.getMessage() for r in records] == []
    relevant = ("bigbird", "remote code", "trust_remote_code", "custom code", "auto_map")
    assert [str(w.message) for w in caught if any(word in str(w.message).lower() for word in relevant)] == []


@pytest.mark.parametrize("source, error", [
    ("import bigbird_ja_kernels\n", r"imports \['bigbird_ja_kernels'\] outside a try block"),
    ("def f():\n    from triton import language\n", r"imports \['triton'\] outside a try block"),
    ("try:\n    import bigbird_ja_kernels\nexcept ImportError:\n    pass\n", None),
], ids=["module-level", "lazy-outside-try", "inside-try"])
def test_a_copy_that_would_need_an_optional_package_is_refused_at_save_time(tmp_path, monkeypatch, source, error):
    from bigbird_ja import hub

    monkeypatch.setattr(hub, "remote_code_sources", lambda: {"modeling_bigbird_ja.py": source})
    config = tiny_config()
    if error is None:
        hub.write_remote_code(config, tmp_path)
        assert config.auto_map["AutoModel"] == "modeling_bigbird_ja.BigBirdJaModel"
    else:
        with pytest.raises(ValueError, match=error):
            hub.write_remote_code(config, tmp_path)


def test_an_absolute_import_of_the_package_is_refused_naming_the_fix():
    from bigbird_ja import hub

    with pytest.raises(ValueError, match="line 2: `bigbird_ja.attention` is imported absolutely; .* relative import"):
        hub._check_imports("bigbird_ja.modeling", ast.parse("import torch\nfrom bigbird_ja.attention import x\n"))


def test_the_configuration_and_the_model_do_not_import_the_hub_module():
    """hub sits above the model (inference layer): `import bigbird_ja` plugs its writer into
    `BigBirdJaConfig.save_hooks`; nothing the model's code reaches imports it, lazily or by name."""
    from bigbird_ja import hub

    modules = hub._collect("bigbird_ja", Path(bigbird_ja.__file__).parent)
    assert {"bigbird_ja.configuration", "bigbird_ja.modeling", "bigbird_ja.attention"} <= set(modules)
    assert "bigbird_ja.hub" not in modules
    for module in modules.values():
        by_name = [node.lineno for node in ast.walk(module.tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")]
        assert by_name == [], f"{module.name} imports a module by name at lines {by_name}"
    from bigbird_ja.embeddings import write_sentence_transformers_files

    assert bigbird_ja.BigBirdJaConfig.save_hooks == [hub.write_remote_code, write_sentence_transformers_files]
    assert "bigbird_ja.embeddings" not in modules  # the copy needs no embedding code: sentence-transformers pools


def test_only_question_answering_folders_name_the_qa_pipeline(saved_heads):
    """custom_pipelines lets `pipeline(model=folder)` pick a task unasked: only where it is the model's task."""
    _, folders, _, _ = saved_heads
    for auto_name, folder in folders.items():
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        assert (Path(folder) / "pipeline_bigbird_ja.py").is_file()
        if auto_name == "AutoModelForQuestionAnswering":
            assert list(config["custom_pipelines"]) == [bigbird_ja.QA_TASK]
        else:
            assert "custom_pipelines" not in config, auto_name
    # loaded by the package, the folder's pipeline gives way to the registered one (no trust_remote_code needed)
    loaded = transformers.AutoConfig.from_pretrained(folders["AutoModelForQuestionAnswering"])
    assert loaded.custom_pipelines == {} and bigbird_ja.QA_TASK in loaded.to_dict()["custom_pipelines"]


def test_each_generated_file_is_its_package_modules_as_they_are_without_their_package_imports(saved_heads):
    """No line of the package is rewritten: a generated file holds every line of its modules, in order, except
    their imports of the package and of __future__; its only relative imports are the other generated files,
    imported at its top."""
    from bigbird_ja import hub

    folder = Path(saved_heads[1]["AutoModel"])
    package_dir = Path(bigbird_ja.__file__).parent
    for module in hub._collect("bigbird_ja", package_dir).values():
        generated = (folder / f"{hub.file_stem(module.name)}.py").read_text(encoding="utf-8").splitlines()
        left_out = {line for node in ast.walk(module.tree) if isinstance(node, ast.ImportFrom)
                    and (node.level or node.module == "__future__")
                    for line in range(node.lineno, node.end_lineno + 1)}
        section = f"# ---- {module.path.relative_to(package_dir.parent).as_posix()} "
        position = next(i for i, line in enumerate(generated) if line.startswith(section))
        for number, line in enumerate(module.source.splitlines(), 1):
            if number not in left_out:
                position = generated.index(line, position + 1)  # ValueError: a line missing or out of order
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
        assert all(node in tree.body for node in relative), path.name
        assert {node.module for node in relative} <= {p.stem for p in folder.glob("*.py")} - {path.stem}, path.name


def test_a_config_saved_alone_carries_the_code_too(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert saved["auto_map"]["AutoConfig"] == "configuration_bigbird_ja.BigBirdJaConfig"
    assert {"configuration_bigbird_ja.py", "modeling_bigbird_ja.py"} <= {p.name for p in tmp_path.glob("*.py")}


def write_package(root: Path, name: str, files: dict[str, str]) -> str:
    """A package ``name`` under ``root`` with ``files`` (path -> text; every folder gets an __init__.py)."""
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(root).parents:
            if folder != Path(".") and not (root / folder / "__init__.py").exists():
                (root / folder / "__init__.py").write_text("", encoding="utf-8")
        path.write_text(text, encoding="utf-8")
    return name


# A package the generator handles: a subpackage re-exporting names, a renamed import, a lazy import that was alone
# in its block, a lazy import from another part, the same third-party import in two modules.
GOOD_PACKAGE = {
    "configuration.py": "from __future__ import annotations\n\nclass Config:\n    width = 3\n",
    "modeling.py": ("from __future__ import annotations\n\nimport math\n\nfrom .configuration import Config\n"
                    "from .parts import double, halve\n\n\ndef run(x):\n    if x < 0:\n"
                    "        from .util.numbers import negate\n    return double(halve(x)) * Config.width\n"),
    "parts/__init__.py": "from __future__ import annotations\n\nfrom .ops import double, halve\n",
    "parts/ops.py": ("from __future__ import annotations\n\nimport math\n\nfrom .base import scale as base_scale\n\n\n"
                     "def double(x):\n    return base_scale(x, 2)\n\n\ndef halve(x):\n"
                     "    from .base import scale\n    return scale(x, 0.5) + math.floor(0)\n"),
    "parts/base.py": "from __future__ import annotations\n\n\ndef scale(x, factor):\n    return x * factor\n",
    "util/numbers.py": "from __future__ import annotations\n\n\ndef negate(x):\n    return -x\n",
}


def test_the_generated_code_of_a_package_runs_as_the_package(tmp_path, monkeypatch):
    from bigbird_ja import hub

    monkeypatch.syspath_prepend(str(tmp_path))
    package = write_package(tmp_path, "hub_good_package", GOOD_PACKAGE)
    sources = hub.remote_code_sources(package)
    assert sorted(sources) == ["configuration_bigbird_ja.py", "hub_good_package_parts.py", "hub_good_package_util.py",
                               "modeling_bigbird_ja.py"]
    assert "base_scale = scale\n" in sources["hub_good_package_parts.py"]
    assert "        pass\n" in sources["modeling_bigbird_ja.py"]
    write_package(tmp_path, "hub_good_copy", sources)
    copy = __import__("hub_good_copy.modeling_bigbird_ja", fromlist=["run"])
    assert copy.run(4) == 12 and copy.run(-2) == -6


@pytest.mark.parametrize("files, error", [
    ({"modeling.py": "from . import configuration\n"},
     r"hub_bad_0.modeling, line 1: `from . import configuration` imports a module; .* write `from .configuration "
     r"import names`"),
    ({"modeling.py": "from .parts import ops\n", "parts/ops.py": "X = 1\n"},
     r"hub_bad_1.modeling: `ops` is not defined at the top level of hub_bad_1.parts \(a module\? import the names"),
    ({"modeling.py": "from .parts.a import f\n", "parts/a.py": "from .b import g\n\ndef f():\n    return g()\n",
      "parts/b.py": "def f():\n    return 1\n\ndef g():\n    return 2\n"},
     r"hub_bad_2_parts.py: `f` is defined by hub_bad_2.parts.b and hub_bad_2.parts.a as different things; .* rename"),
    ({"modeling.py": "from .parts.a import f\n", "parts/a.py": "from .b import g\n\ndef f(x):\n    return len(x)\n",
      "parts/b.py": "def len(x):\n    return 0\n\ndef g():\n    return 2\n"},
     r"hub_bad_3_parts.py: hub_bad_3.parts.a reads `len`, which it does not define \(a builtin\?\), and "
     r"hub_bad_3.parts.b defines `len`; .* rename the one in hub_bad_3.parts.b"),
    ({"modeling.py": "from .parts.a import f\n", "parts/a.py": "from __future__ import annotations\nfrom .b import g\n"
      "f = g\n", "parts/b.py": "def g():\n    return 2\n"},
     r"hub_bad_4_parts.py: its modules have different `from __future__` imports"),
    ({"modeling.py": "import math; from .configuration import X\n", "configuration.py": "X = 1\n"},
     r"hub_bad_5.modeling, line 1: put `from .configuration import X` on lines of its own"),
    ({"modeling.py": "from .parts import f\n\ndef g():\n    return 1\n",
      "parts/__init__.py": "def f():\n    from ..modeling import g\n    return g()\n"},
     r"the generated files would import each other in a cycle \(modeling_bigbird_ja -> hub_bad_6_parts -> "
     r"modeling_bigbird_ja\)"),
    ({"modeling.py": "import hub_bad_7.parts\n"}, r"hub_bad_7.modeling, line 1: `hub_bad_7.parts` is imported "
                                                   r"absolutely"),
], ids=["module-import", "submodule-as-name", "two-meanings", "shadowed-builtin", "futures", "shared-line",
        "file-cycle", "absolute"])
def test_a_package_module_that_breaks_a_rule_of_the_generated_code_is_refused_naming_the_fix(
        tmp_path, monkeypatch, files, error, request):
    from bigbird_ja import hub

    monkeypatch.syspath_prepend(str(tmp_path))
    package = f"hub_bad_{request.node.callspec.indices['files']}"
    write_package(tmp_path, package, {"configuration.py": "X = 1\n", **files})
    with pytest.raises(ValueError, match=error):
        hub.remote_code_sources(package)


def test_a_checksummed_model_folder_lists_the_remote_code_files(tmp_path):
    """Fine-tuning's saved model (as `export`): the code is written by save_pretrained, checksums.json after it."""
    from types import SimpleNamespace

    from bigbird_ja.common.checksums import LISTING, verify_listing
    from bigbird_ja.common.checksums import save_model_folder

    model = bigbird_ja.BigBirdJaForQuestionAnswering(tiny_config())
    save_model_folder(model, SimpleNamespace(save_pretrained=lambda folder: None), tmp_path / "model")
    listed = json.loads((tmp_path / "model" / LISTING).read_text(encoding="utf-8"))["files"]
    assert {"configuration_bigbird_ja.py", "modeling_bigbird_ja.py", "bigbird_ja_attention.py"} <= set(listed)
    assert verify_listing(tmp_path / "model") == []


# Loads a damaged checksummed folder with trust_remote_code where bigbird_ja cannot be imported.
DAMAGED = ISOLATION + r"""
try:
    transformers.AutoModelForQuestionAnswering.from_pretrained(job["folder"], trust_remote_code=True)
except Exception as error:
    results = {"error": type(error).__name__, "module": type(error).__module__, "message": str(error)}
else:
    results = {"error": None}
results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in job["blocked"])
torch.save(results, job["results"])
"""


def test_the_remote_code_checks_a_folder_against_its_checksums_as_the_package_does(tmp_path):
    """The copies carry the package's checksum check (bigbird_ja_common.py): a damaged file is refused by name."""
    from types import SimpleNamespace

    from bigbird_ja.common.checksums import save_model_folder

    model = bigbird_ja.BigBirdJaForQuestionAnswering(tiny_config())
    save_model_folder(model, SimpleNamespace(save_pretrained=lambda folder: None), tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other contents
    weights.write_bytes(bytes(data))
    results = run_child(DAMAGED, dict(blocked=BLOCKED, folder=str(tmp_path / "model")), tmp_path)
    assert results["imported"] == []
    assert results["error"] == "DamagedFolderError" and results["module"].startswith("transformers_modules.")
    assert "model.safetensors has sha256" in results["message"]


@pytest.mark.slow
@pytest.mark.triton
def test_remote_code_runs_the_triton_kernels_where_they_are_installed(tmp_path):
    """The copies import the kernels lazily (`_kernels()` in triton_backend.py): installed, they run them, as the
    package does (on CPU in Triton's interpreter, which conftest selects without a GPU)."""
    pytest.importorskip("bigbird_ja_kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = tiny_config(hidden_size=64, block_size=16, attention_backend="triton")  # head dim 16: the kernels' least
    model = randomize_(bigbird_ja.BigBirdJaForQuestionAnswering(config), seed=5).eval()
    model.save_pretrained(tmp_path / "folder")
    batch = head_inputs("AutoModelForQuestionAnswering", config)
    torch.save(batch, tmp_path / "inputs.pt")
    expected = flat_outputs(model.to(device), {k: v.to(device) for k, v in batch.items()})
    results = run_child(TRITON, dict(blocked=["bigbird_ja"], folder=str(tmp_path / "folder"), device=device,
                                     inputs=str(tmp_path / "inputs.pt")), tmp_path)
    assert results["kernels"] and results["imported"] == []
    worst = max(float((results["outputs"][k] - v).abs().max()) for k, v in expected.items())
    print(f"max |remote - package| on the Triton kernels ({device}): {worst:.2e}")
    assert worst <= 1e-6
