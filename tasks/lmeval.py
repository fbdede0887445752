"""lm-evaluation-harness (0.4.x) tasks run through a KV-cache method: ``lmeval:piqa,arc_easy,hellaswag``.

``HarnessLM`` is lm-eval's HF model wrapper (``HFLM``) around our loaded model, with every forward
(loglikelihood, rolling loglikelihood, multiple choice) and every ``generate`` given a fresh cache of
the method. Batches are of size 1: lm-eval pads loglikelihood batches on the right without passing
a mask to the model, and those pad tokens would enter the cache, where per-channel key statistics
(KIVI, MoQAE, KVQuant's ranges) and token-importance scores (MiKV) would see them. With one request
per forward nothing is padded, so a request scores the same alone or among longer ones (tested).

Data. Every task is lm-eval's own definition (its YAML: prompt, choices, metrics, filters). Without
``--data-dir`` lm-eval loads its hub datasets. With ``--data-dir D`` the data come from local files
only, and the task's YAML is included with nothing but its data source overridden
(``tasks.lmeval_local``): ``D/lm-eval/<task>/<split>.jsonl`` in the hub dataset's schema, for any
YAML task, or the mirror's ``D/lm-eval/*.jsonl`` files through the overrides shipped as YAML in
``tasks/lmeval_yaml/`` (piqa, arc_easy, arc_challenge, openbookqa, boolq, copa, hellaswag). The
record keeps lm-eval's metric names: ``<task>/<metric>`` (``<task>/<metric>[<filter>]`` for a filter
other than ``none``) and ``..._stderr``.

lm-eval's own command line has no hook for models from other packages (it can include task folders,
not model modules), so ``moqae-lm-eval`` (``python -m tasks.lmeval``) is lm-eval's CLI with the
``moqae-harness`` model registered: ``moqae-lm-eval --model moqae-harness --model_args
model=smollm2-135m,method=kivi-2 --tasks piqa``. From Python, importing this module registers it.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch

from harness.data import resolve_data_dir
from harness.evaluation import Task, TaskContext
from harness.integration import AttachedMethod, cache_kwargs, forward
from harness.interface import MethodConfig, MethodSpecError
from harness.options import FreeText, NonNegativeInt, PositiveInt

# --------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------


def quiet_lm_eval() -> None:
    """Keep what lm-eval logs while it builds models and tasks ("`pretrained` model kwarg is not of type
    `str`", "Overwriting default num_fewshot", ...) off the terminal: the records stay in Python logging
    (the ``lm_eval`` logger, for an application that configures handlers), but Python's last-resort
    handler no longer prints them; ``datasets``' progress bars too (the harness shows its own progress)."""
    import datasets

    datasets.disable_progress_bars()
    logger = logging.getLogger("lm_eval")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


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
            self.nonfinite_kv = 0

        def _new_cache(self):
            if self.last_cache is not None:  # non-finite K/V counted over every request's cache
                self.nonfinite_kv += self.last_cache.nonfinite_kv
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
# The harness task
# --------------------------------------------------------------------------------------------


@dataclass
class LMEvalConfig(MethodConfig):
    # lm-eval task names, comma-separated (checked against lm-eval's index with the data, before the model loads)
    tasks: Annotated[str, FreeText("lm-eval task names, comma-separated")] = "piqa,arc_easy,hellaswag"
    limit: PositiveInt | None = None  # first N documents per task
    num_fewshot: NonNegativeInt = 0

    positional: ClassVar[str] = "tasks"

    @property
    def names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def validate(self) -> None:
        if not self.names:
            raise MethodSpecError("lmeval: no tasks; write lmeval:piqa,arc_easy,hellaswag")


def result_metrics(name: str, results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` for one task as
    ``{"<name>/acc": 0.5, "<name>/acc_stderr": 0.1}``; a filter other than ``none`` stays in brackets."""
    out: dict[str, float] = {}
    for key, value in results.items():
        metric, _, flt = key.partition(",")
        if not flt or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # "alias", "samples", "N/A" standard errors
        out[f"{name}/{metric}" + ("" if flt == "none" else f"[{flt}]")] = float(value)
    return out


def sample_row(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """One logged lm-eval sample: its per-sample metric values and the model's responses
    (loglikelihoods for loglikelihood / multiple-choice requests, texts for generation)."""
    out: dict[str, Any] = {"task": name, "doc_id": row.get("doc_id"), "target": row.get("target")}
    for metric in row.get("metrics") or []:
        value = row.get(metric)
        out[metric] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    resps = [r[0] for r in row.get("resps", []) if r]
    if resps and all(isinstance(r, tuple | list) for r in resps):
        out["loglikelihoods"] = [float(r[0]) for r in resps]
    elif resps:
        out["responses"] = [str(r) for r in resps]
    return out


class LMEval(Task):
    name = "lmeval"
    description = "lm-evaluation-harness tasks through the method's cache (lm-eval's own definitions and metrics)"
    report_sections = ("tasks.lmeval_report:LMEVAL",)
    config_class = LMEvalConfig

    def task_manager(self, data_dir: Path | None):
        """A context giving (TaskManager or None, {task: YAML written}): lm-eval's own tasks and hub
        data without a data folder, the local versions of the tasks with one."""
        if data_dir is None:
            return nullcontext((None, {}))
        from tasks.lmeval_local import local_task_manager

        return local_task_manager(self.config.names, data_dir)

    def check_data(self, data_dir: Path | None) -> None:
        """With a data folder, every task's local files by their content, and lm-eval's own task names
        (``tasks.lmeval_local.check_local_tasks``: each task is built, its first document rendered)."""
        if data_dir is not None:
            from tasks.lmeval_local import check_local_tasks

            quiet_lm_eval()
            with self.task_manager(data_dir) as (manager, written):
                check_local_tasks(manager, written)

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        quiet_lm_eval()
        lm = make_harness_lm(ctx.model, ctx.tokenizer, ctx.attached)
        with self.task_manager(ctx.data_dir) as (manager, written):
            out = simple_evaluate(
                model=lm,
                tasks=self.config.names,
                task_manager=manager,
                num_fewshot=self.config.num_fewshot,
                limit=self.config.limit,
                log_samples=True,
            )
        metrics: dict[str, float] = {}
        for name in self.config.names:
            metrics.update(result_metrics(name, out["results"].get(name, {})))
        samples = [sample_row(name, row) for name, rows in out.get("samples", {}).items() for row in rows]
        return {
            "metrics": metrics,
            "kv": None
            if lm.last_cache is None
            else {**lm.last_cache.memory().as_dict(), "nonfinite_kv": lm.nonfinite_kv + lm.last_cache.nonfinite_kv},
            "samples": samples,
            "documents": {n: len(out.get("samples", {}).get(n, [])) for n in self.config.names},
            "data_sources": {n: cfg.get("dataset_kwargs", {}).get("data_files") for n, cfg in written.items()},
            "forwards": lm.forwards,
            "eval_seconds": time.perf_counter() - start,
        }


def _pop_option(argv: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``argv``; its value, or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _task_names(argv: list[str]) -> list[str]:
    value = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--tasks"), None)
    value = value or next((a.split("=", 1)[1] for a in argv if a.startswith("--tasks=")), "")
    return [t.strip() for t in value.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
    """``moqae-lm-eval``: lm-eval's command line with the ``moqae-harness`` model registered.

    Two additions: ``--device`` defaults to the device this machine has (lm-eval's default is
    ``cuda:0``), and ``--data_dir D`` runs the named ``--tasks`` on local files (their YAMLs are
    written to a temporary folder passed as ``--include_path``; see ``tasks.lmeval_local``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        from harness.models import default_device

        argv += ["--device", str(default_device())]
    data_dir = _pop_option(argv, "--data_dir")
    register_with_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    with tempfile.TemporaryDirectory(prefix="moqae-lmeval-") as tmp:
        if data_dir is not None:
            from tasks.lmeval_local import write_local_tasks

            write_local_tasks(_task_names(argv), Path(data_dir), Path(tmp))
            argv += ["--include_path", tmp]
        sys.argv = [sys.argv[0], *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
