"""Files that cannot be read or written are refused in one line, before any model loads.

* weights: a ``model.safetensors`` cut short, a shard the index names that is missing (headers only,
  ``harness.models.check_model_source``; ``load_model`` turns what slips through into one line);
* ``--out`` / ``--report`` where no file can be created (``/sys``, ``/proc``: they refuse even root) for
  ``run``, ``profile``, ``reproduce`` and ``python -m moqae train`` (``harness.files.check_writable_dir``);
* ``python -m moqae train --seqlen`` longer than the model's context (the check ``run`` makes);
* MoQAE's refusal for a model without a shipped router names the user's ``--model``.

Every CLI case: exit 2, exactly one ``error:`` line, no traceback, nothing written under ``--out``.
The model is the ``stories_dir`` fixture (the shared stories260K, else its stand-in, context 512).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from harness.files import check_writable_dir
from harness.models import ModelLoadError, check_model_source, config_context_length, safetensors_problem

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MOQAE_DATA_DIR", raising=False)


@pytest.fixture
def data(tmp_path) -> Path:
    """A WikiText-shaped mirror (test and calibration splits), so that only the case's problem is refused."""
    lines = [" = A Small Test Article = ", ""]
    for i in range(80):
        lines += [f" The little robot number {i} walked to the park and saw a red ball under the old tree . ", ""]
    folder = tmp_path / "data"
    (folder / "wikitext-2-raw").mkdir(parents=True)
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines))
    (folder / "wikitext-2").mkdir()
    (folder / "wikitext-2" / "valid.txt").write_text("\n".join(lines))
    return folder


@pytest.fixture
def model_copy(tmp_path, stories_dir) -> Path:
    """A copy of the stand-in model folder that a test may damage."""
    return Path(shutil.copytree(stories_dir, tmp_path / "model"))


def _one_error_line(err: str, fragment: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


def _harness(argv: list[str], capsys) -> tuple[int, str]:
    from harness.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def _train(argv: list[str], capsys) -> tuple[int, str]:
    from moqae.__main__ import main

    code = main(["train", *argv, "--no-progress"])
    return code, capsys.readouterr().err


def _no_load(monkeypatch) -> None:
    """Any model built from weights or a config fails the test: the refusals must come before it."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config", refuse)


def _split_into_shards(folder: Path, missing: bool) -> None:
    """model.safetensors -> model-00001-of-00002.safetensors + an index naming two shards (the second
    holds nothing but the index's last entry; ``missing``: the second shard file is absent)."""
    single = folder / "model.safetensors"
    n = int.from_bytes(single.read_bytes()[:8], "little")
    names = [k for k in json.loads(single.read_bytes()[8 : 8 + n]) if k != "__metadata__"]
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    single.rename(folder / first)
    weight_map = {name: first for name in names}
    if missing:
        weight_map[names[-1]] = second
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# --------------------------------------------------------------------------------------------
# Weights that cannot be read
# --------------------------------------------------------------------------------------------


def test_intact_weights_pass(model_copy):
    check_model_source(str(model_copy))
    assert safetensors_problem(model_copy / "model.safetensors") is None
    _split_into_shards(model_copy, missing=False)
    check_model_source(str(model_copy))


@pytest.mark.parametrize(
    "damage,fragment",
    [
        (lambda b: b[: len(b) - 100], "cut short"),
        (lambda b: b[:5], "too few"),
        (lambda b: b[:40], "header needs"),
        (lambda b: b + b"\0" * 16, "16 more than its header"),
        (lambda b: (8).to_bytes(8, "little") + b"not json" + b[16:], "no valid JSON header"),
    ],
    ids=["cut-short", "no-header", "header-cut", "trailing-bytes", "garbage-header"],
)
def test_damaged_safetensors_is_refused_from_the_header(model_copy, damage, fragment):
    path = model_copy / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    assert fragment in (safetensors_problem(path) or "")
    with pytest.raises(ModelLoadError, match="model.safetensors") as e:
        check_model_source(str(model_copy))
    assert "\n" not in str(e.value)


def test_run_refuses_a_truncated_model_in_one_line(model_copy, data, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    path = model_copy / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    out = tmp_path / "o"
    code, err = _harness(["run", "--methods", "fp16", "--model", str(model_copy), "--data-dir", str(data),
                          "--out", str(out)], capsys)  # fmt: skip
    assert code == 2
    _one_error_line(err, "model.safetensors has")
    assert "cut short" in err and not out.exists()


def test_run_and_train_refuse_a_missing_shard_in_one_line(model_copy, data, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    _split_into_shards(model_copy, missing=True)
    out = tmp_path / "o"
    code, err = _harness(["run", "--methods", "fp16", "--model", str(model_copy), "--data-dir", str(data),
                          "--out", str(out)], capsys)  # fmt: skip
    assert code == 2
    _one_error_line(err, "names model-00002-of-00002.safetensors, not in the folder")
    assert not out.exists()
    code, err = _train(["--model", str(model_copy), "--data-dir", str(data), "--out", str(out)], capsys)
    assert code == 2
    _one_error_line(err, "model-00002-of-00002.safetensors")
    assert not out.exists()


def test_index_that_is_not_json_is_refused(model_copy):
    _split_into_shards(model_copy, missing=False)
    (model_copy / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="index.json is not a JSON object"):
        check_model_source(str(model_copy))


def test_load_model_turns_unreadable_weights_into_one_line(model_copy, monkeypatch):
    """The backstop: weights check_model_source did not see (here: it is skipped) fail in one line."""
    from harness import models

    monkeypatch.setattr(models, "check_model_source", lambda spec: None)
    path = model_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="cannot load model") as e:
        models.load_model(str(model_copy), device="cpu")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# --out that cannot be created or written
# --------------------------------------------------------------------------------------------


def _unwritable(parent: str) -> Path:
    """A path under ``parent`` (a /sys or /proc folder, which refuse new files even to root); skip
    where the folder is absent or, unexpectedly, takes files."""
    folder = Path(parent)
    if not folder.is_dir():
        pytest.skip(f"no {parent} here")
    try:
        check_writable_dir(folder, "probe")
    except ValueError:
        return folder / "nope" / "deeper"
    pytest.skip(f"{parent} takes new files here")


@pytest.fixture(params=["/sys/kernel", "/proc"])
def unwritable(request) -> Path:
    return _unwritable(request.param)


def test_check_writable_dir_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    check_writable_dir(target, "--out x")
    check_writable_dir(tmp_path, "--out x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out y: is a file"):
        check_writable_dir(tmp_path / "f", "--out y")
    with pytest.raises(ValueError, match="is a file"):
        check_writable_dir(tmp_path / "f" / "sub", "--out y")


def test_check_writable_dir_refuses_an_unwritable_place(unwritable):
    with pytest.raises(ValueError, match="cannot create a file in") as e:
        check_writable_dir(unwritable, f"--out {unwritable}", "give a writable folder")
    assert "\n" not in str(e.value) and not unwritable.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a 0555 folder")
def test_check_writable_dir_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot create a file in"):
            check_writable_dir(ro / "sub", "--out x")
    finally:
        ro.chmod(0o755)


def test_run_profile_reproduce_train_refuse_an_unwritable_out(unwritable, stories_dir, data, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    _no_load(monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    bad, report = str(unwritable), str(tmp_path / "r")
    cases = [
        (_harness, ["run", "--methods", "fp16", "--model", str(stories_dir), "--data-dir", str(data), "--out", bad]),
        (_harness, ["profile", "--methods", "fp16", "--model", "tiny-llama", "--out", bad]),
        (_harness, ["profile", "--methods", "fp16", "--model", "tiny-llama", "--out", bad + "/p.json"]),
        (_harness, ["reproduce", "--profile", "smoke", "--data-dir", str(data), "--out", bad, "--report", report]),
        (
            _harness,
            ["reproduce", "--profile", "smoke", "--data-dir", str(data), "--out", str(tmp_path / "o"), "--report", bad],
        ),
        (_train, ["--model", "tiny-llama", "--out", bad]),
    ]
    for call, argv in cases:
        code, err = call(argv, capsys)
        assert code == 2, (argv, err)
        _one_error_line(err, "cannot create a file in")
    assert not unwritable.exists()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


# --------------------------------------------------------------------------------------------
# moqae train --seqlen longer than the model's context
# --------------------------------------------------------------------------------------------


def test_context_from_the_config_alone(stories_dir, tmp_path):
    assert config_context_length(str(stories_dir)) == 512
    assert config_context_length("tiny-llama") == 1024
    assert config_context_length(str(tmp_path / "nothing")) is None


def test_train_refuses_a_seqlen_longer_than_the_context_before_loading(stories_dir, data, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    _no_load(monkeypatch)
    out = tmp_path / "o"
    code, err = _train(["--model", str(stories_dir), "--seqlen", "513", "--data-dir", str(data), "--out", str(out)],
                       capsys)  # fmt: skip
    assert code == 2
    line = _one_error_line(err, "513 tokens per sequence, longer than the context of")
    assert "(512)" in line and "--seqlen <= 512" in line
    assert not out.exists()


def test_train_checks_the_loaded_context_where_the_config_does_not_tell(stories_dir, data, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    """A hub id's context is known once loaded: checked then, before any training step."""
    monkeypatch.setattr("moqae.__main__.config_context_length", lambda spec: None)
    monkeypatch.setattr("moqae.__main__.RouterTrainer", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "o"
    code, err = _train(["--model", str(stories_dir), "--seqlen", "600", "--data-dir", str(data), "--out", str(out)],
                       capsys)  # fmt: skip
    assert code == 2
    _one_error_line(err, "600 tokens per sequence, longer than the context of")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# MoQAE without a shipped router: the command to paste names the user's model
# --------------------------------------------------------------------------------------------


def test_moqae_refusal_names_the_model_spec(stories_dir, data, tmp_path, capsys):
    out = tmp_path / "o"
    spec = str(stories_dir)
    argv = ["run", "--methods", "moqae:lambda=0.37", "--model", spec, "--data-dir", str(data), "--out", str(out),
            "--device", "cpu", "--seqlen", "64", "--max-windows", "1", "--no-progress"]  # fmt: skip
    code, err = _harness(argv, capsys)
    assert code == 2
    line = _one_error_line(err, f"python -m moqae train --model {shlex.quote(spec)} --lambda 0.37 --out DIR")
    assert "MODEL" not in line
    assert not list(out.rglob("*.json")) if out.exists() else True
