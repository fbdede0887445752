"""Data loading: mirror / environment resolution, the papers' WikiText-2 text, windows, errors."""

from __future__ import annotations

import pytest
import torch

from harness.data import (
    DATA_DIR_ENV,
    MissingDataError,
    calibration_windows,
    raw_file_rows,
    resolve_data_dir,
    token_windows,
    wikitext2_calibration_text,
    wikitext2_test_text,
)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == resolve_data_dir("/elsewhere")  # the argument wins
    assert str(resolve_data_dir("/elsewhere")) == "/elsewhere"


def test_missing_data_names_both_ways(tmp_path):
    with pytest.raises(MissingDataError) as e:
        wikitext2_test_text(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and "wikitext-2-raw/wiki.test.raw" in msg
    assert "hub" in msg and "wikitext/wikitext-2-raw-v1" in msg


def test_raw_rows_follow_the_hub_layout(tmp_path):
    f = tmp_path / "wiki.raw"
    f.write_text(" \n = Title = \n \n Text line . \n")
    assert raw_file_rows(f) == ["", " = Title = \n", "", " Text line . \n"]


def test_wikitext2_mirror_text(data_dir):
    text = wikitext2_test_text(data_dir)
    # joining 4358 hub rows (each non-empty one ending in "\n") with "\n\n"
    assert raw_file_rows(data_dir / "wikitext-2-raw" / "wiki.test.raw")[1] == " = Robert Boulter = \n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")
    assert len(raw_file_rows(data_dir / "wikitext-2-raw" / "wiki.test.raw")) == 4358
    assert text.count("Robert Boulter") > 1 and text.endswith("\n")
    calib = wikitext2_calibration_text(data_dir)
    assert calib != text and "Robert Boulter" not in calib


def test_token_windows():
    ids = torch.arange(10)
    w = token_windows(ids, 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # tail dropped
    assert len(token_windows(ids, 2, max_windows=3)) == 3
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(ids, 1)
    with pytest.raises(ValueError, match="fewer than"):
        token_windows(ids, 11)


def test_calibration_windows_are_seeded(stories, data_dir):
    _, tok = stories
    a = calibration_windows(tok, data_dir, 64, 3, seed=0)
    b = calibration_windows(tok, data_dir, 64, 3, seed=0)
    c = calibration_windows(tok, data_dir, 64, 3, seed=1)
    assert all(x.shape == (1, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
