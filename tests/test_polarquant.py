"""PolarQuant (baselines/polarquant.py, Wu et al., arXiv 2502.00527) against hand-computed values and an
independent transcription of the official quantizer (``ericshwu/PolarQuant`` at 7fc65d8,
``models/modeling_llama_polar.py::quantize_and_pack_nbit`` and the reconstruction in
``models/kernel4group.py``'s ``__main__`` check)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import append_kv, fp16_kv

from baselines.polarquant import PolarQuantConfig, PolarQuantStore, polar_dequantize, polar_quantize
from harness.from_codes import masked_scores, mix_from_codes
from harness.integration import apply_rope
from harness.interface import MethodSpecError, ModelInfo, build_method, method_names
from harness.quant import unpack_codes
from harness.storage import held_parts

G, R = 4, 8
INFO = ModelInfo("llama", 1, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H_kv = 2, D = 8, 4 pairs


def _store(info: ModelInfo = INFO, **options) -> PolarQuantStore:
    return PolarQuantStore(0, info, PolarQuantConfig(**{"group": G, "residual": R, **options}))


def _rope(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Llama's rotate_half RoPE (base 10000) on x [B, H, T, D] at positions start, start + 1, ..."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, T, D]
    return apply_rope(x.double(), emb.cos(), emb.sin()).float()


def test_registered_variants_and_validation():
    assert {"polarquant", "polarquant-33", "polarquant-v4"} <= set(method_names())
    c = build_method("polarquant").config
    assert (c.rbits, c.tbits, c.group, c.residual, c.value_bits, c.index) == (4, 4, 128, 128, 16, "packed")
    assert (build_method("polarquant-33").config.rbits, build_method("polarquant-33").config.tbits) == (3, 3)
    assert build_method("polarquant-v4").config.value_bits == 4
    assert build_method("polarquant:group_size=64,residual_length=128").config.group == 64  # the code's names
    with pytest.raises(MethodSpecError, match="multiple of group"):
        build_method("polarquant:group=32,residual=48")
    with pytest.raises(MethodSpecError, match="rbits"):
        build_method("polarquant:rbits=5")
    with pytest.raises(MethodSpecError, match="index=byte"):
        build_method("polarquant:rbits=8,tbits=2,index=byte")
    build_method("polarquant:rbits=3,tbits=3,index=byte")  # 6 bits in a byte, as the kernel holds them
    with pytest.raises(MethodSpecError, match="bit-packed"):  # 4 pairs × 3 bits is not whole bytes
        build_method("polarquant-33").check_model(INFO)
    with pytest.raises(MethodSpecError, match="value_group"):
        build_method("polarquant-v4:value_group=3").check_model(INFO)


def test_hand_computed_codes_and_reconstruction():
    """One pair (D = 2), G = 4 tokens, 2-bit radius and angle.

    tokens (x, y): (3, 4), (1, 0), (0, −2), (−3, 0)
    radius: 5, 1, 2, 3 -> min 1, step (5 − 1)/4 = 1 -> floor codes 4→3 (clamped), 0, 1, 2;
            r̂ = 1 + (c + ½)·1 = 4.5, 1.5, 2.5, 3.5
    angle:  atan2(4, 3) = 0.9273, 0, atan2(−2, 0) = −π/2 -> 3π/2 (moved to [0, 2π)), π
            -> min 0, step 3π/2 / 4 = 1.1781 (stored fp16: 1.177734375) ->
            floor codes 0.79→0, 0, 4.00→3 (clamped), 2.67→2; φ̂ = (c + ½)·step.
    """
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0], [-3.0, 0.0]]).view(1, 1, 4, 2)
    cr, ct, meta = polar_quantize(x, rbits=2, tbits=2, group=4)
    assert cr.flatten().tolist() == [3, 0, 1, 2]
    assert ct.flatten().tolist() == [0, 0, 3, 2]
    step = torch.tensor(3 * math.pi / 8).half()
    assert step.item() == 1.177734375
    assert meta.flatten().tolist() == [1.0, 1.0, 0.0, step.item()]  # r_min, r_step, t_min, t_step
    r_hat = torch.tensor([4.5, 1.5, 2.5, 3.5])
    phi_hat = (torch.tensor([0, 0, 3, 2]) + 0.5) * step.float()
    expected = torch.stack([r_hat * phi_hat.cos(), r_hat * phi_hat.sin()], dim=-1).view(1, 1, 4, 2)
    torch.testing.assert_close(polar_dequantize(cr, ct, meta, 4), expected, rtol=0, atol=1e-6)
    # (3, 4) with 4-bit radius / 4-bit angle in a group with (0, 0): r 0 and 5 -> step 5/16, codes 0 and 15
    # (floor(16) clamped); angle atan2(4, 3) vs 0 -> step 0.9273/16 (fp16 0.05795), codes 0 and 15
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    cr, ct, meta = polar_quantize(x, 4, 4, 2)
    assert cr.flatten().tolist() == [15, 0] and ct.flatten().tolist() == [15, 0]
    t_step = torch.tensor(math.atan2(4, 3) / 16).half().float()
    assert meta.flatten().tolist() == [0.0, 0.3125, 0.0, t_step.item()]
    k = polar_dequantize(cr, ct, meta, 2)[0, 0, 0]  # r̂ = 15.5 · 5/16, φ̂ = 15.5 · step
    torch.testing.assert_close(k, 4.84375 * torch.stack([(15.5 * t_step).cos(), (15.5 * t_step).sin()]))


def test_pairs_are_the_channels_rope_rotates_together():
    """Pair i = channels (i, i + D/2) (rotate_half): RoPE at any position leaves every pair's radius
    alone, so the radius codes and ranges of a group do not move, while the angles do."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 8, 16, generator=g)
    k[..., 3] *= 20  # an outlier channel: in one coordinate of its pair only
    a, b = _rope(k, 0), _rope(k, 1000)
    cr_a, ct_a, m_a = polar_quantize(a, 4, 4, 8)
    cr_b, ct_b, m_b = polar_quantize(b, 4, 4, 8)
    assert torch.equal(cr_a, cr_b)
    torch.testing.assert_close(m_a[..., :2, :], m_b[..., :2, :], rtol=1e-3, atol=0)
    assert not torch.equal(ct_a, ct_b)

    # adjacent channels (2i, 2i + 1) are not what RoPE rotates: their radius changes
    def adjacent(x: torch.Tensor) -> torch.Tensor:  # channels 0, 2, .., 14, 1, 3, ..: pairs (2i, 2i + 1)
        return x.view(1, 2, 8, 8, 2).transpose(-1, -2).reshape(1, 2, 8, 16)

    assert not torch.equal(polar_quantize(adjacent(a), 4, 4, 8)[0], polar_quantize(adjacent(b), 4, 4, 8)[0])


def _official(keys: torch.Tensor, rbits: int, tbits: int, group: int) -> tuple[torch.Tensor, ...]:
    """The official quantizer and reconstruction, transcribed independently in fp32 (the code runs them
    in the model's dtype): view [B, N, L/G, G, 2, D/2]; angle atan2(second half, first half) moved to
    [0, 2π); radius the norm over the pair; per (group, pair) min and step (max − min) / 2^b; codes
    clamp(floor((v − min) / step), 0, 2^b − 1); midpoints min + (code + ½)·step; keys stacked back as
    [r cos φ | r sin φ]. Returns (radius codes, angle codes, reconstructed keys [B, N, L, D])."""
    b, n, length, d = keys.shape
    ks = keys.view(b, n, length // group, group, 2, d // 2)
    phi = torch.atan2(ks[:, :, :, :, 1, :], ks[:, :, :, :, 0, :])
    phi = torch.where(phi < 0, phi + 2 * math.pi, phi)
    tmx, tmn = phi.max(-2, keepdim=True)[0], phi.min(-2, keepdim=True)[0]
    tscale = (tmx - tmn) / (2**tbits)
    theta = torch.clamp(torch.floor((phi - tmn) / tscale), 0, 2**tbits - 1)
    radii = torch.norm(ks, p=2, dim=-2)
    rmx, rmn = radii.max(-2, keepdim=True)[0], radii.min(-2, keepdim=True)[0]
    rscale = (rmx - rmn) / (2**rbits)
    rho = torch.clamp(torch.floor((radii - rmn) / rscale), 0, 2**rbits - 1)
    phi_hat = theta * tscale + 0.5 * tscale + tmn
    r_hat = rho * rscale + 0.5 * rscale + rmn
    recon = torch.stack([r_hat * phi_hat.cos(), r_hat * phi_hat.sin()], dim=-2).reshape(b, n, length, d)
    return rho.reshape(b, n, length, d // 2), theta.reshape(b, n, length, d // 2), recon


def _realistic_keys(seed: int = 0) -> torch.Tensor:
    """Post-RoPE keys [1, 3, 256, 64]: Student-t (ν = 4) noise, channels 5, 17 and 40 scaled × 20 (each
    in one coordinate of its pair), a per-channel offset, RoPE at positions 0..255; fp16-representable."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(2, 1, 3, 256, 64, generator=g).clamp_min(1e-6)
    chi2 = -2 * torch.log(u[0] * u[1])  # χ² with 4 degrees of freedom
    k = torch.randn(1, 3, 256, 64, generator=g) / torch.sqrt(chi2 / 4)  # Student-t, ν = 4
    k = k.clamp(-30, 30) + torch.randn(1, 1, 1, 64, generator=g)
    k[..., [5, 17, 40]] *= 20
    return _rope(k).half().float()


@pytest.mark.parametrize("bits", [(4, 4), (3, 3)])
def test_quantizer_matches_the_official_transcription(bits):
    """The store (prefill of 256 tokens, G = R = 128: everything quantized) against ``_official`` on
    realistic keys [1, 3, 256, 64] with heavy-tailed channels. The only difference is where min and step
    live: fp16 here (codes computed against the stored values), fp32 in the transcription, so a value
    within an fp16 rounding of a bin edge may land one bin over. Measured (seed 0):

    * 4/4: codes differ by at most 1 step (0.057 % of radius codes, 0.138 % of angle codes); key MSE
      against the input, ours / official: 1.0001;
    * 3/3: at most 1 step (0.028 % radius, 0.073 % angle); MSE ratio 1.0001.
    """
    rbits, tbits = bits
    keys = _realistic_keys()
    info = ModelInfo("llama", 1, 9, 3, 64, 576, torch.float32, torch.device("cpu"))
    store = _store(info, group=128, residual=128, rbits=rbits, tbits=tbits)
    append_kv(store, keys, keys.clone())
    assert store.key_counts == (256, 0)
    rho, theta, ref = _official(keys, rbits, tbits, 128)
    cr, ct, _ = store.k_q.unpacked()
    for ours, theirs in ((cr, rho), (ct, theta)):
        diff = (ours.float() - theirs).abs()
        assert diff.max() <= 1
        assert (diff > 0).float().mean() < 5e-3
    got = store.read(torch.float32)[0]
    ratio = ((got - keys) ** 2).mean() / ((ref - keys) ** 2).mean()
    assert abs(ratio.item() - 1) < 0.01, ratio.item()


# (T, (quantized keys, fp16 keys)) with G = 4, R = 8: the first T - T % R keys quantized
PREFILL = [(0, (0, 0)), (R - 1, (0, 7)), (R, (8, 0)), (2 * R + 5, (16, 5))]


@pytest.mark.parametrize("value_bits", [16, 4])
@pytest.mark.parametrize("t,keys", PREFILL)
def test_prefill_split(t, keys, value_bits):
    store = _store(value_bits=value_bits)
    k, v = fp16_kv(t)
    append_kv(store, k, v)
    assert store.key_counts == keys
    assert store.value_counts == (keys if value_bits < 16 else (0, t))
    rk, rv = store.read(torch.float32)
    assert rk.shape == rv.shape == (1, 2, t, 8)
    if keys[1]:
        assert torch.equal(rk[..., keys[0] :, :], k[..., keys[0] :, :])  # the fp16 window, exact


def test_decode_flushes_the_whole_buffer_when_it_reaches_r():
    """From T = 21 (16 quantized + 5 fp16): the code appends each new key to the fp16 buffer, attends,
    then quantizes the buffer once it holds R = 8 keys; the store applies that at the next append, so
    after each append it holds what that step's attention saw. Values (4-bit) follow the same split."""
    store = _store(value_bits=4)
    append_kv(store, *fp16_kv(21))
    expected = [(16, 6), (16, 7), (16, 8), (24, 1), (24, 2)]
    for step, keys in enumerate(expected):
        append_kv(store, *fp16_kv(1, seed=100 + step))
        assert store.key_counts == store.value_counts == keys, step
        assert store.read(torch.float32)[0].shape[-2] == 22 + step


@pytest.mark.parametrize("index", ["packed", "byte"])
@pytest.mark.parametrize("value_bits", [16, 4, 2])
def test_lookup_table_decode_equals_attention_over_read_keys(value_bits, index):
    """``attend`` (angle / radius lookup tables per query head, group and pair) equals softmax
    attention over ``read``'s reconstructed K/V, with GQA (4 query heads on 2 KV heads), a bool mask and
    an additive mask, across a flush of the key buffer."""
    info = ModelInfo("llama", 1, 4, 2, 16, 64, torch.float32, torch.device("cpu"))
    store = _store(info, value_bits=value_bits, index=index, rbits=3, tbits=3)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 19, 16, generator=g), torch.randn(2, 2, 19, 16, generator=g)
    append_kv(store, k, v)
    for step in range(7):
        append_kv(store, torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g))
        t = store.seq_len
        kk, vv = store.read(torch.float32)
        q = torch.randn(2, 4, 1, 16, generator=g)
        bool_mask = torch.ones(2, 1, 1, t, dtype=torch.bool)
        bool_mask[0, ..., :3] = False
        for mask in (None, bool_mask, torch.where(bool_mask, 0.0, -1e9)):
            out = store.attend(q, 0.25, mask)
            scores = q.view(2, 2, 2, 16) @ kk.transpose(-1, -2) * 0.25  # [B, H_kv, R, T]
            if mask is not None:
                scores = scores.masked_fill(~bool_mask.view(2, 1, 1, t), float("-inf"))
            ref = (torch.softmax(scores, -1) @ vv).view(2, 4, 1, 16)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert store.key_counts == (24, 2)
    # the tables alone: q·k̂ from the codes equals the matmul with the reconstructed keys
    qg = torch.randn(2, 2, 2, 16, generator=g)
    torch.testing.assert_close(store.k_q.scores(qg), qg @ store.k_q.read(torch.float32).transpose(-1, -2))


def test_memory_by_hand():
    """B = 1, H_kv = 2, D = 8 (4 pairs), G = 4, R = 8, a 21-token prefill: 16 keys quantized, 5 fp16.

    4/4 bits, values fp16: key codes 16·2·4 pairs·1 byte = 128; min/step 4 groups·2 heads·4 numbers·
    4 pairs·2 bytes = 256; fp16 keys 5·2·8·2 = 160, values 21·2·8·2 = 672 (fp_tokens 832); total 1216.
    Payload: 256 key elements at 4 bits + (80 + 336) elements at 16 = 7680 bits over 672 elements.
    2/2 bits: codes 16·2·(1 byte radius + 1 byte angle for 4 pairs) = 64; total 1152.
    4/4 with 4-bit values (16 quantized, 5 fp16): value codes 16·2·8·½ = 128, their fp16 scale and zero
    per token (group = head_dim) 16·2·2·2 = 128, fp16 window 5·2·8·2 = 160: total 256 + 384 + 320 = 960.
    """
    store = _store()
    append_kv(store, *fp16_kv(21))
    m = store.memory()
    assert m.bytes == {"codes": 128, "scales": 256, "fp_tokens": 832, "outliers": 0, "router": 0}
    assert m.total_bytes == 1216 and m.elements == 672
    assert m.payload_bits == 256 * 4 + 416 * 16 and (m.quantized_elements, m.fp_elements) == (256, 416)
    store = _store(rbits=2, tbits=2)
    append_kv(store, *fp16_kv(21))
    assert store.memory().bytes["codes"] == 64 and store.memory().total_bytes == 1152
    store = _store(value_bits=4)
    append_kv(store, *fp16_kv(21))
    m = store.memory()
    assert m.bytes == {"codes": 128 + 128, "scales": 256 + 128, "fp_tokens": 320, "outliers": 0, "router": 0}
    assert m.total_bytes == 960
    store = _store(rbits=3, tbits=3, index="byte")  # the kernel's layout: a byte per pair even at 3 + 3 bits
    append_kv(store, *fp16_kv(21))
    assert store.memory().bytes["codes"] == 128 and store.memory().payload_bits == 256 * 4 + 416 * 16


def _old_codes(seq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(radius codes, angle codes) int64 [B, H, T, P] and meta [B, H, T/G, 4, P], unpacked as the code at
    commit dbd5379 did (``unpack_codes``, or the byte's two fields)."""
    codes, meta = seq.codes.value, seq.meta.value
    p = meta.shape[-1] // 4
    if seq.index == "byte":
        cr, ct = codes >> seq.tbits, codes & (2**seq.tbits - 1)
    else:
        nr = p * seq.rbits // 8
        cr, ct = unpack_codes(codes[..., :nr], seq.rbits), unpack_codes(codes[..., nr:], seq.tbits)
    return cr.long(), ct.long(), meta.unflatten(-1, (4, p))


def _old_scores(seq, qg: torch.Tensor) -> torch.Tensor:
    """``PolarSeq.scores`` as it was before the decode path was sped up (commit dbd5379), kept verbatim
    (codes unpacked with ``unpack_codes`` and widened, flat indices added in int64, a new product tensor)."""
    cr, ct, meta = _old_codes(seq)
    b, h, t, p = cr.shape
    r, g, ng, dt = qg.shape[2], seq.group, t // seq.group, qg.dtype
    lt, lr = 2**seq.tbits, 2**seq.rbits
    m = meta.to(dt)
    mid_t = torch.arange(lt, dtype=dt, device=qg.device) + 0.5
    mid_r = torch.arange(lr, dtype=dt, device=qg.device) + 0.5
    phi = m[:, :, :, 2, :, None] + mid_t * m[:, :, :, 3, :, None]
    qx, qy = qg[..., :p, None], qg[..., p:, None]
    lut = qx.unsqueeze(3) * torch.cos(phi).unsqueeze(2) + qy.unsqueeze(3) * torch.sin(phi).unsqueeze(2)
    rad = m[:, :, :, 0, :, None] + mid_r * m[:, :, :, 1, :, None]
    pair = torch.arange(p, device=qg.device)
    it = (pair * lt + ct).view(b, h, 1, ng, g * p).expand(b, h, r, ng, g * p)
    angle = torch.gather(lut.reshape(b, h, r, ng, p * lt), -1, it)
    radius = torch.gather(rad.reshape(b, h, ng, p * lr), -1, (pair * lr + cr).view(b, h, ng, g * p))
    out = (angle * radius.unsqueeze(2)).view(b, h, r, ng, g, p).sum(-1)
    return out.reshape(b, h, r, t)


def _old_attend(store: PolarQuantStore, query: torch.Tensor, scaling: float, mask) -> torch.Tensor:
    """``PolarQuantStore.attend`` as it was at commit dbd5379, on ``_old_scores``."""
    b, h, _, d = query.shape
    hk = store.info.n_kv_heads
    half = query.dtype in (torch.float16, torch.bfloat16)
    dt = torch.float32 if half and query.device.type == "cpu" else query.dtype
    qg = query.reshape(b, hk, h // hk, d).to(dt) * scaling
    parts = []
    if store.k_q.length:
        parts.append(_old_scores(store.k_q, qg))
    if store.k_fp.length:
        parts.append(torch.matmul(qg, store.k_fp.data.to(dt).transpose(-1, -2)))
    p = torch.softmax(masked_scores(torch.cat(parts, dim=-1), mask, hk), dim=-1)
    out, start = None, 0
    for v in held_parts([s for s in (store.v_q, store.v_fp) if s is not None]):
        n = v.shape[-2]
        pv = p[..., start : start + n]
        o = mix_from_codes(pv, v) if not isinstance(v, torch.Tensor) else torch.matmul(pv, v.to(dt))
        out = o if out is None else out + o
        start += n
    return out.reshape(b, h, 1, d).to(query.dtype)


def _old_read_keys(store: PolarQuantStore) -> torch.Tensor:
    """The quantized keys as ``read`` reconstructed them at commit dbd5379 (``unpack_codes``, then
    ``polar_dequantize``)."""
    return polar_dequantize(*_old_codes(store.k_q), store.k_q.group)


# (head_dim, rbits, tbits, index, value_bits, group, residual, batch, prefill tokens)
BIT_IDENTICAL = [
    (16, 4, 4, "packed", 16, G, R, 2, 19),
    (16, 3, 3, "packed", 4, G, R, 2, 21),
    (16, 2, 4, "packed", 2, G, R, 1, 16),
    (16, 8, 2, "packed", 16, G, R, 1, 23),
    (16, 3, 3, "byte", 16, G, R, 2, 19),
    (16, 4, 4, "byte", 4, G, R, 1, 17),
    (64, 4, 4, "packed", 16, 128, 128, 1, 1100),  # SmolLM2's head_dim and the code's G = R = 128
    (64, 3, 3, "packed", 16, 128, 128, 1, 600),
]


@pytest.mark.parametrize("d,rbits,tbits,index,value_bits,group,residual,batch,t", BIT_IDENTICAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_is_bit_identical_to_the_old_code(
    d, rbits, tbits, index, value_bits, group, residual, batch, t, dtype
):
    """The sped-up ``attend`` (codes unpacked into an int16 index buffer, widened once, products in place) gives
    exactly (``torch.equal``) what the code at commit dbd5379 gave, on random stores across flushes of
    the key buffer, with GQA and masks; ``read`` and ``memory`` too (published numbers must not move)."""
    info = ModelInfo("llama", 1, 2 * 3, 3, d, 3 * d, torch.float32, torch.device("cpu"))
    store = _store(info, rbits=rbits, tbits=tbits, index=index, value_bits=value_bits, group=group, residual=residual)
    g = torch.Generator().manual_seed(rbits * 10 + tbits + d)
    k = torch.randn(batch, 3, t, d, generator=g) * torch.rand(1, 1, 1, d, generator=g) * 4
    append_kv(store, k, torch.randn(batch, 3, t, d, generator=g))
    for step in range(group + 3 if group == G else 3):
        append_kv(store, torch.randn(batch, 3, 1, d, generator=g), torch.randn(batch, 3, 1, d, generator=g))
        q = (torch.randn(batch, 6, 1, d, generator=g) * 3).to(dtype)
        mask = torch.rand(batch, 1, 1, store.seq_len, generator=g) > 0.2
        for m in (None, mask, torch.where(mask, 0.0, -1e9)):
            assert torch.equal(store.attend(q, 0.125, m), _old_attend(store, q, 0.125, m)), (step, m is None)
    assert store.key_counts[0] > 0
    nq = store.key_counts[0]
    assert torch.equal(store.read(torch.float32)[0][..., :nq, :], _old_read_keys(store))
    qg = torch.randn(batch, 3, 2, d, generator=g)
    assert torch.equal(store.k_q.scores(qg), _old_scores(store.k_q, qg))
    m = store.memory()
    assert m.bytes["codes"] == batch * 3 * nq * (d // 2) * store.k_q.code_bits // 8 + (
        0 if value_bits == 16 else batch * 3 * store.value_counts[0] * d * value_bits // 8
    )
