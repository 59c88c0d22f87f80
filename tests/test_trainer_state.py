"""The pretraining trainer holds what its declaration lists (`Pretraining`'s annotated fields), nothing else.

A reader sees everything a `Pretraining` holds at the top of the class; these tests fail when a phase sets an
attribute the declaration does not list, or when the declaration lists one that nothing sets any more. The source
is read for every assignment (error paths included); a dry run and a short run show what a real run ends up with.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigbird_ja.training import trainer as trainer_module
from bigbird_ja.training.trainer import Pretraining
from conftest import subprocess_env
from test_pretrain import REPO, TINY
from test_pretrain import tiny_data  # noqa: F401  (a fixture: the data the trainer's own preparation makes)

DECLARED = set(inspect.get_annotations(Pretraining))


def _assigned_in_source() -> set[str]:
    """Every ``self.NAME`` that a statement of `Pretraining` assigns (tuple targets and nested functions included)."""
    tree = ast.parse(Path(trainer_module.__file__).read_text(encoding="utf-8"))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Pretraining"]
    names = set()
    for node in ast.walk(cls):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for part in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "self":
                    names.add(part.attr)
    return names


def test_every_attribute_the_trainer_sets_is_declared_and_every_declared_one_is_set():
    assigned = _assigned_in_source()
    assert assigned - DECLARED == set(), "set on a Pretraining but not declared at the top of the class"
    assert DECLARED - assigned == set(), "declared but set by no phase"


# A subprocess, as a user runs it: the `Pretraining` that `pretrain` builds is kept (by wrapping `run`) and its
# attributes printed once the run is over.
_KEEP_THE_TRAINER = """
import json, sys
from bigbird_ja.training import trainer
from bigbird_ja.training.config import load_pretrain_config

kept = []
run = trainer.Pretraining.run

def keep(self, *args, **kwargs):
    kept.append(self)
    return run(self, *args, **kwargs)

trainer.Pretraining.run = keep
trainer.pretrain(load_pretrain_config(sys.argv[2], sys.argv[3:]), dry_run=sys.argv[1] == "dry-run")
print("ATTRIBUTES " + json.dumps(sorted(vars(kept[0]))))
"""


def _attributes_after(mode: str, args: list[str]) -> set[str]:
    cmd = [sys.executable, "-c", _KEEP_THE_TRAINER, mode, str(REPO / "configs/pretrain/tiny-cpu.yaml"), *TINY, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ATTRIBUTES ")]
    return set(json.loads(line.removeprefix("ATTRIBUTES ")))


@pytest.mark.slow
def test_a_dry_run_whose_data_is_still_to_be_made_sets_only_declared_attributes(tmp_path):
    held = _attributes_after("dry-run", [f"--run.output_dir={tmp_path / 'run'}", f"--data.dir={tmp_path / 'data'}",
                                         f"--data.tokenizer={tmp_path / 'tokenizer'}"])
    print(f"a dry run sets {len(held)} of {len(DECLARED)} declared attributes: not {sorted(DECLARED - held)}")
    assert held - DECLARED == set()
    assert sorted(tmp_path.iterdir()) == []  # still a dry run


@pytest.mark.slow
def test_a_short_run_holds_exactly_the_declared_attributes(tiny_data, tmp_path):  # noqa: F811
    data, tok = tiny_data
    held = _attributes_after("run", [f"--run.output_dir={tmp_path / 'run'}", f"--data.dir={data}",
                                     f"--data.tokenizer={tok}", "--train.max_steps=2", "--checkpoint.every_steps=0"])
    assert held - DECLARED == set(), "set on a Pretraining but not declared at the top of the class"
    assert DECLARED - held == set(), "declared but not set by a run that evaluates, logs samples and saves"
