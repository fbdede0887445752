"""K/V bit splits on the uniform and KIVI quantizers (``key_bits`` / ``value_bits``; variants
``int-k4v2`` / ``kivi-k4v2``): keys and values held at their own widths, the bytes counted by hand,
the split at equal widths identical to the plain method, and older records' keys unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import append_kv

from harness.interface import MethodSpecError, ModelInfo, build_method

INFO = ModelInfo("llama", 1, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H_kv = 2, D = 8
INFO32 = ModelInfo("llama", 1, 4, 2, 32, 128, torch.float32, torch.device("cpu"))  # D = 32: KIVI's group


def _kv(t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, t, d, generator=g), torch.randn(1, 2, t, d, generator=g)


def _store(spec: str, t: int):
    info = INFO32 if spec.startswith("kivi") else INFO
    store = build_method(spec).new_layer_store(0, info)
    append_kv(store, *_kv(t, info.head_dim))
    return store


def _levels(x: torch.Tensor, per: str) -> int:
    """The most distinct values in one quantization range: per token (last dim) or per channel."""
    x = x[0, 0] if per == "token" else x[0, 0].T  # [rows, values of one range]
    return max(len(torch.unique(row)) for row in x)


def test_older_records_keep_their_keys():
    for spec in ("int4", "int2", "kivi-2", "kivi-4", "kivi:bits=4,group=64,residual=128"):
        opts = build_method(spec).options()
        assert "key_bits" not in opts and "value_bits" not in opts, spec
    assert build_method("int-k4v2").options() == {"bits": 4, "group": 0, "symmetric": False, "key_bits": 4,
                                                  "value_bits": 2}  # fmt: skip
    assert build_method("kivi:key_bits=4,value_bits=2").options()["value_bits"] == 2


def test_uniform_k4v2_holds_4_bit_keys_and_2_bit_values():
    t = 16
    store = _store("int:key_bits=4,value_bits=2", t)
    k, v = store.read(torch.float32)  # [1, 2, 16, 8]
    assert _levels(k, "token") > 4 and _levels(k, "token") <= 16  # 4-bit keys: up to 16 levels per token
    assert _levels(v, "token") <= 4  # 2-bit values
    m = store.memory()
    # codes: 2 heads x 16 tokens x 8 channels x (4 + 2) bits; scales: fp16 scale + min per token per head, K and V
    assert m.bytes["codes"] == 2 * t * 8 * (4 + 2) // 8
    assert m.bytes["scales"] == 2 * (2 * t * 2 * 2)
    assert m.nominal_bits == pytest.approx(3.0)
    assert m.effective_bits == pytest.approx(3.0 + 32 / 8)  # fp16 scale + min (32 bits) per 8 elements


def test_split_at_equal_widths_is_the_plain_method():
    for plain, split in (("int4", "int:key_bits=4,value_bits=4"), ("kivi-2", "kivi:key_bits=2,value_bits=2")):
        a, b = _store(plain, 200), _store(split, 200)
        for x, y in zip(a.read(torch.float32), b.read(torch.float32), strict=True):
            assert torch.equal(x, y)
        assert a.memory().as_dict() == b.memory().as_dict()
    k4, _ = _store("int4", 16).read(torch.float32)
    k, v = _store("int-k4v2", 16).read(torch.float32)
    _, v2 = _store("int2", 16).read(torch.float32)
    assert torch.equal(k, k4) and torch.equal(v, v2)  # each half equals the plain method at its width


def test_kivi_k4v2_keys_per_channel_at_4_bits_values_per_token_at_2():
    store = _store("kivi-k4v2", 128 + 32)  # R = 128, G = 32: keys T - T mod R = 128, values T - R = 32
    (kq, kf), (vq, vf) = store.key_counts, store.value_counts
    assert (kq, kf, vq, vf) == (128, 32, 32, 128)
    k, v = store.read(torch.float32)
    assert _levels(k[..., :32, :], "channel") <= 16 and _levels(k[..., :32, :], "channel") > 4
    assert _levels(v[..., :32, :], "token") <= 4
    m = store.memory()
    assert m.bytes["codes"] == 2 * 32 * (128 * 4 + 32 * 2) // 8  # 2 heads x 32 channels
    assert m.bytes["fp_tokens"] == 2 * 32 * (32 + 128) * 2  # fp16 key buffer and value window


def test_bad_split_is_one_line():
    with pytest.raises(MethodSpecError, match="key_bits=3"):
        build_method("int:key_bits=3")
    with pytest.raises(MethodSpecError, match="value_bits=16"):
        build_method("kivi:value_bits=16")
