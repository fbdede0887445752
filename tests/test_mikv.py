"""MiKV (baselines/mikv.py): H2O importance tiers, budget, channel balancing, accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import wikitext_ppl

from baselines.mikv import MiKVConfig, MiKVStore, balance_factors, causal_probs, column_scores, saturate
from harness.integration import AttachedMethod, attention_probs, forward, generate, model_info
from harness.interface import MethodSpecError, ModelInfo, Observation, build_method
from harness.models import tiny_random_model
from harness.quant import fake_quantize

INFO = ModelInfo("llama", 1, 4, 2, 8, 32, torch.float32, torch.device("cpu"))  # H = 4, H_kv = 2, D = 8


def _store(**kw) -> MiKVStore:
    return MiKVStore(0, INFO, MiKVConfig(**kw))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half().float()


def _append(store: MiKVStore, t: int, seed: int = 0, queries: bool = True) -> None:
    start = store.seq_len
    k, v = _rand(1, 2, t, 8, seed=seed), _rand(1, 2, t, 8, seed=seed + 1)
    q = _rand(1, 4, t, 8, seed=seed + 2) if queries else None
    store.append(k, v, Observation(positions=torch.arange(start, start + t), queries=q, is_prefill=start == 0))
    store.seq_len = start + t


def _uniform_rows(weights: list[list[float]], t_q: int) -> torch.Tensor:
    """probs [1, H, t_q, T]: every query of head h attends with weights[h] (normalised)."""
    w = torch.tensor(weights)
    w = w / w.sum(-1, keepdim=True)
    return w.unsqueeze(1).expand(-1, t_q, -1).unsqueeze(0).clone()


def test_options_and_validation():
    c = build_method("mikv").config
    assert (c.ratio, c.high_bits, c.low_bits, c.recent, c.balance) == (0.25, 16, 2, 0, True)
    assert build_method("mikv:high=8,low=4,ratio=0.5").config.high_bits == 8
    for bad in ["mikv:ratio=1.5", "mikv:high=3", "mikv:low=16", "mikv:high=4,low=8"]:
        with pytest.raises(MethodSpecError):
            build_method(bad)
    with pytest.raises(MethodSpecError, match="does not divide head_dim"):
        AttachedMethod(tiny_random_model("llama"), build_method("mikv:group=5"))


def test_importance_ranking_from_hand_made_probs():
    """8 tokens, ratio 0.5 (4 high per head), recent window 1 (token 7), so 3 heavy hitters per KV
    head by attention summed over queries and over the 2 query heads of the group."""
    store = _store(ratio=0.5, recent=1)
    _append(store, 8, queries=False)  # no queries: held high until the probabilities arrive
    assert store.high.length == 8
    weights = [
        # KV head 0 = query heads 0, 1: head 0 alone prefers token 4 (0.4 vs 0.2), but summed with
        # head 1 (1/3 each to tokens 0, 2, 5) tokens 0, 2, 5 lead (0.53 vs 0.4 per query)
        [1, 0, 1, 0, 2, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0, 0],
        # KV head 1 = query heads 2, 3: tokens 6 > 1 > 3, token 7 (recent) gets nothing
        [0, 4, 0, 1, 0, 0, 8, 0],
        [0, 4, 0, 1, 0, 0, 8, 0],
    ]
    store.observe_attention(torch.zeros(1, 4, 8, 8), _uniform_rows(weights, 8))
    high = [torch.nonzero(store.mask[0, h]).flatten().tolist() for h in range(2)]
    assert high == [[0, 2, 5, 7], [1, 3, 6, 7]]
    assert store.high.length == 4 and store.low.length == 4
    # decode: token 8 arrives (T = 9, budget 4, window 1): after its attention the lowest-scoring
    # high-precision token outside the window is demoted. Head 0: token 7 (never attended);
    # head 1: the new queries give token 7 a score of 2 > token 3's 16/13, so token 3 goes.
    _append(store, 1, seed=5, queries=False)
    assert store.high.length == 5  # the new token joins the high tier until attention has run
    step = [[0.0] * 9 for _ in range(4)]
    step[0][0] = step[0][8] = step[1][0] = step[1][8] = 1.0
    step[2][7] = step[3][7] = 1.0
    store.observe_attention(torch.zeros(1, 4, 1, 8), _uniform_rows(step, 1))
    high = [torch.nonzero(store.mask[0, h]).flatten().tolist() for h in range(2)]
    assert high == [[0, 2, 5, 8], [1, 6, 7, 8]]


def test_prefill_is_scored_at_append_and_not_counted_twice():
    store = _store(ratio=0.25)
    _append(store, 32, seed=1)
    q, k = _rand(1, 4, 32, 8, seed=3), _rand(1, 2, 32, 8, seed=1)
    expect = column_scores(attention_probs(q, k, None, 8**-0.5), 2)  # [1, 2, 32]
    _, pos_hi = store.positions()
    assert torch.allclose(store.scores, expect.gather(-1, pos_hi))
    # heavy hitters: the top 4 of the 28 older tokens (window 8 // 2 = 4)
    top = expect[..., :28].topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(pos_hi[..., :4], top)
    before = store.scores.clone()
    store.observe_attention(q, attention_probs(q, k, None, 8**-0.5))  # the prefill's own delivery
    assert torch.equal(store.scores, before)


def test_recent_window_always_high():
    store = _store(ratio=0.25, recent=4)
    _append(store, 32, queries=False)
    probs = torch.zeros(1, 4, 32, 32)
    probs[..., 0] = 1.0  # every query attends to token 0 only: the recent tokens score 0
    store.observe_attention(torch.zeros(1, 4, 32, 8), probs)
    assert store.mask[..., 28:].all() and store.mask[..., 0].all()
    for i in range(6):
        _append(store, 1, seed=10 + i, queries=False)
        t = store.length
        p = torch.zeros(1, 4, 1, t)
        p[..., 0] = 1.0
        store.observe_attention(torch.zeros(1, 4, 1, 8), p)
        assert store.mask[..., t - 4 :].all(), t
        assert store.high.length == max(t // 4, 4)


def test_split_matches_ratio():
    store = _store()
    _append(store, 64)
    assert store.high.length == 16 and store.low.length == 48
    assert store.mask.sum(-1).eq(16).all()
    for i in range(9):
        _append(store, 1, seed=20 + i)
        store.observe_attention(None, torch.softmax(_rand(1, 4, 1, store.length, seed=i), -1))
        t = store.length
        assert store.high.length == t // 4 and store.low.length == t - t // 4
        assert store.mask.sum(-1).eq(t // 4).all()


@pytest.mark.parametrize("high_bits", [16, 8])
def test_read_puts_tokens_back_in_order(high_bits):
    """After prefill tiering and decode demotions (batch 2): high-tier tokens read back as their
    high-precision copy, low-tier tokens as per-token INT2 of that copy (of the K/V at prefill)."""
    store = _store(high_bits=high_bits, balance=False)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).half().float()

    k, v = rnd(2, 2, 40, 8), rnd(2, 2, 40, 8)
    store.append(k, v, Observation(positions=torch.arange(40), queries=rnd(2, 4, 40, 8)))
    store.seq_len = 40
    low_at_prefill = ~store.mask.unsqueeze(-1).expand_as(k)
    for i in range(30):
        nk, nv = rnd(2, 2, 1, 8), rnd(2, 2, 1, 8)
        k, v = torch.cat([k, nk], -2), torch.cat([v, nv], -2)
        store.append(nk, nv, Observation(positions=torch.tensor([40 + i])))
        store.observe_attention(None, torch.softmax(3 * torch.randn(2, 4, 1, store.length, generator=g), -1))
    assert store.high.length == 70 // 4 and store.mask.sum(-1).eq(17).all()
    rk, rv = store.read(torch.float32)
    hq = (lambda x: x) if high_bits == 16 else (lambda x: fake_quantize(x, high_bits, 8))
    high = store.mask.unsqueeze(-1).expand_as(k)
    assert torch.equal(rk[high], hq(k)[high]) and torch.equal(rv[high], hq(v)[high])
    low_at_prefill = torch.cat([low_at_prefill, torch.zeros_like(high[..., 40:, :])], dim=-2)
    demoted = ~high & ~low_at_prefill
    assert demoted.any() and low_at_prefill.any()
    for got, x in ((rk, k), (rv, v)):
        assert torch.equal(got[low_at_prefill], fake_quantize(x, 2, 8)[low_at_prefill])  # straight from K/V
        assert torch.equal(got[demoted], fake_quantize(hq(x), 2, 8)[demoted])  # from the high copy


def test_all_low_precision_equals_int2():
    """ratio 0 without balancing: every token per-token INT2, the same numbers as the int2 method."""
    model = tiny_random_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    logits = {}
    with torch.no_grad():
        for spec in ["int2", "mikv:ratio=0,balance=false"]:
            with AttachedMethod(model, build_method(spec)) as am:
                logits[spec] = forward(model, ids, am.new_cache()).logits
    assert torch.equal(logits["int2"], logits["mikv:ratio=0,balance=false"])


def test_balance_factors_by_hand():
    q = torch.zeros(1, 2, 2, 2)  # 2 query heads in one group, 2 tokens, 2 channels
    q[0, 0] = torch.tensor([[1.0, -8.0], [2.0, 0.0]])
    q[0, 1] = torch.tensor([[-4.0, 1.0], [0.0, 2.0]])
    k = torch.tensor([[[[1.0, 0.5], [-4.0, 2.0]]]])  # max|k| = [4, 2]
    b = balance_factors(q, k)
    assert b.shape == (1, 1, 1, 2) and b.dtype == torch.float16
    # max|q| over tokens and heads = [4, 8]: b = sqrt([4 / 4, 8 / 2]) = [1, 2]
    assert b.flatten().tolist() == [1.0, 2.0]
    k0 = torch.zeros(1, 1, 2, 2)
    assert balance_factors(q, k0).flatten().tolist() == [1.0, 1.0]  # all-zero channels: b = 1


def _outlier_qk(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q = _rand(1, 4, 64, 8, seed=seed)
    k = _rand(1, 2, 64, 8, seed=seed + 1)
    k[..., 3] *= 20  # an outlier channel of the keys
    return q, k


def test_balancing_keeps_qk_and_cuts_quantization_error():
    q, k = _outlier_qk()
    b = balance_factors(q, k).float()  # [1, 2, 1, 8]
    b_q = b.repeat_interleave(2, dim=1)  # per query head
    kr = k.repeat_interleave(2, dim=1)
    scores = q @ kr.transpose(-1, -2)
    assert torch.allclose((q / b_q) @ (kr * b_q).transpose(-1, -2), scores, atol=1e-4)  # q·k unchanged
    assert b[..., 3].max() < 0.5  # the outlier channel shrinks
    plain = fake_quantize(k, 2, 8)
    balanced = fake_quantize(k * b, 2, 8) / b
    err = {
        name: (q @ x.repeat_interleave(2, dim=1).transpose(-1, -2) - scores).pow(2).mean().item()
        for name, x in (("plain", plain), ("balanced", balanced))
    }
    assert err["balanced"] < 0.5 * err["plain"], err
    assert (balanced - k).pow(2).mean() < 0.5 * (plain - k).pow(2).mean()


def test_store_balances_and_unbalances():
    q, k = _outlier_qk(seed=4)
    v = _rand(1, 2, 64, 8, seed=9)
    obs = Observation(positions=torch.arange(64), queries=q, is_prefill=True)
    err = {}
    for balance in (True, False):
        store = _store(ratio=1.0, balance=balance)  # all fp16: balancing must be undone exactly
        store.append(k, v, obs)
        rk, _ = store.read(torch.float32)
        assert torch.allclose(rk, k, rtol=1e-3, atol=1e-3)
        assert (store.balancer is not None) == balance
        store = _store(ratio=0.0, balance=balance)  # all INT2
        store.append(k, v, obs)
        rk, _ = store.read(torch.float32)
        assert store.low.length == 64
        kr, rkr = k.repeat_interleave(2, dim=1), rk.repeat_interleave(2, dim=1)
        err[balance] = (q @ (rkr - kr).transpose(-1, -2)).pow(2).mean().item()
    assert err[True] < 0.5 * err[False], err


def _held_bytes(store: MiKVStore) -> int:
    tensors = [store.mask, store.scores, store.balancer]
    for tier in (store.high, store.low):
        for x in (tier.k, tier.v):
            if isinstance(x, torch.Tensor):
                tensors.append(x)
            elif x is not None:
                tensors += [x.codes, x.scale, x.zero]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("high_bits,low_bits", [(16, 2), (8, 2), (4, 4)])
def test_memory_equals_bytes_held(high_bits, low_bits):
    store = _store(high_bits=high_bits, low_bits=low_bits)
    _append(store, 40)
    for i in range(5):
        _append(store, 1, seed=30 + i)
        store.observe_attention(None, torch.softmax(_rand(1, 4, 1, store.length, seed=i), -1))
    mem = store.memory()
    assert mem.total_bytes == _held_bytes(store)
    t = 45
    n_hi = t // 4
    assert mem.elements == 2 * 2 * t * 8
    assert mem.payload_bits == 2 * 2 * 8 * (n_hi * high_bits + (t - n_hi) * low_bits)
    assert mem.bytes["router"] == 2 * t + 2 * n_hi * 4  # tier mask (bool) + fp32 scores of the high tier
    assert mem.bytes["scales"] >= 2 * 8 * 2  # includes the fp16 balancer [1, H_kv, 1, D]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_and_nominal_bits(family):
    model = tiny_random_model(family)
    info = model_info(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with AttachedMethod(model, build_method("mikv")) as am:
        cache = am.new_cache()
        with torch.no_grad():
            forward(model, ids, cache)
        assert cache.memory().nominal_bits == pytest.approx(5.5)  # 0.25 * 16 + 0.75 * 2, T = 256
        for store in cache.stores:
            assert store.high.length == 64 and store.balancer is not None
        out = generate(model, ids[:, :20], am.new_cache(), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 32)
        cache = am.new_cache()
        generate(model, ids[:, :200], cache, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == 208
    for store in cache.stores:
        assert store.high.length == 52 and store.low.length == 156  # floor(0.25 * 208)
    mem = cache.memory()
    assert mem.nominal_bits == pytest.approx(5.5)
    assert mem.elements == 2 * info.n_layers * info.n_kv_heads * 208 * info.head_dim


def test_all_high_precision_equals_fp16():
    """ratio 1 without balancing holds every token in fp16: greedy tokens equal the fp16 method's."""
    model = tiny_random_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with AttachedMethod(model, build_method("fp16")) as am:
        ref = generate(model, ids, am.new_cache(), **kw)
    with AttachedMethod(model, build_method("mikv:ratio=1,balance=false")) as am:
        out = generate(model, ids, am.new_cache(), **kw)
    assert torch.equal(out, ref)


def test_mikv_16_8_perplexity_close_to_fp16(real_stories, stories, data_dir):
    ppl = wikitext_ppl(stories, data_dir, ["fp16", "mikv:high=16,low=8", "mikv"])
    assert ppl["mikv:high=16,low=8"] == pytest.approx(ppl["fp16"], rel=5e-3)
    assert ppl["mikv"] > ppl["mikv:high=16,low=8"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_reads_the_right_causal_mask(family):
    """Queries that follow cached tokens (pieces of 16 after 16) must see every earlier token: with
    everything kept FP16 and no balancing, MiKV in pieces equals one fp16 forward. (The attention
    hook once ran without a mask there, and sdpa's top-left causal mask hid the cached tokens.)"""
    model = tiny_random_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with AttachedMethod(model, build_method("fp16")) as am, torch.no_grad():
        ref = forward(model, ids, am.new_cache()).logits
    with AttachedMethod(model, build_method("mikv:ratio=1.0,balance=false")) as am, torch.no_grad():
        cache = am.new_cache()
        out = torch.cat([forward(model, ids[:, i : i + 16], cache).logits for i in range(0, 48, 16)], dim=1)
    assert torch.allclose(out, ref, atol=1e-4)


def _argsort_positions(store: MiKVStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The tier positions from the mask, as ``positions`` computed them before it kept them up to date."""
    order = torch.argsort(store.mask.to(torch.uint8), dim=-1, stable=True)
    return order[..., : store.low.length], order[..., store.low.length :]


def _scatter_read(store: MiKVStore, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``read`` as it was before index_copy_ and cached positions (a copy of the old code)."""
    b, h, d, t = store._batch, store.info.n_kv_heads, store.info.head_dim, store.length
    out_k, out_v = torch.empty(b, h, t, d, dtype=dtype), torch.empty(b, h, t, d, dtype=dtype)
    for tier, pos in zip((store.low, store.high), _argsort_positions(store), strict=True):
        k, v = tier.read(torch.float32 if store.balancer is not None else dtype)
        if k is None:
            continue
        index = pos.unsqueeze(-1).expand(*pos.shape, d)
        if store.balancer is not None:
            k = saturate(k / store.balancer.float(), dtype)
        out_k.scatter_(-2, index, k.to(dtype))
        out_v.scatter_(-2, index, v.to(dtype))
    return out_k, out_v


@pytest.mark.parametrize("spec", ["mikv", "mikv:high=8,low=4,ratio=0.4,quantize_prefill=false"])
def test_prefill_probabilities_computed_once_and_outputs_unchanged(monkeypatch, spec):
    """The attention hook skips the prefill's probabilities (the store computed them at append): the
    logits of a prefill, a chunk of 8 and 10 decode steps, and every store's tiers and scores, equal a
    run where the hook computes them for every forward; each read equals the old scatter read."""
    import harness.integration.cache as cache_mod

    model = tiny_random_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))

    def run(always: bool) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]], int]:
        calls = []
        with monkeypatch.context() as m:
            if always:
                m.setattr(MiKVStore, "attention_needed", lambda self, q_len, kv_len: True)
            m.setattr(cache_mod, "attention_probs", lambda *a: calls.append(a[0].shape[-2]) or attention_probs(*a))
            with AttachedMethod(model, build_method(spec)) as am, torch.no_grad():
                cache = am.new_cache()
                logits = [forward(model, ids[:, :40], cache).logits, forward(model, ids[:, 40:], cache).logits]
                for _ in range(10):
                    logits.append(forward(model, logits[-1][:, -1:].argmax(-1), cache).logits)
                    for s in cache.stores:
                        assert all(map(torch.equal, s.positions(), _argsort_positions(s)))
                        for dtype in (torch.float32, torch.float16):
                            assert all(map(torch.equal, s.read(dtype), _scatter_read(s, dtype)))
        states = [(s.mask, s.scores, s.high.k.codes if s.cfg.high_bits < 16 else s.high.k) for s in cache.stores]
        return logits, states, len(calls)

    ref, ref_states, ref_calls = run(always=True)
    out, states, n_calls = run(always=False)
    n_layers = model.config.num_hidden_layers
    assert (ref_calls, n_calls) == (12 * n_layers, 11 * n_layers)  # the prefill's probabilities: once, at append
    assert all(map(torch.equal, out, ref))
    for got, want in zip(states, ref_states, strict=True):
        assert all(map(torch.equal, got, want))


@pytest.mark.parametrize("t_q,t_k,n_rep", [(37, 37, 2), (5, 37, 3), (1, 37, 1)])
def test_causal_probs_equal_attention_probs(t_q, t_k, n_rep):
    """The store's in-place prefill probabilities are the harness's, bit for bit (inf and NaN too)."""
    q, k = _rand(2, 2 * n_rep, t_q, 8, seed=7) * 4, _rand(2, 2, t_k, 8, seed=8) * 4
    q[0, 0, 0, 0], k[1, 1, 3, 2], k[0, 0, -1, 1] = float("inf"), float("nan"), float("-inf")
    want = attention_probs(q, k, None, 0.3)
    assert torch.equal(causal_probs(q, k, 0.3).isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(causal_probs(q, k, 0.3).nan_to_num(7.0), want.nan_to_num(7.0))
