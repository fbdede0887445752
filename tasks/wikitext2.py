"""WikiText-2 perplexity by the papers' protocol (GPTQ / KIVI / KVQuant / MoQAE evaluation scripts).

The raw test split is joined with "\\n\\n", tokenized once, and cut into non-overlapping windows of
``seqlen`` tokens (the incomplete tail is dropped). Each window runs as one forward through a fresh
cache of the method, so the method's quantization applies to the window's own attention (prefill),
unless the method keeps prefill in full precision. PPL = exp(mean token NLL over all windows).

``prefill_chunk=N`` (0 = off, the papers' protocol) feeds each window in consecutive pieces of N
tokens through the same cache instead: every piece's queries read the cache as the method holds it
after the earlier pieces (chunked prefill / streaming). This matters for methods whose decisions
depend on the cache length or recency (MiKV's recent window and budget, KIVI's residual), which a
single 2048-token prefill decides once, for the whole window, from the end of the window.

``decode_from=N`` (0 = off) is the teacher-forced decode protocol: the first N tokens of each window
are prefilled (in pieces of ``prefill_chunk`` if set), then every later token is fed alone, as a
decode step, and scored: the tokens after N are predicted by the decode path a generation uses
(attention from the codes where a method decodes that way, each token quantized before the next
reads it), while the history is the window's own text. ``ppl`` counts every predicted token,
prefill and decode; ``decode_ppl`` only those the decode steps predicted (tokens N+1 .. end).
The option is left out of a record's key when 0, so records made before it existed keep theirs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from harness.data import token_windows, wikitext2_test_text
from harness.evaluation import Task, TaskContext
from harness.integration import forward
from harness.interface import MethodConfig, MethodSpecError
from harness.options import NonNegativeInt, PositiveInt
from harness.reports.scorecard import ScorecardColumn


@dataclass
class WikiText2Config(MethodConfig):
    seqlen: Annotated[int, Field(ge=2)] = 2048
    max_windows: PositiveInt | None = None  # None = the whole test split
    prefill_chunk: NonNegativeInt = 0  # >0: feed each window in pieces of this many tokens through one cache
    decode_from: NonNegativeInt = 0  # >0: prefill this many tokens, then one decode step per token (teacher-forced)

    def validate(self) -> None:
        if self.decode_from >= self.seqlen:
            raise MethodSpecError(f"wikitext2: decode_from={self.decode_from} must be < seqlen={self.seqlen}")


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a window (fp32) and the number of predicted tokens."""
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def add_stats(total: list[dict] | None, new: list[dict]) -> list[dict]:
    """Element-wise sum of per-layer counters over windows."""
    if total is None:
        return [{k: list(v) for k, v in layer.items()} for layer in new]
    for acc, layer in zip(total, new, strict=True):
        for k, v in layer.items():
            acc[k] = [a + b for a, b in zip(acc[k], v, strict=True)]
    return total


def window_logits(
    model: torch.nn.Module, ids: torch.Tensor, cache, piece: int = 0, decode_from: int = 0
) -> torch.Tensor:
    """Logits [1, T, V] of a window: one forward, or (``piece`` > 0) consecutive pieces through ``cache``;
    with ``decode_from`` > 0, those of its first ``decode_from`` tokens, then one forward per token."""
    if decode_from > 0:
        head = window_logits(model, ids[:, :decode_from], cache, piece)
        steps = [forward(model, ids[:, i : i + 1], cache).logits for i in range(decode_from, ids.shape[1])]
        return torch.cat([head, *steps], 1)
    if piece <= 0 or piece >= ids.shape[1]:
        return forward(model, ids, cache).logits
    return torch.cat([forward(model, ids[:, i : i + piece], cache).logits for i in range(0, ids.shape[1], piece)], 1)


class WikiText2(Task):
    """WikiText-2 perplexity as the KV-quantization papers measure it (GPTQ's windows)."""

    name = "wikitext2"
    description = "WikiText-2 (raw) test perplexity, non-overlapping windows of seqlen tokens"
    refuses_random_weights = True
    supports_oracles = True
    shardable = True
    report_sections = ("tasks.wikitext2_report:PERPLEXITY",)
    scorecard = ScorecardColumn(
        "WikiText-2", "ppl", "{:+.2f} %", means="the change of the perplexity", versus_reference=True, order=10
    )
    config_class = WikiText2Config
    _ids_cache: dict[tuple[int, str], torch.Tensor] = {}

    def check_data(self, data_dir: Path | None) -> None:
        wikitext2_test_text(data_dir)

    def token_ids(self, ctx: TaskContext) -> torch.Tensor:
        key = (id(ctx.tokenizer), str(ctx.data_dir))
        if key not in self._ids_cache:
            text = wikitext2_test_text(ctx.data_dir)
            self._ids_cache[key] = ctx.tokenizer(text, return_tensors="pt").input_ids[0]
        return self._ids_cache[key]

    def evaluate(self, ctx: TaskContext) -> dict:
        return self.merge_shards([self.evaluate_shard(ctx, 0, 1)])

    @torch.no_grad()
    def evaluate_shard(self, ctx: TaskContext, index: int, count: int) -> dict:
        """Windows ``[index * W // count, (index + 1) * W // count)`` of the W windows, one entry each."""
        windows = token_windows(self.token_ids(ctx), self.config.seqlen, self.config.max_windows)
        windows = windows[index * len(windows) // count : (index + 1) * len(windows) // count]
        device = next(ctx.model.parameters()).device
        per_window, total_nll, total_tokens = [], 0.0, 0
        start = time.perf_counter()
        bar = tqdm(windows, desc=f"wikitext2 {ctx.attached.method.label}", disable=not ctx.progress, leave=False)
        for window in bar:
            ids = window.view(1, -1).to(device)
            if ctx.attached.method.oracle:  # an upper bound: it may look at the window it is scored on
                with torch.enable_grad():
                    ctx.attached.method.see_window(ctx.attached, ids)
            cache = ctx.attached.new_cache()
            logits = window_logits(ctx.model, ids, cache, self.config.prefill_chunk, self.config.decode_from)
            nll, n = window_nll(logits, ids)
            memory = cache.memory()
            entry = {"nll": nll, "tokens": n, "kv": memory.as_dict(), "layer_stats": cache.layer_stats()}
            if self.config.decode_from:  # the tokens the decode steps predicted, alone
                start = self.config.decode_from - 1  # logits at start predict the first fed-alone token
                entry["decode_nll"], entry["decode_tokens"] = window_nll(logits[:, start:], ids[:, start:])
            per_window.append(entry)
            total_nll, total_tokens = total_nll + nll, total_tokens + n
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
        return {"windows": per_window, "eval_seconds": time.perf_counter() - start}

    def shard_units(self) -> int | None:
        return self.config.max_windows

    def options(self) -> dict:
        options = super().options()
        if not options["decode_from"]:
            del options["decode_from"]  # records made before the option existed keep their keys
        return options

    def merge_shards(self, parts: list[dict]) -> dict:
        """The record of the whole split from its shards, in order: sums window by window, as one pass does."""
        windows = [w for part in parts for w in part["windows"]]
        total_nll, total_tokens, nonfinite, layer_stats = 0.0, 0, 0, None
        for w in windows:
            total_nll, total_tokens = total_nll + w["nll"], total_tokens + w["tokens"]
            nonfinite += w["kv"]["nonfinite_kv"]
            layer_stats = add_stats(layer_stats, w["layer_stats"])
        bits = [(w["kv"]["nominal_bits"], w["kv"]["effective_bits"], w["kv"]["total_bytes"]) for w in windows]
        metrics = {"ppl": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens}
        if windows and "decode_nll" in windows[0]:  # teacher-forced decode: the decode steps' own PPL too
            decode_nll = sum(w["decode_nll"] for w in windows) / sum(w["decode_tokens"] for w in windows)
            metrics.update(decode_ppl=math.exp(decode_nll), decode_nll=decode_nll)
        return {
            "metrics": metrics,
            # one window's cache (all windows have seqlen tokens); non-finite K/V counted over all windows
            "kv": {**windows[-1]["kv"], "nonfinite_kv": nonfinite},
            # the mean over windows (methods whose allocation varies by window: routers, oracles)
            "kv_windows_mean": {
                k: sum(b[i] for b in bits) / len(bits)
                for i, k in enumerate(("nominal_bits", "effective_bits", "total_bytes"))
            },  # fmt: skip
            "windows": len(windows),
            "tokens": total_tokens,
            "eval_seconds": sum(part["eval_seconds"] for part in parts),
            "layer_stats": layer_stats if any(layer_stats) else None,
        }
