"""Every option is typed and range-checked in one place (``harness.options``), before any ``validate()``.

The property test walks the registries (built-ins and whatever plugins are installed) and the reproduce
profile schema: every option must declare its type and range, and for each one a value of the wrong
type and a value out of its range are refused by the CLI with exit code 2 and one ``error:`` line
naming the option. A planted option without a range shows the check failing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.options import OptionType, PositiveInt, check_options, option_types, untyped_options
from harness.registry import METHODS, TASKS, MethodSpecError
from harness.reproduce import ProfileFile, ProfileTable, RunTable

ROOT = Path(__file__).resolve().parents[1]


def config_classes() -> dict[str, type]:
    """Registry name -> config dataclass, for every method and task that loads (plugins included)."""
    out = {}
    for registry in (METHODS, TASKS):
        for name, cls in registry.classes().items():
            out[f"{registry.kind} {name}"] = cls.config_class
    return out


def wrong_type(t: OptionType) -> Any:
    """A value no declaration of this kind accepts."""
    return {"bool": "maybe", "int": "abc", "float": "abc", "str": 5, "list": {"a": 1}}[t.kind]


def out_of_range(t: OptionType) -> Any | None:
    """A value of the right kind outside the declared range (None: a free string has none)."""
    if t.kind == "list":
        item = out_of_range(t.item) if t.item is not None else None
        return [] if item is None else [item]
    if t.choices is not None:
        return next(v for v in (99, -7, "zzz") if v not in t.choices and isinstance(v, type(t.choices[0])))
    if t.kind in ("int", "float"):
        step = 1 if t.kind == "int" else 0.5
        if t.lo is not None:
            return t.lo if t.lo_open else t.lo - step
        if t.hi is not None:
            return t.hi if t.hi_open else t.hi + step
    if t.kind == "str" and t.parsed:
        return "%nonsense%"  # no parser of a spec option reads this
    if t.kind == "str" and t.text == "a non-empty string":
        return "  "
    return None


def test_every_option_is_typed():
    problems = {owner: untyped_options(cls) for owner, cls in config_classes().items()}
    from moqae.train import TrainConfig

    for cls in (ProfileFile, RunTable, ProfileTable, TrainConfig):
        problems[cls.__name__] = untyped_options(cls)
    assert {k: v for k, v in problems.items() if v} == {}
    assert len(problems) >= 25 and all(option_types(cls) for cls in (RunTable, ProfileTable, ProfileFile))


def test_a_planted_option_without_a_type_is_caught():
    @dataclass
    class Planted:
        ok: PositiveInt = 1
        count: int = 3  # no range
        label: str = ""  # no choices, parser or Text
        weights: dict = dataclasses.field(default_factory=dict)  # not an option type

    assert [p.split(":")[0] for p in untyped_options(Planted)] == ["count", "label", "weights"]
    with pytest.MonkeyPatch.context() as mp:  # the property test itself fails with it registered
        from baselines.uniform import Uniform, UniformConfig

        planted = dataclasses.make_dataclass("PlantedConfig", [("count", int, 3)], bases=(UniformConfig,))
        mp.setattr(Uniform, "config_class", planted)
        with pytest.raises(AssertionError, match="count"):
            test_every_option_is_typed()


def method_cases() -> list[tuple[str, str, Any]]:
    """(spec, option, bad value) for every method and task option, wrong type and out of range."""
    cases = []
    for owner, cls in config_classes().items():
        kind, name = owner.split(" ", 1)
        for option, t in option_types(cls).items():
            for bad in (wrong_type(t), out_of_range(t)):
                if bad is None or not isinstance(bad, str | int | float) or t.kind == "list":
                    continue  # a spec's values are text: a wrong type there is one that does not parse
                if t.kind == "str" and not isinstance(bad, str):
                    continue  # (checked in Python below)
                spec = f"{name}:{option}={bad}"
                cases.append((kind, spec, option))
    return cases


def one_error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (argv, err)
    return lines[0]


def test_every_method_and_task_option_refuses_bad_values(capsys, tmp_path):
    cases = method_cases()
    assert len(cases) >= 80
    for kind, spec, option in cases:
        argv = ["run", "--methods", spec] if kind == "method" else ["run", "--methods", "fp16", "--tasks", spec]
        line = one_error_line(capsys, [*argv, "--out", str(tmp_path / "o"), "--dry-run", "--no-progress"])
        assert option in line, (spec, line)
    assert not (tmp_path / "o").exists()


def test_wrong_python_types_are_refused_for_every_option():
    for owner, cls in config_classes().items():
        for option, t in option_types(cls).items():
            with pytest.raises(MethodSpecError, match=f"option {option}="):
                check_options(cls, {option: wrong_type(t)}, owner)


def test_values_are_coerced_to_their_declared_type():
    from harness.evaluation import build_task
    from harness.interface import build_method

    assert build_task("wikitext2", seqlen="128").config.seqlen == 128  # a TOML string, as an override
    m = build_method("qoq:smooth=off,alpha=1")
    assert m.config.smooth is False and m.config.alpha == 1.0 and isinstance(m.config.alpha, float)
    assert build_method("xquant:k_1bit_from=none").config.k_1bit_from is None
    with pytest.raises(MethodSpecError, match=r"^moqae: option lambda=high is not a number in \[0, 1\]$"):
        build_method("moqae:lambda=high")
    with pytest.raises(MethodSpecError, match="^kivi: option group=2.5 is not an integer >= 1$"):
        build_method("kivi:group=2.5")


# ---- the reproduce profile schema -------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers, booleans and arrays read the same in TOML


def profile_text(top: dict[str, Any], run: dict[str, Any], prof: dict[str, Any] | None, prepare: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines += ["[[run]]", *(f"{k} = {toml_value(v)}" for k, v in run.items())]
    if prof is not None:
        lines += ["[profile]", *(f"{k} = {toml_value(v)}" for k, v in prof.items())]
    for method, options in prepare.items():
        lines += [f"[prepare.{method}]", *(f"{k} = {toml_value(v)}" for k, v in options.items())]
    return "\n".join(lines) + "\n"


def profile_cases() -> list[tuple[str, str, Any]]:
    """(table, key, bad value) for every key of the profile schema and of ``[prepare.moqae]``."""
    from moqae.method import MoQAE
    from moqae.train import TrainConfig

    tables = {"top": ProfileFile, "run": RunTable, "profile": ProfileTable}
    cases = []
    for table, cls in tables.items():
        for key, t in option_types(cls).items():
            cases += [(table, key, bad) for bad in (wrong_type(t), out_of_range(t)) if bad is not None]
    train = option_types(TrainConfig)
    for key in MoQAE.prepare_keys:
        cases += [
            ("prepare", key, bad) for bad in (wrong_type(train[key]), out_of_range(train[key])) if bad is not None
        ]
    return cases


def test_every_profile_key_refuses_bad_values(capsys, tmp_path):
    cases = profile_cases()
    assert len(cases) >= 40
    for i, (table, key, bad) in enumerate(cases):
        top = {"models": ["stories260K"]}
        run = {"tasks": ["wikitext2"], "methods": ["fp16"]}
        prof = {"methods": ["fp16"], "contexts": [64]}
        prepare: dict[str, dict] = {}
        {"top": top, "run": run, "profile": prof}.get(table, prepare.setdefault("moqae", {}))[key] = bad
        path = tmp_path / f"bad{i}.toml"
        path.write_text(profile_text(top, run, prof, prepare))
        argv = ["reproduce", "--profile", str(path), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r")]
        line = one_error_line(capsys, [*argv, "--dry-run", "--no-progress"])
        assert key in line and str(path) in line, (table, key, bad, line)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_a_bad_profile_is_refused_before_torch_is_imported(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(profile_text({"models": ["m"]}, {"tasks": ["wikitext2"], "methods": ["fp16"]},
                                 {"methods": ["fp16"], "contexts": [64], "new_tokens": -1}, {}))  # fmt: skip
    code = (
        "import sys; from harness.cli import main; "
        f"rc = main(['reproduce', '--profile', {str(path)!r}, '--dry-run']); "
        "print(rc, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert r.stderr.strip() == f"error: {path} [profile]: option new_tokens=-1 is not an integer >= 1"


def test_a_profile_string_where_an_int_is_declared_is_read_as_the_int(tmp_path, capsys, stories_dir, data_dir):
    """``seqlen = "128"`` in TOML: the run's task gets 128 (it failed with a traceback before)."""
    path = tmp_path / "p.toml"
    run = {"tasks": ["wikitext2"], "methods": ["fp16"], "seqlen": "128", "max_windows": "1"}
    path.write_text(profile_text({"models": [str(stories_dir)]}, run, None, {}))
    argv = ["reproduce", "--profile", str(path), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r")]
    assert main([*argv, "--data-dir", str(data_dir), "--dry-run", "--no-progress"]) == 0
    assert "1 to compute (dry run)" in capsys.readouterr().out
    from harness.reproduce import load_profile

    assert load_profile(path).runs[0].options == {"seqlen": 128, "max_windows": 1}
