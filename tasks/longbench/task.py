"""LongBench v1 (``longbench:trec,samsum,limit=4``) by the protocol of THUDM/LongBench ``pred.py`` / ``eval.py``.

Per sample, as ``pred.py`` does:

1. ``prompt = DATASET2PROMPT[dataset].format(**sample)``.
2. Tokenize (with the tokenizer's special tokens). If longer than ``max_length`` tokens, keep the first
   ``max_length // 2`` and the last ``max_length // 2`` token ids and decode each half back to text
   (``skip_special_tokens=True``), joined: the middle of the context goes, the instructions at both
   ends stay.
3. Except for trec, triviaqa, samsum, lsht, lcc, repobench-p (few-shot / completion prompts), wrap the
   prompt as one user turn of the tokenizer's chat template (``add_generation_prompt=True``) when
   ``chat_template=true`` and the tokenizer has a template. Without one, the raw prompt is used (the
   official script builds each model's wrapper by hand; a base model gets none).
4. Greedy decoding (``do_sample=False``, one beam) of at most ``DATASET2MAXLEN[dataset]`` new tokens
   through a fresh cache of the method, so its quantization covers the long prefill and every decode
   step. samsum also stops at the newline token and generates at least one token, as ``pred.py``.
5. Decode the new tokens only (``skip_special_tokens=True``); trec, triviaqa, samsum, lsht keep the
   first line; score with the dataset's metric (``tasks.longbench.metrics``).

Choices where the official script has no equivalent:

* ``max_length`` (the prompt budget, ``model2maxlen`` upstream: 3,500 for a 4k model, 7,500 for 8k,
  31,500 for 32k). ``max_length=0`` (default) takes, per dataset, the model's
  ``max_position_embeddings`` minus the dataset's maximal new tokens minus the tokens the chat
  template adds (where it applies), so prompt and answer always fit the model's window.
* When re-tokenizing the decoded halves gives more than ``max_length`` tokens (a cut inside a
  multi-byte character decodes to U+FFFD; pieces merge differently at the joint), the halves are
  shrunk until the prompt fits: the official script would feed the longer prompt.
* samsum's stop tokens are the model's end-of-sequence ids (generation config and tokenizer) plus the
  last id of ``tokenizer.encode("\\n")``; upstream lists the tokenizer's EOS and the newline only,
  which is the same set for the models it ran.
* Scores are not rounded (upstream rounds each dataset's score to 2 decimals). ``average`` is the
  plain mean over the datasets evaluated.
* The group ``e`` selects LongBench-E's 13 datasets on LongBench's standard test rows; the
  length-balanced ``*_e`` sets and their per-length buckets are not used.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from harness.data import DataFileError, MissingDataError, longbench_rows
from harness.evaluation import Task, TaskContext
from harness.integration import generate
from harness.interface import MethodConfig, MethodSpecError
from harness.options import NonNegativeInt, Parsed, PositiveInt
from harness.reports.scorecard import ScorecardColumn
from tasks.common import append_checkpoint, read_checkpoint
from tasks.longbench.metrics import sample_score
from tasks.longbench.prompts import (
    DATASET2MAXLEN,
    DATASET2METRIC,
    DATASET2PROMPT,
    DATASETS,
    GROUPS,
    NO_CHAT_TEMPLATE,
    STOP_AT_NEWLINE,
)

_MAX_SHRINK_STEPS = 64
_SMALL_STEPS = 8


def expand_datasets(spec: str) -> list[str]:
    """``"kivi8"`` / ``"trec,samsum"`` / ``"e,lsht"`` -> the dataset names, in order, without repeats."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names.extend(GROUPS[item])
        elif item in DATASET2PROMPT:
            names.append(item)
        else:
            accepted = ", ".join([*GROUPS, *DATASETS])
            raise MethodSpecError(f"longbench: unknown dataset or group {item!r}; accepted: {accepted}")
    if not names:
        raise MethodSpecError("longbench: no dataset given; e.g. longbench:trec,samsum or longbench:kivi8")
    return list(dict.fromkeys(names))


@dataclass
class LongBenchConfig(MethodConfig):
    # datasets and/or groups (all, e, kivi8), comma-separated
    tasks: Parsed(expand_datasets, "LongBench datasets or groups (all, e, kivi8)") = "kivi8"
    limit: PositiveInt | None = None  # first N samples of each dataset; None = all
    # prompt token budget (middle truncation); 0 = model window - new tokens - chat wrapper
    max_length: NonNegativeInt = 0
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template where the protocol does

    positional: ClassVar[str] = "tasks"

    def validate(self) -> None:
        if self.max_length == 1:
            raise MethodSpecError(f"longbench: max_length={self.max_length} must be 0 (automatic) or >= 2")


# --------------------------------------------------------------------------------------------
# Prompt construction
# --------------------------------------------------------------------------------------------


def row_fields(dataset: str) -> list[str]:
    """The fields of a row this task reads: its prompt template's, ``answers``, and ``all_classes``
    where the metric is ``classification`` (``_id`` is optional: it only matches checkpointed samples)."""
    template = [name for _, name, _, _ in string.Formatter().parse(DATASET2PROMPT[dataset]) if name]
    classes = ["all_classes"] if DATASET2METRIC[dataset] == "classification" else []
    return [*dict.fromkeys(template), "answers", *classes]


def fill_template(dataset: str, sample: dict[str, Any]) -> str:
    """The dataset's prompt template filled with the sample's fields (``format(**sample)``)."""
    return DATASET2PROMPT[dataset].format(**sample)


def middle_ids(ids: list[int], max_length: int, half: int | None = None) -> tuple[list[int], list[int]]:
    """The first and the last ``half`` (default ``max_length // 2``) ids of a sequence longer than ``max_length``."""
    half = max_length // 2 if half is None else half
    if half < 1:
        raise ValueError(f"max_length={max_length} leaves no tokens to keep")
    return ids[:half], ids[len(ids) - half :]


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> tuple[str, bool]:
    """(prompt, truncated): the prompt itself if it has at most ``max_length`` tokens, else the decoded
    first and last halves of its token ids (official), halves shrunk until the re-tokenized text fits."""
    ids = tokenizer(prompt).input_ids
    if len(ids) <= max_length:
        return prompt, False

    def attempt(half: int) -> tuple[str, int]:
        head, tail = middle_ids(ids, max_length, half)
        text = tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)
        return text, len(tokenizer(text).input_ids)

    half, too_long = max_length // 2, None
    for step in range(_MAX_SHRINK_STEPS):
        text, n = attempt(half)
        if n <= max_length or half <= 1:
            break
        too_long = half
        # a few tokens too many (the joint, one cut character): one id less per half; else in proportion
        half = half - 1 if step < _SMALL_STEPS else max(1, min(half - 1, half * max_length // n))
    if n <= max_length and too_long is not None and too_long - half > 1:
        lo, hi = half, too_long  # after a jump: the largest half that fits below the last one that did not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_text, mid_n = attempt(mid)
            lo, hi, text = (mid, hi, mid_text) if mid_n <= max_length else (lo, mid, text)
    return text, True


def uses_chat_template(tokenizer: Any, dataset: str, enabled: bool = True) -> bool:
    return enabled and dataset not in NO_CHAT_TEMPLATE and bool(getattr(tokenizer, "chat_template", None))


def apply_chat(tokenizer: Any, prompt: str) -> str:
    """The prompt as one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around an empty user turn (system prompt, role markers, ...)."""
    return len(tokenizer(apply_chat(tokenizer, ""), add_special_tokens=False).input_ids)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids fed to the model: the chat-wrapped text already holds its special tokens."""
    return tokenizer(prompt, add_special_tokens=not chat).input_ids


def context_window(model: torch.nn.Module) -> int:
    from harness.models import context_length

    window = context_length(model)
    if not window:
        raise ValueError("longbench: the model config has no max_position_embeddings; set max_length=N")
    return window


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    ids: list[int] = []
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, list | tuple) else [value])
    return list(dict.fromkeys(int(i) for i in ids))


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class LongBench(Task):
    name = "longbench"
    description = "LongBench v1 (21 datasets; groups all, e, kivi8): official prompts, truncation, metrics"
    report_sections = ("tasks.longbench.report:LONGBENCH",)
    scorecard = ScorecardColumn("LongBench", "average", "{:.2f}", means="the average score over the datasets", order=20)
    shardable = True
    config_class = LongBenchConfig

    def prompt_budget(self, ctx: TaskContext, dataset: str, chat: bool) -> int:
        if self.config.max_length > 0:
            return self.config.max_length
        wrap = chat_overhead(ctx.tokenizer) if chat else 0
        budget = context_window(ctx.model) - DATASET2MAXLEN[dataset] - wrap
        if budget < 2:
            raise ValueError(f"longbench {dataset}: the model's window leaves {budget} prompt tokens")
        return budget

    def generation_kwargs(self, ctx: TaskContext, dataset: str) -> dict[str, Any]:
        tok = ctx.tokenizer
        eos = eos_ids(ctx.model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        kw: dict[str, Any] = dict(
            max_new_tokens=DATASET2MAXLEN[dataset], do_sample=False, num_beams=1, pad_token_id=pad
        )
        if dataset in STOP_AT_NEWLINE:
            newline = tok.encode("\n", add_special_tokens=False)[-1]
            kw.update(eos_token_id=list(dict.fromkeys([*eos, newline])), min_new_tokens=1)
        return kw

    def check_data(self, data_dir: Path | None) -> None:
        """Every dataset the spec names is readable, else one error naming all that are not; a local
        file that is not JSON lines, empty, or with a row lacking a field read is refused at once."""
        names = expand_datasets(self.config.tasks)
        missing: dict[str, MissingDataError] = {}
        for ds in names:
            try:
                longbench_rows(ds, data_dir, row_fields(ds))
            except DataFileError:
                raise
            except MissingDataError as e:
                missing[ds] = e
        if len(missing) == 1:
            raise next(iter(missing.values()))
        if missing:
            first, error = next(iter(missing.items()))
            how = str(error).split(": ", 1)[1].replace(first, "<dataset>")
            raise MissingDataError(
                f"LongBench: {len(missing)} of {len(names)} datasets missing ({', '.join(missing)}); each {how}"
            )

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        """Generate and score every sample; each finished sample is appended to
        ``ctx.checkpoint`` so that a re-run after a crash resumes at the first unfinished one."""
        return self.merge_shards([self.evaluate_shard(ctx, 0, 1)])

    @torch.no_grad()
    def evaluate_shard(self, ctx: TaskContext, index: int, count: int) -> dict[str, Any]:
        """Samples ``[index * N // count, (index + 1) * N // count)`` of the N samples (every dataset's
        rows in order, datasets one after another), each with its score and its cache's memory."""
        cfg, tok = self.config, ctx.tokenizer
        if tok is None:
            raise ValueError("longbench needs a tokenizer (random-weight shape models have none)")
        device = next(ctx.model.parameters()).device
        data = {ds: longbench_rows(ds, ctx.data_dir)[: cfg.limit] for ds in expand_datasets(cfg.tasks)}
        for dataset, rows in data.items():
            if not rows:
                raise ValueError(f"longbench {dataset}: no samples")
        todo = [(ds, i, row) for ds, rows in data.items() for i, row in enumerate(rows)]
        todo = todo[index * len(todo) // count : (index + 1) * len(todo) // count]
        samples: list[dict[str, Any]] = []
        start = time.perf_counter()
        # samples a crashed run already finished
        finished = read_checkpoint(ctx.checkpoint, lambda s: (s["dataset"], s["index"]))
        bar = tqdm(total=len(todo), desc=f"longbench {ctx.attached.method.label}", disable=not ctx.progress,
                   leave=False)  # fmt: skip
        settings: dict[str, tuple[bool, int, dict[str, Any]]] = {}
        for dataset, i, row in todo:
            done = finished.get((dataset, i))
            if done is not None and done.get("_id") == row.get("_id"):
                samples.append(done)
                bar.update(1)
                continue
            if dataset not in settings:
                chat = uses_chat_template(tok, dataset, cfg.chat_template)
                settings[dataset] = (chat, self.prompt_budget(ctx, dataset, chat), self.generation_kwargs(ctx, dataset))
            chat, budget, gen_kw = settings[dataset]
            prompt, truncated = truncate_middle(tok, fill_template(dataset, row), budget)
            if chat:
                prompt = apply_chat(tok, prompt)
            ids = torch.tensor([encode_prompt(tok, prompt, chat)], device=device)
            t0 = time.perf_counter()
            cache = ctx.attached.new_cache()
            out = generate(ctx.model, ids, cache, attention_mask=torch.ones_like(ids), **gen_kw)
            output = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            seconds = time.perf_counter() - t0
            kv = cache.memory().as_dict()
            s = 100 * sample_score(dataset, output, row["answers"], row.get("all_classes"))
            samples.append(
                {
                    "dataset": dataset,
                    "index": i,
                    "_id": row.get("_id"),
                    "input_tokens": ids.shape[1],
                    "truncated": truncated,
                    "output": output,
                    "answers": list(row["answers"]),
                    "score": s,
                    "seconds": seconds,
                    "kv": kv,
                }
            )
            append_checkpoint(ctx.checkpoint, samples[-1])
            bar.update(1)
        bar.close()
        n_samples = {ds: len(rows) for ds, rows in data.items()}
        return {"samples": samples, "n_samples": n_samples, "eval_seconds": time.perf_counter() - start}

    def shard_units(self) -> int | None:
        return None if self.config.limit is None else self.config.limit * len(expand_datasets(self.config.tasks))

    def merge_shards(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The record of every sample from the shards, in order: per-dataset means as one pass takes them."""
        samples = [s for part in parts for s in part["samples"]]
        scores: dict[str, list[float]] = {}
        for s in samples:
            scores.setdefault(s["dataset"], []).append(s["score"])
        metrics = {ds: sum(v) / len(v) for ds, v in scores.items()}
        metrics["average"] = sum(metrics.values()) / len(metrics)
        kv = next((s["kv"] for s in reversed(samples) if s.get("kv")), {})  # a checkpoint of old may lack it
        nonfinite = sum((s.get("kv") or {}).get("nonfinite_kv", 0) for s in samples)
        return {
            "metrics": metrics,
            "kv": {**kv, "nonfinite_kv": nonfinite},  # the last sample's cache; non-finite K/V of all
            "samples": [{k: v for k, v in s.items() if k != "kv"} for s in samples],
            "n_samples": parts[0]["n_samples"],
            "eval_seconds": sum(part["eval_seconds"] for part in parts),
        }
