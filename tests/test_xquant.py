"""XQuant (baselines/xquant.py) against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch
from conftest import append_kv, fp16_kv

from baselines.kivi import KIVIStore
from baselines.xquant import ETA_GRID, XQuant, XQuantConfig, XQuantStore, calibrate_levels
from harness.integration import AttachedMethod, forward, generate, model_info
from harness.interface import MethodSpecError, ModelInfo, build_method, method_names
from harness.models import tiny_random_model
from harness.quant import pack_bits, quantize, unpack_bits

G, R = 4, 8
INFO = ModelInfo("llama", 2, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H_kv = 2, D = 8


def _pair(cfg: XQuantConfig) -> tuple[XQuantStore, XQuantStore]:
    """Layers 0 and 1 of one cache (shared ``cache_state``), built as the method builds them."""
    method = XQuant(cfg)
    stores = [method.new_layer_store(i, INFO) for i in range(2)]
    state: dict = {}
    for s in stores:
        s.cache_state = state
    return stores[0], stores[1]


def test_registered_and_validation():
    assert "xquant" in method_names()
    c = build_method("xquant").config
    assert (c.group, c.residual, c.quantize_prefill) == (32, 128, True)
    assert c.eta1 in ETA_GRID[1] and c.eta2 in ETA_GRID[2]
    assert ETA_GRID == {1: (0.0, 1 / 6, 2 / 6), 2: (0.0, 0.045, 0.09)}  # the official code's candidates
    for spec, match in [
        ("xquant:eta1=0.6", r"eta1=0.6 is not a number in \[0, 0.5\]"),
        ("xquant:group=32,residual=48", "multiple of group"),
        ("xquant:k_share_from=-1", "k_share_from=-1 is not an integer >= 0, or none"),
        ("xquant:bits=2", "unknown option"),
    ]:
        with pytest.raises(MethodSpecError, match=match) as e:
            build_method(spec)
        assert "\n" not in str(e.value)
    model = tiny_random_model("llama")  # head_dim 16, 3 layers
    with pytest.raises(MethodSpecError, match="does not divide head_dim"):
        AttachedMethod(model, build_method("xquant"))
    # keys of layer 1 would share 2-bit codes of layer 0 at 1 bit: refused in one line
    with pytest.raises(MethodSpecError, match="layer 1 share the codes of layer 0") as e:
        AttachedMethod(model, build_method("xquant:group=8,residual=16,k_1bit_from=1,k_share_from=0"))
    assert "\n" not in str(e.value)
    AttachedMethod(model, build_method("xquant:group=8,residual=16,k_1bit_from=1,k_share_from=2")).detach()


def test_data_free_calibration_by_hand():
    # B = 1, groups of 4: [-1, 0, 1, 2] has z = -1, s = 3 and codes 0, 0, 1, 1 (threshold at the middle);
    # the second group is constant 0 (s = 0: codes 0, x = min)
    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    q = quantize(x, 1, 4)
    assert q.codes.shape == (1, 1)  # 8 one-bit codes in one byte
    assert unpack_bits(q.codes, 1).tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]]
    assert q.zero.tolist() == [[-1.0, 0.0]] and q.scale.tolist() == [[3.0, 0.0]]
    # η = 1/6: ẑ = z + η·s·(2^1 − 1) = -1 + 0.5 = -0.5, ŝ = (1 − 2η)·s = 2: levels -0.5 and 1.5
    c = calibrate_levels(q, 1 / 6)
    assert c.zero.tolist() == [[-0.5, 0.0]] and c.scale.tolist() == [[2.0, 0.0]]
    assert c.dequantize(torch.float32).tolist() == [[-0.5, -0.5, 1.5, 1.5, 0.0, 0.0, 0.0, 0.0]]
    # B = 2, η = 0.09 on 0, 2, 4, 6 (z = 0, s = 2): ẑ = 0.09·2·3 = 0.54, ŝ = 0.82·2 = 1.64
    q2 = calibrate_levels(quantize(torch.tensor([[0.0, 2.0, 4.0, 6.0]]), 2, 4), 0.09)
    assert q2.zero.item() == pytest.approx(0.54, abs=1e-3) and q2.scale.item() == pytest.approx(1.64, abs=1e-3)
    assert q2.dequantize(torch.float32)[0].tolist() == pytest.approx([0.54, 2.18, 3.82, 5.46], abs=2e-3)
    # η = 0 is plain min-max
    assert torch.equal(calibrate_levels(q, 0.0).dequantize(torch.float32), q.dequantize(torch.float32))


def test_one_bit_packing_by_hand():
    # codes 1,0,1,1,0,0,0,1 -> bits little-end first: 1 + 4 + 8 + 128 = 141
    codes = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1]])
    assert pack_bits(codes, 1).tolist() == [[141]]
    assert torch.equal(unpack_bits(pack_bits(codes, 1), 1), codes.to(torch.uint8))


def test_layer_bits_and_sharing_rules():
    c = XQuantConfig(k_1bit_from=4, v_1bit_from=0, k_share_from=5, v_share_from=2)
    plan = [c.layer_plan(i, 9) for i in range(9)]
    assert [p[0] for p in plan] == [2, 2, 2, 2, 1, 1, 1, 1, 1]  # key bits
    assert [p[1] for p in plan] == [1] * 9  # value bits
    assert [i for i, p in enumerate(plan) if p[2]] == [5, 7]  # odd layers from 5 borrow key codes
    assert [i for i, p in enumerate(plan) if p[3]] == [3, 5, 7]
    # defaults: the deeper half from layer 2·floor(L/4): L = 30 -> 14
    d = XQuantConfig()
    plan = [d.layer_plan(i, 30) for i in range(30)]
    assert [i for i, p in enumerate(plan) if p[0] == 1] == list(range(14, 30))
    assert all(p[1] == 1 for p in plan)
    assert [i for i, p in enumerate(plan) if p[2]] == [i for i, p in enumerate(plan) if p[3]] == list(range(15, 30, 2))
    # codes-only bits: K (14·2 + 8·1)/30 = 1.2, V (30 − 8)/30
    assert sum(p[0] * (not p[2]) for p in plan) / 30 == 1.2
    assert sum(p[1] * (not p[3]) for p in plan) / 30 == 22 / 30


def test_upper_layer_reuses_lower_codes_with_its_own_ranges():
    """Layer 1 stores only its calibrated scale/zero and dequantizes layer 0's codes with them."""
    cfg = XQuantConfig(group=G, residual=R, k_1bit_from=0, v_1bit_from=0, k_share_from=0, v_share_from=0)
    lower, upper = _pair(cfg)
    assert isinstance(upper, KIVIStore)  # KIVI's windows and transitions
    k0, v0 = fp16_kv(21, seed=1)
    k1, v1 = (3 * k0 + 1).half().float(), -2 * v0  # affine copies of the lower layer's K / V
    append_kv(lower, k0, v0)
    append_kv(upper, k1, v1)
    # KIVI's prefill split with R = 8: keys 16 quantized / 5 fp16, values 13 / 8
    assert lower.key_counts == upper.key_counts == (16, 5)
    assert lower.value_counts == upper.value_counts == (13, 8)
    eta = cfg.eta1
    # keys: the upper layer's own range of 3 k0 + 1 is 3 x the lower range, +1: its levels are the
    # lower layer's levels mapped by the same affine map (up to fp16 rounding of the stored ranges)
    rk0, _ = lower.read(torch.float32)
    rk1, rv1 = upper.read(torch.float32)
    assert torch.allclose(rk1[..., :16, :], 3 * rk0[..., :16, :] + 1, atol=2e-2)
    assert torch.equal(rk1[..., 16:, :], k1[..., 16:, :])  # fp16 residual exact
    # by hand for one key group: reconstruct from the lower codes and the upper's own min-max
    codes = unpack_bits(lower.k_q.q.codes, 1)[0, 0, :4, 0].float()  # 4 tokens, channel 0, head 0
    grp = k1[0, 0, :4, 0]
    z, s = grp.min().half().float(), (grp.max() - grp.min().half().float()).half().float()
    want = codes * ((1 - 2 * eta) * s).half().float() + (z + eta * s).half().float()
    assert torch.allclose(rk1[0, 0, :4, 0], want, atol=1e-6)
    # values (the upper layer holds -2·v0): the lower codes with the upper layer's own per-token range
    qv = unpack_bits(lower.v_q.q.codes, 1)[0, 0, 0, :4].float()
    grp = v1[0, 0, 0, :4]
    z, s = grp.min().half().float(), (grp.max() - grp.min().half().float()).half().float()
    want = qv * ((1 - 2 * eta) * s).half().float() + (z + eta * s).half().float()
    assert torch.allclose(rv1[0, 0, 0, :4], want, atol=1e-6)
    # the upper layer holds no codes
    assert upper.memory().bytes["codes"] == 0 and upper.k_q.memory().payload_bits == 0


def test_decode_keeps_pairs_in_step():
    cfg = XQuantConfig(group=G, residual=R, k_1bit_from=99, v_1bit_from=0, k_share_from=0, v_share_from=0)
    lower, upper = _pair(cfg)
    assert (lower.k_bits, upper.k_bits, lower.v_bits, upper.v_bits) == (2, 2, 1, 1)
    append_kv(lower, *fp16_kv(21))
    append_kv(upper, *fp16_kv(21, seed=5))
    for step in range(6):  # crosses KIVI's key flush at T = 24 -> 25
        append_kv(lower, *fp16_kv(1, seed=10 + step))
        append_kv(upper, *fp16_kv(1, seed=20 + step))
        assert lower.key_counts == upper.key_counts and lower.value_counts == upper.value_counts
        k, v = upper.read(torch.float32)
        assert k.shape == v.shape == (1, 2, 22 + step, 8)
    assert lower.key_counts == (24, 3)


def _held(store: XQuantStore) -> int:
    tensors = [store.k_fp.data, store.v_fp.data]
    for seq in (store.k_q, store.v_q):
        if hasattr(seq, "source"):  # borrowed codes: own scale/zero only
            tensors += [seq.scale, seq.zero]
        elif seq.q is not None:
            tensors += [seq.q.codes, seq.q.scale, seq.q.zero]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_memory_counts_shared_codes_once():
    cfg = XQuantConfig(group=G, residual=R, k_1bit_from=99, v_1bit_from=0, k_share_from=0, v_share_from=0)
    lower, upper = _pair(cfg)
    for store, seed in ((lower, 0), (upper, 1)):
        append_kv(store, *fp16_kv(37, seed=seed, b=2))
    for i in range(3):
        append_kv(lower, *fp16_kv(1, seed=10 + i, b=2))
        append_kv(upper, *fp16_kv(1, seed=20 + i, b=2))
    (nqk, nfk), (nqv, nfv) = lower.key_counts, lower.value_counts  # 40 tokens: keys (32, 8), values (31, 9)
    assert (nqk, nfk, nqv, nfv) == (32, 8, 31, 9)
    per_token = 2 * 2 * 8  # B x H_kv x D
    lo, up = lower.memory(), upper.memory()
    assert lo.total_bytes == _held(lower) and up.total_bytes == _held(upper)
    assert lo.elements == up.elements == 2 * 40 * per_token
    # payload: lower keys 2-bit, values 1-bit, fp16 windows; upper only its fp16 windows
    assert lo.payload_bits == per_token * (nqk * 2 + nqv * 1 + (nfk + nfv) * 16)
    assert up.payload_bits == per_token * (nfk + nfv) * 16
    assert lo.bytes["codes"] == per_token * (nqk * 2 + nqv) // 8 and up.bytes["codes"] == 0
    # both layers hold the same scales: keys one fp16 scale + zero per channel per G tokens,
    # values one per token per G channels
    scales = 2 * 2 * (nqk // G * 8 + nqv * 8 // G) * 2 * 2
    assert lo.bytes["scales"] == up.bytes["scales"] == scales
    total = lo
    total += up
    # the pair's equivalent bits: codes counted once over both layers' elements
    assert total.nominal_bits == pytest.approx((nqk * 2 + nqv + 2 * (nfk + nfv) * 16) / (2 * 2 * 40), rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_through_the_cache(family):
    model = tiny_random_model(family, num_hidden_layers=4)
    info = model_info(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    spec = "xquant:group=8,residual=16,k_1bit_from=2,v_1bit_from=0,k_share_from=2,v_share_from=0"
    with AttachedMethod(model, build_method(spec)) as am:
        cache = am.new_cache()
        out = generate(model, ids, cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 42)
    stores = cache.stores
    assert [(s.k_bits, s.v_bits, s.k_shared, s.v_shared) for s in stores] == [
        (2, 1, False, False),
        (2, 1, False, True),
        (1, 1, False, False),
        (1, 1, True, True),
    ]
    for s in stores:
        assert s.memory().total_bytes == _held(s)
        assert sum(s.key_counts) == 41
    mem = cache.memory()
    assert mem.elements == 2 * info.n_layers * info.n_kv_heads * 41 * info.head_dim
    assert mem.total_bytes == sum(_held(s) for s in stores)


def test_sharing_matches_an_explicit_reconstruction():
    """A whole forward: what layer 1's attention reads is layer 0's codes with layer 1's own ranges."""
    model = tiny_random_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    spec = "xquant:group=8,residual=16,k_1bit_from=0,v_1bit_from=0,k_share_from=0,v_share_from=0"
    with AttachedMethod(model, build_method(spec)) as am, torch.no_grad():
        cache = am.new_cache()
        forward(model, ids, cache)
        lower, upper = cache.stores
        k1, v1 = upper.read(torch.float32)
        nq = upper.key_counts[0]
        # rebuild layer 1's quantized keys by hand from layer 0's codes and layer 1's scale/zero
        codes = unpack_bits(lower.k_q.q.codes, 1)[..., :nq, :].float()  # [B, H, T, D]
        scale = upper.k_q.scale.float().repeat_interleave(8, dim=-2)
        zero = upper.k_q.zero.float().repeat_interleave(8, dim=-2)
        assert torch.allclose(k1[..., :nq, :], codes * scale + zero, atol=1e-6)
        assert not torch.allclose(k1[..., :nq, :], lower.read(torch.float32)[0][..., :nq, :])


def test_two_bit_without_calibration_or_sharing_is_kivi():
    """η = 0, no 1-bit layer and no sharing: XQuant stores exactly what KIVI-2 stores."""
    model = tiny_random_model("qwen2", num_hidden_layers=4)
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(4))
    outs = {}
    for spec in (
        "kivi:bits=2,group=8,residual=16",
        "xquant:group=8,residual=16,k_1bit_from=99,v_1bit_from=99,k_share_from=99,v_share_from=99,eta2=0",
    ):
        with AttachedMethod(model, build_method(spec)) as am, torch.no_grad():
            cache = am.new_cache()
            outs[spec] = (forward(model, ids, cache).logits, cache.memory().as_dict())
    (a, ma), (b, mb) = outs.values()
    assert torch.equal(a, b) and ma == mb
