"""RULER (``ruler:niah_single_1,vt,lengths=4096/8192``): NVIDIA/RULER's 13 synthetic long-context tasks,
generated offline in the target model's tokenizer, answered greedily through each method's cache.

NVIDIA/RULER at commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a, Copyright (c) 2024 NVIDIA CORPORATION,
Apache License 2.0: the generators (``tasks.ruler.generate``: ``scripts/data/synthetic/*.py``,
``scripts/synthetic.yaml``, ``scripts/data/synthetic/constants.py``) and the metrics (``tasks.ruler.metrics``:
``scripts/eval/synthetic/constants.py``, ``scripts/eval/evaluate.py``) follow RULER's code; the protocol:

1. Per task and length L, RULER's generator searches the haystack size so that the prompt's tokens plus
   the task's ``tokens_to_generate`` fit L, and makes ``samples`` samples from ``seed`` (RULER's default
   42; RULER runs 500 samples per task and length, the default here is 4). The prompts depend on the
   tokenizer, the seed, ``haystack`` and ``chat`` only: every method reads the same prompts (their SHA-1
   is recorded, ``ruler.prompts_sha1``).
2. The prompt is RULER's task text before its answer prefix, wrapped as one user turn of the
   tokenizer's chat template where ``chat=true`` and the tokenizer has one (RULER writes a model template
   by hand per model; a base model gets ``base``, no wrapper), then the answer prefix
   (``input + answer_prefix``, as ``scripts/pred/call_api.py`` feeds it).
3. Greedy decoding (RULER: temperature 0, no stop words) of at most ``tokens_to_generate`` new tokens
   through a fresh cache of the method; the new tokens decoded (``skip_special_tokens=True``).
4. Scores: ``string_match_all`` (niah*, vt, cwe, fwe) or ``string_match_part`` (qa_1, qa_2) × 100 per
   task and length (``metrics["niah_single_1@4096"]``), their plain mean over the tasks per length
   (``metrics["avg@4096"]``, RULER's table), and ``metrics["average"]`` over every task and length.

Options: ``tasks`` (names, or ``all`` = 13, ``offline`` = all but qa_1 and qa_2), ``lengths``
(``/``-separated in a spec since ``,`` separates options there: ``lengths=4096/8192``; default: the powers
of two from 1024 up to the model's context, then the context itself where it is not one of them), ``samples``, ``seed``,
``haystack`` (``noise``: RULER's noise sentences stand in for the Paul Graham essays of the essay tasks;
a text file: its words in RULER's essay layout), ``chat``.

qa_1 / qa_2 read SQuAD v2.0 dev and HotpotQA distractor dev (``tasks.ruler.qa``): the files RULER
downloads (``scripts/data/synthetic/json/download_qa_dataset.sh``) as ``<data>/ruler/squad.json`` and
``<data>/ruler/hotpotqa.json``, or the hub's rows (``rajpurkar/squad_v2``, ``hotpotqa/hotpot_qa``
distractor, ``validation``) as JSON lines beside them, or, without a data folder, from the hub; where
none is found the run is refused in one line before the model loads. The record's ``ruler.qa_data`` names
the source each read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from harness.data import MissingDataError, resolve_data_dir
from harness.evaluation import Task, TaskContext
from harness.integration import generate
from harness.interface import MethodConfig, MethodSpecError
from harness.options import NonNegativeInt, Parsed, PositiveInt, Text
from harness.reports.scorecard import ScorecardColumn
from tasks import common
from tasks.ruler.generate import (
    ALL_TASKS,
    CONFIGS,
    DEFAULT_SEED,
    GROUPS,
    Generator,
    Haystack,
    Sample,
    Tokens,
    tokens_to_generate,
)
from tasks.ruler.metrics import metric_name, sample_score
from tasks.ruler.qa import load_qa, locate, missing_message

MIN_DEFAULT_LENGTH = 1024


def expand_tasks(spec: str) -> list[str]:
    """``"offline"`` / ``"niah_single_1,vt"`` -> the task names, in order, without repeats."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names.extend(GROUPS[item])
        elif item in CONFIGS:
            names.append(item)
        else:
            raise MethodSpecError(
                f"ruler: unknown task or group {item!r}; accepted: {', '.join([*GROUPS, *ALL_TASKS])}"
            )
    if not names:
        raise MethodSpecError("ruler: no task given; e.g. ruler:niah_single_1,vt or ruler:offline")
    return list(dict.fromkeys(names))


def parse_lengths(spec: str) -> list[int]:
    """``"4096/8192"`` (``,`` and ``;`` also separate) -> [4096, 8192]; ``""`` -> [] (automatic)."""
    return common.parse_lengths(spec, "ruler")


def default_lengths(context: int | None) -> list[int]:
    return common.default_lengths(context, "ruler")


@dataclass
class RULERConfig(MethodConfig):
    # RULER task names and/or groups (all, offline), comma-separated
    tasks: Parsed(expand_tasks, "RULER tasks or groups (all, offline)") = "offline"
    # sequence lengths in tokens (prompt + tokens to generate), /-separated; "" = 1024, 2048, ... up to the context
    lengths: Parsed(parse_lengths, "lengths in tokens separated by / (e.g. 4096/8192)") = ""
    samples: PositiveInt = 4  # samples per task and length (RULER runs 500)
    seed: NonNegativeInt = DEFAULT_SEED  # RULER's --random_seed
    # "noise" (RULER's noise sentences in place of the essay haystack) or a text file (its words, essay layout)
    haystack: Text = "noise"
    chat: bool = True  # wrap the prompts in the tokenizer's chat template where it has one

    positional: ClassVar[str] = "tasks"

    def validate(self) -> None:
        if self.haystack != "noise":
            path = Path(self.haystack)
            if not path.is_file():
                raise MethodSpecError(f"ruler: haystack file {self.haystack} not found (give 'noise' or a text file)")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MethodSpecError(
                    f"ruler: haystack file {self.haystack} cannot be read as UTF-8 text: {e}"
                ) from None
            if not text.strip():
                raise MethodSpecError(f"ruler: haystack file {self.haystack} is empty")


# --------------------------------------------------------------------------------------------
# Prompts (shared by every method of a run: generated once per process)
# --------------------------------------------------------------------------------------------

_GENERATORS: dict[tuple, Generator] = {}


def extra_words(data_dir: Path | None) -> list[str] | None:
    """RULER's ``json/english_words.json`` (cwe beyond the wonderwords words) where the data folder has it."""
    path = None if data_dir is None else Path(data_dir) / "ruler" / "english_words.json"
    if path is None or not path.is_file():
        return None
    return list(json.loads(path.read_text(encoding="utf-8")).values())


def generator(task: str, length: int, cfg: RULERConfig, tokens: Tokens, data_dir: Path | None) -> Generator:
    tok = tokens.tokenizer
    ident = (
        task,
        length,
        cfg.seed,
        cfg.haystack,
        tokens.chat,
        type(tok).__name__,
        getattr(tok, "name_or_path", ""),
        len(tok),
        str(data_dir),
    )
    if ident not in _GENERATORS:
        qa = load_qa(task, data_dir)[0] if CONFIGS[task]["task"] == "qa" else None
        extra = extra_words(data_dir) if task == "cwe" else None
        _GENERATORS[ident] = Generator(task, length, cfg.seed, tokens, Haystack.load(cfg.haystack), qa, extra)
    return _GENERATORS[ident]


def prompt_sha1(sample: Sample) -> str:
    return hashlib.sha1((sample.input + "\x00" + sample.answer_prefix).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class RULER(Task):
    name = "ruler"
    description = "RULER's 13 synthetic long-context tasks (groups all, offline), generated offline per length"
    shardable = True
    refuses_random_weights = True
    config_class = RULERConfig
    report_sections = ("tasks.ruler.report:RULER_SECTION",)
    scorecard = ScorecardColumn(
        "RULER", "avg@", "{:.2f}", means="the average over RULER's tasks at each length", order=30
    )

    def task_names(self) -> list[str]:
        return expand_tasks(self.config.tasks)

    def tokens_needed(self) -> int | None:
        lengths = parse_lengths(self.config.lengths)
        return max(lengths) if lengths else None

    def lengths(self, model: torch.nn.Module | None) -> list[int]:
        given = parse_lengths(self.config.lengths)
        if given:
            return given
        from harness.models import context_length

        return default_lengths(context_length(model) if model is not None else None)

    def units(self, lengths: list[int]) -> list[tuple[str, int, int]]:
        """(task, length, index) of every sample: lengths, then tasks, then samples."""
        return [(t, n, i) for n in lengths for t in self.task_names() for i in range(self.config.samples)]

    def qa_tasks(self) -> list[str]:
        return [t for t in self.task_names() if CONFIGS[t]["task"] == "qa"]

    def check_data(self, data_dir: Path | None) -> None:
        """qa_1 / qa_2 read (``tasks.ruler.qa.load_qa``); the ones absent are named in one line."""
        data_dir = resolve_data_dir(data_dir)
        missing = []
        for t in self.qa_tasks():
            try:
                load_qa(t, data_dir)
            except MissingDataError:
                if data_dir is not None and locate(t, data_dir) is not None:
                    raise  # the file is there but not readable as either schema: its own message
                missing.append(t)
        if missing:
            raise MissingDataError(missing_message(missing, data_dir))

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        return self.merge_shards([self.evaluate_shard(ctx, 0, 1)])

    @torch.no_grad()
    def evaluate_shard(self, ctx: TaskContext, index: int, count: int) -> dict[str, Any]:
        """Samples ``[index * N // count, (index + 1) * N // count)`` of the N = lengths × tasks × samples."""
        cfg, tok = self.config, ctx.tokenizer
        if tok is None:
            raise ValueError("ruler needs a tokenizer (random-weight shape models have none)")
        device = next(ctx.model.parameters()).device
        data_dir = resolve_data_dir(ctx.data_dir)
        chat = cfg.chat and bool(getattr(tok, "chat_template", None))
        tokens = Tokens(tok, chat)
        lengths = self.lengths(ctx.model)
        todo = self.units(lengths)
        todo = todo[index * len(todo) // count : (index + 1) * len(todo) // count]
        finished = common.read_checkpoint(ctx.checkpoint, lambda s: (s["task"], s["length"], s["index"]))
        samples: list[dict[str, Any]] = []
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"ruler {ctx.attached.method.label}", disable=not ctx.progress, leave=False)
        for task, length, i in todo:
            gen = generator(task, length, cfg, tokens, data_dir)
            sample = gen.samples(i + 1)[i]
            sha = prompt_sha1(sample)
            done = finished.get((task, length, i))
            if done is not None and done.get("prompt_sha1") == sha:
                samples.append(done)
                bar.update(1)
                continue
            ids = torch.tensor([tokens.ids(task, sample.input + sample.answer_prefix)], device=device)
            t0 = time.perf_counter()
            cache = ctx.attached.new_cache()
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            out = generate(
                ctx.model,
                ids,
                cache,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens_to_generate(task),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
            output = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            samples.append(
                {
                    "task": task,
                    "length": length,
                    "index": i,
                    "prompt_sha1": sha,
                    "input_tokens": ids.shape[1],
                    "length_tokens": sample.length_tokens,
                    "haystack_size": sample.haystack_size,
                    **sample.extra,
                    "output": output,
                    "outputs": sample.outputs,
                    "metric": metric_name(task),
                    "score": sample_score(task, output, sample.outputs),
                    "seconds": time.perf_counter() - t0,
                    "kv": cache.memory().as_dict(),
                }
            )
            common.append_checkpoint(ctx.checkpoint, samples[-1])
            bar.update(1)
        bar.close()
        info = self.info(chat, lengths)
        qa = {t: load_qa(t, data_dir)[1] for t in self.qa_tasks()}
        if qa:
            info["qa_data"] = qa
        return {"samples": samples, "ruler": info, "eval_seconds": time.perf_counter() - start}

    def info(self, chat: bool, lengths: list[int]) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ww = version("wonderwords")
        except PackageNotFoundError:
            ww = None
        splitter = ""
        if self.config.haystack != "noise":
            from tasks.ruler.generate import _splitter

            splitter = _splitter()[0]
        return {
            "tasks": self.task_names(),
            "lengths": lengths,
            "samples": self.config.samples,
            "samples_ruler": 500,
            "seed": self.config.seed,
            "haystack": self.config.haystack,
            "chat": chat,
            "sentence_splitter": splitter,
            "wonderwords": ww,
            "source": "NVIDIA/RULER@c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a",
        }

    def shard_units(self) -> int | None:
        lengths = parse_lengths(self.config.lengths)
        return len(self.units(lengths)) if lengths else None

    def merge_shards(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Per task and length the mean score, per length the mean over tasks, the mean of all; the SHA-1
        of every prompt in order (the same for every method)."""
        samples = [s for part in parts for s in part["samples"]]
        scores: dict[tuple[str, int], list[float]] = {}
        for s in samples:
            scores.setdefault((s["task"], s["length"]), []).append(s["score"])
        metrics: dict[str, float] = {}
        per_length: dict[int, list[float]] = {}
        for (task, length), v in scores.items():
            metrics[f"{task}@{length}"] = sum(v) / len(v)
            per_length.setdefault(length, []).append(metrics[f"{task}@{length}"])
        for length, v in sorted(per_length.items()):
            metrics[f"avg@{length}"] = sum(v) / len(v)
        cells = [metrics[k] for k in metrics if not k.startswith("avg@")]
        metrics["average"] = sum(cells) / len(cells)
        digest = hashlib.sha1("".join(s["prompt_sha1"] for s in samples).encode()).hexdigest()
        kv = next((s["kv"] for s in reversed(samples) if s.get("kv")), {})
        nonfinite = sum((s.get("kv") or {}).get("nonfinite_kv", 0) for s in samples)
        return {
            "metrics": metrics,
            "kv": {**kv, "nonfinite_kv": nonfinite},
            "samples": [{k: v for k, v in s.items() if k != "kv"} for s in samples],
            "n_samples": {f"{t}@{n}": len(v) for (t, n), v in scores.items()},
            "ruler": {**parts[0]["ruler"], "prompts_sha1": digest},
            "eval_seconds": sum(part["eval_seconds"] for part in parts),
        }
