"""Data loading: mirror / environment resolution, the papers' WikiText-2 text, windows, errors."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from harness.data import (
    DATA_DIR_ENV,
    WIKITEXT_CALIBRATION,
    WIKITEXT_TEST,
    MissingDataError,
    calibration_windows,
    raw_file_rows,
    resolve_data_dir,
    token_windows,
    wikitext2_calibration_text,
    wikitext2_test_text,
)

MIRROR = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="module")
def mirror() -> Path:
    if not (MIRROR / WIKITEXT_TEST).is_file():
        pytest.skip(f"WikiText-2 mirror not found under {MIRROR} (set {DATA_DIR_ENV} to the shared data dir)")
    return MIRROR


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None and resolve_data_dir("") is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")  # the argument wins over the variable


def test_missing_mirror_file_names_both_ways(tmp_path):
    cases = [(wikitext2_test_text, WIKITEXT_TEST), (wikitext2_calibration_text, WIKITEXT_CALIBRATION)]
    for read, rel in cases:
        with pytest.raises(MissingDataError) as e:
            read(tmp_path)
        msg = str(e.value)
        assert "\n" not in msg
        assert "--data-dir" in msg and DATA_DIR_ENV in msg and str(tmp_path / rel) in msg
        assert "Hugging Face hub" in msg and "wikitext/wikitext-2-raw-v1" in msg


def fake_datasets(monkeypatch, load_dataset) -> list:
    """Replace the ``datasets`` module by one whose ``load_dataset`` is given; returns the calls."""
    calls: list = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=record))
    return calls


def test_unreachable_hub_names_both_ways(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    fake_datasets(monkeypatch, offline)
    with pytest.raises(MissingDataError) as e:
        wikitext2_test_text(None)
    msg = str(e.value)
    assert "\n" not in msg and "--data-dir" in msg and DATA_DIR_ENV in msg and WIKITEXT_TEST in msg
    assert "wikitext/wikitext-2-raw-v1" in msg


def test_hub_and_mirror_routes_give_the_same_text(monkeypatch, tmp_path):
    raw = " \n = Title = \n \n Text line . \n \n = = Part = = \n"
    (tmp_path / WIKITEXT_TEST).parent.mkdir(parents=True)
    (tmp_path / WIKITEXT_TEST).write_text(raw)
    hub_rows = ["", " = Title = \n", "", " Text line . \n", "", " = = Part = = \n"]
    assert raw_file_rows(tmp_path / WIKITEXT_TEST) == hub_rows

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = fake_datasets(monkeypatch, lambda *a, split: {"text": list(hub_rows)})
    assert wikitext2_test_text(None) == wikitext2_test_text(tmp_path) == "\n\n".join(hub_rows)
    wikitext2_calibration_text(None)
    assert [c[1]["split"] for c in calls] == ["test", "train"]  # calibration: the train split, never test
    assert all(c[0] == ("wikitext", "wikitext-2-raw-v1") for c in calls)


def test_wikitext2_mirror_text(mirror):
    rows = raw_file_rows(mirror / WIKITEXT_TEST)
    assert len(rows) == 4358  # the hub's test split has 4,358 rows
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"  # the hub's first non-empty row
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)
    text = wikitext2_test_text(mirror)
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    calib = wikitext2_calibration_text(mirror)
    assert calib != text and "Robert Boulter" not in calib and len(calib) > 1_000_000


def test_token_windows():
    ids = torch.arange(10)
    w = token_windows(ids, 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the tail is dropped
    assert len(token_windows(ids, 2)) == 5 and len(token_windows(ids, 2, max_windows=3)) == 3
    assert [x.shape for x in token_windows(ids, 10)] == [torch.Size([10])]
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(ids, 1)
    with pytest.raises(ValueError, match="fewer than"):
        token_windows(ids, 11)
    with pytest.raises(ValueError, match="1-D"):
        token_windows(ids.view(2, 5), 2)


class CharTokenizer:
    """A stand-in tokenizer: one id per character (enough to test the sampling)."""

    def __call__(self, text: str, return_tensors: str = "pt") -> types.SimpleNamespace:
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 512 for c in text]]))


def test_calibration_windows_are_seeded(mirror, tmp_path):
    small = tmp_path / WIKITEXT_CALIBRATION  # the first lines of the mirror's valid.txt, to keep this fast
    small.parent.mkdir(parents=True)
    with open(mirror / WIKITEXT_CALIBRATION, encoding="utf-8") as f:
        small.write_text("".join(line for _, line in zip(range(200), f, strict=False)), encoding="utf-8")
    tok = CharTokenizer()
    a = calibration_windows(tok, tmp_path, 64, 3, seed=0)
    b = calibration_windows(tok, tmp_path, 64, 3, seed=0)
    c = calibration_windows(tok, tmp_path, 64, 3, seed=1)
    assert len(a) == 3 and all(x.shape == (1, 64) and x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    ids = tok(wikitext2_calibration_text(tmp_path)).input_ids[0]
    for x in a:  # each window is a contiguous slice of the calibration text
        starts = (ids[: ids.numel() - 63] == x[0, 0]).nonzero().flatten().tolist()
        assert any(torch.equal(ids[s : s + 64], x[0]) for s in starts)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_windows(None, tmp_path, 64, 1)


def test_calibration_windows_with_a_real_tokenizer(stories, mirror):
    _, tok = stories
    a = calibration_windows(tok, mirror, 128, 2, seed=0)
    assert [x.shape for x in a] == [(1, 128)] * 2 and a[0].dtype == torch.long
    assert not torch.equal(a[0], a[1])
