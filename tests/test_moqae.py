"""MoQAE: votes and tie rule, routing freezing and sharing, decode buffering, storage accounting."""

from __future__ import annotations

import pytest
import torch

from harness.integration import AttachedMethod, forward, generate, model_info
from harness.interface import MethodSpecError, build_method
from harness.models import tiny_random_model
from harness.quant import quantize
from harness.storage import FullPrecisionSeq
from moqae.router import ChunkRouter, RouterBank, chunk_votes
from moqae.store import MoQAEStore

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
        experts = [store.experts[0] for store in cache.stores]
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
    decisions = [store.experts[0] for store in cache.stores]
    assert decisions[0] == decisions[1] == decisions[2]
    assert decisions[3] == decisions[4] == decisions[5]


def test_decode_buffering_gives_prefill_decisions(model):
    ids = _ids(model, t=40, seed=5)
    spec = "moqae:ckpt=random,chunk=8,share=2,seed=1"
    _, prefill = _run(model, spec, ids)
    _, decode = _run(model, spec, ids, decode_steps=25)
    for a, b in zip(prefill.stores, decode.stores, strict=True):
        assert a.experts[0] == b.experts[0]
        assert a.buf_k.length == b.buf_k.length == 40 % 8
    mixed = {e for s in prefill.stores for e in s.experts[0]}
    assert len(mixed) > 1, "the random router should pick more than one expert on this input"


def test_memory_equals_bytes_held_and_nominal_bits(model):
    ids = _ids(model, t=44, b=2, seed=2)
    method, cache = _run(model, "moqae:ckpt=random,chunk=8,seed=4", ids, decode_steps=3)
    info = model_info(model)
    held, payload, elements = 0, 0.0, 0
    for store in cache.stores:
        for row in store.parts:
            for part in row.values():
                for t in (seq.data if isinstance(seq, FullPrecisionSeq) else seq.q for seq in part):
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


def _run_recording(model, spec, ids, decode_steps):
    """``_run`` that also records the K/V each store was given (fp16, as its buffer holds them)."""
    given: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    real = MoQAEStore.append

    def spy(self, keys, values, obs):
        given.setdefault(self.layer_idx, []).append((keys.half(), values.half()))
        return real(self, keys, values, obs)

    MoQAEStore.append = spy
    try:
        method, cache = _run(model, spec, ids, decode_steps)
    finally:
        MoQAEStore.append = real
    return method, cache, {i: [torch.cat(x, dim=-2) for x in zip(*kv, strict=True)] for i, kv in given.items()}


def test_read_equals_token_order_reconstruction(model):
    """read() restores token order from the experts' parts: bit-identical to quantizing each chunk of
    the K/V given by itself (keys per channel over the chunk, values per token), then the fp16 buffer."""
    ids = _ids(model, t=44, b=2, seed=2)
    method, cache, given = _run_recording(model, "moqae:ckpt=random,chunk=8,seed=4", ids, decode_steps=3)
    mixed = False
    for store in cache.stores:
        k, v = store.read(torch.float32)
        keys, values = given[store.layer_idx]  # [B, H, 44, D] fp16
        for row, experts in enumerate(store.experts):
            mixed |= len(set(experts)) > 1
            want_k, want_v = [], []
            for i, e in enumerate(experts):
                kc, vc = (x[row : row + 1, :, i * 8 : (i + 1) * 8].float() for x in (keys, values))
                bits = method.expert_bits[e]
                want_k.append(kc if bits == 16 else quantize(kc, bits, 8, axis=-2).dequantize())
                want_v.append(vc if bits == 16 else quantize(vc, bits, kc.shape[-1], axis=-1).dequantize())
            tail = len(experts) * 8
            want_k.append(keys[row : row + 1, :, tail:].float())
            want_v.append(values[row : row + 1, :, tail:].float())
            assert torch.equal(k[row : row + 1], torch.cat(want_k, dim=-2))
            assert torch.equal(v[row : row + 1], torch.cat(want_v, dim=-2))
    assert mixed, "the random router should mix experts within a row on this input"


def test_attend_equals_dequantize_then_attend(model):
    """attend() over the experts' parts (no token order) equals attention over read(), also with a
    padding mask whose columns follow token order."""
    ids = _ids(model, t=44, b=2, seed=2)
    _, cache = _run(model, "moqae:ckpt=random,chunk=8,seed=4", ids, decode_steps=3)
    g = torch.Generator().manual_seed(1)
    for store in cache.stores:
        k, v = store.read(torch.float32)  # [B, H_kv, T, D]
        b, h_kv, t, d = k.shape
        q = torch.randn(b, 3 * h_kv, 1, d, generator=g)
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[1, ..., :5] = False  # left padding of the second sequence
        mask[0, ..., 9:12] = False  # masked tokens inside chunk 1 of the first
        for m in (None, mask):
            want = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=m, scale=0.25
            )
            assert torch.allclose(store.attend(q, 0.25, m), want, atol=1e-5)


def test_decode_steps_attend_from_the_parts(model):
    """Decode steps go through attend() and give the logits of dequantize-then-attend steps."""
    ids = _ids(model, t=40, b=2, seed=5)
    logits = {}
    for from_codes in (True, False):
        method = build_method("moqae:ckpt=random,chunk=8,share=2,seed=1")
        with AttachedMethod(model, method, from_codes=from_codes) as am, torch.no_grad():
            assert am.board.from_codes == from_codes
            cache = am.new_cache()
            out = [forward(model, ids[:, :20], cache).logits[:, -1]]
            for t in range(20, 40):  # chunks complete during decode
                out.append(forward(model, ids[:, t : t + 1], cache).logits[:, -1])
        logits[from_codes] = torch.stack(out)
    assert torch.allclose(logits[True], logits[False], atol=1e-4)
