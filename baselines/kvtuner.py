"""KVTuner: layer-wise mixed-precision (key bits, value bits) pairs searched offline (Li et al., ICML 2025,
arXiv 2502.04420; official code github.com/KexuanZhang/KVTuner, read at commit b26327bc796e, the same code
as cmd2001/KVTuner babe775378e3).

Online, each layer quantizes its keys and values at its own pair (K8V4, K4V2, KV2, ...) with the store of
the quantization scheme the search ran with; nothing else differs between layers:

* ``scheme=pertoken`` (the official search's default ``--quant_scheme per-token-asym``): keys and values
  per token over the whole head (``q_group_size=-1``, no residual) -> ``harness.storage.SeqPairStore``.
* ``scheme=kivi`` (``per-channel-asym``): KIVI's layout, keys per channel in groups of 32 tokens, values per
  token in groups of 32 channels, a 32-token fp16 residual (the search script's ``residual_length=32``,
  ``q_group_size=32``) -> ``baselines.kivi.KIVIStore`` (the KIVI code's window rules).
* ``zero_point=integer`` (default): the official ``flexible_quant/vanilla_quantizer.py`` grid,
  s = (max - min) / (2^b - 1) and an integer zero point round(min / s), so x̂ = (q + round(min/s))·s and 0
  is a level; ``zero_point=float`` is the harness's KIVI grid x̂ = q·s + min. Both keep fp16 scale and zero.

The per-layer pairs come from ``pairs=K8V4,K4V2,...`` (one per layer, or one for all; ``KV8`` = ``K8V8`` as
the official presets write it), else from the searched configuration shipped for the loaded model in
``baselines/kvtuner_configs/<family>-L<layers>-D<hidden>.json`` (or ``config=FILE``) at ``budget`` and
``scheme``; none there is a one-line error naming the search command. The pairs are Python ints held by the
method, not tensors of the cache, so ``memory()`` counts only the codes, scales/zeros and fp16 tokens.

The offline search (``python -m baselines.kvtuner search``), as the paper and the official
``search_optuna_adaptive.py`` describe it:

1. Sensitivity: per layer l and candidate pair p of {8,4,2}², the relative attention-output error
   e[l, p] = ||softmax(q K̂ᵀ/√D) V̂ − softmax(q Kᵀ/√D) V|| / ||softmax(q Kᵀ/√D) V|| over the calibration
   windows (only layer l quantized, K/V and queries captured from one full-precision forward).
2. Intra-layer pruning: a layer keeps the pairs on its Pareto front of (mean bits (k+v)/2, e[l, ·]);
   a pair that another pair matches or beats in both (and beats in one) is dropped.
3. Inter-layer clustering: layers are grouped so that a group shares one candidate list (the official
   code raises when a group's layers have different lists); within that rule, average-linkage
   agglomerative clustering of the layers' log-error vectors down to ``--groups`` groups.
4. Multi-objective search with optuna's NSGA-II (``NSGAIISampler(constraints_func=...)``, as the official
   script): one integer per group (an index into its candidate list), objectives (calibration NLL,
   mean bits) both minimised, constraint mean bits − budget ≤ 0; one study per budget. The shipped
   configuration is the feasible trial with the lowest NLL (ties: fewer bits, then earlier).

A configuration's record key holds ``searched``, a digest of the pairs the spec reads (``searched_digest``),
so a new search gives ``kvtuner-4`` / ``kvtuner-3`` new records instead of the runner reusing old ones.

Differences from the official code, each a choice here:

* Quality objective: the official search maximises GSM8K accuracy (first 20 problems, 4-shot, lm-eval)
  with a full-precision prefill (``force_quant=False``); here it is the mean next-token NLL of WikiText-2
  calibration windows (``harness.data.calibration_windows``, never the test split) with the prefill
  quantized (one forward per window would otherwise not see the cache at all).
* The official repository ships the groupings and per-group candidate lists as hard-coded tables for six
  models, not the code that made them; steps 1-3 follow the paper's description (its abstract and a
  secondary summary: Pareto pruning of pairs by bits and attention-output error, clustering of layers by
  their errors; the full text was not at hand), and the error's exact form and the clustering algorithm
  (average linkage on log errors) are ours. ``--groups`` (default 6: the official tables have 4-8 groups).
* Study start: the official script starts each study from NSGA-II's defaults (population 50, a random
  first generation, nothing enqueued); here each study first evaluates the configurations that put every
  layer at the same mean bits (``uniform_choices``: K4V4 everywhere, ...) within its budget
  (``study.enqueue_trial``; ``--no-enqueue-uniform`` gives the official start). Measured on SmolLM2-135M
  (8 x 512 calibration NLL): a 100-trial search without them never tried K4V4 in every layer (3.3288)
  nor layer 0 at K2V4 and the rest at K4V2 (3.5369), both better than its picks (3.3942 at budget 4,
  3.9430 at 3); WikiText-2 agreed at budget 4 (PPL 21.88 for K4V4 against 24.13).
* Prefill: the method's prefill attention reads the quantized cache by default, as every method here;
  ``quantize_prefill=false`` gives the official full-precision prefill (``force_quant=False``).
* The flexible cache of the official code re-quantizes the whole dequantized history each time its
  residual fills (and groups a prefill that is not a multiple of 32 tokens across channels); the KIVI
  store here quantizes each token group once, with KIVI's own window rules.
* Mean bits counts code bits only ((k+v)/2 per layer, as the official ``tot_scale``), not scales or the
  fp16 residual; the records' nominal / effective bits count those.

Search commands for SmolLM2 (their output ships as ``baselines/kvtuner_configs/llama-L30-D576.json``)::

    python -m baselines.kvtuner search --model smollm2-135m --budget 4,3 --scheme pertoken \\
        --trials 8 --windows 8 --seqlen 512 --groups 6 --seed 0 --data-dir ../shared/data
    python -m baselines.kvtuner search --model smollm2-135m --budget 4,3 --scheme kivi \\
        --trials 8 --windows 8 --seqlen 512 --groups 6 --seed 0 --data-dir ../shared/data

8 trials per budget, the enqueued uniform configurations among them (about 25 minutes each on two CPU
cores shared with other runs). Both schemes picked K4V4 in every layer at budget 4 and their 3-bit level
at budget 3 (K2V4 or K4V2 per layer, as its group's candidates hold: pertoken K2V4 in layer 0 only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from baselines.kivi import KIVIConfig, KIVIStore
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    Variant,
)
from harness.options import NonNegativeInt, OneOf, PositiveInt, Text
from harness.quant import META_DTYPE, QuantizedTensor, _grouped, pack_codes
from harness.storage import QuantizedSeq, SeqPairStore

CONFIG_DIR = Path(__file__).with_name("kvtuner_configs")
CONFIG_FORMAT = "kvtuner-config/1"
MAX_CONFIG_BYTES = 4 << 20
#: the candidate pairs (key bits, value bits): {8, 4, 2}², most bits first
CANDIDATES: tuple[tuple[int, int], ...] = ((8, 8), (8, 4), (4, 8), (8, 2), (2, 8), (4, 4), (4, 2), (2, 4), (2, 2))
KIVI_GROUP = 32  # the official search's q_group_size / residual_length for per-channel-asym


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


def pair_name(pair: tuple[int, int]) -> str:
    """(8, 4) -> "K8V4", (4, 4) -> "KV4" (the official presets' names)."""
    k, v = pair
    return f"KV{k}" if k == v else f"K{k}V{v}"


def parse_pair(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"K(\d)V(\d)|KV(\d)", text.strip().upper())
    if not m:
        raise ValueError(f"{text!r} is not a pair like K8V4 or KV4")
    k, v = (int(m[3]), int(m[3])) if m[3] else (int(m[1]), int(m[2]))
    if k not in (2, 4, 8) or v not in (2, 4, 8):
        raise ValueError(f"{text!r}: key and value bits must be 2, 4 or 8")
    return k, v


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [parse_pair(p) for p in re.split(r"[,/ ]+", text.strip()) if p]


def mean_bits(pairs: Sequence[tuple[int, int]]) -> float:
    """The official ``tot_scale``: Σ (k + v) / (2 · layers)."""
    return sum(k + v for k, v in pairs) / (2 * len(pairs))


def model_signature(info: ModelInfo) -> str:
    """The key of a shipped configuration (as MoQAE's routers): family, layers, hidden size."""
    return f"{info.family}-L{info.n_layers}-D{info.hidden_size}"


# --------------------------------------------------------------------------------------------
# The official grid: integer zero point
# --------------------------------------------------------------------------------------------


def quantize_integer_zero(x: torch.Tensor, bits: int, group: int, axis: int) -> QuantizedTensor:
    """KVTuner's ``VanillaQuantizer`` (asym): s = max(max − min, 1e-5) / (2^b − 1), z = s·round(min / s),
    q = clamp(round((x − z) / s), 0, 2^b − 1), x̂ = q·s + z; s and z stored as fp16 (codes against them)."""
    axis = axis - x.dim() if axis >= 0 else axis
    xg, ax = _grouped(x.float(), axis, group)
    lo, hi = torch.aminmax(xg, dim=ax + 1)
    qmax = 2**bits - 1
    scale = ((hi - lo).clamp(min=1e-5) / qmax).to(META_DTYPE)
    s = scale.float()
    zero = (s * torch.round(lo / s)).to(META_DTYPE)
    q = torch.clamp(torch.round((xg - zero.float().unsqueeze(ax + 1)) / s.unsqueeze(ax + 1)), 0, qmax)
    codes = pack_codes(q.reshape(x.shape).to(torch.uint8), bits)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=bits, axis=axis, group=group)


class IntegerZeroSeq(QuantizedSeq):
    """A ``QuantizedSeq`` on the official grid (integer zero point)."""

    def quantize_part(self, x: torch.Tensor) -> QuantizedTensor:
        return quantize_integer_zero(x, self.bits, self.group, self.axis)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class KVTunerConfig(MethodConfig):
    # one pair per layer or one for all (K8V4,K4V2,...); "" = the searched configuration at ``budget``
    pairs: Text = ""
    budget: Annotated[float, Field(ge=2.0, le=8.0)] = 4.0  # mean (k + v) / 2 over layers of the configuration
    scheme: OneOf("pertoken", "kivi") = "pertoken"
    zero_point: OneOf("integer", "float") = "integer"  # integer: the official grid; float: x̂ = q·s + min
    group: NonNegativeInt = 0  # channels (values, pertoken keys) / tokens (kivi keys) per range; 0 = default
    residual: PositiveInt = KIVI_GROUP  # kivi scheme: fp16 residual tokens (a multiple of group)
    quantize_prefill: bool = True  # False = the official full-precision prefill attention (force_quant=False)
    config: Text = ""  # a searched configuration file; "" = the one shipped for the model
    # computed, never read from a spec: a digest of the searched pairs this spec reads (pairs=""), so a
    # new search gives its records a new key instead of the runner reusing old ones; "" with ``pairs``
    searched: str = field(init=False, default="")

    positional: ClassVar[str | None] = "pairs"
    keyed_if_set: ClassVar[tuple[str, ...]] = ("searched",)

    def __post_init__(self) -> None:
        self.searched = "" if self.pairs else searched_digest(self.config, self.scheme, self.budget)

    def group_for(self, head_dim: int) -> int:
        return self.group or (KIVI_GROUP if self.scheme == "kivi" else head_dim)

    def validate(self) -> None:
        if self.pairs:
            try:
                parse_pairs(self.pairs)
            except ValueError as e:
                raise MethodSpecError(f"kvtuner: pairs: {e}") from None
        if self.scheme == "kivi":
            g = self.group_for(0)
            if self.residual < g or self.residual % g:
                raise MethodSpecError(f"kvtuner: residual={self.residual} must be a positive multiple of group={g}")


class KIVIPairStore(KIVIStore):
    """``KIVIStore`` with the layer's own pair, on the official grid where ``zero_point=integer``."""

    def __init__(self, layer_idx: int, info: ModelInfo, config: KIVIConfig, integer_zero: bool):
        super().__init__(layer_idx, info, config)
        if integer_zero:
            k, v = config.widths()
            self.k_q = IntegerZeroSeq(k, config.group, axis=-2)
            self.v_q = IntegerZeroSeq(v, config.group, axis=-1)


def read_config_file(path: Path) -> dict[str, Any]:
    """A searched configuration (JSON), size-bounded; ValueError with a one-line reason otherwise."""
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT or not isinstance(data.get("schemes"), dict):
        raise ValueError(f"{path} is not a KVTuner configuration (format {CONFIG_FORMAT})")
    return data


def searched_digest(config_file: str, scheme: str, budget: float) -> str:
    """10 hex digits of the pairs at (``scheme``, ``budget``) in ``config_file``, or in every shipped file
    when it is "" (the model is not known before it loads, so another model's new search re-keys these
    records too: a needless rerun, never a stale record). A file that does not read counts as its error."""
    paths = [Path(config_file)] if config_file else sorted(CONFIG_DIR.glob("*.json"))
    entries: dict[str, Any] = {}
    for path in paths:
        try:
            entry = read_config_file(path)["schemes"].get(scheme, {}).get("budgets", {}).get(f"{budget:g}")
            entries[path.name] = entry.get("pairs") if isinstance(entry, dict) else None
        except (ValueError, OSError, AttributeError) as e:
            entries[path.name] = f"unreadable: {type(e).__name__}"
    return hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:10]


def search_command(model: str, budget: float, scheme: str, out: Path | None = None) -> str:
    cmd = f"python -m baselines.kvtuner search --model {model} --budget {budget:g} --scheme {scheme}"
    return cmd + (f" --out {shlex.quote(str(out))}" if out is not None else "")


class KVTuner(KVCacheMethod):
    """KVTuner (arXiv 2502.04420): each layer's keys / values at its own searched (key bits, value bits)."""

    name = "kvtuner"
    description = "KVTuner: per-layer (key bits, value bits) pairs searched offline (pairs, budget, scheme)"
    variants = {
        f"kvtuner-{b}": Variant(f"KVTuner: the searched per-layer pairs at a mean of {b} bits", budget=float(b))
        for b in (4, 3)
    }
    report = ReportStyle("KVTuner", "d", "#b15928", rank=73)

    config_class = KVTunerConfig
    decode_from_codes = True  # SeqPairStore / KIVIStore attend from the codes

    def __init__(self, config: KVTunerConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.layer_pairs: list[tuple[int, int]] | None = None

    # ---- which pair each layer gets -------------------------------------------------------------
    def config_path(self, info: ModelInfo) -> Path:
        return Path(self.config.config) if self.config.config else CONFIG_DIR / f"{model_signature(info)}.json"

    def resolve_pairs(self, info: ModelInfo) -> list[tuple[int, int]]:
        c, n = self.config, info.n_layers
        if c.pairs:
            pairs = parse_pairs(c.pairs)
            if len(pairs) not in (1, n):
                raise MethodSpecError(
                    f"{self.label}: {len(pairs)} pairs given; give 1 (all layers) or {n} (one per layer)"
                )
            return pairs * n if len(pairs) == 1 else pairs
        path, key = self.config_path(info), f"{c.budget:g}"
        missing = (
            f"{self.label}: no searched configuration for this model ({model_signature(info)}) at budget={key}, "
            f"scheme={c.scheme} in {path}; make one with: {search_command(_model_arg(info), c.budget, c.scheme)} "
            "(or give the pairs: kvtuner:pairs=K8V4,K4V2,...)"
        )
        if not path.exists():
            raise MethodSpecError(missing)
        try:
            data = read_config_file(path)
        except ValueError as e:
            raise MethodSpecError(f"{self.label}: cannot use configuration: {e}") from None
        entry = data["schemes"].get(c.scheme, {}).get("budgets", {}).get(key)
        if entry is None:
            raise MethodSpecError(missing)
        try:
            pairs = [parse_pair(p) for p in entry["pairs"]]
        except (KeyError, TypeError, ValueError) as e:
            raise MethodSpecError(f"{self.label}: {path}: budget {key} has no valid pairs ({e})") from None
        if len(pairs) != n:
            raise MethodSpecError(f"{self.label}: {path} holds {len(pairs)} layers' pairs; this model has {n}")
        return pairs

    def check_model(self, info: ModelInfo) -> None:
        g = self.config.group_for(info.head_dim)
        if info.head_dim % g:  # value groups run along channels in both schemes
            raise MethodSpecError(f"{self.label}: group={g} does not divide head_dim={info.head_dim}")
        self.layer_pairs = self.resolve_pairs(info)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        if self.layer_pairs is None:
            self.check_model(info)
        k_bits, v_bits = self.layer_pairs[layer_idx]
        c, g = self.config, self.config.group_for(info.head_dim)
        if c.scheme == "kivi":
            kc = KIVIConfig(bits=k_bits, group=g, residual=c.residual, key_bits=k_bits, value_bits=v_bits)
            return KIVIPairStore(layer_idx, info, kc, c.zero_point == "integer")
        seq = IntegerZeroSeq if c.zero_point == "integer" else QuantizedSeq
        return SeqPairStore(layer_idx, info, seq(k_bits, g, axis=-1), seq(v_bits, g, axis=-1))

    @classmethod
    def report_sort_key(cls, config: dict[str, Any]) -> tuple:
        try:
            return (-float(config.get("budget", 4.0)),)
        except (TypeError, ValueError):
            return (-4.0,)


def _model_arg(info: ModelInfo) -> str:
    """What ``--model`` loaded this geometry in this process (``harness.models.loaded_spec``), else MODEL."""
    from harness.models import loaded_spec

    spec = loaded_spec(info.family, info.n_layers, info.hidden_size)
    return shlex.quote(spec) if spec else "MODEL"


# --------------------------------------------------------------------------------------------
# The offline search
# --------------------------------------------------------------------------------------------


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q kᵀ / √D) v in fp32: q [B, H, T, D], k / v [B, H_kv, T, D] (GQA) -> [B, H, T, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, T]
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1) @ v


def layer_errors(model: torch.nn.Module, windows: Sequence[torch.Tensor], base: KVTunerConfig) -> torch.Tensor:
    """e[l, p]: relative attention-output error of layer l with only its K/V at ``CANDIDATES[p]``
    (the store of ``base``'s scheme), summed over ``windows`` ([1, T] ids): ||ô − o||² / ||o||², square-rooted."""
    from harness.integration import apply_rope, forward, model_info
    from harness.integration.capture import capture

    info = model_info(model)
    num = torch.zeros(info.n_layers, len(CANDIDATES), dtype=torch.float64)
    den = torch.zeros(info.n_layers, dtype=torch.float64)
    methods = [KVTuner(replace(base, pairs=pair_name(p), config="", quantize_prefill=True)) for p in CANDIDATES]

    def on_layer(i: int, sig: dict[str, Any]) -> None:
        q, v = sig["queries"], sig["values"]  # [B, H, T, D], [B, H_kv, T, D]
        k = apply_rope(sig["pre_rope_keys"], *sig["rope"])
        ref = attention_output(q, k, v)
        den[i] += ref.pow(2).sum().item()
        for j, m in enumerate(methods):
            store = m.new_layer_store(i, info)
            store.append(k, v, Observation(positions=torch.arange(k.shape[-2]), is_prefill=True))
            kq, vq = store.read(torch.float32)
            num[i, j] += (attention_output(q, kq, vq) - ref).pow(2).sum().item()

    for m in methods:
        m.layer_pairs = [parse_pair(m.config.pairs)] * info.n_layers
    with torch.no_grad(), capture(model, {"queries", "pre_rope_keys", "values", "rope"}, on_layer=on_layer):
        for w in windows:
            forward(model, w)
    return (num / den.clamp(min=1e-30).unsqueeze(1)).sqrt().float()


def prune_pairs(errors: torch.Tensor) -> list[list[int]]:
    """Per layer, the indices into ``CANDIDATES`` on the Pareto front of (mean bits, error), most bits
    first: a pair is dropped when another has no more bits and no more error, and less of one."""
    bits = [(k + v) / 2 for k, v in CANDIDATES]
    kept = []
    for e in errors.tolist():
        keep = [
            p
            for p in range(len(CANDIDATES))
            if not any(
                bits[o] <= bits[p] and e[o] <= e[p] and (bits[o] < bits[p] or e[o] < e[p])
                for o in range(len(CANDIDATES))
            )
        ]
        kept.append(sorted(keep, key=lambda p: (-bits[p], e[p])))
    return kept


def cluster_layers(errors: torch.Tensor, kept: list[list[int]], n_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of the layers' log10-error vectors, merging only layers
    with the same candidate list, until ``n_groups`` groups remain (or no allowed merge does). Ties merge
    the lowest layer indices first. Groups are sorted by their first layer."""
    feats = torch.log10(errors.double().clamp(min=1e-12))  # [L, P]
    dist = torch.cdist(feats, feats)  # [L, L]
    groups = [[i] for i in range(len(kept))]
    while len(groups) > n_groups:
        best: tuple[float, int, int] | None = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if sorted(kept[groups[a][0]]) != sorted(kept[groups[b][0]]):
                    continue
                d = dist[groups[a]][:, groups[b]].mean().item()
                if best is None or d < best[0] - 1e-12:
                    best = (d, a, b)
        if best is None:
            break
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups, key=lambda g: g[0])


def uniform_choices(templates: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]]:
    """One choice per group for each mean-bits level that every group's candidate list holds: each group
    takes its first pair of that level (the lists are sorted by bits, then error), most bits first."""
    levels = set.intersection(*({(k + v) / 2 for k, v in t} for t in templates))
    return [
        [next(i for i, (k, v) in enumerate(t) if (k + v) / 2 == b) for t in templates]
        for b in sorted(levels, reverse=True)
    ]


def calibration_nll(model: torch.nn.Module, windows: Sequence[torch.Tensor], method: KVCacheMethod | None) -> float:
    """Mean next-token NLL of ``windows`` (one forward each, through ``method``'s cache; None = no cache),
    as the WikiText-2 task sums it (``tasks.wikitext2.window_nll``)."""
    from harness.integration import AttachedMethod, forward
    from tasks.wikitext2 import window_nll

    total, count = 0.0, 0
    with torch.no_grad():
        if method is None:
            logits = [forward(model, w).logits for w in windows]
        else:
            with AttachedMethod(model, method) as am:
                logits = [forward(model, w, am.new_cache()).logits for w in windows]
    for lg, w in zip(logits, windows, strict=True):
        nll, n = window_nll(lg, w)
        total, count = total + nll, count + n
    return total / count


def search(
    model: torch.nn.Module,
    windows: Sequence[torch.Tensor],
    budgets: Sequence[float],
    trials: int,
    groups: int = 6,
    seed: int = 0,
    base: KVTunerConfig | None = None,
    log: Any = None,
    enqueue_uniform: bool = True,
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring on ``windows``; the scheme's entry of a configuration file.
    ``enqueue_uniform``: each study first evaluates the :func:`uniform_choices` within its budget."""
    try:
        import optuna
    except ImportError:
        raise MethodSpecError("kvtuner search needs optuna: pip install 'moqae-harness[search]'") from None

    from harness.integration import model_info

    base = base or KVTunerConfig()
    info = model_info(model)
    errors = layer_errors(model, windows, base)
    kept = prune_pairs(errors)
    clusters = cluster_layers(errors, kept, groups)
    templates = [[CANDIDATES[p] for p in kept[g[0]]] for g in clusters]
    seen: dict[tuple, float] = {}

    def evaluate(pairs: list[tuple[int, int]]) -> float:
        key = tuple(pairs)
        if key not in seen:
            m = KVTuner(replace(base, pairs=",".join(map(pair_name, pairs)), quantize_prefill=True))
            seen[key] = calibration_nll(model, windows, m)
        return seen[key]

    def expand(choice: Sequence[int]) -> list[tuple[int, int]]:
        pairs: list[tuple[int, int]] = [(16, 16)] * info.n_layers
        for g, t, c in zip(clusters, templates, choice, strict=True):
            for layer in g:
                pairs[layer] = t[c]
        return pairs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_budgets: dict[str, Any] = {}
    for budget in budgets:

        def objective(trial: optuna.Trial, budget: float = budget) -> tuple[float, float]:
            choice = [trial.suggest_int(f"group_{i}", 0, len(t) - 1) for i, t in enumerate(templates)]
            pairs = expand(choice)
            bits = mean_bits(pairs)
            trial.set_user_attr("constraints", (bits - budget,))
            return evaluate(pairs), bits

        with warnings.catch_warnings():  # constraints_func is marked experimental in optuna 4
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=lambda t: t.user_attrs["constraints"])
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        uniform = [c for c in uniform_choices(templates) if mean_bits(expand(c)) <= budget] if enqueue_uniform else []
        for choice in uniform:  # counted in ``trials``
            study.enqueue_trial({f"group_{i}": c for i, c in enumerate(choice)})
        study.optimize(objective, n_trials=trials)
        done = [t for t in study.trials if t.values is not None]
        feasible = [t for t in done if t.user_attrs["constraints"][0] <= 1e-9]
        if not feasible:
            raise ValueError(f"kvtuner search: no trial within budget={budget:g} in {trials} trials; raise --trials")
        best = min(feasible, key=lambda t: (t.values[0], t.values[1], t.number))
        pairs = expand([best.params[f"group_{i}"] for i in range(len(templates))])
        front = sorted({(round(t.values[1], 4), round(t.values[0], 6)) for t in study.best_trials})
        out_budgets[f"{budget:g}"] = {
            "pairs": [pair_name(p) for p in pairs],
            "mean_bits": mean_bits(pairs),
            "nll": best.values[0],
            "trial": best.number,
            "trials": len(done),
            "enqueued": [",".join(pair_name(p) for p in dict.fromkeys(expand(c))) for c in uniform],
            "pareto_front": [list(p) for p in front],  # (mean bits, NLL) of the study's non-dominated trials
        }
        if log:
            log(f"budget {budget:g}: {' '.join(out_budgets[f'{budget:g}']['pairs'])} "
                f"({mean_bits(pairs):.3f} bits, NLL {best.values[0]:.4f})")  # fmt: skip
    return {
        "quantizer": {k: getattr(base, k) for k in ("zero_point", "group", "residual")},
        "trials": trials,
        "enqueue_uniform": enqueue_uniform,
        "groups_asked": groups,
        "seed": seed,
        "nll_full_precision": calibration_nll(model, windows, None),
        "candidates": [pair_name(p) for p in CANDIDATES],
        "errors": [[float(f"{e:.6g}") for e in row] for row in errors.tolist()],
        "kept": [[pair_name(CANDIDATES[p]) for p in k] for k in kept],
        "groups": clusters,
        "templates": [[pair_name(p) for p in t] for t in templates],
        "budgets": out_budgets,
    }


def build_parser() -> argparse.ArgumentParser:
    """``python -m baselines.kvtuner``'s arguments (``search``)."""
    p = argparse.ArgumentParser(prog="python -m baselines.kvtuner", description="KVTuner's offline search")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="search per-layer (key bits, value bits) pairs on the calibration split")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--budget", default="4,3", help="mean bits (k+v)/2 per layer, comma-separated: one study each")
    s.add_argument("--scheme", choices=("pertoken", "kivi"), default="pertoken")
    s.add_argument("--zero-point", choices=("integer", "float"), default="integer")
    s.add_argument("--trials", type=int, default=100, help="optuna trials per budget (the official default)")
    s.add_argument("--no-enqueue-uniform", dest="enqueue_uniform", action="store_false",
                   help="start each study from NSGA-II's random samples only (the official script)")  # fmt: skip
    s.add_argument("--groups", type=int, default=6, help="layer groups after clustering")
    s.add_argument("--windows", type=int, default=8, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, ... (the search's forwards run there)")
    s.add_argument("--dtype", default="fp32", help="the model's dtype (fp32, fp16, bf16)")
    s.add_argument("--out", default=None, help="JSON file (default: the shipped file for the model)")
    return p


def main(argv: list[str] | None = None) -> int:
    from harness.data import MissingDataError, calibration_windows
    from harness.files import write_text_atomic
    from harness.integration import model_info
    from harness.models import ModelLoadError, load_model, model_id

    args = build_parser().parse_args(argv)
    try:
        budgets = [float(b) for b in args.budget.split(",") if b.strip()]
        if not budgets or any(not 2 <= b <= 8 for b in budgets) or min(args.trials, args.groups, args.windows) < 1:
            raise ValueError("--budget values must lie in [2, 8]; --trials, --groups, --windows must be >= 1")
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
        windows = calibration_windows(tok, args.data_dir, args.seqlen, args.windows, seed=args.seed)
        windows = [w.to(next(model.parameters()).device) for w in windows]
        base = KVTunerConfig(scheme=args.scheme, zero_point=args.zero_point)
        info = model_info(model)
        out = Path(args.out) if args.out else CONFIG_DIR / f"{model_signature(info)}.json"
        entry = search(model, windows, budgets, args.trials, args.groups, args.seed, base, print, args.enqueue_uniform)
    except (MethodSpecError, MissingDataError, ModelLoadError, ValueError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    argv_used = sys.argv[1:] if argv is None else argv
    entry["command"] = "python -m baselines.kvtuner " + " ".join(shlex.quote(a) for a in argv_used)
    entry["calibration"] = {"split": "wikitext-2 calibration", "windows": args.windows, "seqlen": args.seqlen}
    entry["device"], entry["dtype"] = args.device, args.dtype
    data = read_config_file(out) if out.exists() else {"format": CONFIG_FORMAT, "schemes": {}}
    data.update(model=model_id(args.model), signature=model_signature(info))
    data["schemes"][args.scheme] = entry  # this command's scheme replaced; the other scheme's entry stays
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
