"""Files the harness writes: atomic writes and the on-disk cache of calibration artefacts.

* ``write_text_atomic`` / ``write_json_atomic`` / ``torch_save_atomic`` all go through one core
  (``replace_atomic``): the bytes go to a temporary file in the destination's folder, are flushed
  and fsync'ed, and the file is renamed over the destination with ``os.replace``. A crash or an
  interrupt leaves either the old file or the new one, never half a file, and no temporary behind.
* ``calibration_cache_path`` names a calibration artefact (KVQuant's quantizers, KVmix's layer
  scores) under ``<cache root>/calibration`` (``$MOQAE_HARNESS_CACHE``, default
  ``~/.cache/moqae-harness``), keyed by the model (its fingerprint, from
  ``harness.integration.model_fingerprint``), the method's options and the calibration token ids;
  ``save_calibration`` / ``load_calibration`` write it atomically and read it back with
  ``torch.load(weights_only=True)`` (tensors, lists, dicts and numbers only; nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from harness.models import cache_root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: mode of the files written: what ``open()`` would give (``mkstemp`` alone gives 0600)
_FILE_MODE = 0o666 & ~_umask()


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def replace_atomic(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` atomically with what ``write(f)`` writes to a binary file ``f``.

    The temporary file (``.<name>.<random>.tmp`` in the same folder, so the rename stays on one
    file system) is fsync'ed before ``os.replace``; on any error it is removed and the error raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: a crash never leaves half a file."""
    data = text.encode("utf-8")
    replace_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (values JSON cannot hold are written as ``str``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def torch_save_atomic(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints, calibration artefacts)."""
    replace_atomic(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------
# Calibration artefacts
# --------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    """The last path component of a model name, with characters unsafe in file names replaced."""
    last = name.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in last) or "model"


def calibration_cache_path(
    kind: str,
    model_name: str,
    fingerprint: str,
    options: dict[str, Any],
    token_ids: Iterable[torch.Tensor] = (),
) -> Path:
    """``<cache root>/calibration/<kind>-<model slug>-<key>.pt`` for one calibration artefact.

    ``key`` is the first 16 hex digits of a SHA-1 over the model ``fingerprint``, the JSON of
    ``{"method": kind, **options}`` (sorted keys; put a format version in ``options``) and, for each
    tensor of ``token_ids`` (windows or prompts, any shape), its shape and its ids as int64 bytes.
    ``model_name`` (a hub id or path) only makes the file recognizable; it does not enter the key.
    """
    h = hashlib.sha1()
    h.update(fingerprint.encode())
    h.update(json.dumps({"method": kind, **options}, sort_keys=True).encode())
    for ids in token_ids:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.detach().to(torch.int64).cpu().numpy().tobytes())
    return cache_root() / "calibration" / f"{kind}-{_slug(model_name)}-{h.hexdigest()[:16]}.pt"


def save_calibration(path: Path, obj: Any) -> None:
    """Store a calibration artefact (tensors in lists / dicts) atomically."""
    torch_save_atomic(path, obj)


def load_calibration(path: Path) -> Any | None:
    """A stored calibration artefact on the CPU, or None if the file is missing or unreadable
    (the caller then recalibrates; it also checks that the content has the expected structure)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
