"""Peer rows: transformers' DynamicCache and QuantizedCache (optimum-quanto, HQQ) through the harness's
tasks, with their bytes counted from what they hold (hand-computed here)."""

from __future__ import annotations

import importlib.util

import pytest

from harness.interface import MethodSpecError, build_method
from harness.runner import load_record, run

QUIET = {"progress": False, "log": lambda *_: None}
# stories260K: 5 layers, 4 KV heads, head_dim 8, fp32; 256-token windows fed in 32-token pieces
LAYERS, KV_HEADS, HEAD_DIM, FP32 = 5, 4, 8, 4
STREAMED = "wikitext2:seqlen=256,max_windows=2,prefill_chunk=32"


def _records(out, methods, task, stories_dir, data_dir) -> dict[str, dict]:
    s = run(methods, [task], str(stories_dir), out, data_dir=data_dir, **QUIET)
    assert len(s.done) == len(methods) and not s.failed
    return {load_record(p)["method"]: load_record(p) for p in s.done}


def _needs(module: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module} (the [peers] extra; nox -s tests installs it)")


def test_dynamic_is_the_full_precision_cache(tmp_path, stories_dir, data_dir):
    """transformers' DynamicCache holds the model's fp32 K/V: the ``full`` method's numbers exactly,
    streamed or not, and 32 bits per element counted from its tensors."""
    recs = _records(tmp_path, ["dynamic", "full"], STREAMED, stories_dir, data_dir)
    assert recs["dynamic"]["metrics"] == recs["full"]["metrics"]
    kv = recs["dynamic"]["kv"]
    assert kv["total_bytes"] == kv["bytes"]["fp_tokens"] == 2 * LAYERS * KV_HEADS * 256 * HEAD_DIM * FP32
    assert kv["nominal_bits"] == kv["effective_bits"] == 32.0


@pytest.mark.parametrize(("name", "module"), [("hf-quanto", "optimum.quanto"), ("hf-hqq", "hqq")])
def test_quantized_cache_bytes_by_hand_and_prefill_in_full_precision(tmp_path, stories_dir, data_dir, name, module):
    _needs(module)
    methods = [name, f"{name}:nbits=2", "dynamic"]
    recs = _records(tmp_path / "streamed", methods, STREAMED, stories_dir, data_dir)
    # 8 pieces of 32 with a 128-token residual: the first piece is quantized at once, the residual holds
    # 32, 64, 96, then piece 5 flushes all 160 tokens into the quantized part; pieces 6-8 stay: 96 fp32
    quantized, residual = 160, 96
    elements = 2 * LAYERS * KV_HEADS * HEAD_DIM  # per token, keys and values
    for spec, bits in ((name, 4), (f"{name}:nbits=2", 2)):
        kv = recs[spec]["kv"]
        assert kv["bytes"]["codes"] == quantized * elements * bits // 8, spec  # packed codes
        assert kv["bytes"]["scales"] == quantized * elements // 64 * 2 * FP32, spec  # scale + zero per 64, fp32
        assert kv["bytes"]["fp_tokens"] == residual * elements * FP32, spec
        assert kv["nominal_bits"] == (quantized * bits + residual * 32) / 256
    ppl = {m: recs[m]["metrics"]["ppl"] for m in methods}
    assert ppl[f"{name}:nbits=2"] > ppl[name] and ppl[f"{name}:nbits=2"] > ppl["dynamic"]  # 2 bits cost
    # one forward per window: the first update returns the prompt's own K/V, so the prompt's attention
    # never reads the quantized copy and the PPL is the full-precision cache's, to the last digit
    one = _records(tmp_path / "one", [name, "dynamic"], "wikitext2:seqlen=256,max_windows=2", stories_dir, data_dir)
    assert one[name]["metrics"] == one["dynamic"]["metrics"]
    assert one[name]["kv"]["bytes"]["codes"] > 0  # it did quantize (and holds) the window


def test_missing_backend_is_a_one_line_spec_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("optimum") else real(n, *a))
    with pytest.raises(MethodSpecError) as e:
        build_method("hf-quanto:nbits=2")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'moqae-harness[peers]'" in msg and "optimum-quanto" in msg


@pytest.mark.parametrize(
    ("spec", "words"),
    [("hf-quanto:nbits=3", "nbits=3"), ("hf-quanto:axis-key=1", "axis-key=1"), ("hf-hqq:axis-value=-1", "axis-value"),
     ("hf-quanto:q-group-size=0", "q-group-size")],
)  # fmt: skip
def test_bad_options_name_what_transformers_accepts(spec, words):
    with pytest.raises(MethodSpecError, match=words):
        build_method(spec)
