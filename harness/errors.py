"""The input errors the command line prints as one ``error:`` line (exit 2), importable without torch
(``harness.cli`` catches them before anything heavy is imported); ``harness.data`` and
``harness.models`` raise them, ``MethodSpecError`` lives with the registry."""

from __future__ import annotations


class MissingDataError(RuntimeError):
    """A dataset is neither in the local mirror nor reachable on the hub (one-line message)."""


class ModelLoadError(RuntimeError):
    """The model spec could not be loaded (a one-line message naming the accepted forms)."""
