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
PYTHON = "3.11"


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The unit and end-to-end test suite (GPU-only tests skip without a GPU; the Ray executor's tests
    start a real local Ray cluster on 127.0.0.1; the peer rows hf-quanto / hf-hqq need the [peers] extra;
    KVTuner's search needs the [search] extra)."""
    install(session, "dev,ray,peers,search")
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
    """The benchmark of a profile, resumable, then the report: ``python -m harness reproduce``.

    ``$MOQAE_PROFILE``: ``quick`` (default; the embedded SmolLM2-135M on a 2-core CPU, under 30 min),
    ``full`` (Llama-2-7B/13B on a GPU, with internet), ``smoke`` (~5 min), or a TOML file of your own
    (``harness/profiles/*.toml`` show the format). Data come from ``$MOQAE_DATA_DIR`` when set, else
    from the Hugging Face hub. Records land in ``$MOQAE_RESULTS`` (``results/reproduce/<profile>``),
    the report in ``$MOQAE_REPORT`` (``reports/reproduce/<profile>/README.md``); re-running resumes
    where it stopped. Extra arguments go to the command, e.g. ``nox -s reproduce -- --models X``.
    """
    install(session, "dev,peers")  # the peer rows (hf-quanto) of the quick and full profiles
    profile = os.environ.get("MOQAE_PROFILE", "quick")
    name = os.path.splitext(os.path.basename(profile))[0]
    args = ["--profile", profile,
            "--out", os.environ.get("MOQAE_RESULTS", f"results/reproduce/{name}"),
            "--report", os.environ.get("MOQAE_REPORT", f"reports/reproduce/{name}")]  # fmt: skip
    if os.environ.get("MOQAE_DATA_DIR"):
        args += ["--data-dir", os.environ["MOQAE_DATA_DIR"]]
    session.run("python", "-m", "harness", "reproduce", *args, *session.posargs)
