"""Property-based tests (hypothesis) of the command line's edges: `--section.key=value` overrides of the run configs
and the numeric options of `plan` and `layout`. Whatever the input, `bigbird_ja.cli.main` returns 0 or 2 (argparse's
own usage errors exit 2 too); a refusal names the option on stderr; nothing reaches another exception. Each input
the properties found wrong has its own regression test beside the code it hit (test_config.py, test_planner.py,
test_layout.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bigbird_ja import cli
from bigbird_ja.common import config_io

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "model" / "tiny-cpu.yaml")
PRETRAIN_PRESET = str(REPO / "configs" / "pretrain" / "tiny-cpu.yaml")
FINETUNE_PRESET = str(REPO / "configs" / "finetune" / "jsquad-tiny-cpu.yaml")
# bounded: the whole file runs in well under a minute on two cores; nothing is written into the repository
BOUNDED = settings(max_examples=60, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` in-process: (exit status, stdout, stderr); argparse's SystemExit becomes its status. Any other
    exception propagates: that is what the properties look for."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Run configs: `--section.key=value` through `main`, the loader stubbed in for the run (a dry run that trains nothing)


@pytest.fixture
def loaded_configs(monkeypatch):
    """`pretrain` and `finetune` load their config and stop: the list receives the loaded config."""
    import bigbird_ja.finetune
    import bigbird_ja.training
    from bigbird_ja.finetune.config import load_finetune_config

    loaded = []
    monkeypatch.setattr(bigbird_ja.training, "pretrain", lambda cfg, **_: loaded.append(cfg))

    def load_finetune_only(task, config, overrides=None, **_):
        loaded.append(load_finetune_config(config, overrides))

    monkeypatch.setattr(bigbird_ja.finetune, "finetune", load_finetune_only)
    return loaded


def _fields(cls) -> dict[str, dict[str, type]]:
    """section -> key -> annotation of a run config class (top-level scalar fields under the section "")."""
    import typing

    out: dict[str, dict] = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out[f.name] = typing.get_type_hints(tp)
    return out


def _pretrain_fields():
    from bigbird_ja.training.config import PretrainConfig

    return _fields(PretrainConfig)


def _finetune_fields():
    from bigbird_ja.finetune.config import FinetuneConfig

    return _fields(FinetuneConfig)


def _misspell(name: str, data) -> str:
    i = data.draw(st.integers(0, len(name) - 1), label="misspelt at")
    return name[:i] + data.draw(st.sampled_from("xqz_0"), label="letter") + name[i + 1:]


# values as Python objects, written the way YAML writes them: the loaded value must equal the object
PLAIN_VALUES = st.one_of(
    st.integers(-10 ** 6, 10 ** 6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 0.5, 1e-4, 3e-4, 1e20, True, False, None]),
    st.text(max_size=12), st.lists(st.floats(0, 1), max_size=3), st.lists(st.integers(0, 5), max_size=3),
    st.dictionaries(st.text("abc_", min_size=1, max_size=5), st.integers(0, 9), max_size=2),
)
# what a user types: numbers in the usual spellings, words, YAML syntax (flow lists, mappings, tags, anchors)
TYPED_TEXTS = st.one_of(
    st.integers(-10 ** 12, 10 ** 12).map(str), st.integers(0, 99).map(lambda i: f"{i:04d}"),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e309", "-1e309", "1.0e309", "1e400", "nan", ".nan", ".inf", "-.inf", "inf", "-0",
                     "-0.0", "0x1F", "0o17", "0b101", "1_000", "+5", ".5", "5.", "1e3", "3:4", "1:2:3", "yes", "no",
                     "on", "off", "~", "null", "true", "True", "2024-01-01", "[", "[1, 2", "[0.9, 0.98]", "[]",
                     "{a: 1}", "{}", "a: b", "- 1", "!!python/object:os.system", "!!binary aGk=", "&a 1", "*a",
                     "'quoted'", '"x', "#comment", "9" * 5000, "1" + "0" * 400, "\x00", "é", "１２"]),
    st.text(max_size=10),
)


def _equal(loaded, given) -> bool:
    """The loaded value is the given one (a tuple for a list, a float for an int; NaN for NaN; a number for text
    that reads as one: the loader takes 5e8 and '5e8' alike, YAML 1.1 reading the first as text)."""
    if isinstance(given, str) and isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
        try:
            return float(given.replace("_", "")) == loaded
        except ValueError:
            return False
    if isinstance(given, float) and math.isnan(given):
        return isinstance(loaded, float) and math.isnan(loaded)
    if isinstance(loaded, tuple):
        loaded = list(loaded)
    if isinstance(given, (list, tuple)) and isinstance(loaded, list):
        return len(loaded) == len(given) and all(_equal(a, b) for a, b in zip(loaded, given))
    return type(loaded) is type(given) and loaded == given or (
        not isinstance(loaded, bool) and not isinstance(given, bool) and isinstance(loaded, (int, float))
        and isinstance(given, (int, float)) and loaded == given)


def _load_through_main(command: list[str], argument: str, loaded: list) -> tuple[int, str, object]:
    code, _, err = run_cli([*command, argument])
    assert code in (0, 2), (argument, code, err)
    return code, err, (loaded.pop() if code == 0 else None)


def _check_override(command, fields, loaded, data, value_text: str, expected=None, has_expected=False):
    """One override of a drawn key (valid, misspelt, nested, in an unknown section) with ``value_text``."""
    kind = data.draw(st.sampled_from(["valid", "valid", "misspelt key", "unknown section", "nested", "model key"]),
                     label="key kind")
    section = data.draw(st.sampled_from(sorted(fields)), label="section")
    key = data.draw(st.sampled_from(sorted(fields[section])), label="key")
    if kind == "misspelt key":
        key = _misspell(key, data)
    elif kind == "unknown section":
        section = _misspell(section, data)
    elif kind == "nested":
        key = f"{key}.{data.draw(st.sampled_from(['x', 'hidden_size', key]), label='deeper')}"
    elif kind == "model key":
        section, key = "model", f"overrides.{data.draw(st.sampled_from(['hidden_size', 'block_size', 'x']))}"
    dotted = f"{section}.{key}"
    code, err, cfg = _load_through_main(command, f"--{dotted}={value_text}", loaded)
    event(f"{kind}: exit status {code}")
    parts = dotted.split(".")
    if code == 2:
        named = any(re.search(rf"(?<!\w){re.escape(part)}(?!\w)", err) for part in parts)
        assert named and "Traceback" not in err, (dotted, value_text, err)
        return
    # loaded: the key was a real one and the value is the one given
    node = cfg
    for part in parts:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if has_expected:
        assert _equal(node, expected), (dotted, value_text, node, expected)
    else:  # typed text: the value YAML (1.2) reads, or the text itself for a string field
        assert node == value_text or _equal(node, _typed_value(value_text)), (dotted, value_text, node)


def _typed_value(text: str):
    """What a number typed in the usual spellings means: Python's own reading of it, else the loader's."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return config_io.load_yaml_text(text)


@pytest.mark.parametrize("command,fields", [
    (["pretrain", "--config", PRETRAIN_PRESET], _pretrain_fields),
    (["finetune", "jsquad", "--config", FINETUNE_PRESET], _finetune_fields),
], ids=["pretrain", "finetune"])
@BOUNDED
@given(data=st.data(), value=PLAIN_VALUES)
def test_an_override_of_any_value_loads_as_given_or_is_refused_naming_the_key(loaded_configs, command, fields, data,
                                                                               value):
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    text = text[:-3].strip() if text.endswith("...") else text  # a scalar's document-end marker
    _check_override(command, fields(), loaded_configs, data, text, value, has_expected=True)


@pytest.mark.parametrize("command,fields", [
    (["pretrain", "--config", PRETRAIN_PRESET], _pretrain_fields),
    (["finetune", "jsquad", "--config", FINETUNE_PRESET], _finetune_fields),
], ids=["pretrain", "finetune"])
@BOUNDED
@given(data=st.data(), text=TYPED_TEXTS)
def test_an_override_as_a_user_types_it_loads_as_meant_or_is_refused_naming_the_key(loaded_configs, command, fields,
                                                                                    data, text):
    _check_override(command, fields(), loaded_configs, data, text)


# ----------------------------------------------------------------------------------------------------------------
# Numeric options of `plan` and `layout`


NUMBERS = st.one_of(
    st.integers(-3, 3).map(str), st.integers(-10 ** 20, 10 ** 20).map(str), st.integers(10 ** 20, 10 ** 400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 1).map(repr),
    st.sampled_from(["0", "-0", "1e309", "-1e309", "inf", "-inf", "nan", "NaN", "1e-320", "abc", "", " ", "0x10",
                     "1_000", "１２", "1e3", "2**10", " 7 "]),
)


@pytest.fixture
def cached_model_facts(monkeypatch):
    """The planner's activation count (a meta-device forward + backward, ~1 s) once per model, length and precision:
    the properties vary everything else."""
    from bigbird_ja.training.planner import search as planner  # plan_run looks model_facts up there

    measure = planner.model_facts
    count = functools.lru_cache(maxsize=None)(
        lambda config_json, seq_len, precision, threshold: measure(
            planner.plan_model_config(TINY, seq_len), seq_len, precision, threshold))
    monkeypatch.setattr(planner, "model_facts", lambda config, seq_len, precision, threshold=100_000: count(
        config.to_json_string(), seq_len, precision, threshold))


def _or_any(plausible):
    """Values in the option's plausible range (a plan or a drawing comes out) or any of NUMBERS."""
    return st.one_of(plausible.map(repr), NUMBERS)


PLAN_OPTIONS = {  # option -> values: lengths the tiny model takes are few (each is one activation count)
    "--seq-len": st.one_of(st.sampled_from(["64", "256", "1024"]), NUMBERS),
    "--tokens": _or_any(st.floats(1, 1e18)), "--nodes": _or_any(st.integers(1, 1000)),
    "--gpus-per-node": _or_any(st.integers(1, 16)), "--micro-batch": _or_any(st.integers(1, 300)),
    "--global-batch": _or_any(st.integers(1, 10 ** 6)), "--memory-gib": _or_any(st.floats(1e-3, 1e6)),
    "--peak-tflops": _or_any(st.floats(1e-3, 1e6)), "--intra-node-gbps": _or_any(st.floats(1e-3, 1e6)),
    "--inter-node-gbps": _or_any(st.floats(1e-3, 1e6)), "--compute-efficiency": _or_any(st.floats(1e-3, 1)),
    "--precision": st.sampled_from(["bf16", "fp32"]),
}


@BOUNDED
@given(data=st.data())
def test_plan_takes_any_numbers_or_refuses_naming_the_option(cached_model_facts, data):
    chosen = data.draw(st.lists(st.sampled_from(sorted(PLAN_OPTIONS)), min_size=1, max_size=4, unique=True),
                       label="options")
    given = {option: data.draw(PLAN_OPTIONS[option], label=option) for option in chosen}
    args = {"--model": TINY, "--seq-len": "256", "--tokens": "1e9", "--gpu": "h100", **given}
    code, out, err = run_cli(["plan", *[f"{option}={value}" for option, value in args.items()]])
    event(f"exit status {code}")
    assert code in (0, 2), (given, code, err)
    if code == 2:
        assert any(option in err for option in given) and "Traceback" not in err, (given, err)
    else:  # a plan: every figure a finite number
        assert "recommended:" in out and not re.search(r"\b(nan|inf)\b", out, re.IGNORECASE), (given, out[-800:])


LAYOUT_OPTIONS = {  # the tiny model: 128 wide, 2 layers, 4 heads, blocks of 32, 1,024 tokens
    "--seq-len": _or_any(st.integers(1, 1024)), "--block-size": _or_any(st.sampled_from([1, 2, 8, 32, 128, 4096])),
    "--num-window-blocks": _or_any(st.integers(1, 9)), "--num-global-blocks": _or_any(st.integers(0, 4)),
    "--num-random-blocks": _or_any(st.integers(0, 4)), "--random-seed": _or_any(st.integers(0, 2 ** 64)),
    "--num-heads": _or_any(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128])), "--layer": _or_any(st.integers(0, 2)),
    "--head": _or_any(st.integers(0, 8)), "--max-length": _or_any(st.integers(1, 1 << 20)),
    "--attention-type": st.sampled_from(["block_sparse", "full"]),
}


@BOUNDED
@given(data=st.data())
def test_layout_takes_any_numbers_or_refuses_naming_the_option(tmp_path, monkeypatch, data):
    import bigbird_ja.plotting

    def categories_only(config, seq_len, out, layer_idx=0, head=None):  # the layout, not matplotlib's drawing
        assert bigbird_ja.plotting.block_categories(config, seq_len, layer_idx)[head or 0].ndim == 2
        return Path(out)

    monkeypatch.setattr(bigbird_ja.plotting, "draw_layout", categories_only)
    chosen = data.draw(st.lists(st.sampled_from(sorted(LAYOUT_OPTIONS)), min_size=1, max_size=4, unique=True),
                       label="options")
    given = {option: data.draw(LAYOUT_OPTIONS[option], label=option) for option in chosen}
    args = {"--config": TINY, "--seq-len": "512", "--out": str(tmp_path / "layout.png"), **given}
    code, out, err = run_cli(["layout", *[f"{option}={value}" for option, value in args.items()]])
    event(f"exit status {code}")
    assert code in (0, 2), (given, code, err)
    if code == 2:
        assert any(option in err for option in given) and "Traceback" not in err, (given, err)
