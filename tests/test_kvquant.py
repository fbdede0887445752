"""KVQuant: outlier masks, lookup tables, weighted k-means, pre-RoPE round trip, accounting, cache, perplexity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import wikitext_ppl

import baselines.kvquant as kvq
import baselines.kvquant_calibration as kvc
from baselines.kvquant import KVQuant, KVQuantConfig, LayerCalibration, channel_outliers, token_outliers
from harness.integration import AttachedMethod, apply_rope, forward, generate, model_info
from harness.interface import MethodSpecError, Observation, UnsupportedModelError, build_method, tensor_bytes
from harness.models import tiny_random_model
from harness.quant import nearest_level, pack_3bit, percentile, unpack_3bit, unpack_codes, weighted_kmeans_1d


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path, monkeypatch):
    """Every test calibrates into its own cache folder."""
    monkeypatch.setenv("MOQAE_HARNESS_CACHE", str(tmp_path / "cache"))


def _ids(vocab: int, b: int = 1, t: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _calib(model, n: int = 3, t: int = 48) -> list[torch.Tensor]:
    return [_ids(model.config.vocab_size, t=t, seed=100 + i) for i in range(n)]


# ---- primitives ---------------------------------------------------------------------------------


def test_token_outlier_mask_by_hand():
    tok = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5, -40, 1, 1, 1, 1, 1, 1, 1, 30]])
    # threshold 0.8 -> percentiles 90 / 10 of each token: row 0: 8.1 / 0.9 -> {9} and {0} (inclusive)
    mask = token_outliers(tok, 0.8)
    assert mask[0].nonzero().flatten().tolist() == [0, 9]
    assert mask[1].nonzero().flatten().tolist() == [1, 9]
    # threshold 0.99 (the "-1%" variants): 99.5 / 0.5 percentiles; still the extreme pair here
    assert token_outliers(tok, 0.99)[1].nonzero().flatten().tolist() == [1, 9]


def test_token_outliers_and_codes_match_the_sorting_reference():
    """``token_outliers`` (order statistics by topk) and ``_nearest_level`` (midpoints counted) give the
    masks and codes of the previous computation (two full-sort ``percentile`` calls; ``bucketize``),
    with NaN, ±inf, ±0, ties and repeated levels."""
    g = torch.Generator().manual_seed(0)

    def sorting_reference(tok, threshold):
        t = 1 - (1 - threshold) / 2
        hi = percentile(tok.float(), t, dim=-1).unsqueeze(-1)
        lo = percentile(tok.float(), 1 - t, dim=-1).unsqueeze(-1)
        return (tok >= hi) | (tok <= lo)

    for shape in [(512, 2, 192), (7, 2, 10), (3, 1, 4), (8, 2)]:
        x = torch.randn(*shape, generator=g)
        x[0, ..., :1] = float("nan")
        x[1] = 0.0
        x[-1, ..., ::2] = -0.0
        x.view(-1)[5], x.view(-1)[7] = float("inf"), -float("inf")
        for xx in (x, (x * 4).round() / 4, x.half()):
            for threshold in (0.99, 0.8, 0.6, 0.51, 1.0):
                assert torch.equal(token_outliers(xx, threshold), sorting_reference(xx, threshold))
    lut = torch.sort(torch.randn(16, generator=g)).values
    lut[4] = lut[3]
    for n in (100, 70000):
        x = torch.randn(n, generator=g) * 2
        x[:15] = (lut[1:] + lut[:-1]) / 2  # exact ties: the lower level
        x[20], x[21], x[22] = float("nan"), float("inf"), -float("inf")
        assert torch.equal(kvq._nearest_level(x, lut), nearest_level(x, lut))


def test_channel_outlier_mask_by_hand():
    x = torch.tensor([[-2.0, -1.0, 0.0], [1.0, 1.5, 3.0]])  # [T, C]
    lower = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float16)
    upper = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float16)
    # strictly outside [lower, upper] per channel
    assert channel_outliers(x, lower, upper).tolist() == [[True, False, False], [False, True, True]]


def test_percentiles_match_numpy_and_stream():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 6, generator=g)
    for q in (0.0, 0.005, 0.5, 0.995, 1.0):
        ref = np.percentile(x.numpy(), 100 * q, axis=0)
        assert np.allclose(percentile(x, q, dim=0).numpy(), ref, atol=1e-6)
        # streaming tracker fed in chunks
        tr = kvc._TailTracker(301, q, largest=q >= 0.5)
        for chunk in x.split(40):
            tr.add(chunk)
        assert np.allclose(tr.value().numpy(), ref, atol=1e-6)


def test_lut_reconstruction_picks_nearest_level():
    lut = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    x = torch.tensor([-3.0, -0.7, -0.6, -0.625, 0.1, 0.2, 0.126, 0.75, 0.76, 5.0])
    codes = nearest_level(x, lut)
    # -0.625 and 0.75 are ties (midpoints): the lower level wins, as argmin does
    assert codes.tolist() == [0, 0, 1, 0, 1, 2, 2, 2, 3, 3]
    brute = (x[:, None] - lut[None]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), brute)


def test_weighted_kmeans_toy():
    pts = torch.tensor([0.0, 0.1, 0.9, 1.0])
    assert torch.allclose(weighted_kmeans_1d(pts, torch.tensor([1.0, 3.0, 1.0, 1.0]), 2), torch.tensor([0.075, 0.95]))
    assert torch.allclose(weighted_kmeans_1d(pts, torch.ones(4), 2), torch.tensor([0.05, 0.95]))
    # three well separated clusters, weights pull each centroid towards its heavy point
    pts = torch.tensor([-1.0, -0.9, 0.0, 0.2, 0.8, 1.0])
    w = torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(weighted_kmeans_1d(pts, w, 3), torch.tensor([-0.95, 0.15, 0.85]))
    # fewer distinct points than levels: the table repeats, sorted
    assert weighted_kmeans_1d(torch.tensor([0.5, -0.5, 0.5]), torch.ones(3), 4).tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_pack_3bit_round_trip():
    codes = torch.randint(0, 8, (2, 3, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_3bit(codes)
    assert packed.shape == (2, 3, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_3bit(packed), codes)
    assert pack_3bit(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])).tolist() == [[0xD1, 0x58, 0x1F]]


# ---- the store ----------------------------------------------------------------------------------

LEVELS = (torch.arange(16, dtype=torch.float32) - 7.5) / 8  # exact in fp16/fp32; spans [-0.9375, 0.9375]


def _hand_calibrated(model, sparse: bool) -> tuple[KVQuant, AttachedMethod]:
    """A KVQuant attached to ``model`` with a hand-made calibration: key range [-1, 1] per channel
    (zp 0, r 1), the key table = LEVELS, the value table spanning [-1, 1]."""
    info = model_info(model)
    c = info.n_kv_heads * info.head_dim
    cfg = KVQuantConfig(bits=4, sparsity_threshold=0.99 if sparse else 1.0, first_few_fp16=1)
    method = KVQuant(cfg)
    am = AttachedMethod(model, method)
    one = torch.ones(c, dtype=torch.float16)
    v_lut = torch.linspace(-1, 1, 16)
    method.calibration = [LayerCalibration(-one, one, LEVELS.clone(), v_lut) for _ in range(info.n_layers)]
    return method, am


@pytest.mark.parametrize("sparse", [False, True])
def test_pre_rope_round_trip_is_lossless_on_levels(sparse):
    """Keys exactly on the table's levels and two-valued value tokens are stored losslessly: the
    store's keys, dequantized and re-rotated, equal the post-RoPE keys."""
    model = tiny_random_model("llama")
    info = model_info(model)
    method, am = _hand_calibrated(model, sparse)
    b, h, d = 2, info.n_kv_heads, info.head_dim
    g = torch.Generator().manual_seed(0)
    store = method.new_layer_store(0, info)
    all_post, all_v = [], []
    start = 0
    for t in (7, 1, 1, 3):  # prefill then decode steps
        pre = LEVELS[torch.randint(0, 16, (b, h, t, d), generator=g)]
        if sparse:
            pre[0, 0, -1, 0] = 3.0  # outside the key range: an exact outlier
        pos = torch.arange(start, start + t)
        cos, sin = model.model.rotary_emb(pre, pos.view(1, -1))
        post = apply_rope(pre, cos, sin)
        amp = torch.tensor([0.5, 0.25, 2.0])[torch.randint(0, 3, (b, 1, t, 1), generator=g)]
        vals = amp * (torch.randint(0, 2, (b, h, t, d), generator=g) * 2 - 1).float()  # per token: ±a
        store.append(post, vals, Observation(positions=pos, pre_rope_keys=pre, rope=(cos, sin)))
        start += t
        all_post.append(post)
        all_v.append(vals)
    k, v = store.read(torch.float32)
    assert torch.allclose(k, torch.cat(all_post, dim=-2), atol=1e-6)
    assert torch.equal(v, torch.cat(all_v, dim=-2))
    assert store.sink_k.length == 1 and store.q_len == 11
    if sparse:
        assert store.k_sparse.count >= 1
    am.detach()


def _reference_read(store, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``KVQuantStore.read`` before the lookup-table read, kept verbatim: the whole history dequantized
    token-major with ``_denormalize``, outliers scattered, RoPE tables of the positions computed afresh,
    ``apply_rope``, then ``torch.cat`` with the sink."""
    cal, bits = store._cal(store.k_codes.device), store.cfg.bits

    def scatter(sp, dense):
        if sp.idx is not None:
            flat = dense.reshape(-1)
            flat[sp.idx.long()] = sp.val.to(dense.dtype)
            dense = flat.view_as(dense)
        return dense

    def to_bhtd(x):
        t, b, _ = x.shape
        return x.view(t, b, store.info.n_kv_heads, store.info.head_dim).permute(1, 2, 0, 3)

    ks, vs = [store.sink_k.read(dtype)], [store.sink_v.read(dtype)]
    xn = cal.k_lut[unpack_codes(store.k_codes, bits).long()]
    k_pre = to_bhtd(scatter(store.k_sparse, kvq._denormalize(xn, cal.k_lower, cal.k_upper)))
    positions = torch.arange(store.q_start, store.q_start + store.q_len, device=k_pre.device)
    cos, sin = store.rope(positions)
    ks.append(apply_rope(k_pre, cos, sin).to(dtype))
    xn = cal.v_lut[unpack_codes(store.v_codes, bits).long()]
    vs.append(
        to_bhtd(scatter(store.v_sparse, kvq._denormalize(xn, store.v_lower[..., None], store.v_upper[..., None]))).to(
            dtype
        )
    )
    ks, vs = [k for k in ks if k is not None], [v for v in vs if v is not None]
    k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=-2)
    v = vs[0] if len(vs) == 1 else torch.cat(vs, dim=-2)
    return k.contiguous(), v.contiguous()


@pytest.mark.parametrize(
    "spec", ["kvquant-4b-1%", "kvquant-4b", "kvquant-3b-1%", "kvquant-2b-1%", "kvquant-4b-1%:first_few_fp16=0"]
)
def test_read_is_bit_identical_to_the_reference(spec):
    """On a calibrated cache (prefill, then decode steps through the model, batch 2), every layer's
    ``read`` equals the previous computation (``_reference_read``) bit for bit, in fp32, fp16 and bf16."""
    model = tiny_random_model("llama")
    ids = _ids(model.config.vocab_size, b=2, t=33, seed=3)
    with AttachedMethod(model, build_method(spec)) as am, torch.no_grad():
        am.calibrate(_calib(model))
        cache = am.new_cache()
        forward(model, ids[:, :30], cache)
        for i in range(30, 33):
            forward(model, ids[:, i : i + 1], cache)
            n_out = 0
            for store in cache.stores:
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    (k, v), (rk, rv) = store.read(dtype), _reference_read(store, dtype)
                    assert k.dtype == v.dtype == dtype and k.is_contiguous() and v.is_contiguous()
                    assert torch.equal(k, rk) and torch.equal(v, rv)
                n_out += store.k_sparse.count + store.v_sparse.count
            assert (n_out > 0) == ("%" in spec)


def test_generate_and_memory_equals_bytes_held():
    model = tiny_random_model("qwen2")
    info = model_info(model)
    for spec in ("kvquant-4b", "kvquant-3b-1%"):
        method = build_method(spec)
        with AttachedMethod(model, method) as am:
            am.calibrate(_calib(model))
            cache = am.new_cache()
            ids = _ids(model.config.vocab_size, b=2, t=20, seed=5)
            with torch.no_grad():
                forward(model, ids, cache)
                forward(model, ids[:, :1], cache)
            mem = cache.memory()
            held, outliers = 0, 0
            for store in cache.stores:
                held += tensor_bytes(store.sink_k.data) + tensor_bytes(store.sink_v.data)
                for t in (store.k_codes, store.v_codes, store.v_lower, store.v_upper):
                    held += tensor_bytes(t)
                for sp in (store.k_sparse, store.v_sparse):
                    held += tensor_bytes(sp.idx) + tensor_bytes(sp.val)
                    outliers += sp.count
                held += sum(tensor_bytes(t) for t in (store.calib.k_lower, store.calib.k_upper))
                held += sum(tensor_bytes(t) for t in (store.calib.k_lut, store.calib.v_lut))
            assert mem.total_bytes == held
            n = 2 * info.n_layers * 2 * info.n_kv_heads * 21 * info.head_dim
            n_sink = 2 * info.n_layers * 2 * info.n_kv_heads * 1 * info.head_dim
            bits = method.config.bits
            assert mem.elements == n
            assert mem.bytes["codes"] == (n - n_sink) * bits // 8  # 3-bit codes really take 3 bits
            assert mem.bytes["fp_tokens"] == 2 * n_sink
            assert mem.payload_bits == 16 * n_sink + 16 * outliers + bits * (n - n_sink - outliers)
            assert (outliers > 0) == spec.endswith("%")

            gen = generate(model, ids[:1, :10], am.new_cache(), max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert gen.shape == (1, 16)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_tracks_quantized_keys(family):
    """Decoding through the cache stays close to the reference (it is a 4-bit cache of pre-RoPE keys
    re-rotated at read time: a RoPE mistake would destroy the logits)."""
    model = tiny_random_model(family)
    ids = _ids(model.config.vocab_size, t=24, seed=7)
    with torch.no_grad():
        ref = forward(model, ids).logits[:, -1]
        method = build_method("kvquant-4b-1%")
        with AttachedMethod(model, method) as am:
            am.calibrate(_calib(model))
            cache = am.new_cache()
            forward(model, ids[:, :-1], cache)
            step = forward(model, ids[:, -1:], cache).logits[:, -1]
    assert torch.nn.functional.cosine_similarity(step, ref).item() > 0.99


def test_calibration_is_cached(monkeypatch):
    model = tiny_random_model("llama")
    calib = _calib(model, n=2)
    first = build_method("kvquant-2b-1%")
    with AttachedMethod(model, first) as am:
        am.calibrate(calib)
    assert first.calibration_source == "computed"

    class Recalibrated(Exception):
        pass

    def refuse(*_args, **_kwargs):
        raise Recalibrated

    monkeypatch.setattr(kvq, "calibrate_kvquant", refuse)
    second = build_method("kvquant-2b-1%")
    with AttachedMethod(model, second) as am:
        am.calibrate(calib)  # a cache hit: calibrate_kvquant is not called
    assert second.calibration_source.endswith(".pt")
    for a, b in zip(first.calibration, second.calibration, strict=True):
        assert torch.equal(a.k_lut, b.k_lut) and torch.equal(a.v_lut, b.v_lut) and torch.equal(a.k_upper, b.k_upper)
    # another option or other windows: a different entry, so calibration runs
    for spec, windows in (("kvquant-3b-1%", calib), ("kvquant-2b-1%", calib[:1])):
        with AttachedMethod(model, build_method(spec)) as am, pytest.raises(Recalibrated):
            am.calibrate(windows)


def test_calibration_tables_and_ranges():
    model = tiny_random_model("llama")
    info = model_info(model)
    method = build_method("kvquant-4b")
    with AttachedMethod(model, method) as am:
        am.calibrate(_calib(model))
    # per-channel key ranges without outliers: min / max of the k_proj outputs, rounded outwards to fp16
    keys = []
    h = model.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda _m, _i, o: keys.append(o.reshape(-1, o.shape[-1]))
    )
    with torch.no_grad():
        for ids in _calib(model):
            forward(model, ids)
    h.remove()
    k = torch.cat(keys)
    cal = method.calibration[1]
    assert cal.k_lower.shape == (info.n_kv_heads * info.head_dim,) and cal.k_lower.dtype == torch.float16
    assert (cal.k_lower.float() <= k.amin(0)).all() and (cal.k_upper.float() >= k.amax(0)).all()
    assert torch.allclose(cal.k_upper.float(), k.amax(0), rtol=2e-3)
    for lut in (cal.k_lut, cal.v_lut):
        assert lut.shape == (16,) and (lut.diff() > 0).all() and lut.abs().max() <= 1
    # Fisher weighting changes the tables
    plain = build_method("kvquant-4b:fisher=false")
    with AttachedMethod(model, plain) as am:
        am.calibrate(_calib(model))
    assert not torch.allclose(plain.calibration[1].k_lut, cal.k_lut)


def test_refusals():
    with pytest.raises(MethodSpecError):
        build_method("kvquant:bits=5")
    with pytest.raises(MethodSpecError):
        build_method("kvquant:sparsity=0.3")
    model = tiny_random_model("llama", num_key_value_heads=1, num_attention_heads=4, head_dim=12)
    with pytest.raises(MethodSpecError, match="3 bits"):
        AttachedMethod(model, build_method("kvquant-3b-1%"))
    model = tiny_random_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        AttachedMethod(model, build_method("kvquant"))
    model = tiny_random_model("llama")
    with AttachedMethod(model, build_method("kvquant")) as am, pytest.raises(RuntimeError, match="calibrate"):
        am.new_cache()


def test_stories_kvquant_4b_beats_int4(real_stories, stories, data_dir):
    specs = ("fp16", "int4", "kvquant-4b", "kvquant-4b-1%", "kvquant-3b-1%", "kvquant-2b-1%")
    ppl = wikitext_ppl(stories, data_dir, specs)
    print("stories260K wikitext2 ppl (4 x 256):", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["kvquant-4b"] < ppl["int4"]
    assert ppl["kvquant-4b-1%"] < ppl["int4"]
