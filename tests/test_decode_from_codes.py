"""Decode attention straight from the codes (harness.from_codes.decode_attention_over) equals
dequantize-then-attend, alone and inside the model's decode steps."""

from __future__ import annotations

import pytest
import torch

from harness.from_codes import decode_attention_over, mix_from_codes, scores_from_codes
from harness.integration import AttachedMethod, forward
from harness.interface import build_method
from harness.models import tiny_random_model
from harness.quant import quantize

LAYOUTS = [  # (key axis, key group, value axis, value group, symmetric)
    (-2, 4, -1, 8, False),  # KIVI: keys per channel, values per token
    (-1, 16, -1, 16, False),  # uniform INT-N: one range per token per head
    (-1, 4, -1, 4, False),  # per token, several groups per head
    (-2, 4, -2, 4, False),  # both per channel
    (-1, 16, -1, 16, True),  # symmetric
]


def test_scores_and_mix_by_hand():
    # one KV head, one query, D = 4, two tokens, per-token 2-bit keys/values with one group each:
    # token 0 (0, 3, 0, 3): s = 1, z = 0, codes (0, 3, 0, 3); token 1 (1, 1, 1, 1): s = 0, z = 1
    k = quantize(torch.tensor([[[[0.0, 3.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]]]]), 2, 4, -1)
    q = torch.tensor([[[[2.0, 1.0, 0.0, 0.0]]]])
    assert scores_from_codes(q, k).tolist() == [[[[3.0, 3.0]]]]  # 2·0 + 1·3 ; 2·1 + 1·1
    p = torch.tensor([[[[0.25, 0.75]]]])
    assert mix_from_codes(p, k).tolist() == [[[[0.75, 1.5, 0.75, 1.5]]]]  # 0.25·token 0 + 0.75·token 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # 3-bit: KVmix's keys (8 codes in 3 bytes, one plane)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_attention_over_equals_dequantize_then_attend(layout, bits):
    ak, gk, av, gv, sym = layout
    g = torch.Generator().manual_seed(bits)
    b, h_kv, rep, d, t = 2, 2, 3, 16, 12
    k, v = torch.randn(b, h_kv, t, d, generator=g), torch.randn(b, h_kv, t, d, generator=g)
    qk, qv = quantize(k[..., :8, :], bits, gk, ak, sym), quantize(v[..., :4, :], bits, gv, av, sym)
    k_tail, v_tail = k[..., 8:, :].half(), v[..., 4:, :].half()  # windows split at different tokens
    q = torch.randn(b, h_kv * rep, 1, d, generator=g)
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding of the first sequence
    keys = torch.cat([qk.dequantize(), k_tail.float()], dim=-2).repeat_interleave(rep, 1)
    values = torch.cat([qv.dequantize(), v_tail.float()], dim=-2).repeat_interleave(rep, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
    got = decode_attention_over(q, [qk, k_tail], [qv, v_tail], 0.3, mask)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        "int4",
        "kivi:bits=2,group=4,residual=8",
        "int:bits=2,group=4",
        "moqae:ckpt=random,chunk=4,seed=2",
        "qoq",  # calibrated (SmoothAttention), per-token INT4 as int4
        "kvmix:group=4,prompt_len=16,cache=false,important=0.5",  # calibrated K3V4 / K2V2 layers, fp16 windows
        "xquant:group=4,residual=8,k_share_from=0,v_share_from=0",  # odd layers read the codes below
    ],
)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_decode_from_codes_equals_dequantized_reads(spec, family, monkeypatch):
    model = tiny_random_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    calibration = [torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))]
    logits = {}
    for from_codes in (True, False):
        method = build_method(spec)
        with AttachedMethod(model, method, from_codes=from_codes) as am, torch.no_grad():
            am.calibrate(calibration)
            calls = []
            store_cls = type(method.new_layer_store(0, am.info))
            real = store_cls.attend
            counted = lambda self, *a, _calls=calls, _real=real, **k: _calls.append(1) or _real(self, *a, **k)  # noqa: E731
            monkeypatch.setattr(store_cls, "attend", counted)
            cache = am.new_cache()
            out = [forward(model, ids, cache).logits[:, -1]]
            token = out[0].argmax(-1, keepdim=True)
            for _ in range(12):  # past KIVI's residual, so codes and fp16 windows both take part
                out.append(forward(model, token, cache).logits[:, -1])
                token = out[-1].argmax(-1, keepdim=True)
            monkeypatch.undo()
        assert bool(calls) == from_codes  # the store attended every decode step only when asked
        logits[from_codes] = torch.stack(out)
    assert torch.allclose(logits[True], logits[False], atol=1e-4)
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))


def test_methods_that_observe_attention_keep_the_normal_path():
    model = tiny_random_model("llama")
    with AttachedMethod(model, build_method("mikv"), from_codes=True) as am:
        assert not am.board.from_codes
    with AttachedMethod(model, build_method("fp16"), from_codes=True) as am:
        assert not am.board.from_codes  # fp16 reads its tokens as they are
    with AttachedMethod(model, build_method("int4"), from_codes=False) as am:
        assert not am.board.from_codes
