"""Shared fixtures: paths to the local data/model mirror (tests skip where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_models_dir() -> Path:
    return Path(os.environ.get("MOQAE_MODELS_DIR", SHARED / "models"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("MOQAE_DATA_DIR", SHARED / "data"))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    path = shared_models_dir() / "stories260K"
    if not (path / "config.json").exists():
        pytest.skip(f"stories260K not found at {path} (set MOQAE_MODELS_DIR to the shared models folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.skip(f"WikiText-2 mirror not found under {path} (set MOQAE_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def stories(stories_dir):
    from harness.models import load_model

    return load_model(str(stories_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def stories_kv(stories):
    """Real post-RoPE keys and values of layer 2 of stories260K on a short prompt."""
    from harness.integration import AttachedMethod, forward
    from harness.interface import build_method

    model, tok = stories
    ids = tok("Once upon a time there was a little girl named Lily. She loved to play", return_tensors="pt").input_ids
    with AttachedMethod(model, build_method("full")) as am:
        cache = am.new_cache()
        with torch.no_grad():
            forward(model, ids, cache)
        k, v = cache.stores[2].read(torch.float32)
    return k, v


def evaluate_wikitext(stories, data_dir, specs, seqlen: int = 256, windows: int = 4) -> dict[str, dict]:
    """WikiText-2 results of each method spec on stories260K (methods that calibrate get 4 windows
    of the calibration split), keyed by spec."""
    from harness.data import calibration_windows
    from harness.evaluation import TaskContext, build_task
    from harness.integration import AttachedMethod
    from harness.interface import build_method

    model, tok = stories
    task = build_task("wikitext2", seqlen=seqlen, max_windows=windows)
    results = {}
    for spec in specs:
        method = build_method(spec)
        with AttachedMethod(model, method) as am:
            if method.needs_calibration:
                am.calibrate(calibration_windows(tok, data_dir, seqlen, 4))
            results[spec] = task.evaluate(TaskContext(model, tok, am, data_dir, progress=False))
    return results


def wikitext_ppl(stories, data_dir, specs) -> dict[str, float]:
    return {k: r["metrics"]["ppl"] for k, r in evaluate_wikitext(stories, data_dir, specs).items()}


def fp16_kv(t: int, seed: int = 0, b: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable random K/V [b, 2, t, 8] (so fp16 windows hold them exactly)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, 2, t, 8, generator=g).half().float()
    v = torch.randn(b, 2, t, 8, generator=g).half().float()
    return k, v


def append_kv(store, k: torch.Tensor, v: torch.Tensor) -> None:
    """Append k, v [B, H_kv, T, D] to a layer store as the cache does (positions, prefill flag, length)."""
    from harness.interface import Observation

    start = store.seq_len
    store.append(k, v, Observation(positions=torch.arange(start, start + k.shape[-2]), is_prefill=start == 0))
    store.seq_len = start + k.shape[-2]
