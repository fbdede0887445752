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
REPRODUCE_METHODS = "fp16,int8,int4,int2,kivi-4,kivi-2,kvquant-4b,qoq,mikv,moqae"
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
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def reproduce(session: nox.Session) -> None:
    """WikiText-2 perplexity of the methods on the embedded SmolLM2-135M (quick profile).

    Data come from ``$MOQAE_DATA_DIR`` when set, else from the Hugging Face hub. Records land in
    ``results/reproduce`` and re-running resumes where it stopped.
    """
    install(session)
    out = os.environ.get("MOQAE_RESULTS", "results/reproduce")
    session.run(
        "python", "-m", "harness", "run",
        "--methods", os.environ.get("MOQAE_METHODS", REPRODUCE_METHODS),
        "--tasks", "wikitext2",
        "--model", "smollm2-135m",
        "--max-windows", os.environ.get("MOQAE_MAX_WINDOWS", "8"),
        "--out", out,
        *session.posargs,
    )  # fmt: skip
