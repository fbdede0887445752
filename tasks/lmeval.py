"""lm-evaluation-harness (0.4.x) tasks run through a KV-cache method: ``lmeval:piqa,arc_easy,hellaswag``.

``HarnessLM`` is lm-eval's HF model wrapper (``HFLM``) around our loaded model, with every forward
(loglikelihood, rolling loglikelihood, multiple choice) and every ``generate`` given a fresh cache of
the method. Batches are of size 1: lm-eval pads loglikelihood batches on the right without passing
a mask to the model, and those pad tokens would enter the cache, where per-channel key statistics
(KIVI, MoQAE, KVQuant's ranges) and token-importance scores (MiKV) would see them. With one request
per forward nothing is padded, so a request scores the same alone or among longer ones (tested).

Data. Without a local mirror, the tasks are lm-eval's own (hub datasets, its YAML definitions). With
a mirror (``--data-dir``), the tasks are built here as lm-eval task configs over the mirror's
``lm-eval/*.jsonl`` files, with the prompts, choices and targets of lm-eval's standard YAMLs rebuilt
from the mirror's layout, and scored by lm-eval itself (acc; acc_norm where the standard task has it):

* piqa — validation (1,838): "Question: {goal}\\nAnswer:", choices sol1/sol2.
* arc_easy, arc_challenge — test: "Question: {question}\\nAnswer:", the choices' texts.
* openbookqa — test: the question stem, the choices' texts.
* boolq — validation: "{passage}\\nQuestion: {question}?\\nAnswer:", choices no/yes (acc only).
* copa — validation: premise without its final period + " because"/" therefore", choices " " +
  choice with a lower-case first letter (acc only). The mirror writes a comma where the period was;
  it is dropped to give lm-eval's text.
* hellaswag — the mirror's 1,000 validation rows in the original schema, through lm-eval's own
  preprocessing (``activity_label: ctx_a + " " + ctx_b.capitalize()``, WikiHow bracket clean-up).

lm-eval's own command line has no hook for models from other packages (it can include task folders,
not model modules), so ``moqae-lm-eval`` (``python -m tasks.lmeval``) is lm-eval's CLI with the
``moqae-harness`` model registered: ``moqae-lm-eval --model moqae-harness --model_args
model=smollm2-135m,method=kivi-2 --tasks piqa``. From Python, importing this module registers it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.data import MissingDataError, resolve_data_dir
from harness.evaluation import Task, TaskContext
from harness.integration import AttachedMethod, cache_kwargs, forward
from harness.interface import MethodConfig, MethodSpecError

# --------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------


def _hflm():
    from lm_eval.models.huggingface import HFLM

    return HFLM


def make_harness_lm(model: torch.nn.Module, tokenizer: Any, attached: AttachedMethod, **kwargs: Any):
    """An lm-eval ``HFLM`` over ``model`` whose every forward / generate uses a fresh cache of ``attached``."""
    return _harness_lm_class()(model, tokenizer, attached, **kwargs)


_CLASS: type | None = None


def _harness_lm_class() -> type:
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    HFLM = _hflm()

    class HarnessLM(HFLM):
        """lm-eval's HF causal-LM wrapper with the KV cache of a harness method (batch size 1)."""

        def __init__(self, model, tokenizer, attached: AttachedMethod, max_length: int | None = None, **kwargs):
            kwargs.pop("batch_size", None)  # one request per forward: nothing is ever padded
            super().__init__(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=1,
                max_length=max_length,
                device=str(next(model.parameters()).device),
                **kwargs,
            )
            self.attached = attached
            self.last_cache = None
            self.forwards = 0

        def _new_cache(self):
            self.last_cache = self.attached.new_cache()
            self.forwards += 1
            return self.last_cache

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            if inps.shape[0] != 1:
                raise RuntimeError(f"moqae-harness: batch of {inps.shape[0]} requests; the wrapper runs one at a time")
            with torch.no_grad():
                return forward(self.model, inps, self._new_cache()).logits

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
            generation_kwargs.update(cache_kwargs(self.model, self._new_cache()))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    _CLASS = HarnessLM
    return HarnessLM


def register_with_lm_eval() -> None:
    """Register ``moqae-harness`` in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import get_model, register_model

    try:
        get_model("moqae-harness")
        return
    except (KeyError, ValueError):
        pass

    @register_model("moqae-harness")
    class MoQAEHarnessLM(_harness_lm_class()):
        """``--model_args model=ALIAS|PATH,method=SPEC[,data_dir=DIR,dtype=fp32,device=cpu]``."""

        def __init__(self, model: str = "smollm2-135m", method: str = "fp16", data_dir: str | None = None,
                     dtype: str | None = None, device: str | None = None, **kwargs):  # fmt: skip
            from harness.data import calibration_windows
            from harness.interface import build_method
            from harness.models import load_model
            from harness.runner import CALIBRATION_WINDOWS

            lm, tok = load_model(model, device=device, dtype=dtype)
            m = build_method(str(method).replace(";", ","))  # lm-eval splits model_args on commas: use ';'
            attached = AttachedMethod(lm, m)
            if m.needs_calibration:
                attached.calibrate(calibration_windows(tok, resolve_data_dir(data_dir), 2048, CALIBRATION_WINDOWS))
            super().__init__(lm, tok, attached, **kwargs)


# --------------------------------------------------------------------------------------------
# Mirror tasks: lm-eval's standard prompts rebuilt from the mirror's layout
# --------------------------------------------------------------------------------------------


def _question(query: str) -> str:
    return "Question: " + query.removeprefix("Question: ").rstrip("\n") + "\nAnswer:"


def _boolq(query: str) -> str:
    return query.removeprefix("Passage: ") + "\nAnswer:"


def _copa(query: str) -> str:
    return re.sub(r",\s*(because|therefore)$", r" \1", query.strip())


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, " [title]" -> ". ", drop [bracketed] artifacts, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


@dataclass(frozen=True)
class MirrorTask:
    file: str  # under <data_dir>/lm-eval/
    doc: Callable[[dict], dict]  # mirror row -> {"query", "choices", "gold"} in lm-eval's text
    acc_norm: bool = True


def _icl(text: Callable[[str], str], choice: Callable[[str], str] = lambda c: c) -> Callable[[dict], dict]:
    return lambda r: {"query": text(r["query"]), "choices": [choice(c) for c in r["choices"]], "gold": int(r["gold"])}


MIRROR_TASKS: dict[str, MirrorTask] = {
    "piqa": MirrorTask("piqa.jsonl", _icl(_question)),
    "arc_easy": MirrorTask("arc_easy.jsonl", _icl(_question)),
    "arc_challenge": MirrorTask("arc_challenge.jsonl", _icl(_question)),
    "openbookqa": MirrorTask("openbook_qa.jsonl", _icl(lambda q: q)),
    "boolq": MirrorTask("boolq.jsonl", _icl(_boolq), acc_norm=False),
    "copa": MirrorTask("copa.jsonl", _icl(_copa, lambda c: " " + _lower_first(c)), acc_norm=False),
    "hellaswag": MirrorTask("hellaswag.jsonl", hellaswag_doc),
}


def mirror_docs(name: str, data_dir: Path) -> list[dict]:
    path = data_dir / "lm-eval" / MIRROR_TASKS[name].file
    if not path.exists():
        raise MissingDataError(
            f"lm-eval task {name}: {path} not found; give --data-dir with lm-eval/{MIRROR_TASKS[name].file}, "
            "or run online without --data-dir to use lm-eval's hub datasets"
        )
    with path.open() as f:
        return [MIRROR_TASKS[name].doc(json.loads(line)) for line in f if line.strip()]


def mirror_task_config(name: str, data_dir: Path) -> dict[str, Any]:
    """An lm-eval task config (dict) over the mirror's file, scored by lm-eval as its standard task."""
    import datasets

    docs = mirror_docs(name, data_dir)
    metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    if MIRROR_TASKS[name].acc_norm:
        metrics.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    return {
        "task": f"{name}",
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": metrics,
        "metadata": {"version": 1.0, "source": str(data_dir / "lm-eval" / MIRROR_TASKS[name].file)},
    }


# --------------------------------------------------------------------------------------------
# The harness task
# --------------------------------------------------------------------------------------------


@dataclass
class LMEvalConfig(MethodConfig):
    tasks: str = "piqa,arc_easy,hellaswag"
    limit: int | None = None  # first N documents per task
    num_fewshot: int = 0

    positional: ClassVar[str] = "tasks"

    @property
    def names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def validate(self) -> None:
        if not self.names:
            raise MethodSpecError("lmeval: no tasks; write lmeval:piqa,arc_easy,hellaswag")
        if self.limit is not None and self.limit < 1:
            raise MethodSpecError(f"lmeval: limit={self.limit} must be >= 1")
        if self.num_fewshot < 0:
            raise MethodSpecError(f"lmeval: num_fewshot={self.num_fewshot} must be >= 0")


class LMEval(Task):
    name = "lmeval"
    description = "lm-evaluation-harness tasks (acc / acc_norm) through the method's cache"
    report_sections = ("tasks.lmeval_report:LMEVAL",)
    config_class = LMEvalConfig

    def task_specs(self, data_dir: Path | None) -> list[str | dict]:
        names = self.config.names
        if data_dir is None:
            return list(names)  # lm-eval's own task definitions and hub datasets
        unknown = [n for n in names if n not in MIRROR_TASKS]
        if unknown:
            raise MethodSpecError(
                f"lmeval: no mirror definition for {', '.join(unknown)}; with --data-dir the tasks are "
                f"{', '.join(MIRROR_TASKS)} (without --data-dir any lm-eval task name works online)"
            )
        return [mirror_task_config(n, data_dir) for n in names]

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        lm = make_harness_lm(ctx.model, ctx.tokenizer, ctx.attached)
        out = simple_evaluate(
            model=lm,
            tasks=self.task_specs(ctx.data_dir),
            num_fewshot=self.config.num_fewshot,
            limit=self.config.limit,
            log_samples=True,
            verbosity="ERROR",
        )
        metrics: dict[str, float] = {}
        for name in self.config.names:
            res = out["results"].get(name, {})
            for key, value in res.items():
                metric, _, _filter = key.partition(",")
                if metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and isinstance(value, float):
                    metrics[f"{name}/{metric}"] = value
        samples = []
        for name, rows in out.get("samples", {}).items():
            for row in rows:
                samples.append(
                    {
                        "task": name,
                        "doc_id": row.get("doc_id"),
                        "target": row.get("target"),
                        "acc": row.get("acc"),
                        "acc_norm": row.get("acc_norm"),
                        "loglikelihoods": [float(r[0][0]) for r in row.get("resps", [])],
                    }
                )
        return {
            "metrics": metrics,
            "kv": lm.last_cache.memory().as_dict() if lm.last_cache is not None else None,
            "samples": samples,
            "documents": {n: len(out.get("samples", {}).get(n, [])) for n in self.config.names},
            "forwards": lm.forwards,
            "eval_seconds": time.perf_counter() - start,
        }


def main() -> None:
    """``moqae-lm-eval``: lm-eval's command line with the ``moqae-harness`` model registered."""
    register_with_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
