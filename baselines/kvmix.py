"""KVmix: gradient-based layer importance-aware mixed-precision KV quantization (Li et al., AAAI 2026,
arXiv 2506.08018).

Official code: ``LfLab-AI/KVmix``, read at commit 44e80fd8e610 — ``myprofileKV.py`` (the profiler:
``profile_importance``, ``classify_layers``, ``set_quant_bits``) and ``models/modeling_llama_KVmix.py``
(the cache and its recent-pivotal-context split). What this module does, and where the two differ, which it follows:

* **Layer importance** (profiler). For every calibration prompt the LM loss L is back-propagated
  and each layer l scores s_K(l) = ‖∂L/∂W_k(l)‖₂ and s_V(l) = ‖∂L/∂W_v(l)‖₂ (Frobenius norms of the
  gradients with respect to the k_proj / v_proj *weights*; biases are not scored); the scores are the
  mean over prompts of the per-prompt norms. Prompts are at most ``prompt_len`` = 1024 tokens (the
  profiler's ``max_length``): the calibration windows the runner passes (calibration split only) are
  cut into pieces of 1024 tokens (a shorter last piece is kept, pieces under 2 tokens dropped). The
  official profiler runs one forward and one backward per layer per prompt with ``model.train()``;
  the gradients are the same from one forward/backward (``torch.autograd.grad`` on the 2·L weights),
  taken here with the model in eval mode (no dropout; Llama / Mistral / Qwen2 attention dropout is
  0, so ``train()`` changes nothing there), ``torch.enable_grad()`` and ``requires_grad`` set only on
  the k_proj / v_proj weights for the pass (every flag restored afterwards, no ``.grad`` left).
  The loss is the model's own next-token loss (``labels=input_ids``). The official scripts shift the
  labels left by one *and* pass them to a Hugging Face model, which shifts again (their loss scores
  token t + 2 from position t, with a pad label at the end); that double shift is not reproduced.
  Scores are cached on disk per model (``$MOQAE_HARNESS_CACHE/calibration/kvmix-*.pt``, keyed by the
  model fingerprint, ``prompt_len`` and the calibration token ids; ``harness.files``), as KVQuant's
  calibration. The k_proj / v_proj weights come from ``harness.integration.attention_projections``.
* **Bit allocation**, ranked separately for K and V (``classify_layers``): layers sorted by
  descending score; the first ⌊``important``·L⌋ are "important", the next ⌊``general``·L⌋ "general"
  (``int(0.1 * num_layers)`` twice in the code, although its docstring says 10 % / 20 %), the rest
  "unimportant". Important and general layers get the high precision (K ``k_high`` = 3 bits,
  V ``v_high`` = 4 bits), the others ``k_low`` / ``v_low`` = 2 bits. For a 32-layer model
  ⌊3.2⌋ = 3 + 3 layers are high: K (6·3 + 26·2)/32 = 2.1875 ≈ 2.19 bits and V (6·4 + 26·2)/32 =
  2.375 ≈ 2.38 bits, the paper's Llama-2-7B averages (``allocation_bits``).
* **Quantization**: keys per channel in groups of G = ``group`` (32) tokens, values per token in
  groups of G channels, asymmetric min-max with fp16 scale and minimum (``harness.quant.quantize``;
  3-bit codes really take 3 bits, 8 codes in 3 bytes). Not reproduced: the code's 3-bit *key*
  kernel packs groups of 11 tokens into one int32 (ten 3-bit codes and an eleventh clamped to
  2 bits, ``Kgroup_size = 11``), a packing artefact of its CUDA kernel; here 3-bit keys use G = 32
  like every other bit-width. Scale and minimum are fp16 here as there: the official kernels
  (``quant_cuda/csrc/quantization_cuda.cu``, ``process_key_quantization_cuda`` /
  ``process_value_quantization_cuda``) compute them in fp32 and cast both to fp16 on return when the
  input is fp16, and its scripts load the models in fp16 (``pred_long_benchprofile.py``,
  ``Inference-comparision.py``).
* **Recent pivotal context (RPC)**: each layer keeps its newest tokens in an fp16 window; after every
  update (prefill or decode step), with n tokens in the window, the newest ⌊r·n⌋ stay fp16 and the
  oldest ⌊(n − ⌊r·n⌋)/G⌋·G are quantized (keys and values each with their own window, r and bits;
  ``modeling_llama_KVmix.py``, both its prefill and decode branches: the group-multiple floor
  applies to values as well). r depends on the layer's bit-width: the official code's ratios
  {4: 0.3, 3: 0.2, 2: 0.2, 1: 0.1} (``rpc=code``, the default). The paper gives other ratios than
  the code; ``rpc`` also takes an explicit table (``rpc=4:0.3/3:0.2/2:0.2/1:0.1``) to set them, and
  ``rpc=none`` disables the window (everything quantized in groups of G). In one long prefill
  (perplexity windows) about r of the tokens stay fp16; in decoding the window shrinks to
  about G/(1 − r) tokens. The split is applied at each append before attention reads the store,
  as the code's decode branch (quantize, then attention).
* **Prefill attention**: the code runs prefill attention on the full-precision K/V;
  ``quantize_prefill`` = True (default) makes the window's attention read the quantized cache, as
  for every method in the perplexity tables (``kvmix:quantize_prefill=false`` = the code's way).

Accounting: packed codes ("codes"), fp16 scale + minimum per group ("scales"), the RPC windows
("fp_tokens"); nominal bits count b per quantized element and 16 per window element (the paper's
2.19 / 2.38 averages count codes only, ``allocation_bits``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from harness.files import calibration_cache_path, load_calibration, save_calibration
from harness.integration import (
    attention_projections,
    calibration_mode,
    forward,
    model_fingerprint,
    model_info,
    model_name,
)
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
)
from harness.options import Fraction, OneOf, Parsed, PositiveInt
from harness.storage import TOKEN_DIM, FullPrecisionSeq, QuantizedSeq, WindowedPairStore

KVMIX_BITS = (1, 2, 3, 4)
KVmixBits = OneOf(*KVMIX_BITS)
#: the official code's full-precision ratio per bit-width (``set_quant_bits`` in ``myprofileKV.py``)
CODE_RPC = {4: 0.3, 3: 0.2, 2: 0.2, 1: 0.1}
CACHE_VERSION = 1


def parse_rpc(spec: str) -> dict[int, float]:
    """``code`` | ``none`` | ``4:0.3/3:0.2/2:0.2/1:0.1`` -> {bits: ratio}; raises MethodSpecError."""
    s = spec.strip().lower()
    if s == "code":
        return dict(CODE_RPC)
    if s in ("none", "0"):
        return dict.fromkeys(KVMIX_BITS, 0.0)
    out = dict(CODE_RPC)
    try:
        for item in s.split("/"):
            b, _, r = item.partition(":")
            out[int(b)] = float(r)
    except ValueError:
        raise MethodSpecError(
            f"kvmix: rpc={spec!r} is not valid; accepted: code, none, or bits:ratio items joined by '/' "
            "(e.g. 4:0.3/3:0.2/2:0.2/1:0.1)"
        ) from None
    bad = {b: r for b, r in out.items() if b not in KVMIX_BITS or not 0.0 <= r < 1.0}
    if bad:
        raise MethodSpecError(f"kvmix: rpc={spec!r}: bits must be in {KVMIX_BITS} and ratios in [0, 1)")
    return out


# --------------------------------------------------------------------------------------------
# Layer importance and bit allocation
# --------------------------------------------------------------------------------------------


def split_prompts(windows: Iterable[torch.Tensor], prompt_len: int) -> list[torch.Tensor]:
    """Cut [B, T] (or [T]) windows into [1, ≤ prompt_len] prompts, one row at a time; pieces of
    fewer than 2 tokens (no next-token target) are dropped."""
    prompts = []
    for w in windows:
        w = w if w.dim() == 2 else w.view(1, -1)
        for row in w:
            for start in range(0, row.numel(), prompt_len):
                piece = row[start : start + prompt_len]
                if piece.numel() >= 2:
                    prompts.append(piece.view(1, -1))
    return prompts


def layer_importance(model: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_K, s_V), each [L] float64: the mean over ``prompts`` of ‖∂L/∂W_k(l)‖₂ and ‖∂L/∂W_v(l)‖₂.

    The model is left as it was: eval/train mode, every ``requires_grad`` flag, no ``.grad``.
    """
    if not prompts:
        raise ValueError("kvmix: calibration got no prompts of at least 2 tokens")
    projections = attention_projections(model)
    n_layers = len(projections)
    weights = [w for p in projections for w in (p.k.weight, p.v.weight)]  # k0, v0, k1, v1, ...
    device = weights[0].device
    sums = torch.zeros(2, n_layers, dtype=torch.float64)
    with calibration_mode(model, trainable=weights):  # eval; requires_grad on these weights only
        for ids in prompts:
            ids = ids.to(device)
            with torch.enable_grad():
                loss = forward(model, ids, labels=ids).loss
                grads = torch.autograd.grad(loss, weights)
            norms = torch.stack([g.detach().double().norm() for g in grads]).cpu()  # [2L]: k0, v0, k1, ...
            sums += norms.view(n_layers, 2).T
    mean = sums / len(prompts)
    return mean[0], mean[1]


def classify_layers(scores: torch.Tensor, important: float, general: float) -> tuple[list[int], list[int], list[int]]:
    """(important, general, unimportant) layer indices: scores sorted descending (ties: lower index
    first), the first ⌊important·L⌋, the next ⌊general·L⌋, the rest (``classify_layers``)."""
    n = scores.numel()
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    n_imp, n_gen = int(important * n), int(general * n)
    return order[:n_imp], order[n_imp : n_imp + n_gen], order[n_imp + n_gen :]


def allocate_bits(scores: torch.Tensor, important: float, general: float, high: int, low: int) -> list[int]:
    """Bits per layer: ``high`` for important and general layers, ``low`` for the others."""
    imp, gen, _ = classify_layers(scores, important, general)
    bits = [low] * scores.numel()
    for i in imp + gen:
        bits[i] = high
    return bits


def allocation_bits(bits: list[int]) -> float:
    """The paper's average bit-width of an allocation (codes only: no RPC window, no scales)."""
    return sum(bits) / len(bits)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class KVmixStore(WindowedPairStore):
    """One layer: keys per channel / values per token at the layer's bits, each with its RPC window.

    Token order: [quantized | fp16 window] for keys and for values (the two split points differ;
    ``harness.storage.WindowedPairStore`` holds them).
    """

    def __init__(
        self, layer_idx: int, info: ModelInfo, k_bits: int, v_bits: int, k_ratio: float, v_ratio: float, group: int
    ):
        super().__init__(layer_idx, info, k_bits, v_bits, group)
        self.k_bits, self.v_bits, self.k_ratio, self.v_ratio, self.group = k_bits, v_bits, k_ratio, v_ratio, group

    def _split(self, q: QuantizedSeq, fp: FullPrecisionSeq, ratio: float) -> None:
        n = fp.length
        keep = int(ratio * n)  # the code's int(ratio * current_full_length)
        n_q = (n - keep) // self.group * self.group
        if n_q > 0:
            q.append(fp.take_front(n_q))

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        self._batch = keys.shape[0]
        if keys.shape[TOKEN_DIM] == 0:
            return
        self.k_fp.append(keys)
        self.v_fp.append(values)
        self._split(self.k_q, self.k_fp, self.k_ratio)
        self._split(self.v_q, self.v_fp, self.v_ratio)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class KVmixConfig(MethodConfig):
    group: PositiveInt = 32  # G: tokens per key range (per channel), channels per value range (per token)
    k_high: KVmixBits = 3  # bits of important + general layers' keys
    v_high: KVmixBits = 4
    k_low: KVmixBits = 2  # bits of the other layers
    v_low: KVmixBits = 2
    important: Fraction = 0.1  # share of layers ranked "important" (floored), for K and V separately
    general: Fraction = 0.1  # share of the next layers ranked "general" (floored)
    # fp16 window ratio per bit-width: code | none | 4:0.3/3:0.2/2:0.2/1:0.1
    rpc: Parsed(parse_rpc, "code, none or ratios like 4:0.3/3:0.2/2:0.2/1:0.1") = "code"
    prompt_len: Annotated[int, Field(ge=2)] = 1024  # calibration prompt length (the profiler's max_length)
    quantize_prefill: bool = True  # False = the code's full-precision prefill attention
    cache: bool = True  # reuse importance scores cached on disk

    aliases: ClassVar[dict[str, str]] = {"group_size": "group"}

    def validate(self) -> None:
        if self.important + self.general > 1.0:
            raise MethodSpecError(f"kvmix: important + general = {self.important + self.general} exceeds 1")

    @property
    def ratios(self) -> dict[int, float]:
        return parse_rpc(self.rpc)


def importance_cache_path(model: torch.nn.Module, prompts: list[torch.Tensor], prompt_len: int) -> Path:
    """Where the importance scores of ``model`` on ``prompts`` are cached (``harness.files``)."""
    key = {"v": CACHE_VERSION, "prompt_len": prompt_len}
    return calibration_cache_path("kvmix", model_name(model), model_fingerprint(model), key, prompts)


def _save_scores(path: Path, k: torch.Tensor, v: torch.Tensor) -> None:
    save_calibration(path, {"k": k, "v": v})


def _load_scores(path: Path, n_layers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    data = load_calibration(path)
    if not isinstance(data, dict) or any(data.get(k) is None or data[k].numel() != n_layers for k in ("k", "v")):
        return None
    return data["k"], data["v"]


class KVmix(KVCacheMethod):
    """KVmix (arXiv 2506.08018): per-layer K/V bits from gradient importance, recent-pivotal fp16 window."""

    name = "kvmix"
    description = "KVmix: gradient-ranked layers K3/V4 (top 20 %) else 2-bit, per-bit fp16 recent window"
    report = ReportStyle("KVmix", "p", "C8", rank=70)

    config_class = KVmixConfig
    decode_from_codes = True  # decode steps attend from the codes (WindowedPairStore.attend)

    def __init__(self, config: KVmixConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.k_scores: torch.Tensor | None = None
        self.v_scores: torch.Tensor | None = None
        self.calibration_source: str | None = None  # "computed", "given" or the cache file

    @property
    def needs_calibration(self) -> bool:
        return True

    def check_model(self, info: ModelInfo) -> None:
        c = self.config
        if info.head_dim % c.group:
            raise MethodSpecError(
                f"{self.label}: group={c.group} does not divide head_dim={info.head_dim} (value groups run "
                f"along channels); accepted: divisors of {info.head_dim}"
            )
        for bits in {c.k_high, c.v_high, c.k_low, c.v_low}:
            if info.head_dim * bits % 8 or (bits == 3 and info.head_dim % 8):
                raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be bit-packed at {bits} bits")

    def set_scores(self, k_scores: torch.Tensor, v_scores: torch.Tensor) -> None:
        """Use given importance scores [L] (tests, or scores computed elsewhere) instead of calibrating."""
        self.k_scores, self.v_scores = k_scores.double().cpu(), v_scores.double().cpu()
        self.calibration_source = "given"

    def calibrate(self, model: torch.nn.Module, calibration_batches: Iterable[torch.Tensor]) -> None:
        info = self.info or model_info(model)
        prompts = split_prompts(calibration_batches, self.config.prompt_len)
        path = importance_cache_path(model, prompts, self.config.prompt_len)
        if self.config.cache and path.exists():
            scores = _load_scores(path, info.n_layers)
            if scores is not None:
                self.k_scores, self.v_scores = scores
                self.calibration_source = str(path)
                return
        self.k_scores, self.v_scores = layer_importance(model, prompts)
        self.calibration_source = "computed"
        if self.config.cache:
            _save_scores(path, self.k_scores, self.v_scores)

    @property
    def allocation(self) -> tuple[list[int], list[int]]:
        """(K bits, V bits) per layer."""
        if self.k_scores is None or self.v_scores is None:
            raise RuntimeError(f"{self.label}: not calibrated; call AttachedMethod.calibrate(windows) first")
        c = self.config
        return (
            allocate_bits(self.k_scores, c.important, c.general, c.k_high, c.k_low),
            allocate_bits(self.v_scores, c.important, c.general, c.v_high, c.v_low),
        )

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        k_bits, v_bits = (bits[layer_idx] for bits in self.allocation)
        ratios = self.config.ratios
        return KVmixStore(layer_idx, info, k_bits, v_bits, ratios[k_bits], ratios[v_bits], self.config.group)
