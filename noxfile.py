"""Sessions: ``tests`` (the CI suite), ``lint``, ``reproduce`` (the main job on the embedded default).

Every session installs ``torch==2.13.0`` first (a CPU build on the reference machines, where it lies
on disk), then the project; ``pyproject.toml`` itself declares a torch range so GPU users keep theirs.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

TORCH = "torch==2.13.0"
REPRODUCE_METHODS = (
    "fp16,int8,int4,int2,kivi-4,kivi-2,kvquant-4b,kvquant-4b-1%,kvquant-2b-1%,qoq,mikv,"
    "moqae:lam=0.1,moqae:lam=0.3,moqae:lam=0.5,moqae:lam=0.7,moqae:lam=0.9"
)
PYTHON = "3.11"


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The unit and end-to-end test suite (GPU-only tests skip without a GPU)."""
    install(session)
    session.run("pytest", "-q", "-ra", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Micro-benchmarks of the quantized-cache primitives (tests/bench, pytest-benchmark): quantize+pack,
    unpack+dequantize, decode attention (dequantize-then-attend, from codes, Triton on CUDA); prints
    achieved GB/s and the ratio to the torch reference. Extra arguments go to pytest (e.g.
    ``-- --benchmark-json bench.json``)."""
    install(session)
    session.run("pytest", "tests/bench", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                "--benchmark-columns=min,median,iqr,rounds", "--benchmark-sort=name", *session.posargs)  # fmt: skip


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def reproduce(session: nox.Session) -> None:
    """The comparison on the embedded SmolLM2-135M: WikiText-2 perplexity of every method, then the
    report (table, MoQAE expert shares, PPL-vs-bits plot).

    Data come from ``$MOQAE_DATA_DIR`` when set, else from the Hugging Face hub. Records land in
    ``$MOQAE_RESULTS`` (``results/reproduce``), the report in ``$MOQAE_REPORT`` (``reports/reproduce``);
    re-running resumes where it stopped. ``MOQAE_METHODS``, ``MOQAE_TASKS`` (e.g.
    ``wikitext2,lmeval:piqa,arc_easy,hellaswag,limit=200``) and ``MOQAE_MAX_WINDOWS`` narrow or widen it.
    """
    install(session)
    out = os.environ.get("MOQAE_RESULTS", "results/reproduce")
    session.run(
        "python", "-m", "harness", "run",
        "--methods", os.environ.get("MOQAE_METHODS", REPRODUCE_METHODS),
        "--tasks", os.environ.get("MOQAE_TASKS", "wikitext2"),
        "--model", "smollm2-135m",
        "--max-windows", os.environ.get("MOQAE_MAX_WINDOWS", "8"),
        "--out", out,
        *session.posargs,
    )  # fmt: skip
    report = os.environ.get("MOQAE_REPORT", "reports/reproduce")
    session.run("python", "-m", "harness", "report", "--results", out, "--out", report,
                "--title", "SmolLM2-135M, WikiText-2 (nox -s reproduce)")  # fmt: skip
