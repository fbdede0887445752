"""Needle in a haystack (``niah``): the passkey test on a depth × length grid.

The prompt follows the passkey test of henryzhongsc/longctx_bench (``eval/passkey_utils/passkey_utils.py``
and ``config/eval_config/paulgraham_passkey/20480words_10x10x3_7digits.json`` at commit
``72204d09514f4c26aead889de3c892845ff007ee``; MIT License, Copyright (c) 2024 jiayi yuan), the background
being its synthetic ``background/synthetic/grass_sky_sun.txt`` (Mohtashami & Jaggi, NeurIPS 2023):

    full_input = instruction + " ".join([background_before, needle, background_after, ""]) + question

* instruction: ``"There is an important info hidden inside a lot of irrelevant text. Find it and memorize
  it. I will quiz you about the important information there.\\n"`` (``instruction_position: prefix``);
* needle: ``"The pass key is NNNNN. Remember it. NNNNN is the pass key."``, NNNNN ``digits`` random digits
  (``retrieval_target_style: int``, ``wrapper: naked``; a leading 0 may occur, as upstream);
* background: ``"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
  again."`` repeated (``haystack=noise``), or the text of a file (``haystack=PATH``) repeated in order
  (``ordered_repetition``);
* question: ``"\\nWhat is the pass key? The pass key is "``.

Scores, as longctx_bench's ``eval/passkey_utils/eval_metrics.py`` defines them (:func:`score_answer`):

* ``exact``: 1 when the key appears in the normalized output (lower case, punctuation, articles and
  repeated blanks removed: ``exact_match``), else 0;
* ``partial``: the longest run of the key's characters found unbroken in the raw output, over the key's
  length (``partial_match``: ``SequenceMatcher.find_longest_match``): ``12395`` for key ``12345`` is 0.6.

Both are reported × 100: overall (``exact``, ``partial``), per length (``exact@2048``) and per cell in the
record's ``grid`` (``[{"length", "depth", "exact", "partial", "repeats", "input_tokens"}]``).

Choices where longctx_bench has no equivalent or differs:

* Lengths are prompt lengths in the *target model's* tokens (upstream counts background words). For each
  prompt the background is the largest number of whole background sentences with which the whole prompt
  (chat wrapper and special tokens included) has at most ``min(length, context - max_new_tokens)``
  tokens, so that the answer fits the model's window too; the tokens of each prompt are recorded.
* The needle goes at the sentence boundary of the background nearest to ``depth`` × the background's
  characters (upstream: a word boundary at ``int(words × depth)``), so 0 % is right after the instruction
  and 100 % right before the question. ``depths=N``: N depths evenly spaced from 0 to 100 % (N = 1: 50 %).
* Background sentences are joined with the file's own blanks; a copy of the text follows the previous one
  after one space (upstream's synthetic file ends in a literal backslash-n, which is not copied).
* Keys are drawn by ``random.Random("niah:{seed}:{length}:{depth:g}:{repeat}")``: every prompt is a
  function of the options and the tokenizer alone, the same for every cache method (``prompts_sha1`` in
  the record); each cell (length, depth) has ``repeats`` prompts with different keys.
* Greedy decoding of ``digits + 16`` new tokens at most (upstream: 256) through a fresh cache of the
  method (enough for a chat model that restates "The pass key is ..."), stopping at end of sequence.
* ``chat=true`` wraps the prompt as one user turn of the tokenizer's chat template where it has one
  (as the LongBench task does); the record's ``chat_template`` says whether it was used.
* ``lengths=""`` (default): 1024, 2048, 4096, ... up to the model's context, the context itself last
  (a context under 1024: the context alone).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
import time
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator
from tqdm.auto import tqdm

from harness.data import MissingDataError
from harness.evaluation import Task, TaskContext
from harness.integration import generate
from harness.interface import MethodConfig
from harness.options import NonNegativeInt, Parsed, PositiveInt, Text
from harness.reports.scorecard import ScorecardColumn
from tasks import common
from tasks.common import append_checkpoint
from tasks.longbench.task import apply_chat, encode_prompt, eos_ids

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is "
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: new tokens generated beyond the key's digits
EXTRA_NEW_TOKENS = 16
#: a background piece without a sentence end is cut into pieces of at most this many words
_MAX_WORDS = 64


def parse_lengths(spec: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]`` (ascending, distinct); ``""`` -> ``[]`` (from the model)."""
    return common.parse_lengths(spec, "niah")


def _normalize_lengths(spec: str) -> str:
    return ",".join(map(str, parse_lengths(spec)))


@dataclass
class NIAHConfig(MethodConfig):
    depths: PositiveInt = 5  # depths evenly spaced from 0 to 100 % (1: 50 %)
    # prompt lengths in tokens, comma-separated; "" = 1024, 2048, ... up to the model's context
    lengths: Annotated[
        Parsed(parse_lengths, "comma-separated token lengths like 1024,2048 (empty: up to the model's context)"),
        AfterValidator(_normalize_lengths),
    ] = ""
    repeats: PositiveInt = 2  # prompts (different keys) per cell
    digits: PositiveInt = 5  # digits of the key
    seed: NonNegativeInt = 0
    haystack: Text = "noise"  # "noise" (the passkey test's sentences) or a text file's path
    chat: bool = True  # the tokenizer's chat template where it has one

    positional: ClassVar[str] = "lengths"  # niah:lengths=1024,2048 (the bare 2048 continues the list)


# --------------------------------------------------------------------------------------------
# Scoring (longctx_bench eval_metrics.py)
# --------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower case, punctuation and articles removed, blanks collapsed (longctx_bench ``normalize_answer``)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", "", s)
    return " ".join(s.split())


def exact_score(key: str, output: str) -> float:
    """1.0 when the key is in the normalized output (longctx_bench ``exact_match``), else 0.0."""
    return float(normalize_answer(key) in normalize_answer(output))


def partial_score(key: str, output: str) -> float:
    """The longest unbroken run of the key found in the output, over the key's length (``partial_match``)."""
    if not key:
        return 0.0
    match = SequenceMatcher(None, key, output, autojunk=False).find_longest_match(0, len(key), 0, len(output))
    return match.size / len(key)


def score_answer(key: str, output: str) -> tuple[float, float]:
    """(exact, partial), each in [0, 1]."""
    return exact_score(key, output), partial_score(key, output)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def depth_values(n: int) -> list[float]:
    """``n`` depths in percent, evenly spaced from 0 to 100 (one depth: 50)."""
    return [50.0] if n == 1 else [100.0 * i / (n - 1) for i in range(n)]


def sentences(text: str) -> list[str]:
    """The text cut after each sentence end (``.``, ``!``, ``?``, closing quotes or brackets), each piece
    with the blanks that follow it; a piece of more than 64 words is cut every 64 words."""
    text = text.strip()
    cuts = [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", text)]
    units = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if b > a]
    out: list[str] = []
    for u in units:
        words = re.findall(r"\S+\s*", u)
        for i in range(0, len(words), _MAX_WORDS):
            out.append("".join(words[i : i + _MAX_WORDS]))
    if out and not out[-1][-1:].isspace():
        out[-1] += " "  # the next copy of the text follows after one blank
    return out


def background_units(haystack: str) -> list[str]:
    """The background's sentences: the noise's, or a file's (``MissingDataError`` if missing or empty)."""
    if haystack == "noise":
        return sentences(NOISE)
    path = Path(haystack).expanduser()
    if not path.is_file():
        raise MissingDataError(f"niah: haystack file {haystack} not found; give haystack=noise or a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MissingDataError(f"niah: haystack file {haystack} cannot be read as UTF-8 text ({e})") from None
    if not text.strip():
        raise MissingDataError(f"niah: haystack file {haystack} is empty; give a text file or haystack=noise")
    return sentences(text)


def make_key(seed: int, length: int, depth: float, repeat: int, digits: int) -> str:
    """The key of a prompt: ``digits`` random digits, a function of (seed, length, depth, repeat) alone."""
    rng = random.Random(f"niah:{seed}:{length}:{depth:g}:{repeat}")
    return "".join(rng.choice("0123456789") for _ in range(digits))


def needle_boundary(units: list[str], n: int, depth: float) -> int:
    """Index k in [0, n]: the needle goes after the first k of the n background sentences, the boundary
    whose character offset is nearest to ``depth`` % of the background's characters."""
    m = len(units)
    offsets = [0]
    for i in range(n):
        offsets.append(offsets[-1] + len(units[i % m]))
    target = depth / 100.0 * offsets[-1]
    return min(range(n + 1), key=lambda k: (abs(offsets[k] - target), k))


def build_text(units: list[str], n: int, depth: float, key: str) -> tuple[str, int]:
    """The prompt (before any chat wrapper) with ``n`` background sentences, and the needle's boundary."""
    m = len(units)
    k = needle_boundary(units, n, depth)
    before = "".join(units[i % m] for i in range(k)).rstrip()
    after = "".join(units[i % m] for i in range(k, n)).rstrip()
    content = " ".join([before, NEEDLE.format(key=key), after, ""])  # longctx_bench make_content
    return INSTRUCTION + content + QUESTION, k


@dataclass
class Prompt:
    length: int  # the cell's length (tokens asked)
    depth_index: int
    depth: float  # percent
    repeat: int
    key: str
    text: str  # as fed to the tokenizer (chat wrapper included)
    ids: list[int]
    sentences: int  # background sentences
    needle_after: int  # background sentences before the needle

    @property
    def sha1(self) -> str:
        return hashlib.sha1(json.dumps([self.text, self.ids]).encode()).hexdigest()


def fit_prompt(
    tokenizer: Any, units: list[str], budget: int, depth: float, key: str, chat: bool
) -> tuple[str, list[int], int, int]:
    """(text, ids, sentences, needle boundary) of the prompt with the most background sentences whose
    token count (chat wrapper and special tokens included) is at most ``budget``."""

    def make(n: int) -> tuple[str, list[int], int]:
        text, k = build_text(units, n, depth, key)
        if chat:
            text = apply_chat(tokenizer, text)
        return text, encode_prompt(tokenizer, text, chat), k

    cache: dict[int, tuple[str, list[int], int]] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = make(n)
        return len(cache[n][1]) <= budget

    if not fits(0):
        need = len(cache[0][1])
        raise ValueError(f"niah: {budget} prompt tokens are too few: instruction, needle and question take {need}")
    # a first guess from the tokens of one copy of the background, then a bracket, then bisection
    per_copy = max(1, len(tokenizer("".join(units), add_special_tokens=False).input_ids))
    guess = max(1, (budget - len(cache[0][1])) * len(units) // per_copy)
    lo, hi = 0, None
    step = max(1, guess // 32)
    if fits(guess):
        lo = guess
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi = guess
        while True:
            cand = max(0, hi - step)
            if fits(cand):
                lo = cand
                break
            hi = cand
            step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    text, ids, k = cache[lo]
    return text, ids, lo, k


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class NIAH(Task):
    name = "niah"
    description = "needle in a haystack: the passkey test (longctx_bench) on a depth x length grid"
    report_sections = ("tasks.niah_report:NEEDLE",)
    scorecard = ScorecardColumn("needle", "exact", "{:.1f}", means="the mean exact match over the grid", order=40)
    shardable = True
    config_class = NIAHConfig

    # ---- before the model loads ----------------------------------------------------------------
    def tokens_needed(self) -> int | None:
        lengths = parse_lengths(self.config.lengths)
        return max(lengths) if lengths else None

    def check_data(self, data_dir: Path | None) -> None:
        background_units(self.config.haystack)

    # ---- the grid --------------------------------------------------------------------------------
    def max_new_tokens(self) -> int:
        return self.config.digits + EXTRA_NEW_TOKENS

    def lengths(self, ctx: TaskContext) -> list[int]:
        from harness.models import context_length

        return parse_lengths(self.config.lengths) or common.default_lengths(context_length(ctx.model), "niah")

    def uses_chat(self, tokenizer: Any) -> bool:
        return self.config.chat and bool(getattr(tokenizer, "chat_template", None))

    def prompts(self, tokenizer: Any, lengths: list[int], context: int | None) -> list[Prompt]:
        """Every prompt of the grid, lengths ascending, then depths, then repeats: a function of the
        options, the tokenizer and the model's context alone (never of the cache method)."""
        cfg = self.config
        units = background_units(cfg.haystack)
        chat = self.uses_chat(tokenizer)
        out = []
        for length in lengths:
            budget = length if not context else min(length, context - self.max_new_tokens())
            for di, depth in enumerate(depth_values(cfg.depths)):
                for r in range(cfg.repeats):
                    key = make_key(cfg.seed, length, depth, r, cfg.digits)
                    text, ids, n, k = fit_prompt(tokenizer, units, budget, depth, key, chat)
                    out.append(Prompt(length, di, depth, r, key, text, ids, n, k))
        return out

    def shard_units(self) -> int | None:
        lengths = parse_lengths(self.config.lengths)
        return len(lengths) * self.config.depths * self.config.repeats if lengths else None

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        return self.merge_shards([self.evaluate_shard(ctx, 0, 1)])

    @torch.no_grad()
    def evaluate_shard(self, ctx: TaskContext, index: int, count: int) -> dict[str, Any]:
        """Prompts ``[index * N // count, (index + 1) * N // count)`` of the N prompts of the grid."""
        from harness.models import context_length

        tok = ctx.tokenizer
        if tok is None:
            raise ValueError("niah needs a tokenizer (random-weight shape models have none)")
        device = next(ctx.model.parameters()).device
        lengths = self.lengths(ctx)
        context = context_length(ctx.model)
        start = time.perf_counter()
        prompts = self.prompts(tok, lengths, context)
        todo = prompts[index * len(prompts) // count : (index + 1) * len(prompts) // count]
        eos = eos_ids(ctx.model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        gen_kw: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens(), do_sample=False, num_beams=1, pad_token_id=pad
        )
        if eos:
            gen_kw["eos_token_id"] = eos
        finished = common.read_checkpoint(ctx.checkpoint, lambda s: (s["length"], s["depth_index"], s["repeat"]))
        samples: list[dict[str, Any]] = []
        bar = tqdm(total=len(todo), desc=f"niah {ctx.attached.method.label}", disable=not ctx.progress, leave=False)
        for p in todo:
            done = finished.get((p.length, p.depth_index, p.repeat))
            if done is not None and done.get("prompt_sha1") == p.sha1:
                samples.append(done)
                bar.update(1)
                continue
            ids = torch.tensor([p.ids], device=device)
            t0 = time.perf_counter()
            cache = ctx.attached.new_cache()
            out = generate(ctx.model, ids, cache, attention_mask=torch.ones_like(ids), **gen_kw)
            output = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            seconds = time.perf_counter() - t0
            exact, partial = score_answer(p.key, output)
            samples.append(
                {
                    "length": p.length,
                    "depth": p.depth,
                    "depth_index": p.depth_index,
                    "repeat": p.repeat,
                    "key": p.key,
                    "input_tokens": len(p.ids),
                    "background_sentences": p.sentences,
                    "needle_after": p.needle_after,
                    "output": output,
                    "exact": 100.0 * exact,
                    "partial": 100.0 * partial,
                    "prompt_sha1": p.sha1,
                    "seconds": seconds,
                    "kv": cache.memory().as_dict(),
                }
            )
            append_checkpoint(ctx.checkpoint, samples[-1])
            bar.update(1)
        bar.close()
        return {
            "samples": samples,
            "lengths": lengths,
            "depths": depth_values(self.config.depths),
            "chat_template": self.uses_chat(tok),
            "eval_seconds": time.perf_counter() - start,
        }

    def merge_shards(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The record from every shard in order: means overall, per length and per cell (× 100)."""
        samples = [s for part in parts for s in part["samples"]]
        if not samples:
            raise ValueError("niah: no prompts")

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        metrics = {"exact": mean([s["exact"] for s in samples]), "partial": mean([s["partial"] for s in samples])}
        lengths = list(dict.fromkeys(s["length"] for s in samples))
        for length in lengths:
            at = [s for s in samples if s["length"] == length]
            metrics[f"exact@{length}"] = mean([s["exact"] for s in at])
            metrics[f"partial@{length}"] = mean([s["partial"] for s in at])
        cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for s in samples:
            cells.setdefault((s["length"], s["depth_index"]), []).append(s)
        grid = [
            {
                "length": length,
                "depth": cell[0]["depth"],
                "exact": mean([s["exact"] for s in cell]),
                "partial": mean([s["partial"] for s in cell]),
                "repeats": len(cell),
                "input_tokens": mean([s["input_tokens"] for s in cell]),
            }
            for (length, _), cell in cells.items()
        ]
        kv = next((s["kv"] for s in reversed(samples) if s.get("kv")), {})
        nonfinite = sum((s.get("kv") or {}).get("nonfinite_kv", 0) for s in samples)
        prompts_sha1 = hashlib.sha1("".join(s["prompt_sha1"] for s in samples).encode()).hexdigest()
        return {
            "metrics": metrics,
            "grid": grid,
            "kv": {**kv, "nonfinite_kv": nonfinite},  # the last prompt's cache; non-finite K/V of all
            "samples": [{k: v for k, v in s.items() if k != "kv"} for s in samples],
            "lengths": parts[0]["lengths"],
            "depths": parts[0]["depths"],
            "n_samples": len(samples),
            "max_new_tokens": self.max_new_tokens(),
            "chat_template": parts[0]["chat_template"],
            "prompts_sha1": prompts_sha1,
            "eval_seconds": sum(part["eval_seconds"] for part in parts),
        }
