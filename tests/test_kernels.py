"""harness.kernels: the Triton kernels against the torch references, the references against each
other and against a hand-computed case.

The Triton kernels run on CPU only through Triton's interpreter, which is chosen when ``triton`` is
first imported (``TRITON_INTERPRET=1``). Setting that here would depend on import order and leak
into every later test, so ``test_interpreter_subprocess`` runs this file's ``test_triton_*`` tests
in a fresh process with the variable set; run ``TRITON_INTERPRET=1 pytest tests/test_kernels.py``
to see them one by one. ``@pytest.mark.gpu`` tests run the compiled kernels on a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines.kivi import KIVIConfig, KIVIStore
from harness import kernels
from harness.interface import ModelInfo, Observation
from harness.kernels import (
    HAVE_TRITON,
    decode_attention_from_codes,
    decode_attention_reference,
    triton_decode_attention,
    triton_quantize_pack,
)
from harness.quant import pack_bits, quantize, unpack_bits

ROOT = Path(__file__).resolve().parents[1]
NO_TRITON = "triton is not importable (pip install 'triton>=3.0', the project's dev extra)"
INTERPRETER_REASON = (
    "needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): test_interpreter_subprocess"
)
needs_interpreter = pytest.mark.skipif(
    not kernels.interpreted(), reason=INTERPRETER_REASON if HAVE_TRITON else NO_TRITON
)
needs_cuda = pytest.mark.skipif(
    not (HAVE_TRITON and torch.cuda.is_available() and not kernels.interpreted()),
    reason="needs a CUDA GPU and triton (compiled kernels)",
)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _chunk(shape, dtype, bits, group, axis, seed=0):
    """Random data with rounding ties (x - min exactly (k + 1/2)·scale) and constant groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.3
    qmax = 2**bits - 1
    ties = torch.tensor([0.0, qmax] + [(i % qmax) + 0.5 for i in range(group - 2)])
    # constant groups: 1.25 / -0.75 are fp16 numbers (scale 0, exact); 1.2345678 is not, so for fp32
    # input fp16(min) < min and the scale is a tiny positive number (as quantize does: bit identity)
    if axis == -2:
        x[0, 0, :group, 0] = ties  # one channel's first token group
        x[0, -1, group : 2 * group, :] = 1.25  # every channel constant over a group
        x[1, 0, group : 2 * group, :] = 1.2345678
    else:
        x[0, 0, 0, :group] = ties  # one token's first channel group
        x[0, -1, 3, :] = -0.75  # a token constant over all its groups
        x[1, 0, 5, :] = 1.2345678
    return x.to(dtype)


def _cache(b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, q_dtype=torch.float32, seed=0, const=False, device="cpu"):
    """Keys per channel (tk quantized + rk fp16), values per token (tv + rv), as a KIVI cache."""
    assert tk + rk == tv + rv
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, hkv, tk + rk, d, generator=g) * 1.5).to(device)
    v = torch.randn(b, hkv, tk + rk, d, generator=g).to(device)
    if const and tk >= group:
        k[:, :, :group, 1] = 0.25  # one channel constant over the first token group: scale 0
        v[:, :, 2, :] = -1.5  # one token constant over all its channel groups: scale 0
    kq = quantize(k[:, :, :tk], bits, group, axis=-2)
    vq = quantize(v[:, :, :tv], bits, group, axis=-1)
    q = (torch.randn(b, hkv * n_rep, 1, d, generator=g) * 1.5).to(device, q_dtype)
    k_fp = k[:, :, tk:].half() if rk else None
    v_fp = v[:, :, tv:].half() if rv else None
    return (q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, bits, group, k_fp, v_fp)


# (B, H_kv, n_rep, D, T_k, R_k, T_v, R_v, bits, G, splits)
CASES = [
    (1, 2, 2, 16, 64, 0, 64, 0, 2, 16, 1),  # no fp16 tail
    (2, 2, 2, 32, 96, 17, 80, 33, 4, 16, 3),  # KIVI's two windows: keys and values split differently
    (1, 2, 2, 64, 128, 32, 96, 64, 2, 32, 2),
    (2, 2, 2, 64, 64, 5, 64, 5, 4, 32, 4),
    (1, 2, 2, 32, 0, 40, 0, 40, 2, 16, 2),  # only the fp16 tail
    (1, 2, 1, 64, 64, 0, 64, 0, 8, 32, 1),  # 8 bits, no GQA
    (1, 2, 2, 48, 48, 3, 32, 19, 2, 16, 2),  # head_dim not a power of two
]
CASE_IDS = ["-".join(map(str, c)) for c in CASES]


def _sdpa(q, k, v, scale=None):
    """torch's attention over full K/V [B, H_kv, T, D], GQA by repeating KV heads."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _hand_case():
    """B = 1, H_kv = 1, n_rep = 2, D = 4, G = 4, 2 bits, 4 quantized tokens + 1 fp16 token.

    Keys: channel 0 holds codes t = 0..3 with scale 1, zero 0 (k̂_t = [t, 0, 0, 0]); the tail key is
    0. Values: token t has codes [t, 3 - t, 0, 3], scale 1/2, zero -1 (v̂_t = codes/2 - 1); the tail
    value is [2, 2, 2, 2]. Query head 0 = [1, 0, 0, 0] (scores t, 0 for the tail), head 1 = 0
    (uniform). Softmax scale 1.
    """
    k_codes = torch.tensor([[0], [1], [2], [3]], dtype=torch.uint8)  # channel 0 in the low 2 bits
    v_bytes = [t | (3 - t) << 2 | 0 << 4 | 3 << 6 for t in range(4)]  # 204, 201, 198, 195
    v_codes = torch.tensor(v_bytes, dtype=torch.uint8).view(4, 1)
    assert torch.equal(v_codes, pack_bits(torch.tensor([[t, 3 - t, 0, 3] for t in range(4)]), 2))
    args = (
        torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]).view(1, 2, 1, 4),
        k_codes.view(1, 1, 4, 1),
        torch.ones(1, 1, 1, 4, dtype=torch.float16),
        torch.zeros(1, 1, 1, 4, dtype=torch.float16),
        v_codes.view(1, 1, 4, 1),
        torch.full((1, 1, 4, 1), 0.5, dtype=torch.float16),
        torch.full((1, 1, 4, 1), -1.0, dtype=torch.float16),
        2,
        4,
        torch.zeros(1, 1, 1, 4, dtype=torch.float16),
        torch.full((1, 1, 1, 4), 2.0, dtype=torch.float16),
    )
    # head 0: weights e^t / Z over the 4 quantized tokens, e^0 / Z for the tail
    z = sum(math.exp(t) for t in range(4)) + 1.0
    p = [math.exp(t) / z for t in range(4)]
    p_tail = 1.0 / z
    mean_t = sum(t * pt for t, pt in enumerate(p))
    head0 = [
        0.5 * mean_t - (1 - p_tail) + 2 * p_tail,  # Σ p_t (t/2 - 1) + 2 p_tail
        0.5 * (3 * (1 - p_tail) - mean_t) - (1 - p_tail) + 2 * p_tail,
        -(1 - p_tail) + 2 * p_tail,
        0.5 * (1 - p_tail) + 2 * p_tail,
    ]
    # head 1: the mean of the 5 values; quantized means of t/2 - 1 and (3 - t)/2 - 1 are -0.25
    head1 = [(4 * -0.25 + 2) / 5, (4 * -0.25 + 2) / 5, (4 * -1 + 2) / 5, (4 * 0.5 + 2) / 5]
    return args, torch.tensor([head0, head1]).view(1, 2, 1, 4)


def _kivi_state(bits=2, group=8, residual=16, d=16, hkv=2, n_heads=4, prefill=37, steps=5):
    """A KIVI store after a prefill and some decode steps, as decode-attention arguments."""
    info = ModelInfo("llama", 1, n_heads, hkv, d, n_heads * d, torch.float32, torch.device("cpu"))
    store = KIVIStore(0, info, KIVIConfig(bits=bits, group=group, residual=residual))
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate([prefill] + [1] * steps):
        k, v = torch.randn(1, hkv, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)
        store.append(k, v, Observation(positions=torch.arange(n), is_prefill=i == 0))
    q = torch.randn(1, n_heads, 1, d, generator=g)
    kq, vq = store.k_q.q, store.v_q.q
    args = (q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, bits, group, store.k_fp.data, store.v_fp.data)
    return args, store


# ------------------------------------------------------------------------------------------------
# torch references (always run)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_from_codes_matches_dequantize_then_attend(case):
    b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, _ = case
    args = _cache(b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, const=True)
    ref = decode_attention_reference(*args)
    out = decode_attention_from_codes(*args)
    assert out.shape == (b, hkv * n_rep, 1, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # and the same with an explicit softmax scale, in float64 compute
    ref64 = decode_attention_reference(*args, scale=0.3, dtype=torch.float64)
    out64 = decode_attention_from_codes(*args, scale=0.3, dtype=torch.float64)
    torch.testing.assert_close(out64, ref64, atol=1e-12, rtol=1e-12)


def test_reference_matches_sdpa_over_dequantized_cache():
    """GQA mapping (query head h reads KV head h // n_rep) and the two windows, against torch SDPA."""
    args = _cache(2, 2, 3, 32, 64, 16, 48, 32, 4, 16)
    q, kc, ks, kz, vc, vs, vz, bits, group, k_fp, v_fp = args
    from harness.quant import QuantizedTensor

    k = torch.cat([QuantizedTensor(kc, ks, kz, bits, -2, group).dequantize(), k_fp.float()], dim=2)
    v = torch.cat([QuantizedTensor(vc, vs, vz, bits, -1, group).dequantize(), v_fp.float()], dim=2)
    torch.testing.assert_close(decode_attention_reference(*args), _sdpa(q, k, v), atol=2e-6, rtol=1e-5)


def test_hand_checked_case():
    args, expected = _hand_case()
    torch.testing.assert_close(decode_attention_reference(*args, scale=1.0), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(decode_attention_from_codes(*args, scale=1.0), expected, atol=1e-6, rtol=1e-6)


def test_from_codes_reads_a_kivi_store():
    """The references read a KIVI store's held state (per-channel keys, per-token values, the two
    fp16 windows) and agree with attention over what the store's read() reconstructs."""
    args, store = _kivi_state()
    assert store.key_counts != store.value_counts  # the windows differ: a real split test
    k, v = store.read(torch.float32)
    expected = _sdpa(args[0], k, v)
    torch.testing.assert_close(decode_attention_from_codes(*args), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(decode_attention_reference(*args), expected, atol=2e-6, rtol=1e-5)


def test_layout_errors():
    args = list(_cache(1, 2, 2, 16, 32, 0, 32, 0, 2, 16))
    with pytest.raises(ValueError, match="keys hold"):
        decode_attention_reference(*args[:9], None, torch.zeros(1, 2, 3, 16))
    bad = list(args)
    bad[2] = bad[2][:, :, :1, :8]
    with pytest.raises(ValueError, match="k_scale has shape"):
        decode_attention_from_codes(*bad)
    with pytest.raises(ValueError, match="one decode step"):
        decode_attention_reference(torch.zeros(1, 4, 2, 16), *args[1:])


def test_module_imports_without_triton(monkeypatch):
    """With triton missing the module imports, says so, keeps the references and refuses the kernels."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_kernels_without_triton", ROOT / "harness" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAVE_TRITON is False and mod.interpreted() is False
    args, expected = _hand_case()
    torch.testing.assert_close(mod.decode_attention_from_codes(*args, scale=1.0), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mod.triton_quantize_pack(torch.zeros(1, 1, 32, 16), 2, 32, -2)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mod.triton_decode_attention(*args)


@pytest.mark.skipif(not HAVE_TRITON or kernels.interpreted() or torch.cuda.is_available(), reason="CPU, no interpreter")
def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_quantize_pack(torch.zeros(1, 1, 32, 16), 2, 32, -2)


# ------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
def test_interpreter_subprocess():
    """This file's test_triton_* tests in a fresh process with TRITON_INTERPRET=1 set before triton
    is imported (the interpreter is fixed at import; setting it here would leak into other tests)."""
    if kernels.interpreted():
        pytest.skip("already in Triton's interpreter: the test_triton_* tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-k", "test_triton_", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("axis", [-2, -1], ids=["per_channel", "per_token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d", [16, 64])
def test_triton_quantize_pack_matches_quantize(d, bits, axis, dtype):
    group = 16 if (axis == -1 and d == 16) else 32
    x = _chunk((2, 2, 64, d), dtype, bits, group, axis, seed=bits + d)
    got = triton_quantize_pack(x, bits, group, axis)
    ref = quantize(x, bits, group, axis)
    assert torch.equal(got.codes, ref.codes)  # bit for bit
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    assert (got.bits, got.axis, got.group) == (ref.bits, ref.axis, ref.group)
    assert got.scale.dtype == got.zero.dtype == torch.float16
    # the ties rounded half to even, constant groups stored exactly with scale 0
    codes = unpack_bits(got.codes, bits)
    tie = codes[0, 0, :group, 0] if axis == -2 else codes[0, 0, 0, :group]
    qmax = 2**bits - 1
    half_even = [0, qmax] + [round((i % qmax) + 0.5) for i in range(group - 2)]  # Python rounds half to even
    assert tie.tolist() == half_even
    const = got.scale[0, -1, 1] if axis == -2 else got.scale[0, -1, 3]
    assert (const == 0).all()
    back = got.dequantize(torch.float32)
    const_x = x[0, -1, group : 2 * group] if axis == -2 else x[0, -1, 3]
    const_back = back[0, -1, group : 2 * group] if axis == -2 else back[0, -1, 3]
    assert torch.equal(const_back, const_x.half().float())


@needs_interpreter
@pytest.mark.parametrize("axis", [-2, -1], ids=["per_channel", "per_token"])
def test_triton_quantize_pack_matches_quantize_where_fp16_metadata_breaks(axis):
    """Groups near the fp16 maximum, tiny groups whose scale flushes to 0, NaN: harness.quant's clamped
    grid, bit for bit, beside ordinary groups (the kernel marks flushed scales; the host falls back)."""
    x = torch.randn(2, 64, 32) * 2
    x[0, 0, :16], x[0, 1, :16] = -65504.0, 65504.0  # channel groups spanning ±65504: the top level rounds up
    x[0, 2, 0], x[0, 2, 1] = -65504.0, 65504.0  # a token group spanning it
    x[1, 16:32, :] = torch.randn(16, 32) * 1e-8  # scale flushes to 0 in fp16
    for bits in (2, 4):
        got, ref = triton_quantize_pack(x, bits, 16, axis), quantize(x, bits, 16, axis)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale), bits
        assert torch.equal(got.zero, ref.zero) and torch.isfinite(got.dequantize(torch.float32)).all()
    plain = torch.randn(2, 64, 32)
    got = triton_quantize_pack(plain, 4, 16, axis)  # ordinary groups: the kernel's own result
    assert torch.equal(got.scale, quantize(plain, 4, 16, axis).scale) and (got.scale >= 0).all()


@needs_interpreter
def test_triton_quantize_pack_bf16_and_odd_shapes():
    x = torch.randn(3, 40, 48, dtype=torch.bfloat16)  # 3-d, head_dim 48 (not a power of two)
    for bits, group, axis in [(2, 8, -2), (4, 16, -1), (2, 12, -1), (4, 5, -2)]:
        got, ref = triton_quantize_pack(x, bits, group, axis), quantize(x, bits, group, axis)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale), (bits, group, axis)
        assert torch.equal(got.zero, ref.zero)
    with pytest.raises(ValueError, match="whole bytes"):
        triton_quantize_pack(x, 2, 6, -1)


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_decode_matches_references(case):
    b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, splits = case
    args = _cache(b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, const=True)
    ref = decode_attention_reference(*args)
    out = triton_decode_attention(*args, num_splits=splits, block_t=16)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, decode_attention_from_codes(*args), atol=2e-6, rtol=1e-5)
    # default tiling and splits give the same result
    torch.testing.assert_close(triton_decode_attention(*args), ref, atol=2e-6, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASE_IDS[1], CASE_IDS[3]])
def test_triton_decode_fp16_query(case):
    b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, splits = case
    args = _cache(b, hkv, n_rep, d, tk, rk, tv, rv, bits, group, q_dtype=torch.float16, seed=1)
    out = triton_decode_attention(*args, num_splits=splits)
    assert out.dtype == torch.float16
    # fp16 dot operands (dequantized keys / values and p rounded to fp16), fp32 accumulation
    torch.testing.assert_close(out.float(), decode_attention_reference(*args).float(), atol=4e-3, rtol=1e-2)


@needs_interpreter
def test_triton_hand_checked_case_and_kivi_store():
    args, expected = _hand_case()
    torch.testing.assert_close(triton_decode_attention(*args, scale=1.0), expected, atol=1e-6, rtol=1e-6)
    args, store = _kivi_state(bits=4)
    k, v = store.read(torch.float32)
    torch.testing.assert_close(triton_decode_attention(*args, num_splits=2), _sdpa(args[0], k, v), atol=2e-6, rtol=1e-5)


@needs_interpreter
def test_triton_quantize_then_decode():
    """Fused quantizer and decode kernel together: a cache made by triton_quantize_pack."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 96, 32, generator=g), torch.randn(1, 2, 96, 32, generator=g)
    q = torch.randn(1, 4, 1, 32, generator=g)
    kq, vq = triton_quantize_pack(k, 2, 32, -2), triton_quantize_pack(v, 2, 32, -1)
    args = (q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, 2, 32)
    expected = _sdpa(q, kq.dequantize(), vq.dequantize())
    torch.testing.assert_close(triton_decode_attention(*args, num_splits=3), expected, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# compiled kernels on a CUDA GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["fp16", "fp32", "bf16"])
def test_gpu_quantize_pack_bit_identical(dtype):
    for bits in (2, 4, 8):
        for axis in (-2, -1):
            x = _chunk((4, 8, 256, 128), torch.float32, bits, 32, axis, seed=bits).to("cuda", dtype)
            got, ref = triton_quantize_pack(x, bits, 32, axis), quantize(x, bits, 32, axis)
            assert torch.equal(got.codes, ref.codes), (bits, axis)
            assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero), (bits, axis)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n_rep", [1, 4])
@pytest.mark.parametrize("bits", [2, 4])
def test_gpu_decode_attention(bits, n_rep):
    hkv = 32 // n_rep
    args = _cache(4, hkv, n_rep, 128, 4096, 64, 4032, 128, bits, 32, q_dtype=torch.float16, device="cuda")
    ref = decode_attention_reference(*args)
    for splits in (None, 1, 7):
        out = triton_decode_attention(*args, num_splits=splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=4e-3, rtol=1e-2)
    args32 = (args[0].float(),) + args[1:]
    torch.testing.assert_close(
        triton_decode_attention(*args32), decode_attention_reference(*args32), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        decode_attention_from_codes(*args32), decode_attention_reference(*args32), atol=1e-5, rtol=1e-4
    )
