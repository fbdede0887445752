"""QoQ (QServe) KV4: SmoothAttention pairing and folding, Hadamard value rotation, KV4 storage, perplexity."""

from __future__ import annotations

import pytest
import torch
from conftest import wikitext_ppl

from baselines.qoq import QoQ, smooth_scales, sylvester_hadamard
from harness.integration import AttachedMethod, apply_rope, forward, generate, model_info
from harness.interface import MethodSpecError, build_method
from harness.models import tiny_random_model


def _ids(vocab: int, b: int = 2, t: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _model(family: str):
    """A tiny random model; Qwen2's q/k/v biases are made non-zero so their folding is exercised,
    and a few key channels are blown up so SmoothAttention has outliers to migrate."""
    model = tiny_random_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight[3] *= 8.0
            attn.k_proj.weight[20] *= 5.0
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g))
    return model


def _calib(model, n: int = 3) -> list[torch.Tensor]:
    return [_ids(model.config.vocab_size, b=1, t=32, seed=10 + i) for i in range(n)]


def _post_rope_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """q·k (post-RoPE, GQA-expanded) of every layer for ``ids``, from hooks on q/k_proj."""
    info = model_info(model)
    got: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        handles.append(
            attn.register_forward_pre_hook(
                lambda _m, _a, kw, i=i: got.__setitem__(("pe", i), kw["position_embeddings"]), with_kwargs=True
            )
        )
        handles.append(attn.q_proj.register_forward_hook(lambda _m, _i, o, i=i: got.__setitem__(("q", i), o)))
        handles.append(attn.k_proj.register_forward_hook(lambda _m, _i, o, i=i: got.__setitem__(("k", i), o)))
    with torch.no_grad():
        forward(model, ids)
    for h in handles:
        h.remove()
    scores = []
    for i in range(info.n_layers):
        cos, sin = got[("pe", i)]
        b, t, _ = got[("q", i)].shape
        q = apply_rope(got[("q", i)].view(b, t, -1, info.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(got[("k", i)].view(b, t, -1, info.head_dim).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(info.n_heads // info.n_kv_heads, dim=1)
        scores.append(q @ k.transpose(-1, -2))
    return scores


def test_sylvester_hadamard():
    h = sylvester_hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=h.dtype), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.equal(h[1] * 8**0.5, torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1], dtype=h.dtype))
    with pytest.raises(ValueError):
        sylvester_hadamard(12)


def test_smooth_scales_by_hand():
    # D = 4: rotate-half pairs are (0, 2) and (1, 3)
    spans = torch.tensor([[1.0, 4.0, 9.0, 0.25], [0.0, 0.0, 0.0, 16.0]])
    lam = smooth_scales(spans, alpha=0.5)
    assert lam.tolist() == [[3.0, 2.0, 3.0, 2.0], [1.0, 4.0, 1.0, 4.0]]  # zero span -> 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lambda_pairing_and_folding_keep_scores(family):
    model = _model(family)
    info = model_info(model)
    ids = _ids(model.config.vocab_size)
    ref_logits = forward(model, ids).logits
    ref_scores = _post_rope_scores(model, ids)
    method = QoQ()
    with AttachedMethod(model, method) as am:
        am.calibrate(_calib(model))
        half = info.head_dim // 2
        for lam in method.lam:
            assert lam.shape == (info.n_kv_heads, info.head_dim)
            assert torch.equal(lam[:, :half], lam[:, half:])  # λ_j == λ_{j+D/2}
            assert (lam > 0).all()
        assert max(lam.max().item() for lam in method.lam) > 1.5  # the blown-up channels are smoothed
        scores = _post_rope_scores(model, ids)
        logits = forward(model, ids).logits  # plain forward: folded weights, no quantization
    for s, r in zip(scores, ref_scores, strict=True):
        assert torch.allclose(s, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_lambda_is_sqrt_of_post_rope_key_absmax():
    model = _model("llama")
    info = model_info(model)
    calib = _calib(model, n=2)
    # post-RoPE key spans measured independently of the method
    spans = [None] * info.n_layers
    got: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.self_attn.register_forward_pre_hook(
                lambda _m, _a, kw, i=i: got.__setitem__(i, kw["position_embeddings"]), with_kwargs=True
            )
        )

        def k_hook(_m, _inp, out, i=i):
            k = apply_rope(out.view(1, -1, info.n_kv_heads, info.head_dim).transpose(1, 2), *got[i])
            m = k.abs().amax(dim=(0, 2))
            spans[i] = m if spans[i] is None else torch.maximum(spans[i], m)

        handles.append(layer.self_attn.k_proj.register_forward_hook(k_hook))
    with torch.no_grad():
        for ids in calib:
            forward(model, ids)
    for h in handles:
        h.remove()
    method = QoQ()
    with AttachedMethod(model, method) as am:
        am.calibrate(calib)
        half = info.head_dim // 2
        for lam, span in zip(method.lam, spans, strict=True):
            pooled = torch.maximum(span[:, :half], span[:, half:]).double().sqrt()
            assert torch.allclose(lam, torch.cat([pooled, pooled], dim=-1), rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_value_rotation_keeps_output_and_rotates_values(family):
    model = _model(family)
    info = model_info(model)
    ids = _ids(model.config.vocab_size)
    ref = forward(model, ids).logits
    v_ref = {}
    h = model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda _m, _i, o: v_ref.__setitem__("v", o))
    forward(model, ids)
    h.remove()
    method = build_method("qoq:smooth=false")
    assert not method.needs_calibration
    with AttachedMethod(model, method):
        out = forward(model, ids).logits
        layer = model.model.layers[0]
        v_rot = layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens(ids)))
    assert (out - ref).abs().max().item() < 1e-4
    r = sylvester_hadamard(info.head_dim, torch.float32)
    v = v_ref["v"].view(*ids.shape, info.n_kv_heads, info.head_dim)
    assert torch.allclose(v_rot.view_as(v), v @ r.T, atol=1e-5)


def test_detach_restores_weights_exactly():
    model = _model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with AttachedMethod(model, QoQ()) as am:
        am.calibrate(_calib(model))
        am.calibrate(_calib(model, n=2))  # recalibrating refolds from the original weights
        assert not torch.equal(
            model.model.layers[0].self_attn.k_proj.weight, before["model.layers.0.self_attn.k_proj.weight"]
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kv4_storage_matches_int4_and_held_bytes():
    model = _model("qwen2")
    info = model_info(model)
    ids = _ids(model.config.vocab_size, b=2, t=32)
    mems = {}
    for spec in ("int4", "qoq"):
        method = build_method(spec)
        with AttachedMethod(model, method) as am:
            if method.needs_calibration:
                am.calibrate(_calib(model))
            cache = am.new_cache()
            with torch.no_grad():
                forward(model, ids, cache)
            mem = cache.memory()
            held = 0
            for store in cache.stores:
                for seq in (store.k, store.v):
                    assert seq.q.bits == 4 and seq.q.group == info.head_dim and seq.q.axis == -1  # per token, per head
                    held += sum(t.numel() * t.element_size() for t in (seq.q.codes, seq.q.scale, seq.q.zero))
            assert mem.total_bytes == held
            mems[spec] = mem.as_dict()
    assert mems["qoq"] == mems["int4"]
    n = 2 * info.n_layers * 2 * info.n_kv_heads * 32 * info.head_dim
    assert mems["qoq"]["bytes"]["codes"] == n // 2
    assert mems["qoq"]["bytes"]["scales"] == (n // info.head_dim) * 4  # fp16 scale + zero per token per head
    assert mems["qoq"]["nominal_bits"] == 4.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate(family):
    model = _model(family)
    ids = _ids(model.config.vocab_size, b=1, t=12, seed=3)
    with AttachedMethod(model, QoQ()) as am:
        am.calibrate(_calib(model))
        cache = am.new_cache()
        out = generate(model, ids, cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 20)
    assert cache.get_seq_length() == 19
    assert cache.memory().nominal_bits == 4.0


def test_refusals():
    model = tiny_random_model("llama", head_dim=12)
    with pytest.raises(MethodSpecError, match="rotate_values=false"):
        AttachedMethod(model, build_method("qoq"))
    AttachedMethod(model, build_method("qoq:rotate_values=false")).detach()
    model = _model("llama")
    with AttachedMethod(model, QoQ()) as am, pytest.raises(RuntimeError, match="calibrate"):
        am.new_cache()
    with pytest.raises(MethodSpecError):
        build_method("qoq:bits=3")


def test_stories_perplexity_between_fp16_and_int2(real_stories, stories, data_dir):
    ppl = wikitext_ppl(stories, data_dir, ("fp16", "int4", "int2", "qoq"))
    print("stories260K wikitext2 ppl (4 x 256):", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["fp16"] < ppl["qoq"] < ppl["int2"]
