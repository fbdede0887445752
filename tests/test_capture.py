"""The calibration / capture API of harness.integration, and harness.files.

Captured signals are checked against the modules computed by hand (the tests may touch modules;
methods may not), hooks against their removal, weight edits against exact restoration.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from harness.files import (
    calibration_cache_path,
    load_calibration,
    save_calibration,
    torch_save_atomic,
    write_json_atomic,
    write_text_atomic,
)
from harness.integration import (
    CAPTURE_SIGNALS,
    AttachedMethod,
    WeightEdits,
    apply_rope,
    attention_projections,
    attention_scaling,
    calibration_mode,
    capture,
    forward,
    model_info,
    rope_tables,
)
from harness.interface import build_method
from harness.models import tiny_random_model

FAMILIES = ["llama", "qwen2"]


def _ids(model, b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _heads(x: torch.Tensor, d: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, -1, d).transpose(1, 2)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _model(family: str):
    """A tiny model; Qwen2's q/k/v biases made non-zero so that they matter."""
    model = tiny_random_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_signals_equal_the_projections_by_hand(family):
    model = _model(family)
    info = model_info(model)
    ids = _ids(model)
    signals = CAPTURE_SIGNALS - {"attention"}
    with torch.no_grad(), capture(model, signals) as cap:
        logits = forward(model, ids).logits
    assert sorted(cap.layers) == list(range(info.n_layers))
    with torch.no_grad():
        ref = forward(model, ids).logits
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(ids.shape[1]).view(1, -1))
        first = model.model.layers[0].input_layernorm(hidden)
    assert torch.equal(logits, ref)  # capturing changes nothing
    assert torch.equal(cap.layers[0]["block_input"], first)
    for i, layer in enumerate(model.model.layers):
        got = cap.layers[i]
        assert set(got) == signals
        x = got["block_input"]  # [B, T, hidden]
        assert x.shape == (*ids.shape, info.hidden_size)
        attn = layer.self_attn
        with torch.no_grad():
            k, v, q = (_heads(p(x), info.head_dim) for p in (attn.k_proj, attn.v_proj, attn.q_proj))
        assert got["pre_rope_keys"].shape == (ids.shape[0], info.n_kv_heads, ids.shape[1], info.head_dim)
        assert torch.equal(got["pre_rope_keys"], k) and torch.equal(got["values"], v)
        assert torch.equal(got["rope"][0], cos) and torch.equal(got["rope"][1], sin)
        assert got["queries"].shape == (ids.shape[0], info.n_heads, ids.shape[1], info.head_dim)
        assert torch.equal(got["queries"], apply_rope(q, cos, sin))


def test_hooks_are_removed_and_on_layer_streams():
    model = _model("llama")
    info = model_info(model)
    ids = _ids(model)
    before = _hook_count(model)
    seen = []
    with (
        torch.no_grad(),
        capture(model, {"pre_rope_keys", "block_input"}, on_layer=lambda i, s: seen.append((i, set(s)))) as cap,
    ):
        assert _hook_count(model) > before
        forward(model, ids)
        forward(model, ids)
    assert _hook_count(model) == before
    expect = [(i, {"pre_rope_keys", "block_input"}) for i in range(info.n_layers)]
    assert seen == expect * 2  # once per layer and forward, in layer order
    assert cap.layers == {}  # with on_layer nothing is kept unless keep=True
    forward(model, ids)
    assert len(seen) == 2 * info.n_layers  # nothing is called after the context
    # an error inside the context removes the hooks too
    with pytest.raises(RuntimeError, match="boom"), capture(model, {"values", "attention"}):
        assert model.config._attn_implementation != "sdpa"
        raise RuntimeError("boom")
    assert _hook_count(model) == before and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="unknown signals"), capture(model, {"keys"}):
        pass
    with pytest.raises(ValueError, match="grad=True"), capture(model, {"queries"}, grad=True):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_of_projection_outputs(family):
    """∂L/∂(k_proj output) from the capture, contracted with the block input, is ∂L/∂W_k."""
    model = _model(family)
    info = model_info(model)
    ids = _ids(model, b=1, t=16)
    layer = model.model.layers[1].self_attn
    with calibration_mode(model, trainable=[layer.k_proj.weight, layer.v_proj.weight]):
        ref = forward(model, ids, labels=ids)
        gk, gv = torch.autograd.grad(ref.loss, [layer.k_proj.weight, layer.v_proj.weight])
    with (
        calibration_mode(model, trainable=()),
        capture(model, {"pre_rope_keys", "values", "block_input"}, grad=True) as cap,
    ):
        out = forward(model, ids, labels=ids)
        out.loss.backward()
    assert torch.equal(out.logits, ref.logits)  # the leaves carry the same values
    assert all(p.grad is None for p in model.parameters())
    x = cap.layers[1]["block_input"].reshape(-1, info.hidden_size)  # [T, hidden]
    for name, g_w in (("pre_rope_keys", gk), ("values", gv)):
        g = cap.grad(1, name)
        assert g.shape == cap.layers[1][name].shape
        rows = g.transpose(1, 2).reshape(-1, info.n_kv_heads * info.head_dim)  # [T, H_kv * D]
        assert torch.allclose(rows.T @ x, g_w, rtol=1e-4, atol=1e-6)
    # "cut": every captured output a fresh leaf; the last layer's gradient is the same, an earlier
    # layer's misses the paths through the later layers' k_proj
    with calibration_mode(model, trainable=()), capture(model, {"pre_rope_keys"}, grad="cut") as cut:
        forward(model, ids, labels=ids).loss.backward()
    last = info.n_layers - 1
    assert torch.allclose(cut.grad(last, "pre_rope_keys"), cap.grad(last, "pre_rope_keys"), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(cut.grad(0, "pre_rope_keys"), cap.grad(0, "pre_rope_keys"), rtol=1e-3, atol=0)
    with capture(model, {"pre_rope_keys"}) as plain:
        forward(model, ids)
    with pytest.raises(ValueError, match="grad=True"):
        plain.grad(0, "pre_rope_keys")
    with pytest.raises(ValueError, match="accepted"), capture(model, {"values"}, grad="some"):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities(family):
    model = _model(family)
    info = model_info(model)
    ids = _ids(model)
    with torch.no_grad():
        ref = forward(model, ids).logits
        with capture(model, {"attention", "queries", "pre_rope_keys", "rope"}) as cap:
            logits = forward(model, ids).logits
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(logits, ref, atol=1e-5)
    scaling = attention_scaling(model)
    assert scaling == model.model.layers[0].self_attn.scaling
    t = ids.shape[1]
    for i in range(info.n_layers):
        got = cap.layers[i]
        probs = got["attention"]
        assert probs.shape == (ids.shape[0], info.n_heads, t, t) and probs.dtype == torch.float32
        k = apply_rope(got["pre_rope_keys"], *got["rope"]).repeat_interleave(info.n_heads // info.n_kv_heads, dim=1)
        scores = got["queries"] @ k.transpose(-1, -2) * scaling
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        assert torch.allclose(probs, torch.softmax(scores, dim=-1), atol=1e-6)


def test_capture_inside_an_attached_method():
    """Attention captured while a method that observes attention is attached: the harness's
    attention is wrapped, its cache still works, and both are undone in order."""
    model = _model("llama")
    ids = _ids(model, b=1)
    method = build_method("mikv")
    with AttachedMethod(model, method) as am:
        attached_impl = model.config._attn_implementation
        with torch.no_grad():
            cache = am.new_cache()
            ref = forward(model, ids, cache).logits
            with capture(model, {"attention"}) as cap:
                cache = am.new_cache()
                logits = forward(model, ids, cache).logits
        assert torch.equal(logits, ref)
        assert cap.layers[0]["attention"].shape[-1] == ids.shape[1]
        assert model.config._attn_implementation == attached_impl
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_fold_and_restore_exactly(family):
    model = _model(family)
    info = model_info(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    projections = attention_projections(model)
    assert len(projections) == info.n_layers
    for layer, p in zip(model.model.layers, projections, strict=True):
        assert p.k.weight is layer.self_attn.k_proj.weight and p.o.weight is layer.self_attn.o_proj.weight
        assert (p.q.bias is not None) == (family == "qwen2")
    ids = _ids(model)
    ref = forward(model, ids).logits
    edits = WeightEdits()
    g = torch.Generator().manual_seed(2)
    n_rep = info.n_heads // info.n_kv_heads
    for p in projections:  # q·k unchanged: q channels × λ, k channels ÷ λ (per KV head, GQA-shared)
        half = torch.rand(info.n_kv_heads, info.head_dim // 2, generator=g, dtype=torch.float64) + 0.5
        lam = torch.cat([half, half], dim=-1)  # channels j and j + D/2 share λ: commutes with RoPE
        lq, lk = lam.repeat_interleave(n_rep, dim=0).reshape(-1), lam.reshape(-1)
        edits.set("q", p.q.weight, p.q.weight.double() * lq[:, None])
        edits.set("k", p.k.weight, p.k.weight.double() / lk[:, None])
        if p.q.bias is not None:
            edits.set("q", p.q.bias, p.q.bias.double() * lq)
            edits.set("k", p.k.bias, p.k.bias.double() / lk)
    assert len(edits) == info.n_layers * (4 if family == "qwen2" else 2)
    assert not torch.equal(projections[0].k.weight, before["model.layers.0.self_attn.k_proj.weight"])
    assert torch.allclose(forward(model, ids).logits, ref, atol=1e-4)
    edits.restore(("k",))  # a part of the edits
    assert torch.equal(projections[0].k.weight, before["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(projections[0].q.weight, before["model.layers.0.self_attn.q_proj.weight"])
    edits.restore()
    assert len(edits) == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_mode_restores_flags_and_mode():
    model = _model("llama")
    model.train()
    head = model.lm_head.weight
    head.requires_grad_(True)
    w = attention_projections(model)[0].v.weight
    with calibration_mode(model, trainable=[w]):
        assert not model.training
        assert [p for p in model.parameters() if p.requires_grad] == [w]
    assert model.training and head.requires_grad and not w.requires_grad
    with calibration_mode(model):  # mode only
        assert not model.training and head.requires_grad
    assert model.training


def test_rope_tables_are_the_models():
    model = _model("llama")
    rope = rope_tables(model)
    assert rope.rope_type == "default" and rope.dim(torch.device("cpu")) == model_info(model).head_dim
    positions = torch.arange(5, 12)
    cos, sin = rope(positions)
    ref = model.model.rotary_emb(torch.zeros(1), positions.view(1, -1))
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1]) and cos.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# harness.files
# --------------------------------------------------------------------------------------------


def test_atomic_writes(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1, "p": tmp_path})
    assert path.read_text() == '{\n  "x": 1,\n  "p": "' + str(tmp_path) + '"\n}'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    write_text_atomic(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    pt = tmp_path / "t.pt"
    torch_save_atomic(pt, {"a": torch.arange(3)})
    assert torch.equal(torch.load(pt, weights_only=True)["a"], torch.arange(3))

    # a failing write leaves the old file and no temporary behind
    def broken(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        torch_save_atomic(pt, {"a": torch.zeros(1)})
    assert torch.equal(torch.load(pt, weights_only=True)["a"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.pt"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.json"]


def test_calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOQAE_HARNESS_CACHE", str(tmp_path))
    ids = [torch.arange(6).view(1, 6), torch.arange(4)]
    path = calibration_cache_path("kvx", "org/My Model/", "fp", {"v": 1, "bits": 2}, ids)
    assert path.parent == tmp_path / "calibration" and path.name.startswith("kvx-My_Model-")
    assert path == calibration_cache_path("kvx", "other/name/My Model", "fp", {"bits": 2, "v": 1}, ids)
    for other in (
        calibration_cache_path("kvx", "My Model", "fp2", {"v": 1, "bits": 2}, ids),
        calibration_cache_path("kvx", "My Model", "fp", {"v": 1, "bits": 3}, ids),
        calibration_cache_path("kvx", "My Model", "fp", {"v": 1, "bits": 2}, ids[:1]),
        calibration_cache_path("kvx", "My Model", "fp", {"v": 1, "bits": 2}, [ids[0].view(2, 3), ids[1]]),
    ):
        assert other.name != path.name
    assert load_calibration(path) is None  # missing
    save_calibration(path, [{"lut": torch.linspace(-1, 1, 4)}])
    assert torch.equal(load_calibration(path)[0]["lut"], torch.linspace(-1, 1, 4))
    path.write_bytes(b"not a checkpoint")
    assert load_calibration(path) is None  # unreadable: recalibrate
