"""Local data files are checked by content before any model loads, and lm-eval's noise stays off stderr.

An lm-eval or LongBench file that is empty, cut short mid-JSON, or whose rows lack a field the task
reads is refused by ``python -m harness run``: exit 2, exactly one ``error:`` line naming the file and
the line, no traceback, nothing written under ``--out``. The data are the stand-in mirror
(``tests/standin.py``) with one file spoiled per case; no ``../shared`` needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from standin import standin_data

from harness.cli import main
from harness.evaluation import build_task

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("MOQAE_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return standin_data(tmp_path_factory.mktemp("standin"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def empty(path: Path) -> None:
    path.write_text("")


def cut_last_line(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


def hub_layout(path: Path) -> None:
    """piqa's rows in the hub's schema (goal, sol1, sol2, label) where the YAML reads the mirror's ``query``."""
    _write(path, [{"goal": r["query"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["gold"]}
                  for r in _rows(path)])  # fmt: skip


def drop_field(field: str, index: int) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        rows = _rows(path)
        del rows[index][field]
        _write(path, rows)

    return spoil


# (id, task spec, file under the data folder, how it is spoiled, fragment of the one line after the file)
CASES = [
    ("lmeval-empty", "lmeval:piqa", "lm-eval/piqa.jsonl", empty, " holds no rows"),
    ("lmeval-cut", "lmeval:piqa", "lm-eval/piqa.jsonl", cut_last_line, " line 12: not JSON"),
    ("lmeval-no-query", "lmeval:piqa", "lm-eval/piqa.jsonl", hub_layout, " line 1: no field 'query'"),
    ("lmeval-row-without-field", "lmeval:arc_easy", "lm-eval/arc_easy.jsonl", drop_field("gold", 4),
     " line 5: no field 'gold'"),
    ("lmeval-process-docs-input", "lmeval:hellaswag", "lm-eval/hellaswag.jsonl", drop_field("ctx_a", 6),
     " line 7: no field 'ctx_a'"),
    ("longbench-no-context", "longbench:trec", "longbench/trec.jsonl", drop_field("context", 1),
     " line 2: no field 'context'"),
    ("longbench-no-classes", "longbench:trec,samsum", "longbench/trec.jsonl", drop_field("all_classes", 2),
     " line 3: no field 'all_classes'"),
    ("longbench-cut", "longbench:samsum,qasper", "longbench/samsum.jsonl", cut_last_line, " line 3: not JSON"),
    ("longbench-empty", "longbench:qasper", "longbench/qasper.jsonl", empty, " holds no rows"),
]  # fmt: skip


@pytest.mark.parametrize("spec,rel,spoil,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_spoiled_file_is_one_line_exit_2(spec, rel, spoil, fragment, standin, stories_dir, tmp_path, capsys):
    data = tmp_path / "data"
    for sub in ("lm-eval", "longbench"):
        (data / sub).mkdir(parents=True)
        for f in (standin / sub).iterdir():
            (data / sub / f.name).write_bytes(f.read_bytes())
    spoil(data / rel)
    out = tmp_path / "out"
    argv = ["run", "--methods", "fp16", "--tasks", spec, "--data-dir", str(data), "--model", str(stories_dir),
            "--out", str(out)]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{data / rel}{fragment}" in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_the_intact_standin_passes(standin):
    build_task("lmeval:piqa,arc_easy,copa,hellaswag").check_data(standin)
    build_task("longbench:trec,samsum,qasper").check_data(standin)


def test_a_hub_layout_file_needs_the_fields_of_lm_evals_own_yaml(tmp_path):
    """``D/lm-eval/piqa/validation.jsonl`` in the hub's schema: lm-eval's piqa.yaml reads goal, sol1, sol2, label."""
    from harness.data import DataFileError

    folder = tmp_path / "lm-eval" / "piqa"
    folder.mkdir(parents=True)
    _write(
        folder / "validation.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a"}]
    )
    with pytest.raises(DataFileError, match=r"validation\.jsonl line 2: no field 'label', 'sol2'"):
        build_task("lmeval:piqa").check_data(tmp_path)


def test_lm_eval_warnings_are_logged_not_printed(stories, monkeypatch, capsys, caplog):
    """lm-eval warns that a model object as ``pretrained`` ignores model arguments: in a process without
    logging handlers Python's last-resort handler printed it on stderr; now it is a log record only, which
    an application's handler receives."""
    from harness.integration import AttachedMethod
    from harness.interface import build_method
    from tasks.lmeval import make_harness_lm, quiet_lm_eval

    lm_eval_logger = logging.getLogger("lm_eval")  # as in a fresh process: an earlier test may have set it up
    monkeypatch.setattr(lm_eval_logger, "handlers", [])
    monkeypatch.setattr(lm_eval_logger, "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no handler: pytest's own are gone too
    model, tok = stories
    with AttachedMethod(model, build_method("fp16")) as am:
        make_harness_lm(model, tok, am)
        assert "`pretrained` model kwarg is not of type `str`" in capsys.readouterr().err  # the noise, before
        quiet_lm_eval()
        make_harness_lm(model, tok, am)
        assert capsys.readouterr().err == ""
        logging.getLogger().addHandler(caplog.handler)  # an application that configures logging
        make_harness_lm(model, tok, am)
    assert any("`pretrained` model kwarg" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().err == ""
