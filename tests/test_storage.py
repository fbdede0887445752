"""Growable token buffers (harness.storage.TokenBuffer) and the sequences built on them."""

from __future__ import annotations

import torch

from harness.quant import quantize
from harness.storage import FullPrecisionSeq, QuantizedSeq, TokenBuffer


def tokens(start: int, n: int) -> torch.Tensor:
    """[1, 1, n, 2] holding token ids start..start+n-1 in both channels."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 2).contiguous()


def test_appends_write_into_spare_capacity():
    buf = TokenBuffer()
    first = tokens(0, 100)
    buf.append(first)
    assert buf.value.data_ptr() == first.data_ptr() and buf.reserved_bytes == 0  # a prefill: no spare
    buf.append(tokens(100, 1))  # grows to 101 + max(64, 101 // 8) = 165 tokens
    assert buf.buf.shape[-2] == 165 and buf.reserved_bytes == 64 * 2 * 4
    storage = buf.buf.data_ptr()
    for t in range(101, 165):
        buf.append(tokens(t, 1))
    assert buf.buf.data_ptr() == storage and buf.reserved_bytes == 0  # 64 appends, no copy
    buf.append(tokens(165, 1))  # full: 166 + max(64, 20) = 230
    assert buf.buf.shape[-2] == 230 and torch.equal(buf.value, tokens(0, 166))


def test_take_front_moves_the_start_and_the_tokens_move_when_needed():
    buf = TokenBuffer()
    buf.append(tokens(0, 8))
    buf.append(tokens(8, 1))  # capacity 9 + 64 = 73
    assert torch.equal(buf.take_front(4), tokens(0, 4)) and torch.equal(buf.value, tokens(4, 5))
    assert buf.reserved_bytes == (73 - 5) * 2 * 4  # the dropped front is spare too
    for t in range(9, 77):  # 68 more: at 69 live tokens from start 4 the buffer is full, so the 70th
        buf.append(tokens(t, 1))  # moves them to a new one of 70 + 64 tokens
    assert buf.buf.shape[-2] == 134 and buf.start == 0 and torch.equal(buf.value, tokens(4, 73))
    buf.reorder(torch.tensor([0]))
    assert buf.reserved_bytes == 0 and torch.equal(buf.value, tokens(4, 73))


def test_sequences_hold_what_concatenation_held():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=g)
    fp, qs, qc = FullPrecisionSeq(), QuantizedSeq(4, 8, axis=-1), QuantizedSeq(2, 8, axis=-2)
    for a, b in ((0, 24), (24, 32), (32, 40)):  # a prefill, then whole groups
        fp.append(x[..., a:b, :])
        qs.append(x[..., a:b, :])
        qc.append(x[..., a:b, :])
    assert torch.equal(fp.data, x.half()) and fp.length == 40
    for seq, axis, bits in ((qs, -1, 4), (qc, -2, 2)):
        parts = [quantize(x[..., a:b, :], bits, 8, axis) for a, b in ((0, 24), (24, 32), (32, 40))]
        assert torch.equal(seq.q.codes, torch.cat([p.codes for p in parts], dim=-2))
        assert torch.equal(seq.q.scale, torch.cat([p.scale for p in parts], dim=-2))
        mem = seq.memory()  # the accounting counts the tokens held; the spare is reported beside
        assert mem.total_bytes == sum(p.code_bytes + p.meta_bytes for p in parts) and mem.reserved_bytes > 0
    # capacity 24 + 8 + 64 = 96 tokens after the second append, 40 held: 56 tokens of [2, 3, ., 16] fp16 spare
    assert fp.memory().total_bytes == x.numel() * 2 and fp.memory().reserved_bytes == 56 * 2 * 3 * 16 * 2


def test_a_large_dropped_front_is_given_back():
    """A 2048-token prefill that keeps a 128-token window (KIVI's residual) holds 128 + 64 tokens of room."""
    buf = TokenBuffer()
    buf.append(tokens(0, 2048))
    assert torch.equal(buf.take_front(1920), tokens(0, 1920))
    assert buf.buf.shape[-2] == 128 + 64 and buf.start == 0 and torch.equal(buf.value, tokens(1920, 128))
    assert buf.reserved_bytes == 64 * 2 * 4
    for t in range(2048, 2048 + 200):  # a decode: one in, one out, as KIVI's value window
        buf.append(tokens(t, 1))
        buf.take_front(1)
        assert buf.buf.shape[-2] <= 128 + 64 + 128 and torch.equal(buf.value, tokens(t - 127, 128))
