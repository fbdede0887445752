"""MoQAE: mixed-precision KV-cache quantization with a mixture of quantization-aware experts.

Algorithm (MoQAE, ACL 2025), per layer and per chunk of N tokens:

1. The router of the layer (``moqae.router.ChunkRouter``) reads the hidden states entering the block
   (after its input norm) and gives every token a distribution over the experts.
2. Each token votes for its argmax expert; the chunk's majority picks its expert (ties: higher bits).
3. Routing freezing (RF): the first chunk is always FP16 (it holds the attention sinks).
   Routing sharing (RS): layers in consecutive groups of ``share`` reuse the decision of the group's
   first layer; only that layer's router runs.
4. The chunk is stored by its expert: FP16, or INT-b with keys per channel over the chunk's tokens
   (the chunk is the key group) and values per token (group = head_dim, option ``value_group``),
   asymmetric min-max from ``harness.quant``. Each expert's chunks are kept as one contiguous part
   (``moqae.store.MoQAEStore``); decode steps attend from the parts' codes (``harness.from_codes``).
5. In decode, new tokens wait in an fp16 buffer until a chunk is complete; the buffer counts in the
   memory accounting. Token votes are computed as tokens arrive, so a chunk completed in decode gets
   the same decision as the same tokens would at prefill.

Choices where the paper is silent (documented options): experts default ``16/4/2``; router hidden
width = number of experts; with batch > 1 each sequence routes its own chunks.

Router checkpoints (``moqae:ckpt=PATH``; ``save_router_checkpoint`` / ``read_router_checkpoint``):
``.safetensors`` files hold the router weights as tensors (``routers.<i>.w1.weight`` ...) and, as
JSON in the string metadata key ``moqae``, everything else: ``format``, ``config`` (experts, share,
router_width, chunk, hidden_size, n_layers), ``lambda``, ``signature``, ``train_config``, ``steps``.
The shipped routers (``checkpoints/*.safetensors``, ``default_checkpoint``) are in this format. Any
other suffix, only ever a path given explicitly (``moqae:ckpt=PATH.pt``, or an older run's
``router.pt`` that ``MoQAE.prepare`` reuses), is read as an old ``torch.save`` file through
``torch.load(weights_only=True)`` (``harness.files.load_torch_safe``), with a one-line deprecation
note, once per process.
Both are refused unreadable (one-line ``MethodSpecError`` naming the file) if larger than
``router_checkpoint_bound`` (2 x the router bank's fp32 parameter bytes + 1 MiB), corrupt, of
another structure, or a pickle payload; nothing in the file is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch

from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    PrepareContext,
    Prepared,
    ReportStyle,
)
from harness.options import Fraction, FreeText, NonNegativeInt, Parsed, PositiveInt
from harness.quant import SUPPORTED_BITS
from moqae.router import RouterBank
from moqae.store import FP16_BITS, MoQAEStore

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ROUTER_FORMAT = "moqae-router/1"
_log = logging.getLogger("moqae")
_legacy_noted = False  # the deprecation note on a user's .pt router checkpoint: once per process


def parse_experts(text: str) -> tuple[int, ...]:
    """``"16/4/2"`` -> (16, 4, 2); 16 is the FP16 expert, others must be packable bit-widths."""
    try:
        bits = tuple(int(b) for b in str(text).replace("/", ",").split(",") if b.strip())
    except ValueError:
        raise MethodSpecError(f"moqae: experts={text!r} must be bit-widths like 16/4/2") from None
    allowed = (FP16_BITS, *SUPPORTED_BITS)
    bad = [b for b in bits if b not in allowed]
    if bad or len(bits) < 2 or len(set(bits)) != len(bits):
        raise MethodSpecError(f"moqae: experts={text!r}: need >= 2 distinct bit-widths from {allowed}")
    return bits


@dataclass
class MoQAEConfig(MethodConfig):
    # bit-widths separated by "/" (a comma separates spec options)
    experts: Parsed(parse_experts, "bit-widths like 16/4/2") = "16/4/2"
    chunk: PositiveInt = 32
    value_group: NonNegativeInt = 0  # channels per value range; 0 = head_dim
    freeze_first: bool = True  # routing freezing (RF)
    share: PositiveInt = 3  # routing sharing (RS): layers per group; 1 = off
    router_width: NonNegativeInt = 0  # 0 = number of experts
    lam: Fraction = 0.5  # the λ of the router's training loss (selects the shipped checkpoint)
    # router checkpoint; "" = the shipped one for this model and λ; "random" = untrained
    ckpt: Annotated[str, FreeText("a router file, random, or empty (the shipped router)")] = ""
    seed: NonNegativeInt = 0  # initialisation of an untrained router (ckpt=random)

    aliases: ClassVar[dict[str, str]] = {"lambda": "lam"}

    @property
    def expert_bits(self) -> tuple[int, ...]:
        return parse_experts(self.experts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def model_signature(info: ModelInfo) -> str:
    """A checkpoint key for a model geometry (routers depend on the hidden size and layer count)."""
    return f"{info.family}-L{info.n_layers}-D{info.hidden_size}"


def default_checkpoint(info: ModelInfo, lam: float, share: int = 3) -> Path:
    """Shipped router for this model shape and λ (routing-sharing group 3; other groups are named):
    ``checkpoints/<signature>-lambda<λ>[-share<n>].safetensors``, the only format shipped routers have."""
    suffix = "" if share == 3 else f"-share{share}"
    return CHECKPOINT_DIR / f"{model_signature(info)}-lambda{lam:g}{suffix}.safetensors"


def _model_arg(info: ModelInfo) -> str:
    """What ``--model`` said for this model (quoted for a shell), where ``harness.models.load_model``
    loaded it in this process; else the placeholder ``MODEL``."""
    import shlex

    from harness.models import loaded_spec

    spec = loaded_spec(info.family, info.n_layers, info.hidden_size)
    return shlex.quote(spec) if spec else "MODEL"


def router_checkpoint_bound(bank: RouterBank) -> int:
    """Largest router checkpoint read: 2 x the bank's fp32 parameter bytes + 1 MiB (headers, metadata)."""
    fp32 = sum(p.numel() * 4 for p in bank.parameters())
    return 2 * fp32 + (1 << 20)


def save_router_checkpoint(path: Path | str, routers: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write router weights as safetensors, ``info`` (config, lambda, ...; JSON-able) as metadata ``moqae``."""
    from harness.files import save_safetensors_atomic

    meta = json.dumps({"format": ROUTER_FORMAT, **info}, sort_keys=True)
    save_safetensors_atomic(path, routers, {"moqae": meta})


def read_router_checkpoint(path: Path | str, max_bytes: int) -> dict[str, Any]:
    """``{"routers": {name: tensor}, "config": {...}, ...}`` of a ``.safetensors`` router checkpoint or
    an old ``.pt`` one a user named (``torch.load(weights_only=True)``, with a deprecation note once per
    process); ValueError with a one-line reason otherwise."""
    global _legacy_noted
    from harness.files import load_safetensors_safe, load_torch_safe

    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = load_safetensors_safe(path, max_bytes)
        try:
            info = json.loads(metadata.get("moqae", ""))
        except ValueError:
            raise ValueError(f"{path} has no readable 'moqae' metadata (JSON of the router's config)") from None
        if not isinstance(info, dict):
            raise ValueError(f"{path}: its 'moqae' metadata is not a JSON object")
        state = {**info, "routers": tensors}
    else:
        state = load_torch_safe(path, max_bytes)
        if not _legacy_noted:
            _legacy_noted = True
            _log.warning(f"note: {path} is an old .pt router checkpoint; new trainings write .safetensors")
    if not isinstance(state, dict) or not isinstance(state.get("routers"), dict) or not state["routers"]:
        raise ValueError(f"{path} is not a router checkpoint (no 'routers' table of tensors)")
    bad = [k for k, v in state["routers"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not all(v.is_floating_point() for v in state["routers"].values()):
        raise ValueError(f"{path} is not a router checkpoint ('routers' holds entries that are not float tensors)")
    if not isinstance(state.get("config", {}), dict):
        raise ValueError(f"{path} is not a router checkpoint ('config' is not a table)")
    return state


class MoQAE(KVCacheMethod):
    """Mixture of quantization-aware experts: routers choose a bit-width per chunk and layer."""

    name = "moqae"
    description = "MoQAE: chunk router picks FP16/INT4/INT2 per chunk (RF, RS); options lambda, ckpt"
    report = ReportStyle("MoQAE", "o", "C3", rank=90)
    report_sections = ("moqae.report:PUBLISHED", "moqae.report:ANALYSIS")
    #: options that select a point of the λ sweep (or its router) rather than an ablation variant
    sweep_options: ClassVar[tuple[str, ...]] = ("lam", "ckpt", "seed")
    #: the profile's [prepare.moqae] table: router training where no checkpoint ships (moqae.train)
    prepare_keys: ClassVar[tuple[str, ...]] = ("steps", "seqlen", "windows", "lr", "estimator", "seed")

    config_class = MoQAEConfig
    signals = frozenset({"block_input"})
    decode_from_codes = True  # decode steps attend from the experts' parts (MoQAEStore.attend)

    def __init__(self, config: MoQAEConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.expert_bits = self.config.expert_bits
        self.top_expert = max(range(len(self.expert_bits)), key=lambda i: self.expert_bits[i])
        self.bank: RouterBank | None = None
        self.time_routes = False  # profiling turns it on: time (and on GPU synchronise) each router call
        self.route_seconds = 0.0  # wall time spent in the routers while time_routes is on

    # ---- in reports -------------------------------------------------------------------------
    @classmethod
    def report_label(cls, label: str, config: dict[str, Any]) -> str:
        """``moqae:lam=0.5,ckpt=runs/x/router.pt`` -> ``moqae:lam=0.5 (own router)``: a trained
        router's path is an implementation detail of the row, not its name."""
        name, sep, opts = label.partition(":")
        if not sep:
            return label
        items = opts.split(",")
        kept = [o for o in items if not (o.startswith("ckpt=") and o.endswith((".pt", ".safetensors")))]
        if len(kept) == len(items):
            return label
        return name + (":" + ",".join(kept) if kept else "") + " (own router)"

    @classmethod
    def report_sort_key(cls, config: dict[str, Any]) -> tuple:
        """By λ, the full method before its ablation variants."""
        return (float(config.get("lam", 0.5)), len(cls.ablation_options(config)))

    @classmethod
    def ablation_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        defaults = dataclasses.asdict(MoQAEConfig())
        return {k: v for k, v in config.items() if k not in cls.sweep_options and k in defaults and v != defaults[k]}

    # ---- before a run: router training where none ships -----------------------------------------
    @classmethod
    def check_prepare_options(cls, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.prepare_keys))
        if unknown:
            raise MethodSpecError(
                f"moqae: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(cls.prepare_keys)}"
            )
        from harness.options import check_options
        from moqae.train import TrainConfig

        check_options(TrainConfig, options, "moqae")  # each key's type and range, as `train` has them

    def needs_prepare(self) -> bool:
        return not self.config.ckpt

    def prepare(self, spec: str, ctx: PrepareContext) -> Prepared | None:
        """Train a router (``moqae.train``) into ``OUT/routers/<model>/<spec>-lambda<λ>/router.safetensors``
        unless one ships for this model; a finished router is reused (also an older run's ``router.pt``,
        so that its run records keep their keys), an unfinished training resumes."""
        from harness.integration import model_info
        from harness.models import model_id
        from harness.options import check_options
        from moqae.train import RouterTrainer, TrainConfig

        self.check_prepare_options(ctx.options)
        lm, tok = ctx.load()
        if self.checkpoint_path(model_info(lm)).exists():
            return None  # a shipped router
        name, _, opts = spec.partition(":")
        sweep = ("lam", "lambda", "ckpt", "seed")
        keep = [o for o in opts.split(",") if o.strip() and o.split("=")[0].strip() not in sweep]
        base, lam = name + (":" + ",".join(keep) if keep else ""), float(self.config.lam)
        where = ctx.out / "routers" / _slug(model_id(ctx.model)) / f"{_slug(base)}-lambda{lam:g}"
        ckpt = where / "router.safetensors"
        if not ckpt.exists() and (where / "router.pt").exists():
            ckpt = where / "router.pt"  # written before routers were safetensors
        cell = f"router {base} λ={lam:g}"
        new_spec = spec + ("," if ":" in spec else ":") + f"ckpt={ckpt}"
        if ckpt.exists():
            return Prepared(new_spec, cell, ckpt, reused=True)
        cfg = check_options(TrainConfig, {**ctx.options, "lam": lam, "method": base}, "[prepare.moqae]")
        ctx.log(f"== prepare: {cell} on {ctx.model} ({cfg.steps} steps x {cfg.seqlen} tokens) -> {ckpt}")
        trainer = RouterTrainer(lm, tok, cfg, data_dir=ctx.data_dir, out=where)
        dev = next(lm.parameters()).device
        trainer.windows = [w.to(dev) for w in trainer.windows]
        trainer.train(progress=ctx.progress)
        return Prepared(new_spec, cell, ckpt)

    # ---- life cycle ---------------------------------------------------------------------------
    def checkpoint_path(self, info: ModelInfo) -> Path | None:
        if self.config.ckpt == "random":
            return None
        if self.config.ckpt:
            return Path(self.config.ckpt)
        return default_checkpoint(info, self.config.lam, self.config.share)

    def check_model(self, info: ModelInfo) -> None:
        path = self.checkpoint_path(info)
        if path is not None and not path.exists():
            raise MethodSpecError(
                f"{self.label}: no router checkpoint {path.name} for this model ({model_signature(info)}, "
                f"lambda={self.config.lam:g}); train one with: python -m moqae train --model {_model_arg(info)} "
                f"--lambda {self.config.lam:g} --out DIR, then use moqae:ckpt=DIR/router.safetensors "
                "(or moqae:ckpt=random for an untrained router)"
            )
        vg = self.config.value_group or info.head_dim
        if info.head_dim % vg:
            raise MethodSpecError(f"{self.label}: value_group={vg} does not divide head_dim={info.head_dim}")
        for b in self.expert_bits:
            if b != FP16_BITS and info.head_dim * b % 8:
                raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be packed at {b} bits")

    def new_bank(self, info: ModelInfo) -> RouterBank:
        torch.manual_seed(self.config.seed)
        return RouterBank(
            info.n_layers, info.hidden_size, len(self.expert_bits), self.config.router_width or None, self.config.share
        )

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        if self.bank is None:
            self.bank = self.new_bank(info)
            path = self.checkpoint_path(info)
            if path is not None:
                self.load_checkpoint(path, info)
        self.bank.to(info.device).eval().requires_grad_(False)

    def load_checkpoint(self, path: Path, info: ModelInfo | None = None) -> None:
        """Load router weights (``read_router_checkpoint``: size-checked, nothing executed); any
        unreadable or unfitting file is one ``MethodSpecError`` line naming it."""
        path = Path(path)
        try:
            state = read_router_checkpoint(path, router_checkpoint_bound(self.bank))
        except ValueError as e:
            raise MethodSpecError(f"{self.label}: cannot use router checkpoint: {e}") from None
        saved = state.get("config", {})
        mine: dict[str, Any] = {
            "experts": self.expert_bits, "share": self.config.share, "router_width": self.config.router_width
        }  # fmt: skip
        if info is not None:
            mine.update(hidden_size=info.hidden_size, n_layers=info.n_layers)
        theirs = dict(saved)
        if "experts" in theirs:
            try:
                theirs["experts"] = parse_experts(theirs["experts"])
            except MethodSpecError:
                raise MethodSpecError(
                    f"{self.label}: router checkpoint {path} has unreadable experts={saved['experts']!r}"
                ) from None
        for key, value in mine.items():
            if key in theirs and theirs[key] != value:
                raise MethodSpecError(
                    f"{self.label}: checkpoint {path.name} was trained with {key}={saved[key]}, not {value}"
                )
        routers, want = state["routers"], self.bank.state_dict()
        missing, extra = sorted(set(want) - set(routers)), sorted(set(routers) - set(want))
        shapes = [k for k in want if k in routers and routers[k].shape != want[k].shape]
        if missing or extra or shapes:
            if missing or extra:
                what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            else:
                k = shapes[0]
                what = f"{k} is {tuple(routers[k].shape)}, not {tuple(want[k].shape)}"
            raise MethodSpecError(f"{self.label}: router checkpoint {path} does not fit this model's routers ({what})")
        self.bank.load_state_dict(routers)

    def route(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Expert probabilities [B, T, E] of the router serving ``layer_idx``."""
        if not self.time_routes:
            with torch.no_grad():
                return self.bank.router(layer_idx)(hidden)
        start = time.perf_counter()
        with torch.no_grad():
            probs = self.bank.router(layer_idx)(hidden)
        if probs.is_cuda:
            torch.cuda.synchronize(probs.device)
        self.route_seconds += time.perf_counter() - start
        return probs

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        if self.bank is None:
            raise RuntimeError("moqae: attach the method to a model before making caches")
        return MoQAEStore(layer_idx, info, self)
