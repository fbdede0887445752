"""MoQAE's layer store: one layer's K/V history held by expert (the method is ``moqae.method``).

Each complete chunk of N tokens is stored by the expert its router decision picks (FP16, or INT-b with
keys per channel over the chunk's tokens and values per token, ``harness.quant``); each expert's chunks
are one contiguous part per batch row, decode steps attend from the parts' codes
(``harness.from_codes``), and ``read`` restores token order from the per-chunk expert list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness.from_codes import decode_attention_over
from harness.interface import LayerStore, MemoryReport, ModelInfo, Observation
from harness.quant import fake_quantize
from harness.storage import FullPrecisionSeq, QuantizedSeq, Seq, held_parts
from moqae.router import chunk_votes

if TYPE_CHECKING:
    from moqae.method import MoQAE

FP16_BITS = 16


class MoQAEStore(LayerStore):
    """One layer's history, held by expert: per batch row, each expert's chunks are one contiguous part
    (fp16 ``FullPrecisionSeq``, or a ``QuantizedSeq`` pair: keys per channel over each chunk's tokens,
    values per token), plus an fp16 buffer of the incomplete chunk. ``experts[row]`` lists the expert of
    each complete chunk in token order: the position map from which ``read`` restores token order.
    Decode attention (``attend``) needs no order: a softmax over the parts' scores is the attention
    over the tokens in order, so each part is attended from its codes (``harness.from_codes``)."""

    def __init__(self, layer_idx: int, info: ModelInfo, method: MoQAE):
        super().__init__(layer_idx, info)
        self.method = method
        self.cfg = method.config
        self.bits = method.expert_bits
        self.experts: list[list[int]] = []  # per batch row: expert of each complete chunk, in token order
        self.parts: list[dict[int, tuple[Seq, Seq]]] = []  # per batch row: expert -> (keys, values), chunk order
        self.buf_k = FullPrecisionSeq()
        self.buf_v = FullPrecisionSeq()
        self.votes: torch.Tensor | None = None  # [B, T_buf] token votes of buffered tokens (leaders)
        self.soft: torch.Tensor | None = None  # [B, T_buf, E] relaxed token weights (training only)
        self.leader = method.bank.leader(layer_idx) if method.bank is not None else layer_idx
        self.device = info.device

    # ---- routing ---------------------------------------------------------------------------
    def _token_votes(self, obs: Observation) -> torch.Tensor:
        if obs.block_input is None:
            raise RuntimeError("moqae needs the block input hidden states (signal block_input)")
        train = self.cache_state.get("train")
        if train is None:
            probs = self.method.route(self.layer_idx, obs.block_input)  # [B, T, E]
            return probs.argmax(dim=-1).to(torch.uint8)  # one byte per buffered token vote
        # router training (moqae.train): keep the probabilities with their graph
        probs = self.method.bank.router(self.layer_idx)(obs.block_input.detach())
        train["probs"].setdefault(self.leader, []).append(probs)
        if train.get("relaxed"):
            # Gumbel-softmax: perturbed token choices; soft weights carry the gradient
            u = torch.rand(probs.shape, generator=train["generator"]).clamp(1e-9, 1 - 1e-9)
            logits = probs.clamp_min(1e-9).log() - torch.log(-torch.log(u))
            soft = torch.softmax(logits / train["tau"], dim=-1)  # [B, T, E]
            self.soft = soft if self.soft is None else torch.cat([self.soft, soft], dim=1)
            return logits.detach().argmax(dim=-1).to(torch.uint8)
        if train["sample"]:
            flat = probs.detach().reshape(-1, probs.shape[-1])
            votes = torch.multinomial(flat, 1, generator=train["generator"]).view(probs.shape[:-1])
        else:
            votes = probs.detach().argmax(dim=-1)
        return votes.to(torch.uint8)

    def _decide(self, first: int, count: int, votes: torch.Tensor | None) -> torch.Tensor:
        """Expert index per batch row of chunks ``first`` .. ``first + count - 1``: [B, count] (RF, RS,
        forced decisions). Each chunk's decision is kept in the cache state as ("decision", leader, i)."""
        state, b = self.cache_state, len(self.experts)
        forced = state.get("forced")  # training / analysis: {leader layer: [B, n_chunks]}
        if forced is not None and self.leader in forced:
            chosen = forced[self.leader][:, first : first + count]  # [B, count] (or [1, count]: every row)
            return chosen.expand(b, count) if chosen.shape[0] == 1 else chosen
        routed = None
        if self.layer_idx == self.leader:
            routed = chunk_votes(votes.view(b, count, -1), self.bits)  # [B, count]: each chunk's majority
        for i in range(first, first + count):
            key = ("decision", self.leader, i)
            if self.cfg.freeze_first and i == 0:
                state[key] = torch.full((b,), self.method.top_expert, dtype=torch.long)
            elif routed is not None:
                state[key] = routed[:, i - first]
        return torch.stack([state[("decision", self.leader, i)] for i in range(first, first + count)], dim=1)

    # ---- storage ---------------------------------------------------------------------------
    def _part(self, row: int, expert: int) -> tuple[Seq, Seq]:
        """The (keys, values) containers of ``expert`` in batch row ``row``, made on first use."""
        part = self.parts[row].get(expert)
        if part is None:
            bits = self.bits[expert]
            if (self.cache_state.get("train") or {}).get("relaxed"):
                part = FullPrecisionSeq(None), FullPrecisionSeq(None)  # mixed reconstructions, with their graph
            elif bits == FP16_BITS:
                part = FullPrecisionSeq(), FullPrecisionSeq()
            else:
                vg = self.cfg.value_group or self.info.head_dim
                part = QuantizedSeq(bits, self.cfg.chunk, axis=-2), QuantizedSeq(bits, vg, axis=-1)
            self.parts[row] = dict(sorted({**self.parts[row], expert: part}.items()))  # parts in expert order
        return part

    def _keep(self, row: int, experts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append complete chunks of one row (k, v [1, H, len(experts)·N, D], fp16) to their experts'
        parts: one gather and one quantization per expert, whatever the number of chunks (the ranges
        are per chunk, so the codes equal chunk-by-chunk quantization)."""
        n = self.cfg.chunk
        by_expert: dict[int, list[int]] = {}
        for i, e in enumerate(experts):
            by_expert.setdefault(e, []).append(i)
        for e, idx in by_expert.items():
            if len(idx) < len(experts) or k._base is not None:  # a part keeps a tensor of its own
                tok = (torch.tensor(idx, device=k.device)[:, None] * n + torch.arange(n, device=k.device)).flatten()
                ke, ve = k.index_select(-2, tok), v.index_select(-2, tok)
            else:
                ke, ve = k, v
            ks, vs = self._part(row, e)
            ks.append(ke)
            vs.append(ve)
        self.experts[row].extend(experts)

    def _store_relaxed(self, chunk_idx: int, experts: torch.Tensor, k, v, train: dict) -> list[tuple]:
        """Training only: the chunk's K/V as Σ_e w_e·Q_e(x) with straight-through weights (forward value
        = the chosen expert's reconstruction, gradient through the soft Gumbel weights). Returns the
        chunk per row as (expert, k, v), for ``_keep_relaxed``."""
        key = ("weights", self.leader, chunk_idx)
        if key not in self.cache_state:
            hard = F.one_hot(experts, len(self.bits)).float()  # [B, E]
            routed = not (self.cfg.freeze_first and chunk_idx == 0)
            if routed and self.soft is not None:
                soft, self.soft = self.soft[:, : self.cfg.chunk].mean(dim=1), self.soft[:, self.cfg.chunk :]
                w = hard - soft.detach() + soft
                train["weights"].append(w)
            else:
                if self.soft is not None:
                    self.soft = self.soft[:, self.cfg.chunk :]
                w = hard
            probe = train.get("probe")  # moqae.oracle: dNLL/dw_e for every chunk, group and expert
            if probe is not None:
                w = hard.clone().requires_grad_(True)
                probe[(self.leader, chunk_idx)] = w
            self.cache_state[key] = w
        w = self.cache_state[key]
        vg = self.cfg.value_group or self.info.head_dim
        cands_k, cands_v = [], []
        for bits in self.bits:
            if bits == FP16_BITS:
                cands_k.append(k.half().float())
                cands_v.append(v.half().float())
            else:
                cands_k.append(fake_quantize(k, bits, group=k.shape[-2], axis=-2))
                cands_v.append(fake_quantize(v, bits, group=vg, axis=-1))
        wk = w.view(w.shape[0], 1, 1, 1, -1)  # [B, 1, 1, 1, E]
        mixed_k = (torch.stack(cands_k, dim=-1) * wk).sum(-1)
        mixed_v = (torch.stack(cands_v, dim=-1) * wk).sum(-1)
        return [(int(experts[row]), mixed_k[row : row + 1], mixed_v[row : row + 1]) for row in range(k.shape[0])]

    def _keep_relaxed(self, row: int, chunks: list[tuple]) -> None:
        """Append one row's relaxed chunks (expert, k, v) to their experts' parts: one concatenation
        per expert (autograd-friendly; a part's first append keeps the tensor as it is)."""
        for e in dict.fromkeys(c[0] for c in chunks):
            ks, vs = self._part(row, e)
            ks.append(torch.cat([c[1] for c in chunks if c[0] == e], dim=-2))
            vs.append(torch.cat([c[2] for c in chunks if c[0] == e], dim=-2))
        self.experts[row].extend(c[0] for c in chunks)

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        batch = keys.shape[0]
        if not self.experts:
            self.experts, self.parts = [[] for _ in range(batch)], [{} for _ in range(batch)]
            self.device = keys.device
        self.buf_k.append(keys)
        self.buf_v.append(values)
        routes = self.layer_idx == self.leader and self.cache_state.get("forced") is None
        if routes:
            new_votes = self._token_votes(obs)  # [B, T_new]
            self.votes = new_votes if self.votes is None else torch.cat([self.votes, new_votes], dim=-1)
        n = self.cfg.chunk
        count = self.buf_k.length // n  # chunks completed by these tokens
        if not count:
            return
        first = len(self.experts[0])
        votes = None
        if routes:
            votes, self.votes = self.votes[:, : count * n], self.votes[:, count * n :]
        experts = self._decide(first, count, votes)  # [B, count]
        k, v = self.buf_k.take_front(count * n), self.buf_v.take_front(count * n)  # fp16 [B, H, count·N, D]
        train = self.cache_state.get("train")
        if train is not None and train.get("relaxed"):
            pairs = zip(k.float().split(n, dim=-2), v.float().split(n, dim=-2), strict=True)
            chunks = [self._store_relaxed(first + i, experts[:, i], kc, vc, train) for i, (kc, vc) in enumerate(pairs)]
            for row in range(batch):
                self._keep_relaxed(row, [c[row] for c in chunks])
            return
        for row, row_experts in enumerate(experts.tolist()):
            self._keep(row, row_experts, k if batch == 1 else k[row : row + 1], v if batch == 1 else v[row : row + 1])

    def _positions(self, row: int) -> torch.Tensor:
        """Token positions of row ``row``'s complete chunks in part order (parts by expert, each in chunk
        order): the position map, made from ``experts[row]`` when needed (a tensor kept would be bytes
        held beside the accounting)."""
        n, experts = self.cfg.chunk, self.experts[row]
        chunks = sorted(range(len(experts)), key=experts.__getitem__)  # stable: chunk order within an expert
        return (torch.tensor(chunks, device=self.device)[:, None] * n + torch.arange(n, device=self.device)).flatten()

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[chunks in token order | fp16 buffer] as [B, H, T, D]: each part is read once and written
        into its chunks' token positions (in place where one expert holds every chunk of the row)."""
        n_chunks = len(self.experts[0]) if self.experts else 0
        if not n_chunks:
            return self.buf_k.read(dtype), self.buf_v.read(dtype)
        n, buf = self.cfg.chunk, self.buf_k.length
        first = next(iter(self.parts[0].values()))[1]
        ref = first.data if isinstance(first, FullPrecisionSeq) else first.q.codes
        b, h = len(self.experts), ref.shape[1]
        shape = (b, h, n_chunks * n + buf, self.info.head_dim)
        out_k = torch.empty(shape, dtype=dtype, device=ref.device)
        out_v = torch.empty(shape, dtype=dtype, device=ref.device)
        for row in range(b):
            pos, start = self._positions(row), 0
            for ks, vs in self.parts[row].values():
                length = ks.length
                for out, seq in ((out_k, ks), (out_v, vs)):
                    target = out[row : row + 1]
                    if length == n_chunks * n:  # one expert holds every chunk: write in place
                        seq.read(dtype, out=target[..., :length, :])
                    else:
                        target.index_copy_(-2, pos[start : start + length], seq.read(dtype))
                start += length
        if buf:
            self.buf_k.read(dtype, out=out_k[..., n_chunks * n :, :])
            self.buf_v.read(dtype, out=out_v[..., n_chunks * n :, :])
        return out_k, out_v

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step over [parts by expert | buffer], each attended from what it holds
        (``harness.from_codes.decode_attention_over``), batch row by batch row (rows route their own
        chunks). The mask's columns are put in the same order as the parts."""
        b, out = query.shape[0], []
        buf_k, buf_v = self.buf_k.data, self.buf_v.data
        for row in range(b):
            parts = self.parts[row].values() if self.experts else ()
            keys, values = held_parts([p[0] for p in parts]), held_parts([p[1] for p in parts])
            if buf_k is not None:
                keys.append(buf_k if b == 1 else buf_k[row : row + 1])
                values.append(buf_v if b == 1 else buf_v[row : row + 1])
            m = mask if mask is None or mask.shape[0] == 1 else mask[row : row + 1]
            if m is not None and self.experts and len(self.parts[row]) > 1:
                pos = self._positions(row)
                t = pos.numel() + (0 if buf_k is None else buf_k.shape[-2])
                tail = torch.arange(pos.numel(), t, device=pos.device)
                m = m[..., -1:, :t].index_select(-1, torch.cat([pos, tail]))
            out.append(decode_attention_over(query[row : row + 1], keys, values, scaling, m))
        return out[0] if b == 1 else torch.cat(out, dim=0)

    def memory(self) -> MemoryReport:
        r = self.buf_k.memory()
        r += self.buf_v.memory()
        for row_parts in self.parts:
            for ks, vs in row_parts.values():
                r += ks.memory()
                r += vs.memory()
        if self.votes is not None:
            r.add("router", self.votes.numel() * self.votes.element_size())
        return r

    def stats(self) -> dict[str, list[float]]:
        """Chunks per expert in this layer (summed over the batch), experts in config order."""
        counts = [0] * len(self.bits)
        for row in self.experts:
            for e in row:
                counts[e] += 1
        return {"expert_chunks": counts}
