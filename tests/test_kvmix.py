"""KVmix (baselines/kvmix.py) against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch
from conftest import append_kv, fp16_kv

from baselines.kvmix import (
    CODE_RPC,
    KVmix,
    KVmixStore,
    allocate_bits,
    allocation_bits,
    classify_layers,
    layer_importance,
    parse_rpc,
    split_prompts,
)
from harness.integration import AttachedMethod, decoder_layers, forward, generate, model_info
from harness.interface import MethodSpecError, ModelInfo, build_method, method_names
from harness.models import tiny_random_model
from harness.quant import unpack_codes

G = 4
INFO = ModelInfo("llama", 1, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H_kv = 2, D = 8


def test_registered_and_validation():
    assert "kvmix" in method_names()
    c = build_method("kvmix").config
    assert (c.group, c.k_high, c.v_high, c.k_low, c.v_low, c.important, c.general) == (32, 3, 4, 2, 2, 0.1, 0.1)
    assert c.ratios == {4: 0.3, 3: 0.2, 2: 0.2, 1: 0.1} == CODE_RPC  # the official code's ratios
    assert build_method("kvmix").needs_calibration
    assert parse_rpc("none") == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}
    assert parse_rpc("2:0.05/4:0.1") == {4: 0.1, 3: 0.2, 2: 0.05, 1: 0.1}  # unnamed bit-widths keep the code's
    for spec, match in [
        ("kvmix:k_high=5", "k_high=5 is not one of 1, 2, 3, 4"),
        ("kvmix:important=0.6,general=0.5", "exceeds 1"),
        ("kvmix:rpc=fast", "rpc"),
        ("kvmix:rpc=2:1.5", "ratios in"),
        ("kvmix:bits=2", "unknown option"),
    ]:
        with pytest.raises(MethodSpecError, match=match) as e:
            build_method(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(MethodSpecError, match="does not divide head_dim"):
        AttachedMethod(tiny_random_model("llama"), build_method("kvmix:group=32"))  # head_dim 16
    with pytest.raises(RuntimeError, match="not calibrated"):
        build_method("kvmix").new_layer_store(0, INFO)


def test_classify_layers_by_hand():
    # 10 layers: int(0.1 * 10) = 1 important, 1 general; ties go to the lower index
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0, 0.0, 0.7, 0.2, 0.3, 0.4])
    imp, gen, rest = classify_layers(scores, 0.1, 0.1)
    assert (imp, gen) == ([1], [3])
    assert sorted(rest) == [0, 2, 4, 5, 6, 7, 8, 9]
    assert allocate_bits(scores, 0.1, 0.1, high=3, low=2) == [2, 3, 2, 3, 2, 2, 2, 2, 2, 2]
    # 9 layers: int(0.9) = 0 -> no layer is high precision
    assert allocate_bits(scores[:9], 0.1, 0.1, high=4, low=2) == [2] * 9


def test_llama2_7b_average_bits():
    """32 layers: int(0.1 * 32) = 3 important + 3 general layers at K 3 / V 4 bits, 26 at 2 bits:
    K (6·3 + 26·2)/32 = 2.1875 ≈ 2.19, V (6·4 + 26·2)/32 = 2.375 ≈ 2.38 (the paper's averages)."""
    g = torch.Generator().manual_seed(0)
    method = build_method("kvmix:rpc=none")
    method.set_scores(torch.rand(32, generator=g), torch.rand(32, generator=g))
    k_bits, v_bits = method.allocation
    assert sorted(k_bits).count(3) == 6 and sorted(v_bits).count(4) == 6
    assert allocation_bits(k_bits) == 2.1875 and round(allocation_bits(k_bits), 2) == 2.19
    assert allocation_bits(v_bits) == 2.375 and round(allocation_bits(v_bits), 2) == 2.38
    # the stores' own accounting of one 64-token prefill (rpc=none: everything quantized) gives the same
    info = ModelInfo("llama", 32, 4, 2, 32, 128, torch.float32, torch.device("cpu"))
    k_pay = v_pay = k_el = v_el = 0
    for layer in range(32):
        store = method.new_layer_store(layer, info)
        k = torch.randn(1, 2, 64, 32, generator=g)
        append_kv(store, k, k.clone())
        km, vm = store.key_memory(), store.value_memory()
        k_pay, k_el = k_pay + km.payload_bits, k_el + km.elements
        v_pay, v_el = v_pay + vm.payload_bits, v_el + vm.elements
    assert k_pay / k_el == 2.1875 and v_pay / v_el == 2.375


def test_rpc_split_by_hand():
    """Keys r = 0.2, values r = 0.3, G = 4. After each append the window of n tokens keeps
    int(r·n) and quantizes the oldest floor((n - int(r·n)) / 4) * 4 (the code's rule, values too)."""
    store = KVmixStore(0, INFO, k_bits=2, v_bits=4, k_ratio=0.2, v_ratio=0.3, group=G)
    append_kv(store, *fp16_kv(23))
    # n = 23: keys keep int(4.6) = 4, quantize floor(19/4)*4 = 16; values keep int(6.9) = 6, quantize 16
    assert store.key_counts == (16, 7) and store.value_counts == (16, 7)
    expected = [  # one decode token per step: ((quantized, fp16) keys, (quantized, fp16) values)
        ((20, 4), (20, 4)),  # n = 8: keys keep 1, quantize 4; values keep int(2.4) = 2, quantize 4
        ((24, 1), (24, 1)),  # n = 5: keys keep 1, quantize 4; values keep int(1.5) = 1, quantize 4
        ((24, 2), (24, 2)),  # n = 2: nothing reaches a group
        ((24, 3), (24, 3)),  # n = 3: likewise
        ((28, 0), (24, 4)),  # n = 4: keys keep int(0.8) = 0, quantize all 4; values keep int(1.2) = 1
    ]
    for step, (keys, values) in enumerate(expected):
        append_kv(store, *fp16_kv(1, seed=10 + step))
        assert (store.key_counts, store.value_counts) == (keys, values), step
    rk, rv = store.read(torch.float32)
    assert rk.shape == rv.shape == (1, 2, 28, 8)


def test_three_bit_keys_by_hand():
    # one head, 4 tokens x 8 channels, G = 4, 3-bit per channel: channel c holds 0, 1, 2, 7 times c+1
    info = ModelInfo("llama", 1, 1, 1, 8, 8, torch.float32, torch.device("cpu"))
    store = KVmixStore(0, info, k_bits=3, v_bits=4, k_ratio=0.0, v_ratio=0.0, group=4)
    base = torch.tensor([0.0, 1.0, 2.0, 7.0])
    k = (base[:, None] * torch.arange(1, 9)[None, :]).view(1, 1, 4, 8)
    append_kv(store, k, k.clone())
    q = store.k_q.q
    assert q.bits == 3 and q.codes.shape == (1, 1, 4, 3)  # 8 codes in 3 bytes per token
    assert torch.equal(q.scale.flatten(), torch.arange(1, 9).half())  # (max - min) / 7 = c + 1
    assert unpack_codes(q.codes, 3)[0, 0, :, 0].tolist() == [0, 1, 2, 7]
    assert torch.equal(store.read(torch.float32)[0], k)  # exact: every key is a level
    mem = store.memory()
    assert mem.bytes["codes"] == 4 * 3 + 4 * 4  # keys 3 bits x 32, values 4 bits x 32
    assert mem.payload_bits == 32 * 3 + 32 * 4


def _held_bytes(store: KVmixStore) -> int:
    tensors = [store.k_fp.data, store.v_fp.data]
    for seq in (store.k_q, store.v_q):
        if seq.q is not None:
            tensors += [seq.q.codes, seq.q.scale, seq.q.zero]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (3, 4), (1, 2)])
def test_memory_equals_bytes_held(k_bits, v_bits):
    store = KVmixStore(0, INFO, k_bits, v_bits, CODE_RPC[k_bits], CODE_RPC[v_bits], G)
    append_kv(store, *fp16_kv(37, b=2))
    for i in range(6):
        append_kv(store, *fp16_kv(1, seed=i, b=2))
    mem = store.memory()
    assert mem.total_bytes == _held_bytes(store)
    assert mem.elements == 2 * 2 * 2 * 43 * 8
    (nqk, nfk), (nqv, nfv) = store.key_counts, store.value_counts
    per_token = 2 * 2 * 8
    assert mem.payload_bits == per_token * (nqk * k_bits + nqv * v_bits + (nfk + nfv) * 16)
    assert mem.bytes["scales"] == 2 * 2 * (nqk // G * 8 + nqv * 8 // G) * 2 * 2


def test_split_prompts():
    w = torch.arange(10).view(1, -1)
    assert [p.tolist() for p in split_prompts([w], 4)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]
    assert [p.numel() for p in split_prompts([torch.arange(9)], 4)] == [4, 4]  # a 1-token tail is dropped
    assert len(split_prompts([torch.zeros(2, 8, dtype=torch.long)], 1024)) == 2  # one prompt per row


def test_layer_importance_matches_per_layer_backward():
    """One backward gives the official profiler's per-layer gradient norms (one backward per weight
    with ``inputs=[weight]``), and the model is left as it was."""
    model = tiny_random_model("qwen2")
    layers = decoder_layers(model)
    prompts = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (12, 7)]
    k, v = layer_importance(model, prompts)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.grad is None for p in model.parameters())
    expect = torch.zeros(2, len(layers), dtype=torch.float64)
    for ids in prompts:
        for i, layer in enumerate(layers):
            for j, w in enumerate((layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight)):
                w.requires_grad_(True)
                with torch.enable_grad():
                    loss = forward(model, ids, labels=ids).loss
                    (g,) = torch.autograd.grad(loss, [w])
                w.requires_grad_(False)
                expect[j, i] += g.double().norm() / len(prompts)
    assert torch.allclose(k, expect[0], rtol=1e-6) and torch.allclose(v, expect[1], rtol=1e-6)
    assert (k > 0).all() and (v > 0).all()


def test_calibration_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("MOQAE_HARNESS_CACHE", str(tmp_path))
    model = tiny_random_model("llama", num_hidden_layers=10)
    windows = [torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))]
    first = build_method("kvmix:group=4,prompt_len=8")
    with AttachedMethod(model, first) as am:
        am.calibrate(windows)
    assert first.calibration_source == "computed"
    assert len(list((tmp_path / "calibration").glob("kvmix-*.pt"))) == 1
    second = build_method("kvmix:group=4,prompt_len=8,k_high=4")  # bits do not change the scores
    with AttachedMethod(model, second) as am:
        am.calibrate(windows)
    assert second.calibration_source.endswith(".pt")
    assert torch.equal(first.k_scores, second.k_scores) and torch.equal(first.v_scores, second.v_scores)
    # 10 layers: one important + one general layer for K and for V
    assert sorted(first.allocation[0]) == [2] * 8 + [3, 3] and sorted(second.allocation[0]) == [2] * 8 + [4, 4]
    top_k = torch.sort(first.k_scores, descending=True, stable=True).indices[:2].tolist()
    assert {i for i, b in enumerate(first.allocation[0]) if b == 3} == set(top_k)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_through_the_cache(family, monkeypatch, tmp_path):
    monkeypatch.setenv("MOQAE_HARNESS_CACHE", str(tmp_path))
    model = tiny_random_model(family, num_hidden_layers=10)
    info = model_info(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    method = build_method("kvmix:group=8")
    assert isinstance(method, KVmix)
    with AttachedMethod(model, method) as am:
        am.calibrate([torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))])
        cache = am.new_cache()
        out = generate(model, ids, cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 42)
    k_bits, v_bits = method.allocation
    for store, kb, vb in zip(cache.stores, k_bits, v_bits, strict=True):
        assert (store.k_bits, store.v_bits) == (kb, vb)
        assert sum(store.key_counts) == sum(store.value_counts) == 41
        assert store.memory().total_bytes == _held_bytes(store)
    mem = cache.memory()
    assert mem.elements == 2 * info.n_layers * info.n_kv_heads * 41 * info.head_dim
    assert mem.total_bytes == sum(_held_bytes(s) for s in cache.stores)
    assert 2 < mem.nominal_bits < 16
