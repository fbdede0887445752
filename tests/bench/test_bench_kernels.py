"""Micro-benchmarks: quantize + pack, unpack + dequantize, and one decode step of attention over a
packed 2-bit KIVI-layout cache (keys per channel, values per token, group 32, an fp16 tail of 64
tokens), at two realistic sizes:

* ``smollm2-135m``: one layer, batch 1, 3 KV heads (9 query heads, GQA n_rep = 3), head_dim 64;
* ``llama-2-7b``: one layer, batch 1, 32 heads (no GQA), head_dim 128;

both over 4096 quantized tokens. On CPU: fp32 compute (the harness's CPU dtype); on CUDA: fp16,
and the Triton kernels beside the torch paths. Decode: ``decode_attention_reference`` (dequantize
the history, then attend: the harness's read path, the reference of the ratios),
``decode_attention_from_codes`` (scales applied after grouped matmuls on the codes) and, on CUDA,
``triton_decode_attention``. GB/s = the bytes a step must move at least (codes, scales, zeros,
fp16 tail, q, output) / median time; the table is printed at the end of the session.
"""

from __future__ import annotations

import pytest
import torch

from harness.kernels import (
    HAVE_TRITON,
    decode_attention_from_codes,
    decode_attention_reference,
    decode_bytes,
    interpreted,
    triton_decode_attention,
    triton_quantize_pack,
)
from harness.quant import quantize, unpack_planes, unpack_to_float

SIZES = {  # name: (batch, KV heads, n_rep, head_dim)
    "smollm2-135m": (1, 3, 3, 64),
    "llama-2-7b": (1, 32, 1, 128),
}
TOKENS, TAIL, BITS, GROUP = 4096, 64, 2, 32
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
TRITON = HAVE_TRITON and DEVICE.type == "cuda" and not interpreted()
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels are timed on a CUDA GPU only")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, *args, **kwargs):
    def run():
        out = fn(*args, **kwargs)
        _sync()
        return out

    return run


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture(scope="module", params=list(SIZES))
def cache(request):
    """A layer's KV chunk and its packed cache at one size."""
    b, hkv, n_rep, d = SIZES[request.param]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, hkv, TOKENS + TAIL, d, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(b, hkv, TOKENS + TAIL, d, generator=g).to(DEVICE, DTYPE)
    q = torch.randn(b, hkv * n_rep, 1, d, generator=g).to(DEVICE, DTYPE)
    kq = quantize(k[:, :, :TOKENS], BITS, GROUP, axis=-2)
    vq = quantize(v[:, :, :TOKENS], BITS, GROUP, axis=-1)
    args = (q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, BITS, GROUP)
    tails = (k[:, :, TOKENS:].half(), v[:, :, TOKENS:].half())
    return {"size": request.param, "k": k[:, :, :TOKENS], "v": v[:, :, :TOKENS], "kq": kq, "vq": vq,
            "args": args, "tails": tails}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# quantize + pack (one 4096-token chunk)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("axis", [-2, -1], ids=["keys_per_channel", "values_per_token"])
def test_quantize_pack(benchmark, record_bandwidth, cache, axis, impl):
    if impl == "triton" and not TRITON:
        pytest.skip("Triton kernels are timed on a CUDA GPU only")
    x = cache["k"] if axis == -2 else cache["v"]
    fn = quantize if impl == "torch" else triton_quantize_pack
    benchmark.group = f"quantize+pack {cache['size']} {'keys' if axis == -2 else 'values'}"
    qt = benchmark(_timed(fn, x, BITS, GROUP, axis))
    nbytes = _nbytes(x, qt.codes, qt.scale, qt.zero)
    record_bandwidth(benchmark, benchmark.group, f"{impl} {DEVICE.type}", nbytes, impl == "torch")


# ------------------------------------------------------------------------------------------------
# unpack + dequantize (the harness's read of the history)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["keys", "values"])
def test_unpack_dequantize(benchmark, record_bandwidth, cache, which):
    qt = cache["kq"] if which == "keys" else cache["vq"]
    benchmark.group = f"unpack+dequant {cache['size']} {which}"
    out = benchmark(_timed(qt.dequantize, DTYPE))
    nbytes = _nbytes(qt.codes, qt.scale, qt.zero, out)
    record_bandwidth(benchmark, benchmark.group, f"QuantizedTensor.dequantize {DEVICE.type}", nbytes, True)


@pytest.mark.parametrize("impl", ["table", "planes"])
@pytest.mark.parametrize("which", ["keys", "values"])
def test_unpack_codes(benchmark, record_bandwidth, cache, which, impl):
    """Packed codes to float codes: the 256-row table gather in channel order (``unpack_to_float``,
    the dequantize path) against plane by plane (``unpack_planes``, the from-codes decode path)."""
    qt = cache["kq"] if which == "keys" else cache["vq"]
    fn = unpack_to_float if impl == "table" else unpack_planes
    benchmark.group = f"unpack codes {cache['size']} {which}"
    out = benchmark(_timed(fn, qt.codes, qt.bits, DTYPE))
    nbytes = _nbytes(qt.codes, out)
    record_bandwidth(benchmark, benchmark.group, f"{fn.__name__} {DEVICE.type}", nbytes, impl == "table")


# ------------------------------------------------------------------------------------------------
# one decode step
# ------------------------------------------------------------------------------------------------

DECODE = {
    "dequantize-then-attend": decode_attention_reference,
    "from-codes": decode_attention_from_codes,
    "triton": triton_decode_attention,
}


@pytest.mark.parametrize("impl", list(DECODE))
def test_decode_attention(benchmark, record_bandwidth, cache, impl):
    if impl == "triton" and not TRITON:
        pytest.skip("Triton kernels are timed on a CUDA GPU only")
    args, (k_fp, v_fp) = cache["args"], cache["tails"]
    kwargs = {} if impl == "triton" else {"dtype": DTYPE}
    benchmark.group = f"decode {cache['size']} {TOKENS}+{TAIL} tokens"
    out = benchmark(_timed(DECODE[impl], *args, k_fp, v_fp, **kwargs))
    assert out.shape == args[0].shape
    nbytes = decode_bytes(args[0], list(args[1:7]) + [k_fp, v_fp])
    record_bandwidth(benchmark, benchmark.group, f"{impl} {DEVICE.type}", nbytes, impl == "dequantize-then-attend")


def test_decode_paths_agree(cache):
    """The timed paths compute the same thing (a guard, not a benchmark)."""
    args, (k_fp, v_fp) = cache["args"], cache["tails"]
    ref = decode_attention_reference(*args, k_fp, v_fp, dtype=torch.float32)
    tol = {"atol": 1e-5, "rtol": 1e-4} if DTYPE == torch.float32 else {"atol": 4e-3, "rtol": 1e-2}
    torch.testing.assert_close(decode_attention_from_codes(*args, k_fp, v_fp, dtype=DTYPE).float(), ref.float(), **tol)
    if TRITON:
        torch.testing.assert_close(triton_decode_attention(*args, k_fp, v_fp).float(), ref.float(), **tol)
