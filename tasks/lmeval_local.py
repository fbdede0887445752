"""lm-eval tasks on local files, through lm-eval's own task definitions.

lm-eval (0.4) loads a task from its YAML; a YAML may ``include:`` another and override keys, and
``dataset_path: json`` (or ``parquet``) with ``dataset_kwargs: {data_files: {split: path}}`` reads
local files through ``datasets``. So a task runs offline, unchanged, as

    include: <lm-eval's own YAML of the task>     # prompt, choices, metrics, filters, process_docs
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {validation: /data/lm-eval/piqa/validation.jsonl}}

written into a folder that ``TaskManager(include_path=...)`` (or lm-eval's ``--include_path``) reads.
For task ``T`` and a data folder ``D`` (``--data-dir``), the data come from, first match wins:

1. ``D/lm-eval/T/<split>.jsonl`` (or ``.json``, ``.parquet``): the hub dataset's own rows, one file
   per split that lm-eval's YAML of ``T`` names (``test_split``, ``validation_split``,
   ``training_split``, ``fewshot_split``; splits without a file are dropped). Any YAML-defined
   lm-eval task runs this way with no code: e.g. ``D/lm-eval/lambada_openai/test.jsonl`` with
   ``{"text": ...}`` rows, as in ``EleutherAI/lambada_openai``.
2. ``tasks/lmeval_yaml/T.yaml`` shipped here: overrides for files in another layout, the mirror's
   ``D/lm-eval/<file>.jsonl`` (llm-foundry's ``{"query", "choices", "gold"}`` rows). They name the
   file (relative to ``D/lm-eval``) and map its fields onto lm-eval's prompt in lm-eval's own Jinja.

``write_local_tasks`` writes the YAMLs; ``local_task_manager`` is a TaskManager over them alone;
``check_local_tasks`` refuses files lm-eval cannot evaluate (by their content) before any model loads.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from harness.data import DataFileError, MissingDataError, jsonl_rows, require_fields
from harness.interface import MethodSpecError

SHIPPED_DIR = Path(__file__).parent / "lmeval_yaml"
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
EVAL_SPLIT_KEYS = ("test_split", "validation_split")  # lm-eval evaluates the first one set
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix -> datasets builder


@functools.cache
def default_task_manager() -> Any:
    """lm-eval's TaskManager over its own task folder (indexing it takes a few seconds: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def stock_yaml(name: str) -> Path:
    """The YAML file in which lm-eval defines task ``name``; one-line errors for groups and the unknown."""
    from lm_eval.tasks._index import Kind

    entry = default_task_manager().task_index.get(name)
    if entry is None:
        raise MethodSpecError(f"lmeval: {name!r} is not an lm-eval task (lm-eval ls tasks lists them)")
    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        kinds = {Kind.GROUP: "a group", Kind.TAG: "a tag", Kind.PY_TASK: "a Python-class task"}
        kind = kinds.get(entry.kind, "not a task")
        raise MethodSpecError(
            f"lmeval: {name!r} is {kind} in lm-eval; local data work for YAML tasks: name its tasks one by one"
        )
    return Path(entry.yaml_path)


def stock_config(name: str) -> dict[str, Any]:
    """lm-eval's own config of ``name`` with its includes merged (``!function`` tags left unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(stock_yaml(name), resolve_func=False)


def _data_source(stock: dict[str, Any], files: dict[str, Path], task: str) -> dict[str, Any]:
    """The keys that point ``stock`` at local ``files`` ({split: path}); splits without a file go."""
    builders = {BUILDERS[p.suffix] for p in files.values()}
    if len(builders) > 1:
        raise MissingDataError(f"lmeval {task}: mixes JSON and Parquet files ({', '.join(map(str, files.values()))})")
    out: dict[str, Any] = {
        "dataset_path": builders.pop(),
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(p) for split, p in files.items()}},
    }
    for key in SPLIT_KEYS:
        if stock.get(key) and stock[key] not in files:
            out[key] = None
    if not any(stock.get(k) in files for k in EVAL_SPLIT_KEYS):
        wanted = " or ".join(str(stock[k]) for k in EVAL_SPLIT_KEYS if stock.get(k))
        raise MissingDataError(f"lmeval {task}: no file for the split lm-eval evaluates ({wanted})")
    return out


def hub_layout_override(name: str, stock: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Overrides for ``folder/<split>.jsonl|json|parquet`` holding the hub dataset's own rows."""
    files: dict[str, Path] = {}
    for key in SPLIT_KEYS:
        split = stock.get(key)
        if split and split not in files:
            found = [folder / f"{split}{ext}" for ext in BUILDERS if (folder / f"{split}{ext}").is_file()]
            if found:
                files[split] = found[0]
    if not files:
        splits = sorted({str(stock[k]) for k in SPLIT_KEYS if stock.get(k)})
        raise MissingDataError(
            f"lmeval {name}: {folder} holds none of {', '.join(s + '.jsonl' for s in splits)} "
            f"(rows in the schema of the hub dataset {stock.get('dataset_path')})"
        )
    return _data_source(stock, files, name)


def shipped_override(name: str, stock: dict[str, Any], lmeval_dir: Path) -> dict[str, Any] | None:
    """The shipped override ``tasks/lmeval_yaml/<name>.yaml`` with its files under ``lmeval_dir``."""
    path = SHIPPED_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    override = yaml.safe_load(path.read_text())
    files = {split: lmeval_dir / rel for split, rel in override["dataset_kwargs"]["data_files"].items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise MissingDataError(
            f"lmeval {name}: {', '.join(missing)} not found (the mirror's file), nor {lmeval_dir / name}/ "
            "with the hub dataset's own split files"
        )
    return {**override, **_data_source(stock, files, name)}


def local_override(name: str, data_dir: Path) -> dict[str, Any]:
    """The YAML keys that run lm-eval's task ``name`` on the files under ``data_dir/lm-eval``."""
    lmeval_dir = data_dir / "lm-eval"
    stock = stock_config(name)
    if (lmeval_dir / name).is_dir():
        return hub_layout_override(name, stock, lmeval_dir / name)
    override = shipped_override(name, stock, lmeval_dir)
    if override is None:
        splits = sorted({str(stock[k]) for k in SPLIT_KEYS if stock.get(k)})
        raise MissingDataError(
            f"lmeval {name}: no local data; put the hub dataset's rows ({stock.get('dataset_path')}) in "
            f"{lmeval_dir / name}/{{{','.join(splits)}}}.jsonl, or run without --data-dir to use the hub"
        )
    return override


def write_local_tasks(names: list[str], data_dir: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write ``out_dir/<name>.yaml`` (lm-eval's YAML of the task, included, plus the local data source)
    for every task; returns {name: the YAML written}. Raises before writing anything if one is missing."""
    tasks = {name: {"include": str(stock_yaml(name)), **local_override(name, data_dir), "task": name} for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cfg in tasks.items():
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tasks


def read_fields(config: dict[str, Any]) -> list[str] | None:
    """The document fields lm-eval's task ``config`` (functions resolved) reads: the variables of its
    Jinja templates, a template that is a bare name being that field (lm-eval's rule); None where Python
    code reads the documents (``process_docs``, ``process_results``, a ``!function`` template)."""
    from jinja2 import meta
    from lm_eval.utils import env

    keys = ["doc_to_text", "doc_to_target", "doc_to_choice"]
    keys += ["doc_to_decontamination_query"] if config.get("should_decontaminate") else []
    if config.get("process_docs") or config.get("process_results") or any(callable(config.get(k)) for k in keys):
        return None
    fields: list[str] = []
    for value in (config.get(k) for k in keys):
        if isinstance(value, str):  # an int, a list or a dict of choices reads no field
            fields += [value] if value.isidentifier() else sorted(meta.find_undeclared_variables(env.parse(value)))
    return list(dict.fromkeys(fields))


def check_local_tasks(manager: Any, written: dict[str, dict[str, Any]]) -> None:
    """``DataFileError`` (one line) for a task whose local files lm-eval cannot evaluate. Each ``.jsonl``
    file: JSON objects, one a line, at least one, every row with the fields the task reads
    (:func:`read_fields`; where Python code reads them, the fields of the first row). Then the task is
    built as lm-eval builds it, which loads every file and renders the first document."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, cfg in written.items():
        what = f"lmeval {name}"
        fields = read_fields(load_yaml(manager.task_index[name].yaml_path))
        files = [Path(p) for p in cfg["dataset_kwargs"]["data_files"].values()]
        for path in files:
            if path.suffix == ".jsonl":
                rows = jsonl_rows(path, what)
                require_fields(path, rows, next(iter(rows.values())) if fields is None else fields, what)
        try:
            manager.load([name])
        except Exception as e:  # datasets' and lm-eval's errors: the innermost cause says what is wrong
            cause: BaseException = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise DataFileError(
                f"{what}: lm-eval cannot evaluate {', '.join(map(str, files))}: {type(cause).__name__}: {cause}"
            ) from e


@contextmanager
def local_task_manager(names: list[str], data_dir: Path) -> Iterator[tuple[Any, dict[str, dict[str, Any]]]]:
    """An lm-eval TaskManager that knows only the local versions of ``names`` (a temporary folder)."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="moqae-lmeval-") as tmp:
        written = write_local_tasks(names, data_dir, Path(tmp))
        yield TaskManager(include_path=tmp, include_defaults=False), written
