"""KIVI (baselines/kivi.py) against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch
from conftest import append_kv, fp16_kv, wikitext_ppl

from baselines.kivi import KIVIConfig, KIVIStore
from harness.integration import AttachedMethod, generate, model_info
from harness.interface import MethodSpecError, ModelInfo, Observation, build_method, method_names
from harness.models import tiny_random_model
from harness.quant import unpack_bits

G, R = 4, 8
INFO = ModelInfo("llama", 1, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H_kv = 2, D = 8


def _store(bits: int = 2, group: int = G, residual: int = R) -> KIVIStore:
    return KIVIStore(0, INFO, KIVIConfig(bits=bits, group=group, residual=residual))


def test_registered_variants_and_validation():
    assert {"kivi", "kivi-2", "kivi-4"} <= set(method_names())
    assert build_method("kivi-2").config.bits == 2 and build_method("kivi-4").config.bits == 4
    assert build_method("kivi:bits=8").config.bits == 8
    c = build_method("kivi").config
    assert (c.group, c.residual, c.quantize_prefill) == (32, 128, True)
    with pytest.raises(MethodSpecError, match="multiple of group"):
        build_method("kivi:group=32,residual=48")
    with pytest.raises(MethodSpecError, match="bits"):
        build_method("kivi:bits=3")
    model = tiny_random_model("llama")  # head_dim 16
    with pytest.raises(MethodSpecError, match="does not divide head_dim"):
        AttachedMethod(model, build_method("kivi:group=32,residual=128"))


# (T, (quantized keys, fp16 keys), (quantized values, fp16 values)) with G = 4, R = 8:
# keys: first T - T % R quantized; values: first T - R quantized (T <= R: none).
PREFILL = [
    (0, (0, 0), (0, 0)),
    (R - 1, (0, 7), (0, 7)),
    (R, (8, 0), (0, 8)),
    (2 * R + 5, (16, 5), (13, 8)),
]


@pytest.mark.parametrize("t,keys,values", PREFILL)
def test_prefill_split(t, keys, values):
    store = _store()
    k, v = fp16_kv(t)
    append_kv(store, k, v)
    assert store.key_counts == keys
    assert store.value_counts == values
    rk, rv = store.read(torch.float32)
    assert rk.shape == rv.shape == (1, 2, t, 8)


def test_decode_crosses_the_flush_boundary():
    """From T = 2R + 5 = 21. KIVI's code, per decode step: the new token joins the fp16 buffers,
    attention reads them, then the key buffer is flushed if it holds R tokens and the oldest value
    quantized if the window holds R + 1. The store applies those after-attention transitions at the
    start of the next append, so after each append it holds what that step's attention saw."""
    store = _store()
    append_kv(store, *fp16_kv(21))
    expected = [
        # T=22: buffer 5 -> 6 keys; window 8 -> 9 values (attention sees 9 fp16 values)
        ((16, 6), (13, 9)),
        # T=23: the 9th value of the last step is quantized first (14, 8), then the new one joins
        ((16, 7), (14, 9)),
        # T=24: the key buffer reaches R = 8: this step's attention still sees them in fp16
        ((16, 8), (15, 9)),
        # T=25: the full buffer is quantized at once (24, 0), then the new key starts a new buffer
        ((24, 1), (16, 9)),
        ((24, 2), (17, 9)),
    ]
    for step, (keys, values) in enumerate(expected):
        append_kv(store, *fp16_kv(1, seed=100 + step))
        assert (store.key_counts, store.value_counts) == (keys, values), step
        assert store.read(torch.float32)[0].shape[-2] == 22 + step


def test_per_channel_key_ranges_by_hand():
    # one head, 4 tokens x 4 channels (rows = tokens); G = R = 4 -> all 4 keys quantized per channel
    k = torch.tensor([[0.0, 1.0, -2.0, 4.0], [3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 8.0], [2.0, 1.0, 2.0, 2.0]])
    info = ModelInfo("llama", 1, 1, 1, 4, 4, torch.float32, torch.device("cpu"))
    store = KIVIStore(0, info, KIVIConfig(bits=2, group=4, residual=4))
    keys = k.view(1, 1, 4, 4)
    store.append(keys, keys.clone(), Observation(positions=torch.arange(4), is_prefill=True))
    assert store.key_counts == (4, 0) and store.value_counts == (0, 4)
    q = store.k_q.q
    # per channel over the 4 tokens: min = [0, 1, -2, 0], max = [3, 1, 2, 8], scale = (max - min) / 3
    assert q.zero.flatten().tolist() == [0.0, 1.0, -2.0, 0.0]
    expect_scale = torch.tensor([1.0, 0.0, 4 / 3, 8 / 3]).half()
    assert torch.equal(q.scale.flatten(), expect_scale)
    codes = unpack_bits(q.codes, 2)[0, 0]  # [tokens, channels]
    assert codes[:, 0].tolist() == [0, 3, 1, 2]  # channel 0: scale 1, exact
    assert codes[:, 1].tolist() == [0, 0, 0, 0]  # constant channel: code 0, x = min
    # channel 3: 4 / (8/3) = 1.5 -> 2 (half to even), 8 -> 3, 2 / (8/3) = 0.75 -> 1
    assert codes[:, 3].tolist() == [2, 0, 3, 1]
    rk, _ = store.read(torch.float32)
    assert torch.equal(rk[0, 0, :, :2], k[:, :2])


def test_per_token_value_ranges_by_hand():
    # 5 tokens, R = 4: the first value token is quantized per token in groups of G = 4 channels
    info = ModelInfo("llama", 1, 1, 1, 8, 8, torch.float32, torch.device("cpu"))
    store = KIVIStore(0, info, KIVIConfig(bits=2, group=4, residual=4))
    v = torch.zeros(1, 1, 5, 8)
    v[0, 0, 0] = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 5.0, 0.0, 2.0])
    store.append(torch.zeros_like(v), v, Observation(positions=torch.arange(5), is_prefill=True))
    assert store.value_counts == (1, 4)
    q = store.v_q.q
    assert q.zero.flatten().tolist() == [0.0, -1.0]
    assert q.scale.flatten().tolist() == [1.0, 2.0]
    assert torch.equal(store.read(torch.float32)[1][0, 0, 0, :4], v[0, 0, 0, :4])


def test_read_returns_tokens_in_order():
    store = _store()
    k, v = fp16_kv(21, seed=3, b=2)
    append_kv(store, k, v)
    for i in range(5):
        nk, nv = fp16_kv(1, seed=10 + i, b=2)
        append_kv(store, nk, nv)
        k, v = torch.cat([k, nk], -2), torch.cat([v, nv], -2)
    rk, rv = store.read(torch.float32)
    nqk, nqv = store.key_counts[0], store.value_counts[0]
    assert torch.equal(rk[..., nqk:, :], k[..., nqk:, :])  # fp16 residual exact
    assert torch.equal(rv[..., nqv:, :], v[..., nqv:, :])
    # quantized part: every element within half a step of its own range
    kq, vq = store.k_q.q, store.v_q.q
    k_step = kq.scale.float().repeat_interleave(G, dim=-2)  # [B, H, T_q, D]
    v_step = vq.scale.float().repeat_interleave(G, dim=-1)
    assert torch.all((rk[..., :nqk, :] - k[..., :nqk, :]).abs() <= k_step / 2 + 1e-3)
    assert torch.all((rv[..., :nqv, :] - v[..., :nqv, :]).abs() <= v_step / 2 + 1e-3)
    assert (rk[..., :nqk, :] - k[..., :nqk, :]).abs().max() > 0  # and it is quantized


def _held_bytes(store: KIVIStore) -> int:
    tensors = [store.k_fp.data, store.v_fp.data]
    for seq in (store.k_q, store.v_q):
        if seq.q is not None:
            tensors += [seq.q.codes, seq.q.scale, seq.q.zero]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_memory_equals_bytes_held(bits):
    store = _store(bits=bits)
    append_kv(store, *fp16_kv(21, b=2))
    for i in range(4):
        append_kv(store, *fp16_kv(1, seed=i, b=2))
    mem = store.memory()
    assert mem.total_bytes == _held_bytes(store)
    assert mem.elements == 2 * 2 * 2 * 25 * 8  # K+V x B x H_kv x T x D
    (nqk, nfk), (nqv, nfv) = store.key_counts, store.value_counts
    per_token = 2 * 2 * 8  # B x H_kv x D elements per token
    assert mem.payload_bits == per_token * ((nqk + nqv) * bits + (nfk + nfv) * 16)
    assert mem.bytes["codes"] == per_token * (nqk + nqv) * bits // 8
    # keys: fp16 scale + min per channel per G tokens; values: per token per G channels
    assert mem.bytes["scales"] == 2 * 2 * (nqk // G * 8 + nqv * 8 // G) * 2 * 2
    assert mem.bytes["fp_tokens"] == per_token * (nfk + nfv) * 2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_through_the_cache(family):
    model = tiny_random_model(family)
    info = model_info(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with AttachedMethod(model, build_method("kivi:bits=2,group=4,residual=8")) as am:
        cache = am.new_cache()
        out = generate(model, ids, cache, **kw)
    assert out.shape == (1, 28)
    assert cache.get_seq_length() == 27  # 12 prompt + 15 cached decode tokens
    for store in cache.stores:
        # prefill 12: keys (8, 4), values (4, 8); 15 decode appends: the key buffer reaches 8 at the
        # 4th, is flushed at the 5th and 13th; values quantize one token per append from the 2nd on
        assert store.key_counts == (24, 3)
        assert store.value_counts == (18, 9)
    mem = cache.memory()
    assert mem.elements == 2 * info.n_layers * info.n_kv_heads * 27 * info.head_dim


def test_generate_all_residual_equals_fp16():
    """With the whole sequence inside the residual and KIVI's full-precision prefill, KIVI holds
    every token in fp16: greedy tokens equal the fp16 method's."""
    model = tiny_random_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with AttachedMethod(model, build_method("fp16")) as am:
        ref = generate(model, ids, am.new_cache(), **kw)
    with AttachedMethod(model, build_method("kivi:group=4,residual=32,quantize_prefill=false")) as am:
        cache = am.new_cache()
        out = generate(model, ids, cache, **kw)
    assert torch.equal(out, ref)
    assert cache.memory().nominal_bits == 16.0


def test_kivi8_perplexity_close_to_fp16(stories, data_dir):
    """stories260K has head_dim 8: group 8, residual 32."""
    ppl = wikitext_ppl(
        stories, data_dir, ["fp16", "kivi:bits=8,group=8,residual=32", "kivi:bits=2,group=8,residual=32"]
    )
    assert ppl["kivi:bits=8,group=8,residual=32"] == pytest.approx(ppl["fp16"], rel=5e-3)
    assert ppl["kivi:bits=2,group=8,residual=32"] > ppl["kivi:bits=8,group=8,residual=32"]
