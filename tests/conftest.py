"""Shared fixtures: paths to the local data/model mirror (tests skip where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# The suite never needs the hub (mirrors, the embedded model, stand-ins): on a machine without network
# a hub lookup would retry and log instead of failing at once, as CI's HF_HUB_OFFLINE=1 makes it do
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shared_models_dir() -> Path:
    return Path(os.environ.get("MOQAE_MODELS_DIR", SHARED / "models"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("MOQAE_DATA_DIR", SHARED / "data"))


def has_shared_model() -> bool:
    return (shared_models_dir() / "stories260K" / "config.json").exists()


def has_shared_data() -> bool:
    return (shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw").exists()


#: where the stand-ins are built once per machine (``tests/standin.py``; the version names the recipe)
STANDIN_DIR = Path(os.environ.get("MOQAE_HARNESS_CACHE", Path.home() / ".cache" / "moqae-harness")) / "standin-v1"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """stories260K from the shared mirror; on a machine without it, the stand-in of the same shape
    trained by ``tests/standin.py`` (built once, cached)."""
    path = shared_models_dir() / "stories260K"
    if has_shared_model():
        return path
    from standin import standin_model

    folder = STANDIN_DIR / "stories260K"  # the same folder name: model ids in records and reports match
    if not (folder / "config.json").exists():
        tmp = folder.with_name(f"stories260K.tmp{os.getpid()}")
        standin_model(tmp)
        if not folder.exists():  # another process may have built it meanwhile
            tmp.replace(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The shared data mirror; on a machine without it, a stand-in in its layout (``tests/standin.py``)."""
    path = shared_data_dir()
    if has_shared_data():
        return path
    from standin import standin_data

    return standin_data(tmp_path_factory.mktemp("standin-data"))


@pytest.fixture
def real_stories():
    """Skip a test whose expectations are properties of the real stories260K (its greedy text...)."""
    if not has_shared_model():
        pytest.skip("checks the real stories260K (set MOQAE_MODELS_DIR to the shared models folder)")


@pytest.fixture
def real_data():
    """Skip a test whose expectations are properties of the real datasets (a row's text...)."""
    if not has_shared_data():
        pytest.skip("checks the real mirror's data (set MOQAE_DATA_DIR to the shared data folder)")


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
