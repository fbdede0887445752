"""Quantizer properties and hand-computed values (harness/quant.py)."""

import pytest
import torch

from harness.quant import QuantizedTensor, fake_quantize, pack_bits, quantize, unpack_bits, unpack_planes


def test_unpack_planes_by_hand():
    # 2-bit codes (0, 1, 2, 3) | (3, 3, 0, 1) packed little-end first: bytes 0b11100100, 0b01001111
    packed = pack_bits(torch.tensor([[0, 1, 2, 3, 3, 3, 0, 1]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[0b11100100, 0b01001111]]
    # plane i holds the i-th code of each byte: [P, T, m] = [4, 1, 2]
    assert unpack_planes(packed, 2, torch.float32).tolist() == [[[0, 3]], [[1, 3]], [[2, 0]], [[3, 1]]]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unpack_planes_regroups_the_codes(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    planes = unpack_planes(pack_bits(codes, bits), bits, torch.float32)  # [2, 3, P, 5, 64 / P]
    per = 8 // bits
    assert planes.shape == (2, 3, per, 5, 64 // per)
    for i in range(per):  # channel P·j + i at [.., i, t, j]
        assert torch.equal(planes[:, :, i], codes[..., i::per].float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_pack_layout_by_hand():
    # 2-bit codes [1, 2, 3, 0] -> 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 57
    assert pack_bits(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[57]]
    # 4-bit codes [15, 1] -> 15 | 1<<4 = 31
    assert pack_bits(torch.tensor([[15, 1]]), 4).tolist() == [[31]]


def test_unsupported_bits_and_bad_groups():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(4, 8), 5, 8)
    with pytest.raises(ValueError, match="group"):
        quantize(torch.zeros(4, 8), 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        pack_bits(torch.zeros(1, 3, dtype=torch.uint8), 2)


def test_asymmetric_by_hand():
    # one group [0, 1, 2, 3] at 2 bits: min 0, scale 1, codes 0..3, exact reconstruction
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q = quantize(x, 2, 4)
    assert q.scale.item() == 1.0 and q.zero.item() == 0.0
    assert unpack_bits(q.codes, 2).tolist() == [[0, 1, 2, 3]]
    assert torch.equal(q.dequantize(), x)
    # [0, 0.4, 0.6, 3] -> s = 1: codes round(0.4)=0, round(0.6)=1
    q = quantize(torch.tensor([[0.0, 0.4, 0.6, 3.0]]), 2, 4)
    assert unpack_bits(q.codes, 2).tolist() == [[0, 0, 1, 3]]


def test_round_half_to_even():
    # [0, 0.5, 1.5, 3]: s = 1; 0.5 -> 0 and 1.5 -> 2 (half to even, like torch.round)
    q = quantize(torch.tensor([[0.0, 0.5, 1.5, 3.0]]), 2, 4)
    assert unpack_bits(q.codes, 2).tolist() == [[0, 0, 2, 3]]


def test_symmetric_by_hand():
    # 4-bit symmetric: qmax = 7, s = 7/7 = 1; values round to nearest integer in [-7, 7]
    x = torch.tensor([[-7.0, -2.4, 0.0, 3.6, 7.0, 1.0, 2.0, 5.5]])
    q = quantize(x, 4, 8, symmetric=True)
    assert q.zero is None and q.scale.item() == 1.0
    assert q.dequantize().tolist() == [[-7.0, -2.0, 0.0, 4.0, 7.0, 1.0, 2.0, 6.0]]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_error_at_most_half_a_step(bits, axis, symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 32, generator=g) * 3 + 1
    q = quantize(x, bits, 16, axis=axis, symmetric=symmetric)
    err = (q.dequantize() - x).abs()
    # scale broadcast back to every element of its group
    s = q.scale.float().repeat_interleave(16, dim=axis)
    assert torch.all(err <= s / 2 * (1 + 1e-2) + 1e-4)


def test_groups_along_tokens_use_per_channel_ranges():
    # keys per channel: [B=1, H=1, T=4, D=4]; ranges 0..3, constant 5, 0..6, constant -1
    t = torch.arange(4.0)
    x = torch.stack([t, torch.full((4,), 5.0), 2 * t, torch.full((4,), -1.0)], dim=-1).view(1, 1, 4, 4)
    q = quantize(x, 2, 4, axis=-2)
    assert q.scale.shape == (1, 1, 1, 4)
    assert q.scale.flatten().tolist() == [1.0, 0.0, 2.0, 0.0]
    assert q.zero.flatten().tolist() == [0.0, 5.0, 0.0, -1.0]
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_group_exact_and_no_nan(bits):
    x = torch.full((2, 4, 16), 0.3125)  # fp16-representable
    q = quantize(x, bits, 16)
    d = q.dequantize()
    assert not torch.isnan(d).any()
    assert torch.equal(d, x)


def test_fp16_storage_and_byte_counts():
    x = torch.randn(1, 2, 8, 16)
    q = quantize(x, 4, 16)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert q.code_bytes == 1 * 2 * 8 * 16 * 4 // 8
    assert q.meta_bytes == 2 * (1 * 2 * 8) * 2
    assert q.numel == x.numel()


def test_cat_along_tokens_matches_whole():
    x = torch.randn(1, 2, 8, 16)
    whole = quantize(x, 4, 16, axis=-1)
    parts = QuantizedTensor.cat([quantize(x[..., :3, :], 4, 16), quantize(x[..., 3:, :], 4, 16)], dim=-2)
    assert torch.equal(whole.dequantize(), parts.dequantize())


def test_fewer_bits_more_error_on_real_kv(stories_kv):
    keys, values = stories_kv
    for x in (keys, values):
        errs = [(fake_quantize(x, b, x.shape[-1]) - x).pow(2).mean().item() for b in (8, 4, 2)]
        assert errs[0] < errs[1] < errs[2], errs


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpack_to_float_equals_unpack_then_convert(bits, dtype):
    from harness.quant import unpack_to_float

    packed = torch.arange(256, dtype=torch.uint8).reshape(2, 2, 64)  # every byte value
    for offset in (0, 2 ** (bits - 1)):
        want = unpack_bits(packed, bits).to(dtype) - offset
        got = unpack_to_float(packed, bits, dtype, offset)
        assert got.dtype == dtype and torch.equal(got, want)
    assert unpack_to_float(packed[:, :, :0], bits, dtype).shape == (2, 2, 0)


@pytest.mark.parametrize("axis,group", [(-2, 4), (-1, 8)])
def test_dequantize_into_a_slice_and_read_tokens(axis, group):
    from harness.storage import FullPrecisionSeq, QuantizedSeq, read_tokens

    x = torch.randn(2, 3, 12, 16)
    q = quantize(x[..., :8, :], 4, group, axis)
    out = torch.full((2, 3, 12, 16), float("nan"))
    q.dequantize(torch.float32, out=out[..., 2:10, :])
    assert torch.equal(out[..., 2:10, :], q.dequantize(torch.float32)) and out[..., :2, :].isnan().all()
    seq_q, seq_fp = QuantizedSeq(4, group, axis), FullPrecisionSeq()
    seq_q.append(x[..., :8, :])
    seq_fp.append(x[..., 8:, :])
    got = read_tokens([seq_q, seq_fp], torch.float32)
    assert torch.equal(got, torch.cat([seq_q.read(torch.float32), seq_fp.read(torch.float32)], dim=-2))
    assert read_tokens([QuantizedSeq(4, group, axis)], torch.float32) is None
