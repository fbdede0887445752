"""The transformers integration: fp16 equals no cache, generate works, signals reach the stores."""

from __future__ import annotations

import pytest
import torch

from harness.integration import AttachedMethod, apply_rope, forward, generate, model_info
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    ModelInfo,
    Observation,
    UnsupportedModelError,
    build_method,
)
from harness.models import tiny_random_model

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _ids(model, b=2, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, t), generator=g)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.0), (torch.float32, 1e-3)])
def test_fp16_method_matches_no_cache(family, dtype, tol):
    model = tiny_random_model(family, dtype=dtype)
    info = model_info(model)
    assert info.n_kv_heads < info.n_heads  # GQA
    ids = _ids(model)
    with torch.no_grad():
        ref = forward(model, ids).logits
        with AttachedMethod(model, build_method("fp16")) as am:
            cache = am.new_cache()
            out = forward(model, ids, cache).logits
            # continue decoding one token from the cache: same as the full forward's last position
            nxt = ref[:, -1:].argmax(-1)
            step = forward(model, nxt, cache).logits[:, -1]
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= tol, diff
    full = forward(model, torch.cat([ids, nxt], dim=1)).logits[:, -1]
    assert (step.float() - full.float()).abs().max().item() <= max(tol, 1e-3) + (1e-2 if dtype == torch.float16 else 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_generate_same_greedy_tokens(family, dtype):
    model = tiny_random_model(family, dtype=dtype)
    ids = _ids(model, b=1, t=12, seed=1)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = generate(model, ids, **kw)
    with AttachedMethod(model, build_method("fp16")) as am:
        out = generate(model, ids, am.new_cache(), **kw)
    assert torch.equal(out, ref)


def test_quantized_generate_runs_and_differs_from_reference():
    model = tiny_random_model("llama")
    ids = _ids(model, b=1, t=12, seed=2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with AttachedMethod(model, build_method("int2")) as am:
        cache = am.new_cache()
        out = generate(model, ids, cache, **kw)
        # decode steps went through the store: 12 prompt + 7 cached decode tokens
        assert cache.get_seq_length() == out.shape[1] - 1
        assert cache.memory().nominal_bits == 2.0


def test_cache_bytes_match_accounting():
    model = tiny_random_model("qwen2")
    info = model_info(model)
    ids = _ids(model, b=2, t=32)
    n = 2 * info.n_layers * 2 * info.n_kv_heads * 32 * info.head_dim  # K+V elements
    sizes = {}
    for spec in ["fp16", "int8", "int4", "int2"]:
        with AttachedMethod(model, build_method(spec)) as am:
            cache = am.new_cache()
            forward(model, ids, cache)
            mem = cache.memory()
            held = 0
            for store in cache.stores:
                for seq in (store.k, store.v):
                    if spec == "fp16":
                        held += seq.data.numel() * seq.data.element_size()
                    else:
                        held += sum(t.numel() * t.element_size() for t in (seq.q.codes, seq.q.scale, seq.q.zero))
        assert mem.total_bytes == held
        assert mem.elements == n
        sizes[spec] = mem.total_bytes
    assert sizes["fp16"] == 2 * n
    bits = {"int8": 8, "int4": 4, "int2": 2}
    for spec, b in bits.items():  # codes + one fp16 scale and zero per token per head
        assert sizes[spec] == n * b // 8 + (n // info.head_dim) * 4


class _Recorder(LayerStore):
    """A store that keeps what it observed (test helper)."""

    def __init__(self, layer_idx: int, info: ModelInfo):
        super().__init__(layer_idx, info)
        self.k = self.v = None
        self.obs: list[Observation] = []
        self.attn: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def append(self, keys, values, obs):
        self.obs.append(obs)
        self.k = keys if self.k is None else torch.cat([self.k, keys], -2)
        self.v = values if self.v is None else torch.cat([self.v, values], -2)

    def read(self, dtype):
        return self.k.to(dtype), self.v.to(dtype)

    def memory(self):
        return MemoryReport()

    def observe_attention(self, queries, probs):
        self.attn.append((queries, probs))


class _Observer(KVCacheMethod):
    config_class = MethodConfig
    signals = frozenset({"pre_rope_keys", "block_input", "queries", "attention"})
    name = "observer"

    def new_layer_store(self, layer_idx, info):
        return _Recorder(layer_idx, info)


def test_signals_reach_the_layer_stores(family):
    model = tiny_random_model(family)
    info = model_info(model)
    ids = _ids(model, b=1, t=10)
    with torch.no_grad():
        ref = forward(model, ids).logits
        with AttachedMethod(model, _Observer()) as am:
            cache = am.new_cache()
            out = forward(model, ids, cache).logits
            forward(model, out[:, -1:].argmax(-1), cache)
            assert model.config._attn_implementation != "sdpa"
        assert model.config._attn_implementation == "sdpa"  # restored on detach
    assert torch.allclose(out, ref, atol=1e-5)  # the observing attention changes nothing
    store = cache.stores[1]
    prefill, step = store.obs
    assert prefill.is_prefill and not step.is_prefill
    assert prefill.positions.tolist() == list(range(10)) and step.positions.tolist() == [10]
    assert prefill.pre_rope_keys.shape == (1, info.n_kv_heads, 10, info.head_dim)
    assert prefill.block_input.shape == (1, 10, info.hidden_size)
    q, probs = store.attn[0]
    assert q.shape == (1, info.n_heads, 10, info.head_dim)
    # queries at update time (post-RoPE, rebuilt from q_proj + the RoPE tables) equal attention's
    assert torch.allclose(prefill.queries, q, atol=1e-5)
    assert torch.allclose(step.queries, store.attn[1][0], atol=1e-5)
    # re-applying RoPE to the pre-RoPE keys gives the keys the cache received
    assert torch.allclose(apply_rope(prefill.pre_rope_keys, *prefill.rope), store.k[..., :10, :], atol=1e-5)
    assert probs.shape == (1, info.n_heads, 10, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(1, info.n_heads, 10))
    assert torch.all(probs[..., 0, 1:] == 0)  # causal
    q1, p1 = store.attn[1]
    assert p1.shape == (1, info.n_heads, 1, 11)


def test_pre_rope_keys_are_k_proj_output():
    model = tiny_random_model("llama")
    info = model_info(model)
    ids = _ids(model, b=1, t=6)
    with AttachedMethod(model, _Observer()) as am:
        cache = am.new_cache()
        forward(model, ids, cache)
    layer0 = model.model.layers[0]
    hidden = model.model.embed_tokens(ids)
    k = layer0.self_attn.k_proj(layer0.input_layernorm(hidden)).view(1, 6, -1, info.head_dim).transpose(1, 2)
    obs = cache.stores[0].obs[0]
    assert torch.allclose(obs.pre_rope_keys, k, atol=1e-6)
    assert torch.allclose(obs.block_input, layer0.input_layernorm(hidden), atol=1e-6)
    assert not torch.allclose(cache.stores[0].k, k, atol=1e-3)  # the stored keys are post-RoPE


def test_full_precision_prefill_switch():
    """quantize_prefill=False: prefill attention sees the original K/V, the store still quantizes."""

    model = tiny_random_model("llama")
    ids = _ids(model, b=1, t=16)
    int2 = build_method("int2")
    with torch.no_grad():
        ref = forward(model, ids).logits
        with AttachedMethod(model, int2) as am:
            quantized = forward(model, ids, am.new_cache()).logits
        int2.config.quantize_prefill = False
        with AttachedMethod(model, int2) as am:
            cache = am.new_cache()
            fp_prefill = forward(model, ids, cache).logits
            assert cache.memory().nominal_bits == 2.0
    assert torch.allclose(fp_prefill, ref, atol=1e-5)
    assert not torch.allclose(quantized, ref, atol=1e-3)


def test_refuses_models_it_cannot_serve():
    class NotALM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.config = tiny_random_model("llama").config

    with pytest.raises(UnsupportedModelError, match="decoder layers"):
        model_info(NotALM())
    model = tiny_random_model("llama")
    model.config.layer_types = ["linear_attention"] * model.config.num_hidden_layers
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        model_info(model)
