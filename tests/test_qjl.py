"""QJL (baselines/qjl.py) against hand-computed values, its estimator's expectation, and an independent
transcription of the official code (amirzandieh/QJL @ 421d61cb: ``qjl_quant_kernel.cu``,
``qjl_gqa_score_kernel.cu``, ``new_pack.py``, ``quantization.cu``) on fixed heavy-tailed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import append_kv, fp16_kv

import baselines.qjl as qjl_module
from baselines.qjl import QJL, QJLConfig, QJLStore, pack_signs, projection, signs
from harness.from_codes import masked_scores, mix_from_codes
from harness.integration import AttachedMethod
from harness.interface import MethodSpecError, ModelInfo, build_method, method_names
from harness.models import tiny_random_model
from harness.quant import QuantizedTensor, pack_bits, unpack_bits, unpack_to_float

C = math.sqrt(math.pi / 2)


def _method(spec: str = "", s: torch.Tensor | None = None, d: int = 8) -> QJL:
    """A qjl method; ``s`` [m, d] replaces the projection of both layer classes."""
    method = build_method(f"qjl:{spec}" if spec else "qjl")
    if s is not None:
        method._projections[(d, "cpu")] = (s, s)
    return method


def _info(d: int = 8, h_kv: int = 2) -> ModelInfo:
    return ModelInfo("llama", 1, 2 * h_kv, h_kv, d, 2 * h_kv * d, torch.float32, torch.device("cpu"))


def _store(method: QJL, d: int = 8, h_kv: int = 2, layer: int = 0) -> QJLStore:
    return method.new_layer_store(layer, _info(d, h_kv))


def test_registered_defaults_and_validation():
    assert "qjl" in method_names()
    c = build_method("qjl").config
    assert (c.initial_layers, c.outliers, c.outliers_initial, c.group, c.buffer, c.value_bits, c.rotate) == (
        15, 8, 8, 32, 128, 2, True,
    )  # fmt: skip
    assert c.sizes(False, 128) == (256, 256, 8) and c.sizes(True, 128) == (512, 128, 8)  # run_longbench.py
    assert build_method("qjl:key_quantization_bits=64,buffer_size=64").config.sizes(False, 128)[0] == 64
    with pytest.raises(MethodSpecError, match="multiple of group"):
        build_method("qjl:group=32,buffer=48")
    with pytest.raises(MethodSpecError, match="multiple of 8"):
        build_method("qjl:dim=12")
    with pytest.raises(MethodSpecError, match="value_bits"):
        build_method("qjl:value_bits=3")
    model = tiny_random_model("llama")  # head_dim 16
    with pytest.raises(MethodSpecError, match="does not divide head_dim"):
        AttachedMethod(model, build_method("qjl"))
    with pytest.raises(MethodSpecError, match="outlier channels"):
        AttachedMethod(model, build_method("qjl:group=16,outliers=16"))
    with pytest.raises(MethodSpecError, match="m_o=64 > m=32"):
        AttachedMethod(model, build_method("qjl:group=16,dim=32,outlier_dim=64,initial_layers=0"))


# ---- hand-computed: d = 4, m = 8, a fixed S --------------------------------------------------

S8 = torch.tensor(
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, -1, 0, 0], [0, 0, 1, -1]],
    dtype=torch.float32,
)
K = torch.tensor([1.0, -2.0, 3.0, 0.0])
Q = torch.tensor([2.0, 0.5, 1.0, -1.0])


def _hand_store(outliers: int) -> QJLStore:
    spec = f"group=4,buffer=4,dim=8,dim_initial=8,outlier_dim=8,outlier_dim_initial=8,outliers={outliers}"
    method = _method(spec + f",outliers_initial={outliers}", S8, d=4)
    store = _store(method, d=4, h_kv=1)
    k = K.expand(1, 1, 4, 4).clone()  # one group of G = 4 tokens, all equal to K
    append_kv(store, k, torch.zeros(1, 1, 4, 4))
    return store


def test_hand_computed_without_outliers():
    """S K = [1, -2, 3, 0, -1, 3, 3, 3]: bits (> 0) 1,0,1,0,0,1,1,1 -> byte 1+4+32+64+128 = 229 (the
    exact 0 is a -1, as the kernel's ``> 0``); ‖K‖ = √14 in fp16; Sᵀ sign(S K) = [1, -3, 3, -1], so
    k̂ = √(π/2)/8 · √14 · [1, -3, 3, -1] and q·k̂ = √(π/2)/8 · √14 · (2 - 1.5 + 3 + 1)."""
    store = _hand_store(0)
    assert store.key_counts == (4, 0) and store.outlier_idx.n == 0
    assert store.sign_in.value[0, 0, :, 0].tolist() == [229] * 4
    norm = torch.tensor(14.0).sqrt().half()
    assert torch.equal((store.norm.value[0, 0, :, 0] / store.norm_shift).half(), norm.expand(4))  # held × 2^-e
    k_hat = C / 8 * norm.float() * torch.tensor([1.0, -3.0, 3.0, -1.0])
    keys, _ = store.read(torch.float32)
    torch.testing.assert_close(keys[0, 0], k_hat.expand(4, 4))
    expected = C / 8 * norm.float() * 4.5
    score = store.key_scores(Q.view(1, 1, 1, 4))  # from the sign bits, as the score kernel
    torch.testing.assert_close(score, expected.expand(1, 1, 1, 4))


def test_hand_computed_with_an_outlier_channel():
    """One outlier channel per group: channel 2 (norm 6 over the 4 tokens). k_in = [1, -2, 0, 0]:
    S k_in = [1, -2, 0, 0, -1, 0, 3, 0] -> bits 1,0,0,0,0,0,1,0 = 65; k_out = [0, 0, 3, 0]:
    S k_out = [0, 0, 3, 0, 0, 3, 0, 3] -> 0,0,1,0,0,1,0,1 = 164. Norms √14 and 3 (fp16), ‖k_in‖ =
    sqrt(fp16(√14)² - 9). k̂ = √(π/2)/8·‖k_in‖·M_in⊙Sᵀs_in + √(π/2)/8·3·M_out⊙Sᵀs_out with
    Sᵀs_in = [1, -3, ·, -1] (channel 2 masked) and Sᵀs_out = [·, ·, 3, ·]."""
    store = _hand_store(1)
    assert store.outlier_idx.value.flatten().tolist() == [2]
    assert store.sign_in.value[0, 0, :, 0].tolist() == [65] * 4
    assert store.sign_out.value[0, 0, :, 0].tolist() == [164] * 4
    norm = torch.tensor(14.0).sqrt().half().float()
    assert (store.norm_out.value.flatten() / store.norm_shift).tolist() == [3.0] * 4  # held × 2^-e
    n_in = (norm**2 - 9).sqrt()
    k_hat = torch.tensor([C / 8 * n_in, -3 * C / 8 * n_in, C / 8 * 3 * 3, -C / 8 * n_in])
    keys, _ = store.read(torch.float32)
    torch.testing.assert_close(keys[0, 0], k_hat.expand(4, 4))
    torch.testing.assert_close(store.key_scores(Q.view(1, 1, 1, 4))[0, 0, 0], (k_hat @ Q).expand(4))


# ---- the estimator's expectation -------------------------------------------------------------


@pytest.mark.parametrize("outliers", [0, 2])
def test_estimator_is_unbiased_over_random_projections(outliers):
    """Over 3000 i.i.d. Gaussian S (``rotate=false``, m = 32, d = 16), the mean of q·k̂ is q·k within
    4 standard errors, and the standard error is small enough (< 2 % of q·k) that a missing √(π/2)
    (-20 %) or a 1/√m instead of 1/m would fail. Keys with fp16-exact norms (the norm is stored in
    fp16); with outliers the masks are fixed by the data, so both parts are unbiased."""
    d, m, n = 16, 32, 3000
    g = torch.Generator().manual_seed(5)
    k = torch.zeros(4, d)
    k[:, :4] = torch.tensor([4.0, 2.0, 1.0, 2.0])  # ‖k‖ = 5
    k[:, 8:12] = torch.tensor([20.0, -5.0, 2.0, 1.0])  # the two largest are the outliers
    k = k.view(1, 1, 4, d)
    q = k[:, :, :1] / 5 + 0.5 * torch.randn(1, 1, 1, d, generator=g)  # q·k well away from 0
    truth = float((q.view(d) @ k[0, 0, 0]).item())
    spec = f"rotate=false,group=4,buffer=4,dim={m},dim_initial={m},outliers={outliers},outliers_initial={outliers}"
    method = _method(spec)
    est = torch.empty(n)
    for i in range(n):
        method._projections[(d, "cpu")] = (s := projection(d, m, False, g), s)
        store = _store(method, d=d, h_kv=1)
        append_kv(store, k, torch.zeros_like(k))
        est[i] = store.key_scores(q)[0, 0, 0, 0]
    mean, se = est.mean().item(), est.std().item() / math.sqrt(n)
    assert abs(mean - truth) < 4 * se, (mean, truth, se)
    assert 4 * se < 0.08 * abs(truth), (se, truth)


# ---- the official code, transcribed independently ----------------------------------------------


def _official_keys(key: torch.Tensor, proj_dir_score: torch.Tensor, n_out: int, m_o: int, group: int):
    """``QJLKeyQuantizer.build_sketch`` + ``quantize_with_outliers_kernel`` on fp16 keys [B, H, T, D]
    (T a multiple of G): per group the top-``n_out`` channels by L2 norm over its tokens (fp16
    norms), per projection row p: sketched_keys / sketched_outliers summed over inlier / outlier
    channels in fp32, bit = sketch > 0 at bit p % 8 of byte p // 8, outlier bits for p < m_o only;
    outlier norm sqrt(Σ outlier²) in fp32 -> fp16; key norm ``torch.norm`` -> fp16."""
    b, h, t, d = key.shape
    x = key.reshape(b, h, t // group, group, d)
    outlier_indices = x.float().norm(dim=-2).half().topk(n_out, dim=-1).indices.to(torch.uint8)
    rand_prj = proj_dir_score.T  # proj_dir_quant [m, D]
    mask = torch.zeros(b, h, t // group, d)
    for bi in range(b):
        for hi in range(h):
            for n in range(t // group):
                for c in outlier_indices[bi, hi, n].tolist():
                    mask[bi, hi, n, c] = 1.0
    kf = x.float()  # [B, H, N, G, D]
    sk = torch.einsum("bhngd,pd->bhngp", kf * (1 - mask[..., None, :]), rand_prj)
    so = torch.einsum("bhngd,pd->bhngp", kf * mask[..., None, :], rand_prj)
    weights = 2 ** torch.arange(8)
    key_quant = ((sk > 0).long().view(*sk.shape[:-1], -1, 8) * weights).sum(-1).to(torch.uint8)
    key_outlier_quant = ((so[..., :m_o] > 0).long().view(*so.shape[:-1], -1, 8) * weights).sum(-1).to(torch.uint8)
    outlier_norms = (kf * mask[..., None, :]).pow(2).sum(-1).sqrt().half()  # [B, H, N, G]
    key_norm = torch.norm(x.float(), dim=-1).half()  # key_states_norm, in the key dtype
    return key_quant, key_outlier_quant, key_norm, outlier_norms, outlier_indices


def _official_scores(query, key_quant, key_outlier_quant, key_norm, outlier_norm, outlier_indices, proj_dir_score):
    """``calc_gqa_score_kernel``: query [B, H, 1, D] -> scores [B, H, T]. q_sketch = q @ proj_dir_score;
    per group, the outlier query sketch Σ_{c∈out} q_c·proj_dir_score[c, :]; per key
    Σ_p ±(q_sketch − q_out_sketch)_p and Σ_{p<m_o} ±q_out_sketch_p by its bits; score =
    √(π/2)/m·sqrt(‖k‖² − ‖k_out‖²)·inner + √(π/2)/m_o·‖k_out‖·outer."""
    b, h_kv, n, g, _ = key_quant.shape
    h = query.shape[1]
    r = h // h_kv
    d, m = proj_dir_score.shape
    m_o = key_outlier_quant.shape[-1] * 8
    q = query.float()[:, :, 0]  # [B, H, D]
    q_sketch = q @ proj_dir_score  # [B, H, m]
    bits = (key_quant.long()[..., None] >> torch.arange(8)) & 1  # [B, H_kv, N, G, m/8, 8]
    bits = bits.reshape(b, h_kv, n, g, m).float() * 2 - 1
    obits = ((key_outlier_quant.long()[..., None] >> torch.arange(8)) & 1).reshape(b, h_kv, n, g, m_o).float() * 2 - 1
    scores = torch.empty(b, h, n, g)
    for bi in range(b):
        for qh in range(h):
            kh = qh // r
            for ni in range(n):
                q_out = torch.zeros(m)
                for c in outlier_indices[bi, kh, ni].tolist():
                    q_out += q[bi, qh, c] * proj_dir_score[c]
                inner = bits[bi, kh, ni] @ (q_sketch[bi, qh] - q_out)  # [G]
                outer = obits[bi, kh, ni] @ q_out[:m_o]
                norm_o = outlier_norm[bi, kh, ni].float()
                norm_k = (key_norm[bi, kh, ni].float() ** 2 - norm_o**2).sqrt()
                scores[bi, qh, ni] = C / m * norm_k * inner + C / m_o * norm_o * outer
    return scores.reshape(b, h, n * g)


def _official_values(data: torch.Tensor, group: int, bit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``triton_quantize_and_pack_along_last_dim`` in fp16 (min/max per group of channels, scale =
    (mx − mn)/(2^b − 1), (x − mn)/scale, clamp, round) and ``quantization.cu``'s dequantization
    float(scale)·code + float(mn): (dequantized [B, H, T, D], codes [B, H, T, D], scales [B, H, T, D/G])."""
    b, h, t, d = data.shape
    x = data.half().reshape(b, h, t, d // group, group)
    mn, mx = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    scale = (mx - mn) / (2**bit - 1)
    code = ((x - mn) / scale).clamp(0, 2**bit - 1).round()
    deq = (scale.float() * code.float() + mn.float()).reshape(b, h, t, d)
    return deq, code.float().reshape(b, h, t, d), scale.reshape(b, h, t, d // group)


def _heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., [3, 17, 64, 100]] *= 20  # a few heavy channels, as LLM keys have
    return x.half().float()


def test_matches_the_official_key_and_value_quantizers():
    """Keys, values [1, 4, 256, 128] with channels 3, 17, 64, 100 scaled ×20; 16 query heads (GQA 4);
    the official configuration (m = 512, m_o = 128, 8 outliers; G = 32, B = 128; 2-bit values),
    prefill of 256 tokens (keys: all quantized; values: the first 128). Same S for both sides.

    Measured: key sign bits, fp16 norms and outlier indices identical to the transcribed kernel; scores
    q·k̂ (``read``) and from the codes (``key_scores``) against the transcribed score kernel: max |diff|
    1.0e-3 / 1.2e-3 (2.9e-7 / 3.5e-7 of the largest score, fp32 summation order), MSE against the
    exact q·k ratio 1.00000 for both. Values: 0.040 % of the codes differ (26.6 % of the fp16 scales
    are one fp16 step apart: the official code subtracts and divides in fp16, ``harness.quant`` in
    fp32 then rounds the scale to fp16; a code flips where x sits at a half step), max |diff| 16.5
    (one code step in a ×20 channel's group), MSE ratio 1.00006.
    """
    b, h_kv, t, d, h = 1, 4, 256, 128, 16
    keys, values = _heavy_tailed((b, h_kv, t, d), 0), _heavy_tailed((b, h_kv, t, d), 1)
    query = _heavy_tailed((b, h, 1, d), 2)
    method = _method()
    store = _store(method, d=d, h_kv=h_kv)  # layer 0: an initial layer (m = 512, m_o = 128)
    assert (store.m, store.m_o, store.n_out) == (512, 128, 8)
    append_kv(store, keys, values)
    assert store.key_counts == (256, 0) and store.value_counts == (128, 128)
    proj_dir_score = store.S.T.contiguous()  # [D, m]
    kq, koq, kn, on, oi = _official_keys(keys.half(), proj_dir_score, 8, 128, 32)
    n = t // 32
    assert torch.equal(store.sign_in.value.view(b, h_kv, n, 32, -1), kq)
    assert torch.equal(store.sign_out.value.view(b, h_kv, n, 32, -1), koq)
    # held as ‖k‖ · 2^-e: a power of two, so the same fp16 numbers as the official norms
    assert torch.equal((store.norm.value / store.norm_shift).half().view(b, h_kv, n, 32), kn)
    assert torch.equal((store.norm_out.value / store.norm_shift).half().view(b, h_kv, n, 32), on)
    assert torch.equal(store.outlier_idx.value.sort(-1).values, oi.sort(-1).values)

    official = _official_scores(query, kq, koq, kn, on, oi, proj_dir_score)  # [B, H, T]
    read_keys, read_values = store.read(torch.float32)
    qg = query.view(b, h_kv, h // h_kv, d)
    ours_read = (qg @ read_keys.transpose(-1, -2)).reshape(b, h, t)
    ours_codes = store.key_scores(qg).reshape(b, h, t)
    exact = (qg @ keys.transpose(-1, -2)).reshape(b, h, t)
    for ours in (ours_read, ours_codes):
        diff = (ours - official).abs().max() / official.abs().max()
        ratio = ((ours - exact) ** 2).mean() / ((official - exact) ** 2).mean()
        assert diff < 1e-5 and abs(ratio - 1) < 0.01, (diff, ratio)

    v_official, codes, scales = _official_values(values[:, :, :128], 32, 2)
    v_ours, v_true = read_values[:, :, :128], values[:, :, :128]
    diff = (v_ours - v_official).abs()
    ratio = ((v_ours - v_true) ** 2).mean() / ((v_official - v_true) ** 2).mean()
    other_codes = (unpack_bits(store.v_q.q.codes, 2).float() != codes).float().mean()
    other_scales = (store.v_q.q.scale != scales).float().mean()
    assert other_codes < 0.005 and other_scales < 0.5 and diff.max() < 25, (other_codes, other_scales, diff.max())
    assert abs(ratio - 1) < 0.01, ratio
    assert torch.equal(read_values[:, :, 128:], values[:, :, 128:].half().float())  # the fp16 window


# ---- buffers, decode path, accounting ----------------------------------------------------------

SMALL = "group=4,buffer=8,dim=16,outlier_dim=8,outliers=1,initial_layers=0"


@pytest.mark.parametrize(
    "t,keys,values",
    [(0, (0, 0), (0, 0)), (7, (0, 7), (0, 7)), (8, (8, 0), (0, 8)), (21, (16, 5), (13, 8))],
)
def test_prefill_split(t, keys, values):
    """Keys: the first T − T mod B quantized; values: the first T − B (B = 8)."""
    store = _store(_method(SMALL))
    append_kv(store, *fp16_kv(t))
    assert store.key_counts == keys and store.value_counts == values
    k, v = store.read(torch.float32)
    assert k.shape == v.shape == (1, 2, t, 8)


@pytest.mark.parametrize("mode", ["slide", "keep"])
def test_decode_steps(mode):
    """From T = 21 (B = 8). Keys: the residual is quantized when T mod B = 0, before that step's
    attention (``update_sketch`` precedes ``attention_score``). Values (``slide``, llama2_qjl.py): the
    oldest fp16 value is quantized after a step's attention when the window holds B + 1, applied at
    the next append; ``keep`` (llama3_qjl.py): decode values stay fp16."""
    store = _store(_method(f"{SMALL},decode_values={mode}"))
    append_kv(store, *fp16_kv(21))
    slide = [(13, 9), (14, 9), (15, 9), (16, 9), (17, 9)]
    keep = [(13, 9), (13, 10), (13, 11), (13, 12), (13, 13)]
    keys = [(16, 6), (16, 7), (24, 0), (24, 1), (24, 2)]  # T = 22 .. 26; T = 24 flushes the residual
    for step in range(5):
        append_kv(store, *fp16_kv(1, seed=100 + step))
        assert store.key_counts == keys[step], step
        assert store.value_counts == (slide if mode == "slide" else keep)[step], step


def test_streamed_appends_store_what_one_prefill_stores():
    whole, pieces = _store(_method(SMALL)), _store(_method(SMALL))
    k, v = fp16_kv(40)
    append_kv(whole, k, v)
    for a, b in ((0, 13), (13, 14), (14, 31), (31, 40)):
        append_kv(pieces, k[:, :, a:b], v[:, :, a:b])
    assert torch.equal(whole.read(torch.float32)[0], pieces.read(torch.float32)[0])
    assert torch.equal(whole.sign_in.value, pieces.sign_in.value)


def test_decode_attention_from_codes_equals_attention_over_read():
    store = _store(_method(SMALL))
    append_kv(store, *fp16_kv(29, seed=3))
    query = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(4))
    out = store.attend(query, 0.35, None)
    k, v = store.read(torch.float32)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = torch.softmax(query @ k.transpose(-1, -2) * 0.35, dim=-1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_memory_by_hand():
    """B = 1, H_kv = 2, D = 8, G = 4, buffer 8, m = 16, m_o = 8, 1 outlier; T = 21 -> keys 16 quantized
    + 5 fp16, values 13 quantized + 8 fp16. Bytes: sign bits 2·16·(16 + 8)/8 = 96, value codes
    2·13·8·2/8 = 52 -> codes 148; norms 2·16·2·2 = 128, value scale + minimum 2·13·2 groups·2·2 = 208,
    the projection (layer 0 holds it) 16·8·4 = 512 -> scales 848; outlier indices 2·4 groups·1 = 8;
    fp16 keys 2·5·8·2 = 160 + values 2·8·8·2 = 256 -> 416. Payload bits: keys 2·16·24 + values
    2·13·8·2 + fp16 2·13·8·16 = 768 + 416 + 3328 = 4512 over 672 elements."""
    method = _method(SMALL)
    store = _store(method)
    append_kv(store, *fp16_kv(21))
    mem = store.memory()
    assert mem.bytes == {"codes": 148, "scales": 848, "fp_tokens": 416, "outliers": 8, "router": 0}
    assert mem.elements == 672 and mem.payload_bits == 4512
    other = _store(method, layer=1)  # another layer of the class reaches the same S, holds none
    append_kv(other, *fp16_kv(21))
    assert other.memory().bytes["scales"] == 848 - 512 and torch.equal(other.S, store.S)


def test_projection_rows_and_sharing():
    """rotate: each block of d rows of S is √d times an orthonormal set (QR of a Gaussian block);
    the two layer classes get the first and second draws of one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(42)
    general, initial = projection(8, 16, True, g), projection(8, 32, True, g)
    s = _method().projection(False, 8, torch.device("cpu"))
    assert torch.equal(s, general) and torch.equal(_method().projection(True, 8, torch.device("cpu")), initial)
    for i in range(0, 16, 8):
        block = s[i : i + 8]
        torch.testing.assert_close(block @ block.T, 8 * torch.eye(8), atol=1e-4, rtol=0)
    assert signs(torch.tensor([[229]], dtype=torch.uint8)).tolist() == [[1, -1, 1, -1, -1, 1, 1, 1]]
    assert QJLConfig().sizes(True, 64) == (256, 64, 8)


# ---- the fast paths against the computation they replaced -------------------------------------
# A copy of baselines/qjl.py's decode / read / key-quantization code before the fast paths (sign bits
# unpacked through ``unpack_to_float``, Sᵀ[idx] by advanced indexing, one batched matmul over all groups,
# ``pack_bits``): the new code must give the same floats and bytes (torch.equal), so published scores
# cannot move.


def _old_signs(packed: torch.Tensor) -> torch.Tensor:
    return unpack_to_float(packed, 1, torch.float32).mul_(2).sub_(1)


def _old_quantize_keys(store: QJLStore, k: torch.Tensor) -> dict[str, torch.Tensor]:
    b, h, n, d = k.shape
    g = store.cfg.group
    kf = k.to(torch.float16).float()
    S = store.S.to(kf.device)  # noqa: N806
    shift = store.norm_shift
    out = {"norm": (kf.norm(dim=-1, keepdim=True) * shift).half()}
    if store.n_out:
        groups = kf.view(b, h, n // g, g, d)
        norms = groups.norm(dim=-2).half()
        idx = norms.topk(store.n_out, dim=-1).indices
        mask = torch.zeros(b, h, n // g, d, dtype=torch.bool, device=k.device).scatter_(-1, idx, True)
        mask = mask.unsqueeze(-2).expand(b, h, n // g, g, d).reshape(b, h, n, d)
        k_out = kf * mask
        out["idx"] = idx.to(torch.uint8)
        out["norm_out"] = (k_out.norm(dim=-1, keepdim=True) * shift).half()
        out["sign_out"] = pack_bits((k_out @ S[: store.m_o].T) > 0, 1)
        kf = kf * ~mask
    out["sign_in"] = pack_bits((kf @ S.T) > 0, 1)
    return out


def _old_key_estimates(store: QJLStore) -> torch.Tensor | None:
    tq = store.sign_in.n
    if tq == 0:
        return None
    S = store.S  # noqa: N806
    n_in, n_out = store._norms()
    k_hat = (C / store.m) * n_in * (_old_signs(store.sign_in.value) @ S)
    mask = store._masks(tq, k_hat.device)
    if mask is None:
        return k_hat
    out = (C / store.m_o) * n_out * (_old_signs(store.sign_out.value) @ S[: store.m_o])
    return torch.where(mask, out, k_hat)


def _old_read(store: QJLStore, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k_hat = _old_key_estimates(store)
    if k_hat is not None and dtype == torch.float16:
        k_hat = k_hat.clamp(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
    parts = [p.to(dtype) for p in (k_hat, store.k_fp.read(dtype)) if p is not None]
    keys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    values = [p for p in (store.v_q.read(dtype), store.v_fp.read(dtype)) if p is not None]
    return keys, values[0] if len(values) == 1 else torch.cat(values, dim=-2)


def _old_key_scores(store: QJLStore, qg: torch.Tensor) -> torch.Tensor:
    S = store.S  # noqa: N806
    b, h, r, d = qg.shape
    tq, g = store.sign_in.n, store.cfg.group
    n = tq // g
    n_in, n_out = store._norms()
    q_s = qg @ S.T
    sg = _old_signs(store.sign_in.value).view(b, h, n, g, store.m)
    if not store.n_out:
        score = (C / store.m) * n_in * (sg.view(b, h, tq, store.m) @ q_s.transpose(-1, -2))
        return score.transpose(-1, -2)
    idx = store.outlier_idx.value.long()
    q_pick = qg.unsqueeze(2).expand(b, h, n, r, d).gather(-1, idx.unsqueeze(3).expand(b, h, n, r, store.n_out))
    s_pick = S.T[idx]
    q_out_s = q_pick @ s_pick
    inner = sg @ (q_s.unsqueeze(2) - q_out_s).transpose(-1, -2)
    so = _old_signs(store.sign_out.value).view(b, h, n, g, store.m_o)
    outer = so @ q_out_s[..., : store.m_o].transpose(-1, -2)
    score = (C / store.m) * n_in * inner.reshape(b, h, tq, r)
    score = score + (C / store.m_o) * n_out * outer.reshape(b, h, tq, r)
    return score.transpose(-1, -2)


def _old_attend(store: QJLStore, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    b, h, _, d = query.shape
    h_kv = store.info.n_kv_heads
    qg = query.reshape(b, h_kv, h // h_kv, d).float() * scaling
    parts = []
    if store.sign_in.n:
        parts.append(_old_key_scores(store, qg))
    if store.k_fp.length:
        parts.append(qg @ store.k_fp.data.float().transpose(-1, -2))
    p = torch.softmax(masked_scores(torch.cat(parts, dim=-1), mask, h_kv), dim=-1)
    out, start = 0, 0
    for v in (store.v_q.q, store.v_fp.data):
        if v is None:
            continue
        n = v.shape[-2]
        pv = p[..., start : start + n]
        out = out + (mix_from_codes(pv, v) if isinstance(v, QuantizedTensor) else pv @ v.float())
        start += n
    return out.reshape(b, h, 1, d).to(query.dtype)


CHUNK5 = 5 * 4 * 32 * 256 + 4  # CHUNK_BYTES of 5 groups of 32 tokens at m = 256 (10 at m = 128)


@pytest.mark.parametrize("spec,layer", [("", 0), ("", 15), ("outliers=0,outliers_initial=0", 0), ("group=16", 20)])
@pytest.mark.parametrize("chunk,threads", [(None, 1), (CHUNK5, 1), (CHUNK5, 2)])
def test_fast_paths_equal_the_computation_they_replaced(spec, layer, chunk, threads, monkeypatch):
    """Random stores (SmolLM2's head_dim 64, 3 KV heads, 9 query heads, batch 2) of both layer classes,
    keys with heavy channels (the outliers), a prefill of 300 tokens then 90 decode steps (the buffers
    grow past their first tensor, and a residual flush happens mid-way): attend, key_scores, read
    (fp32 and fp16) and the stored codes / memory() equal the old computation's bit for bit, at every
    step checked; with ``chunk`` the per-group products run over several chunks, the last one partial;
    at 1 and 2 torch threads (the profile's)."""
    if chunk is not None:
        monkeypatch.setattr(qjl_module, "CHUNK_BYTES", chunk)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_with_the_old_computation(spec, layer)
    finally:
        torch.set_num_threads(before)


def _compare_with_the_old_computation(spec: str, layer: int) -> None:
    d, h_kv, h, b = 64, 3, 9, 2
    info = ModelInfo("llama", 30, h, h_kv, d, h * d, torch.float32, torch.device("cpu"))
    method = build_method(f"qjl:{spec}" if spec else "qjl")
    new, old = method.new_layer_store(layer, info), method.new_layer_store(layer, info)
    old.quantize_keys = lambda k: _old_quantize_keys(old, k)  # the old key quantizer fills ``old``
    assert (new.m, new.m_o) == ((256, 64) if layer < 15 else (128, 128))
    g = torch.Generator().manual_seed(7)
    keys, values, queries = (torch.randn(b, n, 390, d, generator=g) for n in (h_kv, h_kv, h))
    keys[..., [3, 17, 40, 63]] *= 20  # heavy channels, as LLM keys have
    keys[..., ::5, 11] = 0.0  # exact zeros: sketches of 0 count as -1 on both sides
    append_kv(new, keys[:, :, :300], values[:, :, :300])
    append_kv(old, keys[:, :, :300], values[:, :, :300])
    for t in range(300, 391):
        for name in ("sign_in", "sign_out", "norm", "norm_out", "outlier_idx"):
            a, z = getattr(new, name).value, getattr(old, name).value
            assert (a is None and z is None) or torch.equal(a, z), (name, t)
        assert new.memory() == old.memory()
        if t % 10 == 0 or t == 384:  # 384: the step right after the flush of the residual (T mod 128 = 0)
            q = queries[:, :, t - 1 : t]
            qg = q.reshape(b, h_kv, h // h_kv, d) * 0.125
            assert torch.equal(new.key_scores(qg), _old_key_scores(old, qg)), t
            assert torch.equal(new.attend(q, 0.125, None), _old_attend(old, q, 0.125, None)), t
            for dtype in (torch.float32, torch.float16):
                assert all(torch.equal(x, y) for x, y in zip(new.read(dtype), _old_read(old, dtype), strict=True)), t
        if t < 390:
            append_kv(new, keys[:, :, t : t + 1], values[:, :, t : t + 1])
            append_kv(old, keys[:, :, t : t + 1], values[:, :, t : t + 1])


def test_pack_and_unpack_signs_by_hand():
    """pack_signs / signs against pack_bits / unpack_to_float on every byte value, and by hand."""
    bits = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # [256, 8]: byte b's bits
    assert torch.equal(pack_signs(bits), torch.arange(256, dtype=torch.uint8).unsqueeze(-1))
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(1)) > 0
    assert torch.equal(pack_signs(x), pack_bits(x, 1))
    packed = pack_bits(x, 1)
    assert torch.equal(signs(packed), _old_signs(packed))
    assert torch.equal(signs(packed[:, :, 1:4]), _old_signs(packed[:, :, 1:4]))  # a non-contiguous view
    assert pack_signs(torch.tensor([[True, False, True, False, False, True, True, True]])).tolist() == [[229]]
    assert signs(torch.zeros(2, 0, 4, dtype=torch.uint8)).shape == (2, 0, 32)
