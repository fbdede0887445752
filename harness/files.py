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
* ``load_torch_safe`` reads a user-handed torch file (training states, old router checkpoints):
  at most ``max_bytes`` are read, only the zip format of ``torch.save`` with uncompressed entries
  totalling at most ``max_bytes`` is accepted (no legacy pickle files, no zip bombs), and it goes
  through ``torch.load(weights_only=True)``, which builds tensors, numbers, strings, lists, tuples
  and dicts and runs nothing from the file. ``save_safetensors_atomic`` / ``load_safetensors_safe``
  write and read a flat ``{name: tensor}`` file with string metadata (size-checked the same way).
  Every refusal is a ``ValueError`` with a one-line reason naming the file.
* ``check_writable_dir`` refuses, in one line and before any work, an output folder (``--out``,
  ``--report``) that is a file or where no file can be created (a read-only mount, ``/sys``): it
  creates and removes a probe file there, or in the nearest existing ancestor, and leaves nothing.
* ``claim`` / ``release``: a ``<record>.claim`` file created exclusively, so that two processes on
  one results folder never compute the same cell (a dead process's claim is taken over).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import tempfile
import time
import zipfile
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
# Output folders: checked before any work
# --------------------------------------------------------------------------------------------


def check_writable_dir(folder: Path | str, label: str, hint: str = "give a writable folder") -> None:
    """Refuse (ValueError, one line ``{label}: <reason>; {hint}``) an output folder that cannot be made
    or written: a file, a path under a file, or a place where no file can be created (a read-only
    mount, ``/sys``, ``/proc``, no permission).

    The probe creates and removes an empty file in ``folder``, or, where it does not exist yet, in its
    nearest existing ancestor; no folder is made and nothing is left behind (the folder itself is made
    when the first file is written)."""
    folder = Path(folder).expanduser()
    base = folder
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{label}: is a file; {hint}")
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise ValueError(f"{label}: {base} is a file; {hint}")
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-probe-", suffix=".tmp")
    except OSError as e:  # an ancestor that cannot be searched, a file system that refuses new files
        raise ValueError(f"{label}: cannot create a file in {base} ({e.strerror or _first_line(e)}); {hint}") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Size-checked loads of user-handed files (never unpickled)
# --------------------------------------------------------------------------------------------


def _first_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    text = (str(e).strip().splitlines() or [""])[0].strip()
    text = "".join(c for c in text if c.isprintable())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_bytes_bounded(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``; ValueError if it is missing, not a file, empty or
    larger than ``max_bytes`` (checked before reading, and at most ``max_bytes + 1`` bytes are read)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} has {size} bytes, more than the {max_bytes} expected at most")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({_first_line(e)})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path} grew past the {max_bytes} bytes expected at most while being read")
    if not data:
        raise ValueError(f"{path} is empty")
    return data


def load_torch_safe(path: Path | str, max_bytes: int) -> Any:
    """``torch.load(weights_only=True)`` on the CPU of a zip-format torch file of at most ``max_bytes``
    (uncompressed entries, also at most ``max_bytes`` in all); ValueError with a one-line reason
    for anything else (legacy or pickle files, random bytes, what the restricted unpickler refuses)."""
    data = read_bytes_bounded(path, max_bytes)
    buf = io.BytesIO(data)
    if not zipfile.is_zipfile(buf):
        raise ValueError(f"{path} is not a torch.save zip file (random bytes, a pickle or a legacy format)")
    try:
        with zipfile.ZipFile(buf) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable torch.save zip file ({_first_line(e)})") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in entries):
        raise ValueError(f"{path} has compressed entries; torch.save writes none")
    if sum(i.file_size for i in entries) > max_bytes:
        raise ValueError(f"{path} unpacks to more than the {max_bytes} bytes expected at most")
    buf.seek(0)
    try:
        return torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file asks to run or build code
        raise ValueError(
            f"{path} holds objects other than tensors and plain data (a pickle payload?); it was not loaded"
        ) from None
    except Exception as e:  # every other failure of a corrupt or hostile file is one refusal
        raise ValueError(f"{path} cannot be loaded safely ({_first_line(e)})") from None


def save_safetensors_atomic(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``{name: tensor}`` (contiguous CPU copies) and string ``metadata`` as safetensors, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(flat, metadata=metadata)
    replace_atomic(path, lambda f: f.write(data))


def load_safetensors_safe(path: Path | str, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file of at most ``max_bytes``; ValueError with a
    one-line reason if it is missing, too large or not a valid safetensors file."""
    from safetensors.torch import load

    data = read_bytes_bounded(path, max_bytes)
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or header_len > len(data) - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("metadata is not a table of strings")
        tensors = load(data)
    except Exception as e:  # every failure of a corrupt file is one refusal
        raise ValueError(f"{path} is not a valid safetensors file ({_first_line(e)})") from None
    return tensors, metadata


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


#: while :func:`recording_calibration` is active: the artefacts saved or loaded, in order
_calibration_files: list[list[Path]] = []


def save_calibration(path: Path, obj: Any) -> None:
    """Store a calibration artefact (tensors in lists / dicts) atomically."""
    torch_save_atomic(path, obj)
    for files in _calibration_files:
        files.append(Path(path))


def load_calibration(path: Path) -> Any | None:
    """A stored calibration artefact on the CPU, or None if the file is missing or unreadable
    (the caller then recalibrates; it also checks that the content has the expected structure)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    for files in _calibration_files:
        files.append(Path(path))
    return obj


class recording_calibration:  # noqa: N801 - used as a context manager, like contextlib's
    """``with recording_calibration() as files:`` -> the calibration artefacts saved or loaded inside
    (``files``, a list of paths under ``<cache root>/calibration``), so that a calibration computed in
    one process can be handed to another (the Ray executor's calibration step)."""

    def __enter__(self) -> list[Path]:
        self.files: list[Path] = []
        _calibration_files.append(self.files)
        return self.files

    def __exit__(self, *exc: Any) -> None:
        _calibration_files.remove(self.files)


def install_calibration(files: dict[str, bytes]) -> None:
    """Write calibration artefacts (file name -> bytes, as :func:`recording_calibration` found them)
    into this machine's ``<cache root>/calibration`` where they are missing; ``load_calibration``
    still checks what it reads."""
    folder = cache_root() / "calibration"  # bare file names: nothing is written outside the folder
    install_artefacts({str(folder / Path(name).name): data for name, data in files.items()})


def install_artefacts(files: dict[str, bytes]) -> None:
    """Write a sweep's prepared artefacts (path as the driver names it -> bytes, e.g. a router that a
    ``prepare`` step trained on another machine) where they are missing, so that a worker without the
    driver's file system finds each at the path its method spec names; an existing file is kept."""
    for name, data in files.items():
        target = Path(name)
        if not target.exists():
            replace_atomic(target, lambda f, data=data: f.write(data))


# --------------------------------------------------------------------------------------------
# Claims: two processes on one results folder never compute the same cell
# --------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path) -> bool:
    """Claim the cell whose record is ``path``: ``<path>.claim`` created exclusively, holding this
    process's host and pid. False when another live process on this host holds it; a claim left by
    a process that died (or on another host, after a day) is taken over."""
    lock = path.with_name(path.name + ".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                same_host = held.get("host") == me["host"]
                live = _alive(int(held["pid"])) if same_host else time.time() - float(held["time"]) < 86400
            except (OSError, ValueError, KeyError, TypeError):
                live = False  # unreadable: a torn claim, take it over
            if live:
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(path: Path) -> None:
    """Drop this process's claim on ``path`` (see :func:`claim`)."""
    lock = path.with_name(path.name + ".claim")
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
