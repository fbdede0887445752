"""QJL: 1-bit quantized JL transform for the KV cache (Zandieh, Daliri, Han, AAAI 2025, arXiv 2406.03482).

Read in the official code, ``amirzandieh/QJL`` at commit 421d61cb97da828e5f1b9d2c7a146f9251e8f5b1:
``models/llama2_utils_qjl.py`` / ``models/llama3_utils_qjl.py`` (``QJLSketch``, ``QJLKeyQuantizer``),
``qjl_kernel/csrc/qjl_quant_kernel.cu`` (what a key stores), ``qjl_kernel/csrc/qjl_gqa_score_kernel.cu``
(the score), ``models/llama2_qjl.py`` / ``llama3_qjl.py`` (values, buffers), ``qjl_kernel/new_pack.py``
(value quantizer) and ``run_longbench.py`` / ``README.md`` (the configuration).

Keys (per KV head, post-RoPE, fp16 as the official model runs). Complete groups of G tokens are
quantized once the sequence length reaches a multiple of the buffer length B (prefill: the first
T − T mod B tokens; decode: the fp16 residual is quantized when T mod B = 0, *before* that step's
attention, as ``update_sketch`` runs before ``attention_score``). Per group, the ``outliers`` channels
with the largest L2 norm over the group's tokens are outlier channels (uint8 indices). With M_in / M_out
the inlier / outlier channel masks and S [m, d] the projection, a key k stores

* sign(S (M_in⊙k)) as m bits (packed, 1 bit each; a sketch of exactly 0 counts as −1, ``> 0`` in the
  kernel), sign(S[:m_o] (M_out⊙k)) as m_o bits (the first m_o rows of the same S);
* ‖k‖ and ‖M_out⊙k‖ in fp16 (the official code keeps both in the key dtype, fp16 in its runs).

No scales or zero points. The score kernel computes, with ‖k_in‖ = sqrt(‖k‖² − ‖k_out‖²),
q·k ≈ √(π/2)/m · ‖k_in‖ · ⟨S(M_in⊙q), sign(S k_in)⟩ + √(π/2)/m_o · ‖k_out‖ · ⟨S[:m_o](M_out⊙q), sign(...)⟩,
which is exactly q·k̂ with k̂ = √(π/2)/m · ‖k_in‖ · M_in⊙(Sᵀ sign(S k_in)) + √(π/2)/m_o · ‖k_out‖ ·
M_out⊙(S[:m_o]ᵀ sign(S[:m_o] k_out)). ``read`` returns that k̂ (prefill attention, non-decode paths);
``attend`` (decode steps) computes the same scores from the sign bits and the sketched query, as the
kernel does, without k̂. With i.i.d. Gaussian S (``rotate=false``) E[q·k̂] = q·k (the paper's Lemma);
the official ``rot=True`` orthogonalizes S in blocks of d rows (QR, × √d): rows uniform on the
sphere of radius √d, E[q·k̂] = c_d·q·k with c_d = √(π/2)·√d·E|u₁| (1.0020 at d = 128, 1.0078 at 32).

Values are quantized per token in groups of G channels, asymmetric min-max at ``value_bits`` with fp16
scale and minimum (``new_pack.triton_quantize_and_pack_along_last_dim``; here ``harness.quant``, which
computes the codes in fp32 against the stored fp16 scale/minimum where the official code works in
fp16: see tests/test_qjl.py). The newest B values stay fp16: prefill quantizes the first T − B;
``llama2_qjl.py`` (the model ``run_longbench.py`` loads) then quantizes the oldest fp16 value after a
decode step's attention when the window holds B + 1 (``decode_values=slide``; applied here at the
start of the next append, so each step's attention sees what the official one sees), while
``llama3_qjl.py`` never quantizes decode-step values (``decode_values=keep``).

The projection S (fp32 [m, d], ``torch.randn`` then, with ``rotate``, QR per block of d) is one matrix
per layer class, shared by every layer and head of the class (the official ``config.qjl`` /
``config.qjl_initial_layers``, drawn in that order from one generator). It is a constant of the method
(regenerated from ``seed``: the official CUDA generator's numbers cannot be reproduced on CPU), held
once per cache: the first store of each class keeps a reference and counts its m·d·4 bytes under
"scales"; the other stores of the class reach it through the method. The official code holds three
copies (``proj_dir``, ``proj_dir_score``, ``proj_dir_quant``); one is held here.

Bytes (``memory()``): codes = the two sign sketches; scales = the two fp16 norms per token, the value
scales/minima and the projection; outliers = the uint8 outlier indices (``outliers`` per group of G
tokens); fp_tokens = the fp16 key residual and value window. Payload bits: m + m_o per key token.

Decode cost. Each step scores every quantized key from its m + m_o sign bits (``key_scores``): the format's
own part is that product, m + m_o sign coordinates per key against the query sketch where a key of one
number per channel (int4's) needs d, measured as ONE dense matmul of ±1 sketches unpacked beforehand
(row ``format:`` of ``python tests/bench/method_parts.py qjl``, beside the same product over d fp32
channels). The rest is this implementation's: unpacking the bits to ±1 floats (a table row per byte,
in L2-sized chunks), the per-group query sketches, and the products per group of G tokens as [G, m] @
[m, R], the orientation the published scores were computed in, which BLAS runs several times slower
than [R, m] @ [m, G] (same sums in another order: the last digits would move; rows ``sign products``).

Defaults are the official README / ``run_longbench.py`` command (Llama-2 longchat, head_dim 128):
m = 256, m_o = 256 in general layers, m = 512, m_o = 128 in the first 15 layers, 8 outlier channels,
G = 32, B = 128, 2-bit values, ``rot=True``. m and m_o default to those multiples of head_dim (2d, 2d;
4d, d), so another head_dim keeps the official bits per channel; ``dim=256`` etc. set them directly.

Where this differs from the official code (options where it is a choice):
* ``quantize_prefill=true`` (default): the prefill's own attention reads the cache (k̂ and the
  quantized values), like every method's table row here; the official prefill attends in full
  precision (``quantize_prefill=false``).
* Prompts shorter than B: the official code never sets ``key_states_quant`` and fails at the next
  quantization; here the keys just stay in the fp16 residual. Appends of several tokens after the
  prefill (streamed protocol; the official code asserts one) follow the same rule: keys quantized up
  to the last multiple of B, values up to the newest B.
* ‖k‖² − ‖k_out‖² is clamped at 0 before the square root (fp16 norms can make it slightly negative
  where the outlier channels hold all of a key: NaN in the official kernel).
* A constant value group (max = min) gets codes 0 (the official fp16 division by a zero scale gives
  NaN codes); value scales/minima are fp16 for bf16 models too (the official code uses the model dtype).
* The official kernels support head_dim 128 only (``EMB_DIM``) and m a multiple of 32; here any
  head_dim that G divides, m and m_o multiples of 8, m_o ≤ m.
* ``outliers=0`` stores no outlier sketch, norm or index (the official kernel still writes all-zero
  outlier bits and zero norms).
* The fp16 norms are held as ‖k‖ · 2^-e with e = ⌈log2 √d⌉ (a power of two: the same fp16 number as
  the official ‖k‖ wherever that is a finite normal fp16, read back × 2^e in fp32), so that the norm of
  any fp16 key (at most √d · 65504) stays finite; the official fp16 ‖k‖ overflows to inf beyond 65504.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from harness.from_codes import masked_scores, mix_from_codes, workspace
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    tensor_bytes,
)
from harness.options import NonNegativeInt, OneOf, PositiveInt
from harness.quant import QuantizedTensor, pack_bits
from harness.storage import TOKEN_DIM, FullPrecisionSeq, QuantizedSeq, TokenBuffer

SQRT_HALF_PI = math.sqrt(math.pi / 2)


@dataclass
class QJLConfig(MethodConfig):
    dim: NonNegativeInt = 0  # m, general layers; 0 = 2·head_dim (official 256 at head_dim 128)
    dim_initial: NonNegativeInt = 0  # m, the first ``initial_layers``; 0 = 4·head_dim (official 512)
    outlier_dim: NonNegativeInt = 0  # m_o, general layers; 0 = 2·head_dim (official dim_outlier=256)
    outlier_dim_initial: NonNegativeInt = 0  # m_o, initial layers; 0 = head_dim (official 128)
    initial_layers: NonNegativeInt = 15  # official initial_layers_count
    outliers: NonNegativeInt = 8  # outlier channels per group, general layers (outlier_count_general)
    outliers_initial: NonNegativeInt = 8  # outlier_count_initial_layers
    group: PositiveInt = 32  # G: tokens per outlier selection, channels per value range
    buffer: PositiveInt = 128  # B: fp16 key residual (multiple of G) and value window
    value_bits: OneOf(2, 4) = 2  # the official value kernel accepts 2 and 4
    rotate: bool = True  # official rot=True: S orthogonalized per block of d rows; False: i.i.d. N(0, 1)
    seed: NonNegativeInt = 42
    decode_values: OneOf("slide", "keep") = "slide"  # llama2_qjl.py / llama3_qjl.py
    quantize_prefill: bool = True  # False = the official full-precision prefill attention

    aliases: ClassVar[dict[str, str]] = {
        "key_quantization_bits": "dim",
        "key_quantization_bits_initial_layers": "dim_initial",
        "initial_layers_count": "initial_layers",
        "outlier_count_general": "outliers",
        "outlier_count_initial_layers": "outliers_initial",
        "value_quantization_bits": "value_bits",
        "group_size": "group",
        "buffer_size": "buffer",
    }

    def validate(self) -> None:
        if self.buffer % self.group:
            raise MethodSpecError(
                f"qjl: buffer={self.buffer} must be a multiple of group={self.group} "
                "(the key residual is quantized in groups of G tokens when it holds B)"
            )
        for name in ("dim", "dim_initial", "outlier_dim", "outlier_dim_initial"):
            if getattr(self, name) % 8:
                raise MethodSpecError(f"qjl: {name}={getattr(self, name)} must be a multiple of 8 (packed sign bits)")

    def sizes(self, initial: bool, d: int) -> tuple[int, int, int]:
        """(m, m_o, outlier channels) of a layer class at head_dim d."""
        if initial:
            return self.dim_initial or 4 * d, self.outlier_dim_initial or d, self.outliers_initial
        return self.dim or 2 * d, self.outlier_dim or 2 * d, self.outliers


def projection(d: int, m: int, rotate: bool, generator: torch.Generator) -> torch.Tensor:
    """S [m, d] fp32 as ``QJLSketch``: proj_dir ~ N(0, 1) [d, m]; with ``rotate`` each block of d columns
    is replaced by Q of its reduced QR times √d (``init_rot_dir``); S = proj_dir_scoreᵀ (``proj_dir_quant``)."""
    p = torch.randn((d, m), generator=generator, dtype=torch.float32)  # [d, m]
    if rotate:
        p = torch.cat([torch.linalg.qr(p[:, i : i + d], mode="reduced")[0] for i in range(0, m, d)], dim=-1)
        p = p * math.sqrt(d)
    return p.T.contiguous()  # [m, d]


_SPREAD = sum(1 << 7 * k for k in range(1, 9))  # Σ_{k=1..8} 2^{7k}


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Sign bits bool [..., m] -> uint8 [..., m/8], coordinate 8i + j at bit j of byte i: the bytes of
    ``pack_bits(positive, 1)``. The 8 bools of byte i read as one little-endian word w = Σ_j b_j·2^{8j};
    w·Σ_{k=1..8} 2^{7k} (uint64, mod 2^64) holds b_j at bit 56 + j (its terms b_j·2^{8j+7k} fall on
    distinct bits, so nothing carries): one multiply and shift per 8 coordinates."""
    if sys.byteorder != "little" or positive.shape[-1] % 8:
        return pack_bits(positive, 1)
    words = positive.contiguous().view(torch.uint8).view(torch.uint64)  # [..., m/8]
    return ((words * _SPREAD).view(torch.int64) >> 56).to(torch.uint8)


_SIGN_ROWS: dict[torch.device, torch.Tensor] = {}


def _sign_rows(device: torch.device) -> torch.Tensor:
    """[256, 4] int64: row b holds the bytes of the 8 fp32 ±1 of byte b's bits (bit j -> float j)."""
    if device not in _SIGN_ROWS:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8]
        _SIGN_ROWS[device] = (bits.float() * 2 - 1).view(torch.int64).to(device)
    return _SIGN_ROWS[device]


def signs(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed sign bits [..., m/8] uint8 or int32 (coordinate 8i + j at bit j of byte i) -> ±1 fp32 [..., m].

    One 32-byte row copied per byte from a 256-row table of the eight ±1 floats (moved as 4 int64, no
    arithmetic on the floats): the floats of ``2 · unpack_to_float(packed, 1) − 1`` without its two passes
    over them. ``out``: a contiguous fp32 tensor [..., m] to write into."""
    *lead, nb = packed.shape
    if out is None:
        out = torch.empty(*lead, 8 * nb, dtype=torch.float32, device=packed.device)
    rows = out.view(torch.int64).view(-1, 4)  # [N·m/8, 4]
    torch.index_select(_sign_rows(packed.device), 0, packed.reshape(-1).to(torch.int32), out=rows)
    return out


def _scratch_signs(packed: torch.Tensor) -> torch.Tensor:
    """``signs`` into this thread's reused workspace (``harness.from_codes``: a fresh multi-MiB tensor per
    decode step can cost as much in page faults as the unpack itself), valid until its next use."""
    return signs(packed, workspace((*packed.shape[:-1], 8 * packed.shape[-1]), torch.float32, packed.device))


FP16_MAX = torch.finfo(torch.float16).max
CHUNK_BYTES = 2**21  # unpacked sign sketches per product in ``key_scores``: a core's L2 (half of it per thread at 2)


class QJLStore(LayerStore):
    """One layer: QJL keys (sign sketches, fp16 norms, outlier indices) + fp16 key residual; values
    per token at ``value_bits`` + fp16 window. Shapes [B, H_kv, T, D]; sketches [B, H_kv, T, m/8]."""

    def __init__(self, layer_idx: int, info: ModelInfo, method: QJL, owner: bool):
        super().__init__(layer_idx, info)
        self.cfg: QJLConfig = method.config
        self.initial = layer_idx < self.cfg.initial_layers
        self.m, self.m_o, self.n_out = self.cfg.sizes(self.initial, info.head_dim)
        self._method = method  # the projection's owner (a method-level constant, never walked per store)
        # the first store of its class in a cache holds (and counts) the class's projection
        self.projection_held = method.projection(self.initial, info.head_dim, info.device) if owner else None
        self.sign_in = TokenBuffer()  # uint8 [B, H, Tq, m/8]
        self.sign_out = TokenBuffer()  # uint8 [B, H, Tq, m_o/8]
        self.norm = TokenBuffer()  # fp16 [B, H, Tq, 1]: ‖k‖ · 2^-e
        self.norm_out = TokenBuffer()  # fp16 [B, H, Tq, 1]: ‖M_out⊙k‖ · 2^-e
        self.norm_shift = 2.0 ** -math.ceil(math.log2(math.sqrt(info.head_dim)))  # 2^-e: √d · 65504 fits fp16
        self.outlier_idx = TokenBuffer()  # uint8 [B, H, Tq/G, n_out]
        self.k_fp = FullPrecisionSeq()  # fp16 key residual, < B tokens after each append
        self.v_q = QuantizedSeq(self.cfg.value_bits, self.cfg.group, axis=-1)
        self.v_fp = FullPrecisionSeq()
        self._batch: int | None = None

    @property
    def S(self) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self._method.projection(self.initial, self.info.head_dim, self.info.device)

    @property
    def key_counts(self) -> tuple[int, int]:
        """(quantized, fp16) key tokens held."""
        return self.sign_in.n, self.k_fp.length

    @property
    def value_counts(self) -> tuple[int, int]:
        """(quantized, fp16) value tokens held."""
        return self.v_q.length, self.v_fp.length

    # ---- quantization --------------------------------------------------------------------
    def quantize_keys(self, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codes of keys k [B, H, n, D] (n a multiple of G) as the official quant kernel makes them."""
        b, h, n, d = k.shape
        g = self.cfg.group
        kf = k.to(torch.float16).float()  # the official keys are fp16
        S = self.S.to(kf.device)  # noqa: N806
        shift = self.norm_shift  # norms held in fp16 as ‖k‖ · 2^-e (module docstring)
        out: dict[str, torch.Tensor] = {"norm": (kf.norm(dim=-1, keepdim=True) * shift).half()}
        if self.n_out:
            groups = kf.view(b, h, n // g, g, d)
            norms = groups.norm(dim=-2).half()  # [B, H, N, D]: key_states.norm(dim=-2), fp16
            idx = norms.topk(self.n_out, dim=-1).indices  # [B, H, N, n_out]
            mask = torch.zeros(b, h, n // g, d, dtype=torch.bool, device=k.device).scatter_(-1, idx, True)
            mask = mask.unsqueeze(-2).expand(b, h, n // g, g, d).reshape(b, h, n, d)
            k_out = kf * mask
            out["idx"] = idx.to(torch.uint8)
            out["norm_out"] = (k_out.norm(dim=-1, keepdim=True) * shift).half()
            out["sign_out"] = pack_signs((k_out @ S[: self.m_o].T) > 0)  # [B, H, n, m_o/8]
            kf = kf * ~mask
        out["sign_in"] = pack_signs((kf @ S.T) > 0)  # [B, H, n, m/8]
        return out

    def _keep_keys(self, k: torch.Tensor) -> None:
        c = self.quantize_keys(k)
        self.sign_in.append(c["sign_in"])
        self.norm.append(c["norm"])
        if self.n_out:
            self.sign_out.append(c["sign_out"])
            self.norm_out.append(c["norm_out"])
            self.outlier_idx.append(c["idx"])

    def _settle_values(self) -> None:
        n = self.v_fp.length - self.cfg.buffer  # all but the newest B values are quantized
        if n > 0:
            self.v_q.append(self.v_fp.take_front(n))

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        self._batch = keys.shape[0]
        if keys.shape[TOKEN_DIM] == 0:
            return
        prefill = self.sign_in.n + self.k_fp.length == 0
        if not prefill and self.cfg.decode_values == "slide":
            self._settle_values()  # what llama2_qjl.py did after the previous step's attention
        self.k_fp.append(keys)
        total, buffer = self.sign_in.n + self.k_fp.length, self.cfg.buffer
        flush = total - total % buffer - self.sign_in.n  # keys up to the last multiple of B
        if flush > 0:
            self._keep_keys(self.k_fp.take_front(flush))
        self.v_fp.append(values)
        if prefill:
            self._settle_values()  # the prefill split, at once

    # ---- reading ---------------------------------------------------------------------------
    def _masks(self, tq: int, device: torch.device) -> torch.Tensor | None:
        """Outlier channel mask [B, H, Tq, D] (bool) of the quantized keys, or None without outliers."""
        if not self.n_out:
            return None
        idx = self.outlier_idx.value.long()  # [B, H, N, n_out]
        b, h, n, _ = idx.shape
        d, g = self.info.head_dim, self.cfg.group
        mask = torch.zeros(b, h, n, d, dtype=torch.bool, device=device).scatter_(-1, idx, True)
        return mask.unsqueeze(-2).expand(b, h, n, g, d).reshape(b, h, tq, d)

    def _norms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(‖k_in‖, ‖k_out‖) fp32 [B, H, Tq, 1], as the score kernel forms them from the fp16 norms."""
        norm = self.norm.value.float() / self.norm_shift
        if not self.n_out:
            return norm, None
        out = self.norm_out.value.float() / self.norm_shift
        return (norm.square() - out.square()).clamp_min(0).sqrt(), out

    def key_estimates(self) -> torch.Tensor | None:
        """k̂ [B, H, Tq, D] fp32 of the quantized keys: q·k̂ is the kernel's score for every q."""
        tq = self.sign_in.n
        if tq == 0:
            return None
        S = self.S  # noqa: N806
        n_in, n_out = self._norms()
        k_hat = (SQRT_HALF_PI / self.m) * n_in * (_scratch_signs(self.sign_in.value) @ S)  # [B, H, Tq, D]
        mask = self._masks(tq, k_hat.device)
        if mask is None:
            return k_hat
        out = (SQRT_HALF_PI / self.m_o) * n_out * (_scratch_signs(self.sign_out.value) @ S[: self.m_o])
        return torch.where(mask, out, k_hat)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k_hat = self.key_estimates()
        if k_hat is not None and dtype == torch.float16:  # an estimate of a huge key may pass fp16's range
            k_hat = k_hat.clamp(-FP16_MAX, FP16_MAX)
        parts = [p.to(dtype) for p in (k_hat, self.k_fp.read(dtype)) if p is not None]
        if not parts:
            empty = torch.zeros(self._batch or 0, self.info.n_kv_heads, 0, self.info.head_dim, dtype=dtype)
            return empty, empty.clone()
        keys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=TOKEN_DIM)
        values = [p for p in (self.v_q.read(dtype), self.v_fp.read(dtype)) if p is not None]
        return keys, values[0] if len(values) == 1 else torch.cat(values, dim=TOKEN_DIM)

    def key_scores(self, qg: torch.Tensor) -> torch.Tensor:
        """Scores of queries qg [B, H_kv, R, D] (fp32, scaled) against the quantized keys, from the sign
        bits and the sketched query as ``calc_gqa_score_kernel``: [B, H_kv, R, Tq].

        With outliers, the per-group products run over chunks of ``CHUNK_BYTES`` of unpacked ±1 sketches
        (unpacked into the reused workspace, then multiplied while still in cache): each group's matmul
        is the one of the whole batch, so the scores do not depend on the chunking."""
        S = self.S  # noqa: N806
        b, h, r, d = qg.shape
        tq, g = self.sign_in.n, self.cfg.group
        n = tq // g
        n_in, n_out = self._norms()  # [B, H, Tq, 1]
        q_s = qg @ S.T  # [B, H, R, m]: S q
        if not self.n_out:
            sg = _scratch_signs(self.sign_in.value).view(b, h, tq, self.m)
            score = (SQRT_HALF_PI / self.m) * n_in * (sg @ q_s.transpose(-1, -2))
            return score.transpose(-1, -2)
        idx = self.outlier_idx.value.long()  # [B, H, N, n_out]
        q_pick = qg.unsqueeze(2).expand(b, h, n, r, d).gather(-1, idx.unsqueeze(3).expand(b, h, n, r, self.n_out))
        # the workspace holds, 64-byte aligned: S(M_out⊙q) | S(M_in⊙q) | Sᵀ[idx], then the unpacked chunks
        nbh, m, m_o, rows = b * h * n, self.m, self.m_o, idx.reshape(-1)
        step = max(1, CHUNK_BYTES // (4 * g * m))  # groups per chunk
        nq = -(-nbh * r * m // 16) * 16
        ws = workspace((2 * nq + max(rows.numel(), min(step, nbh) * g) * m,), torch.float32, qg.device)
        s_pick = torch.index_select(S.T.contiguous(), 0, rows, out=ws[2 * nq :][: rows.numel() * m].view(-1, m))
        q_out_s = ws[: nbh * r * m].view(b, h, n, r, m)  # S (M_out⊙q) per group
        torch.matmul(q_pick, s_pick.view(b, h, n, self.n_out, m), out=q_out_s)  # Sᵀ[idx]: outlier columns of S
        q_in_s = torch.sub(q_s.unsqueeze(2), q_out_s, out=ws[nq:][: nbh * r * m].view(b, h, n, r, m))
        q_in_s = q_in_s.transpose(-1, -2).flatten(0, 2)  # [B·H·N, m, R]: S(M_in⊙q)
        q_out_s = q_out_s[..., :m_o].transpose(-1, -2).flatten(0, 2)  # [B·H·N, m_o, R]
        bits_in = self.sign_in.value.reshape(nbh, g, m // 8).to(torch.int32)  # the table's row indices, once
        bits_out = self.sign_out.value.reshape(nbh, g, m_o // 8).to(torch.int32)
        inner = torch.empty(nbh, g, r, dtype=torch.float32, device=qg.device)  # ⟨sign, S(M_in⊙q)⟩
        outer = torch.empty_like(inner)  # ⟨sign_out, S[:m_o](M_out⊙q)⟩
        chunk = ws[2 * nq :]  # Sᵀ[idx] is spent
        for i in range(0, nbh, step):
            c = min(step, nbh - i)
            sg = signs(bits_in[i : i + c], chunk[: c * g * m].view(c, g, m))  # [c, G, m]
            torch.bmm(sg, q_in_s[i : i + c], out=inner[i : i + c])
            so = signs(bits_out[i : i + c], chunk[: c * g * m_o].view(c, g, m_o))  # [c, G, m_o]: sg is spent
            torch.bmm(so, q_out_s[i : i + c], out=outer[i : i + c])
        score = (SQRT_HALF_PI / self.m) * n_in * inner.view(b, h, tq, r)
        score = score + (SQRT_HALF_PI / self.m_o) * n_out * outer.view(b, h, tq, r)
        return score.transpose(-1, -2)

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step: scores from the codes (``key_scores``) and the fp16 residual, values from
        their codes (``harness.from_codes.mix_from_codes``) and the fp16 window. [B, H, 1, D]."""
        b, h, _, d = query.shape
        h_kv = self.info.n_kv_heads
        qg = query.reshape(b, h_kv, h // h_kv, d).float() * scaling
        parts = []
        if self.sign_in.n:
            parts.append(self.key_scores(qg))
        if self.k_fp.length:
            parts.append(qg @ self.k_fp.data.float().transpose(-1, -2))
        p = torch.softmax(masked_scores(torch.cat(parts, dim=-1), mask, h_kv), dim=-1)  # [B, H_kv, R, T]
        out, start = 0, 0
        for v in (self.v_q.q, self.v_fp.data):
            if v is None:
                continue
            n = v.shape[-2]
            pv = p[..., start : start + n]
            out = out + (mix_from_codes(pv, v) if isinstance(v, QuantizedTensor) else pv @ v.float())
            start += n
        return out.reshape(b, h, 1, d).to(query.dtype)

    # ---- accounting ------------------------------------------------------------------------
    def _key_buffers(self) -> tuple[TokenBuffer, ...]:
        return self.sign_in, self.sign_out, self.norm, self.norm_out, self.outlier_idx

    def memory(self) -> MemoryReport:
        r = MemoryReport()
        r.add("codes", tensor_bytes(self.sign_in.value) + tensor_bytes(self.sign_out.value))
        r.add("scales", tensor_bytes(self.norm.value) + tensor_bytes(self.norm_out.value))
        r.add("scales", tensor_bytes(self.projection_held))
        r.add("outliers", tensor_bytes(self.outlier_idx.value))
        tq = self.sign_in.n
        elements = (self._batch or 0) * self.info.n_kv_heads * tq * self.info.head_dim if tq else 0
        r.elements = r.quantized_elements = elements
        r.payload_bits = float(elements // self.info.head_dim * (self.m + (self.m_o if self.n_out else 0)))
        r.reserved_bytes = sum(buf.reserved_bytes for buf in self._key_buffers())
        for seq in (self.k_fp, self.v_q, self.v_fp):
            r += seq.memory()
        return r

    def reorder(self, index: torch.Tensor) -> None:
        for buf in self._key_buffers():
            buf.reorder(index)
        for seq in (self.k_fp, self.v_q, self.v_fp):
            seq.reorder(index)


class QJL(KVCacheMethod):
    """QJL (arXiv 2406.03482): keys as 1-bit JL sketches + norms, values per token, fp16 buffers."""

    name = "qjl"
    description = "QJL: keys as sign bits of a JL projection + fp16 norms (outlier channels apart), 2-bit values"
    report = ReportStyle("QJL", "<", "#6a3d9a", rank=72)

    config_class = QJLConfig
    decode_from_codes = True  # decode steps score from the sign bits (QJLStore.attend)

    def __init__(self, config: QJLConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self._projections: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def check_model(self, info: ModelInfo) -> None:
        c, d = self.config, info.head_dim
        if d % c.group:
            raise MethodSpecError(
                f"{self.label}: group={c.group} does not divide head_dim={d} (value ranges run along channels)"
            )
        if d > 256:
            raise MethodSpecError(f"{self.label}: head_dim={d} > 256 (outlier channel indices are uint8)")
        for initial in (True, False):
            m, m_o, n_out = c.sizes(initial, d)
            if n_out >= d:
                raise MethodSpecError(f"{self.label}: {n_out} outlier channels of head_dim={d}; accepted: < {d}")
            if m_o > m:
                raise MethodSpecError(f"{self.label}: outlier sketch m_o={m_o} > m={m} (its rows are S's first m_o)")

    def projection(self, initial: bool, d: int, device: torch.device) -> torch.Tensor:
        """S [m, d] fp32 of a layer class: general then initial drawn from one generator (run_longbench.py)."""
        key = (d, str(device))
        if key not in self._projections:
            g = torch.Generator().manual_seed(self.config.seed)
            general = projection(d, self.config.sizes(False, d)[0], self.config.rotate, g)
            first = projection(d, self.config.sizes(True, d)[0], self.config.rotate, g)
            self._projections[key] = (general.to(device), first.to(device))
        return self._projections[key][0 if not initial else 1]

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        owner = layer_idx in (0, self.config.initial_layers)  # the first layer of its class
        return QJLStore(layer_idx, info, self, owner)
