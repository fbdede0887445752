"""MoQAE: votes and tie rule, routing freezing and sharing, decode buffering, storage accounting."""

from __future__ import annotations

import pytest
import torch

from harness.integration import AttachedMethod, forward, generate, model_info
from harness.interface import MethodSpecError, build_method
from harness.models import tiny_random_model
from moqae.router import ChunkRouter, RouterBank, chunk_votes

BITS = (16, 4, 2)


def test_chunk_votes_majority_and_ties():
    # votes are expert indices into BITS = (16, 4, 2)
    assert chunk_votes(torch.tensor([[1, 1, 2, 0]]), BITS).tolist() == [1]  # majority INT4
    assert chunk_votes(torch.tensor([[2, 2, 1, 1]]), BITS).tolist() == [1]  # tie INT2/INT4 -> INT4
    assert chunk_votes(torch.tensor([[0, 2, 0, 2]]), BITS).tolist() == [0]  # tie FP16/INT2 -> FP16
    assert chunk_votes(torch.tensor([[2, 2, 2, 0]]), BITS).tolist() == [2]
    # expert order does not matter for the tie rule: (2, 16) -> tie goes to 16 (index 1)
    assert chunk_votes(torch.tensor([[0, 1]]), (2, 16)).tolist() == [1]


def test_router_is_a_gated_mlp():
    r = ChunkRouter(hidden_size=6, n_experts=3)
    x = torch.randn(2, 5, 6)
    expected = torch.softmax(r.w3(torch.nn.functional.silu(r.w1(x)) * r.w2(x)), dim=-1)
    assert torch.allclose(r(x), expected, atol=1e-6)
    assert r.w1.weight.shape == (3, 6)  # hidden width = number of experts by default


def test_router_bank_sharing():
    bank = RouterBank(n_layers=7, hidden_size=4, n_experts=3, width=None, share_group=3)
    assert bank.routed_layers == [0, 3, 6] and len(bank.routers) == 3
    assert [bank.leader(i) for i in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert bank.router(4) is bank.routers[1]


def _run(model, spec, ids, decode_steps=0):
    method = build_method(spec)
    with AttachedMethod(model, method) as am:
        cache = am.new_cache()
        with torch.no_grad():
            forward(model, ids[:, : ids.shape[1] - decode_steps], cache)
            for t in range(ids.shape[1] - decode_steps, ids.shape[1]):
                forward(model, ids[:, t : t + 1], cache)
    return method, cache


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", num_hidden_layers=6)


def _ids(model, t=40, b=1, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def test_routing_freezing_keeps_first_chunk_fp16(model):
    ids = _ids(model)
    for freeze in (True, False):
        # router biased to INT2 for every token: only RF can keep chunk 0 in FP16
        method = build_method(f"moqae:ckpt=random,chunk=8,freeze_first={freeze}")
        with AttachedMethod(model, method) as am:
            method.route = lambda layer_idx, h: torch.tensor([0.1, 0.2, 0.7]).expand(*h.shape[:-1], 3)
            cache = am.new_cache()
            with torch.no_grad():
                forward(model, ids, cache)
        experts = [[c.expert for c in store.chunks[0]] for store in cache.stores]
        for row in experts:
            assert row[1:] == [2] * 4
            assert row[0] == (0 if freeze else 2)


def test_routing_sharing_reuses_the_leader_decision_and_skips_other_routers(model):
    ids = _ids(model, t=64)
    method = build_method("moqae:ckpt=random,chunk=8,share=3,seed=3")
    calls = []
    with AttachedMethod(model, method) as am:
        original = method.route

        def spy(layer_idx, hidden):
            calls.append(layer_idx)
            return original(layer_idx, hidden)

        method.route = spy
        cache = am.new_cache()
        with torch.no_grad():
            forward(model, ids, cache)
    assert sorted(set(calls)) == [0, 3]
    decisions = [[c.expert for c in store.chunks[0]] for store in cache.stores]
    assert decisions[0] == decisions[1] == decisions[2]
    assert decisions[3] == decisions[4] == decisions[5]


def test_decode_buffering_gives_prefill_decisions(model):
    ids = _ids(model, t=40, seed=5)
    spec = "moqae:ckpt=random,chunk=8,share=2,seed=1"
    _, prefill = _run(model, spec, ids)
    _, decode = _run(model, spec, ids, decode_steps=25)
    for a, b in zip(prefill.stores, decode.stores, strict=True):
        assert [c.expert for c in a.chunks[0]] == [c.expert for c in b.chunks[0]]
        assert a.buf_k.length == b.buf_k.length == 40 % 8
    mixed = {c.expert for s in prefill.stores for c in s.chunks[0]}
    assert len(mixed) > 1, "the random router should pick more than one expert on this input"


def test_memory_equals_bytes_held_and_nominal_bits(model):
    ids = _ids(model, t=44, b=2, seed=2)
    method, cache = _run(model, "moqae:ckpt=random,chunk=8,seed=4", ids, decode_steps=3)
    info = model_info(model)
    held, payload, elements = 0, 0.0, 0
    for store in cache.stores:
        for row in store.chunks:
            for c in row:
                for t in (c.k, c.v):
                    if isinstance(t, torch.Tensor):
                        held += t.numel() * 2
                        payload += t.numel() * 16
                        elements += t.numel()
                    else:
                        held += t.codes.numel() + t.scale.numel() * 2 + t.zero.numel() * 2
                        payload += t.numel * t.bits
                        elements += t.numel
        held += 2 * store.buf_k.data.numel() * 2 + (store.votes.numel() if store.votes is not None else 0)
        payload += 2 * store.buf_k.data.numel() * 16
        elements += 2 * store.buf_k.data.numel()
    mem = cache.memory()
    # 44 tokens, chunk 8: 5 complete chunks per sequence, 2 sequences
    assert all(sum(layer["expert_chunks"]) == 10 for layer in cache.layer_stats())
    assert mem.total_bytes == held
    assert mem.elements == elements == 2 * info.n_layers * 2 * info.n_kv_heads * 44 * info.head_dim
    assert mem.nominal_bits == pytest.approx(payload / elements)


def test_generate_and_gqa_families():
    for family in ("llama", "qwen2", "mistral"):
        m = tiny_random_model(family)
        ids = _ids(m, t=20)
        with AttachedMethod(m, build_method("moqae:ckpt=random,chunk=4")) as am:
            out = generate(m, ids, am.new_cache(), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 26)


def test_bad_options_and_missing_checkpoint(model):
    with pytest.raises(MethodSpecError, match="chunk=0 is not an integer >= 1"):
        build_method("moqae:chunk=0")
    with pytest.raises(MethodSpecError, match="experts"):
        build_method("moqae:experts=16/3")
    with pytest.raises(MethodSpecError, match="lambda"):
        build_method("moqae:lambda=1.5")
    method = build_method("moqae:lambda=0.37")
    with pytest.raises(MethodSpecError, match="python -m moqae train"):
        AttachedMethod(model, method)


def _trainer(stories, data_dir, out, steps=3, estimator="reinforce", seed=0, **kw):
    from moqae.train import RouterTrainer, TrainConfig

    model, tok = stories
    cfg = TrainConfig(steps=steps, seqlen=64, windows=4, estimator=estimator, seed=seed, save_every=2,
                      method="moqae:chunk=8,share=2", **kw)  # fmt: skip
    return RouterTrainer(model, tok, cfg, data_dir=data_dir, out=out)


@pytest.mark.parametrize("estimator", ["gumbel", "reinforce", "paper"])
def test_training_gradients_reach_only_the_router(stories, data_dir, tmp_path, estimator):
    model, _ = stories
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = _trainer(stories, data_dir, tmp_path, estimator=estimator)
    start = {k: v.clone() for k, v in tr.bank.state_dict().items()}
    tr.train_step()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.bank.parameters())
    assert any(not torch.equal(start[k], v) for k, v in tr.bank.state_dict().items())
    tr.attached.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_is_deterministic_and_resumes(stories, data_dir, tmp_path):
    a = _trainer(stories, data_dir, tmp_path / "a", steps=4)
    path_a = a.train(progress=False)
    b = _trainer(stories, data_dir, tmp_path / "b", steps=4)
    b.train_step(), b.train_step()
    b._save_state()
    b.attached.detach()
    resumed = _trainer(stories, data_dir, tmp_path / "b", steps=4)  # picks up at step 2
    assert resumed.step == 2
    path_b = resumed.train(progress=False)
    from safetensors.torch import load_file

    assert path_a.name == "router.safetensors"
    ra, rb = load_file(path_a), load_file(path_b)
    assert all(torch.allclose(ra[k], rb[k]) for k in ra)
    # the checkpoint loads as a method and routes
    method = build_method(f"moqae:chunk=8,share=2,ckpt={path_a}")
    model, _ = stories
    with AttachedMethod(model, method) as am:
        cache = am.new_cache()
        with torch.no_grad():
            forward(model, torch.arange(40).view(1, -1), cache)
    assert cache.memory().nominal_bits > 0


@pytest.mark.parametrize("scale", ["chunk", "token"])
def test_gumbel_loss_weighs_nll_per_routing_decision(stories, data_dir, tmp_path, scale):
    """loss = λ·s·NLL + (1−λ)·bits/16 with s = N (chunk: a chunk's summed NLL) or 1 (token)."""
    tr = _trainer(stories, data_dir, tmp_path, estimator="gumbel", lam=0.3, nll_scale=scale)
    rec = tr.train_step()
    tr.attached.detach()
    s = 8.0 if scale == "chunk" else 1.0  # chunk=8 in _trainer's method spec
    assert rec["loss"] == pytest.approx(0.3 * s * rec["nll"] + 0.7 * rec["routed_bits"] / 16, rel=1e-5)
    with pytest.raises(ValueError, match="--nll-scale=window is not one of chunk, token"):
        _trainer(stories, data_dir, tmp_path / "bad", nll_scale="window")


def test_read_equals_chunk_by_chunk_reconstruction(model):
    """read() groups chunks by expert; it must return exactly the chunks in order, then the buffer."""
    ids = _ids(model, t=44, b=2, seed=2)
    _, cache = _run(model, "moqae:ckpt=random,chunk=8,seed=4", ids, decode_steps=3)
    mixed = False
    for store in cache.stores:
        k, v = store.read(torch.float32)
        for row, chunks in enumerate(store.chunks):
            mixed |= len({c.expert for c in chunks}) > 1
            ks = [c.k.float() if isinstance(c.k, torch.Tensor) else c.k.dequantize(torch.float32) for c in chunks]
            vs = [c.v.float() if isinstance(c.v, torch.Tensor) else c.v.dequantize(torch.float32) for c in chunks]
            want_k = torch.cat([*ks, store.buf_k.data[row : row + 1].float()], dim=-2)
            want_v = torch.cat([*vs, store.buf_v.data[row : row + 1].float()], dim=-2)
            assert torch.equal(k[row : row + 1], want_k) and torch.equal(v[row : row + 1], want_v)
    assert mixed, "the random router should mix experts within a row on this input"
