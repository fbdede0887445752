"""AlignedKV: precision-aligned partial reads of an FP16 KV cache (Tan, Wang, Yan, Deng, arXiv 2409.16546).

AlignedKV saves memory *traffic*, not memory: the cache holds every K/V element as an fp16 value,
stored split into three pieces, and each decode step reads only as many leading bits (8, 12 or 16)
of each value as the dot products it enters can use. Its criterion, "precision alignment": when
terms of different magnitude are added in floating point, a term's bits below the result's last
significant bit are lost anyway, so they need not be fetched. This module follows the official code
(``github.com/AlignedQuant/AlignedKV``, branch ``main`` = ``evaluate`` for these files:
``extension/k_cache_file.py``, ``extension/v_cache_file.py``, ``extension/csrc/K_cache.cu``,
``extension/csrc/V_cache.cu``, ``model/KVCache_AlignedKV.py``); every rule below was read there and
is written here from scratch, with the choices the code leaves open listed as options.

Notation: for an fp16 number x, ``bits(x)`` is its 16-bit pattern (sign, 5 exponent bits, 10
mantissa bits) and ``E(x) = (bits(x) >> 10) & 31`` its biased exponent field (bias 15, sign
ignored). Reading 8 bits = the high byte (sign, exponent, 2 mantissa bits); 12 bits = high byte +
the next 4 mantissa bits; 16 bits = the whole value.

Storage (``k_cache_save`` / ``v_cache_save``). Tokens are grouped in blocks of ``block`` = 64
(the code's ``column_block``, 256 bits / 4). A complete block is held split: the high bytes, and the
low byte as two 4-bit planes (upper nibble "mid", lower nibble "last"), each plane packing two
elements per byte (the even element in the upper nibble). Keys are laid out per block channel-major,
[B, H_kv, blocks, D, block] (the tokens of one channel contiguous, so a per-channel precision skips
whole runs; nibbles pair consecutive tokens); values per token, [B, H_kv, T, D] (nibbles pair
consecutive channels, so a per-token precision skips whole rows). The tokens of the incomplete last
block wait as plain fp16 (the code's ``restk`` / ``restv``) and are always read in full; a block is
split as soon as it is complete, before the step's attention reads the cache. (The key planes
have these shapes here but lie token-major in memory, the same bytes: ``_Split``.)
Per layer, KV head and channel the store also holds the largest exponent field seen in that
channel, for keys and for values (``k_cache_exp_column_max``, one byte each): after the first append
it is ``E`` of the per-channel max over those tokens, later raised to the ``E`` of every new token.
Note the code takes the first append's max over the *signed* values (``torch.max``), the later ones
over magnitudes (``channel_max=code``, default); ``channel_max=abs`` takes magnitudes throughout.

Keys at a decode step (``K_Cache_Class.decoding_compute``, ``k_cache_compute_kernel``). With the
step's post-RoPE query q (the "queries" signal), the exponent of the product term q_d · k_{t,d} is
estimated per channel, for all complete blocks at once, as ``E(q_d) + Emax_k[d]`` (the sum of the
biased exponents); the largest estimate over channels is the reference and ``diff_d`` = reference −
estimate. A channel reads 8 bits when diff_d ≥ 8, 12 bits when 4 ≤ diff_d ≤ 7, else 16: a term 8
exponent steps below the largest keeps 2 mantissa bits, whose resolution equals the last mantissa
bit of the largest term (10 bits, 8 steps up), and likewise 6 bits at 4 steps. GQA (the code serves
only MHA): a KV channel is read once for its whole query group, so it gets the most bits any query
head of the group asks for (the smallest diff_d).

Values at a decode step (``V_Cache_Class.decoding_compute``, ``v_cache_test_compute_kernel``,
``v_cache_compute_kernel``). The attention probabilities s of the step (softmax of the scores
computed from the keys as just read, in fp16 as the code keeps them) decide per token:

1. Output estimate: the complete-block tokens are viewed as rows of ``lanes`` = 32 consecutive
   tokens (the code's ``top_max_k``); per lane (token position within a row) the row with the
   largest s is taken, 32 tokens in all. ô_d = Σ over those tokens of s_t · |v̂_{t,d}|, where v̂ is
   the 8-bit read with its low byte set to 0x80 (the kernel's fill) and the sign cleared; an
   estimate of the output's magnitude per channel, rounded to fp16.
2. Alignment score: a_d = E'(ô_d) + 15 − Emax_v[d], the biased exponent a score would need for
   s · max|v_d| to reach ô_d's exponent; A = min_d a_d (the most demanding channel). E' is what the
   code computes: ``(bits >> 10) & 0x1F - 1``, which Python evaluates as ``& 0x1E`` (the exponent
   with its last bit cleared), while its comment says "- 1" (``o_exp=code``, default;
   ``o_exp=minus1`` takes E − 1). The code subtracts in uint8, which wraps when a_d < 0
   (ô_d < 2^-15 · max|v_d|); here a_d is a signed integer (such a channel then asks for 16 bits).
3. Per token t: d_t = (A << 10) − bits(s_t), i.e. the distance of s_t below 2^(A − 15) measured on
   the fp16 bit pattern (exponent steps, mantissa as fraction). The kernel reads 8 bits when
   d_t ≥ 0x800 and 12 bits when d_t ≥ 0x400: thresholds of 2 and 1 exponent steps
   (``v_steps=code``, default); ``v_steps=aligned`` uses 8 and 4 steps, the keys' rule.
   GQA: per query head, then the most bits over the group.

Reconstruction. Missing bits are filled as the kernel fills them: a missing lower nibble with
0b1000, a missing low byte with 0x80, i.e. the middle of the truncated interval (``fill=mid``,
default; ``fill=zero`` truncates toward zero magnitude). The reconstructed fp16 values are what
``read`` returns, so the model's attention (not fp16 ``hfma2`` accumulation as in the kernel) runs on
them.

Prefill. A multi-token append (the prefill, or a chunk of a chunked prefill) is read in full
16 bits: the code computes prefill attention on the full-precision K/V (``prefill``) and only
serves single-token decode steps otherwise. A first append of one token counts as a prefill, as in
the code (``start_pos == 0``). Perplexity in one 2048-token prefill therefore equals fp16's; the
decode rule acts in generation and in ``wikitext2:prefill_chunk=1`` (one token per step).

Where the harness differs from the code: the store computes s itself (softmax of q·K̂ᵀ·scaling in
fp32, rounded to fp16) over all tokens held, with no attention mask (batch rows are not padded
in the harness; a sliding window is ignored for this estimate); the model then attends with its own
kernel. The uint8 wrap of step 2 is not reproduced. Step 2 is per head here, as the paper describes
it: each query head's own estimate ô against its KV head's maxima. The code (main at 080930a19626)
is not: ``V_Cache_Class.decoding_compute`` (``extension/v_cache_file.py``) adds ``test_o_exp``
[B, H, 1, D] to 15 − ``v_cache_exp_column_max`` [B, 1, H, D], which broadcasts to [B, H, H, D], and
takes the min over D ([B, H, H, 1]); ``v_cache_compute`` (``extension/csrc/V_cache.cu``, batch stride
``n_local_kv_heads``) then reads element b·H + h of that, which for the first batch row is head 0's
estimate against head h's maxima, for every head h.

Accounting. ``memory()`` holds exactly fp16's bytes for the K/V (split planes + fp16 tail, under
``fp_tokens``, 16 payload bits per element) plus the two exponent-maximum bytes per KV head and
channel (``scales``). ``last_read_bytes()`` is what the latest ``read`` touched: after a multi-token
append every byte held of the K/V; after a decode step the complete blocks at their chosen widths
(8/12/16 bits per element), the fp16 tail in full, the exponent maxima (2 · D bytes per KV head) and
the value estimate's 32 high bytes per channel per query head. ``last_read`` splits it into
``k`` / ``v`` / ``meta``; ``stats()`` sums, over the decode steps of a cache, the bytes read, the
K/V bytes held at those reads, and the elements read at 8 / 12 / 16 bits.

Decode cost. In the code a decode step is the attention itself: ``k_cache_compute`` reads each key
channel at its width inside the q·Kᵀ kernel, the softmax is the attention's, and ``v_cache_compute``
reads each value token at its width inside the s·V kernel; what the method adds to a plain fp16
attention is the per-step precision selection (the key widths from E(q) and the channel maxima; for
the values ``test_compute``: the per-lane maximum of s, the 32-token estimate ``v_cache_test_compute``,
the alignment minimum, and the per-token comparison the kernel makes) and the bit assembly of each
element, fused there into the reads. Here ``read`` must hand the model K̂ / V̂ for its own attention,
so a step also computes the probabilities once more than the model does (q·K̂ᵀ and the softmax, for
the value rule) and assembles K̂ / V̂ from the byte planes with tensor ops into the model's dtype;
those two are this implementation's, the selection is the method's. Each piece timed alone against
int4's step and a plain fp16 read of the same tokens: ``python tests/bench/method_parts.py alignedkv``
(the numbers are in docs/results.md).

Options: ``block`` (64, even, a multiple of ``lanes``), ``lanes`` (32), ``fill`` (mid, zero),
``channel_max`` (code, abs), ``o_exp`` (code, minus1), ``v_steps`` (code, aligned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from harness.from_codes import workspace
from harness.integration import attention_scaling
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
from harness.options import OneOf, PositiveInt

TOKEN_DIM = -2
EXP_BIAS = 15
WIDTHS = (8, 12, 16)
KEY_STEPS = (4, 8)  # exponent steps below the reference: 12 bits from 4, 8 bits from 8
VALUE_STEPS = {"code": (1, 2), "aligned": (4, 8)}
# the low byte kept (mask) and the bits put in place of the dropped ones (fill), per width
KEEP = {8: 0x00, 12: 0xF0, 16: 0xFF}
FILL = {"mid": {8: 0x80, 12: 0x08, 16: 0x00}, "zero": {8: 0x00, 12: 0x00, 16: 0x00}}
ESTIMATE_FILL = 0x80  # the value estimate's 8-bit reads always use the kernel's 0x80


@dataclass
class AlignedKVConfig(MethodConfig):
    block: Annotated[int, Field(ge=2)] = 64  # tokens per block (the code's column_block); the tail stays fp16
    lanes: PositiveInt = 32  # tokens sampled for the value estimate (the code's top_max_k)
    fill: OneOf("mid", "zero") = "mid"  # dropped bits: "mid" = 0b1000... as the kernels, "zero"
    channel_max: OneOf("code", "abs") = "code"  # "code": signed max at the first append, magnitudes after
    o_exp: OneOf("code", "minus1") = "code"  # "code": E(o) & 0b11110 as the code evaluates; "minus1": E(o) - 1
    v_steps: OneOf(*VALUE_STEPS) = "code"  # "code": values drop at 1 / 2 steps (0x400 / 0x800); "aligned": 4 / 8

    aliases: ClassVar[dict[str, str]] = {"column_block": "block", "top_max_k": "lanes"}

    def validate(self) -> None:
        if self.block % 2 or self.block % self.lanes:
            raise MethodSpecError(
                f"alignedkv: block={self.block}, lanes={self.lanes}; block must be even and a multiple of lanes"
            )


# --------------------------------------------------------------------------------------------
# fp16 bit patterns and the byte split
# --------------------------------------------------------------------------------------------


def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """The fp16 bit pattern of ``x`` (rounded to fp16) as int32 in [0, 65535]."""
    return x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp16 values of int32 bit patterns in [0, 65535]."""
    return bits.to(torch.int16).view(torch.float16)  # int32 -> int16 wraps to the same 16 bits


def exponent_field(x: torch.Tensor) -> torch.Tensor:
    """The biased fp16 exponent field E(x) (sign ignored), int32 in [0, 31]."""
    return (fp16_bits(x) >> 10) & 0x1F


def _pack_nibbles(x: torch.Tensor) -> torch.Tensor:
    """4-bit values [..., 2n] -> bytes [..., n], the even element in the upper nibble."""
    return ((x[..., 0::2] << 4) | x[..., 1::2]).to(torch.uint8)


def split_bytes(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 bit patterns [..., 2n] -> (high bytes [..., 2n], mid nibbles [..., n], last nibbles [..., n])."""
    return (bits >> 8).to(torch.uint8), _pack_nibbles((bits >> 4) & 0xF), _pack_nibbles(bits & 0xF)


def low_bytes(mid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The low bytes [..., 2n] (uint8) of the elements whose nibbles ``mid`` / ``last`` [..., n] hold:
    an even element's are the upper nibbles of both planes, an odd element's the lower ones."""
    even = (mid & 0xF0) | (last >> 4)
    odd = (mid << 4) | (last & 0x0F)  # uint8 shift drops the upper nibble
    return torch.stack([even, odd], dim=-1).flatten(-2)


def join_fp16(
    hi: torch.Tensor,
    mid: torch.Tensor,
    last: torch.Tensor,
    keep: torch.Tensor | None = None,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inverse of ``split_bytes``, as fp16 values; with ``keep`` / ``fill`` (uint8, broadcast over
    the elements) the low byte is ``(low & keep) | fill``: a partial read."""
    low = low_bytes(mid, last)
    if keep is not None:
        low = (low & keep) | fill
    return ((hi.to(torch.int16) << 8) | low.to(torch.int16)).view(torch.float16)  # int16 shift wraps


def join_bytes(
    hi: torch.Tensor,
    mid: torch.Tensor,
    last: torch.Tensor,
    keep: torch.Tensor | None = None,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """``join_fp16`` as int32 bit patterns in [0, 65535]."""
    if keep is not None:
        keep, fill = torch.as_tensor(keep, dtype=torch.uint8), torch.as_tensor(fill, dtype=torch.uint8)
    return fp16_bits(join_fp16(hi, mid, last, keep, fill))


_MASKS: dict[tuple, torch.Tensor] = {}  # (fill, pair, device) -> [2, 3]: keep, fill for 8 / 12 / 16 bits


def width_masks(width: torch.Tensor, fill: str, pair: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (keep, fill) low-byte masks (uint8) for read widths of 8 / 12 / 16 bits; ``pair``:
    the byte twice in an int16, for the low bytes of two elements read at the same width."""
    table = _MASKS.get((fill, pair, width.device))
    if table is None:
        rows = [[KEEP[w] for w in WIDTHS], [FILL[fill][w] for w in WIDTHS]]
        if pair:  # 0xHH -> 0xHHHH as a signed int16
            rows = [[(x * 0x101 + 0x8000) % 0x10000 - 0x8000 for x in r] for r in rows]
        table = torch.tensor(rows, dtype=torch.int16 if pair else torch.uint8, device=width.device)
        _MASKS[fill, pair, width.device] = table
    masks = table.index_select(1, ((width.flatten() - 8) >> 2).long())  # 8, 12, 16 -> 0, 1, 2
    return masks[0].view(width.shape), masks[1].view(width.shape)


# --------------------------------------------------------------------------------------------
# The precision rules (pure functions: tests feed them by hand)
# --------------------------------------------------------------------------------------------


def width_from_steps(steps: torch.Tensor, thresholds: tuple[int, int]) -> torch.Tensor:
    """8 bits where ``steps >= thresholds[1]``, 12 where ``>= thresholds[0]``, else 16 (int32)."""
    mid, low = thresholds
    return torch.where(steps >= low, 8, torch.where(steps >= mid, 12, 16)).to(torch.int32)


def key_widths(q_exp: torch.Tensor, k_emax: torch.Tensor) -> torch.Tensor:
    """Bits read per KV channel for the complete key blocks.

    q_exp [B, H, D]: E of the step's query; k_emax [B, H_kv, D]: the key channels' exponent maxima.
    Term exponent estimate e = E(q_d) + Emax_k[d]; diff = max_d e − e per query head; a KV channel
    takes the smallest diff over its query group; 8 bits from 8 steps, 12 from 4 -> [B, H_kv, D].
    """
    b, h, d = q_exp.shape
    h_kv = k_emax.shape[1]
    est = q_exp.reshape(b, h_kv, h // h_kv, d) + k_emax.unsqueeze(2)  # [B, H_kv, G, D]
    diff = (est.amax(-1, keepdim=True) - est).amin(2)
    return width_from_steps(diff, KEY_STEPS)


def alignment_score(
    s: torch.Tensor, v_hi: torch.Tensor, v_emax: torch.Tensor, lanes: int, o_exp: str = "code"
) -> torch.Tensor:
    """The value rule's alignment exponent A per query head (steps 1-2 of the module docstring).

    s [B, H_kv, G, P] fp16 probabilities of the complete-block tokens (P a multiple of ``lanes``);
    v_hi [B, H_kv, P, D] the values' high bytes; v_emax [B, H_kv, D] -> A [B, H_kv, G] (int32).
    """
    b, h_kv, g, p = s.shape
    rows = s.float().view(b, h_kv, g, p // lanes, lanes)
    s_top, row = rows.max(dim=-2)  # [B, H_kv, G, lanes]: per lane, the row with the largest s
    token = row * lanes + torch.arange(lanes, device=s.device)
    d = v_hi.shape[-1]
    picked = v_hi.unsqueeze(2).expand(b, h_kv, g, p, d)  # [B, H_kv, P, D] high bytes, per query head
    picked = picked.gather(3, token.unsqueeze(-1).expand(*token.shape, d)).to(torch.int32)  # [B, H_kv, G, lanes, D]
    v8 = from_bits(((picked << 8) | ESTIMATE_FILL) & 0x7FFF).float()  # 8-bit read, sign cleared
    o_hat = (s_top.unsqueeze(-1) * v8).sum(-2)  # [B, H_kv, G, D]
    e_o = exponent_field(o_hat)
    e_o = e_o & 0x1E if o_exp == "code" else e_o - 1
    align = e_o + EXP_BIAS - v_emax.unsqueeze(2)  # signed (the code's uint8 would wrap below 0)
    return align.amin(-1)


def value_widths(s: torch.Tensor, align: torch.Tensor, steps: tuple[int, int]) -> torch.Tensor:
    """Bits read per complete-block value token (step 3): s [B, H_kv, G, P] fp16, A [B, H_kv, G]
    -> [B, H_kv, P], the most bits over each query group."""
    dist = (align.unsqueeze(-1) << 10) - fp16_bits(s)  # distance below 2^(A-15), on the bit patterns
    # the most bits over the group = the bits of the smallest distance (fewer bits the farther below)
    return width_from_steps(dist.amin(2), (steps[0] << 10, steps[1] << 10))


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class _Split:
    """Complete blocks held as high bytes + two nibble planes, growing along the token axis.

    ``planes`` are the code's layouts: keys (``channel_major``) [B, H, blocks, D, block], nibbles
    pairing tokens; values [B, H, T, D], nibbles pairing channels. In memory both are token-major
    (keys: [B, H, T, D] high bytes, [B, H, T/2, D] nibbles of token pairs), so that a read writes
    [B, H, T, D] without a transpose; the bytes held are the same.
    """

    def __init__(self, block: int, channel_major: bool):
        self.block, self.channel_major = block, channel_major
        self.held: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # token-major
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        """Add complete blocks: fp16 tokens [B, H, n, D], n a multiple of ``block``."""
        bits = fp16_bits(x)
        if self.channel_major:  # nibbles pair tokens 2i, 2i + 1: [B, H, n/2, D]
            new = ((bits >> 8).to(torch.uint8), *(_pack_nibbles(p.transpose(-1, -2)).transpose(-1, -2)
                                                   for p in ((bits >> 4) & 0xF, bits & 0xF)))  # fmt: skip
        else:
            new = split_bytes(bits)
        new = tuple(p.contiguous() for p in new)
        if self.held is not None:  # tokens (or token pairs) are dim 2 of every plane
            new = tuple(torch.cat([a, c], dim=2) for a, c in zip(self.held, new, strict=True))
        self.held = new
        self.length += x.shape[TOKEN_DIM]

    @property
    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(high bytes, mid nibbles, last nibbles) in the code's layout (views of what is held)."""
        if self.held is None or not self.channel_major:
            return self.held
        b, h, t, d = self.held[0].shape
        return tuple(p.view(b, h, t // self.block, -1, d).transpose(-1, -2) for p in self.held)

    def read(
        self, width: torch.Tensor | None = None, fill: str = "mid", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp16 values [B, H, T, D] read at ``width`` (keys: [B, H, D] per channel; values:
        [B, H, T] per token; None = 16 bits), converted into ``out`` ([B, H, T, D]) when given."""
        hi, mid, last = self.held
        b, h, t, d = hi.shape
        n = hi.numel()
        # scratch reused from read to read (uint8, 6.5 N bytes): the bits and a temporary (int16 [N] each),
        # int16 words of two low bytes ([N/2]), and even / odd / tmp (uint8 [N/2]): the low bytes of the
        # elements paired in a nibble byte ([B, H, T/2, D] keys / [B, H, T, D/2] values)
        ws = workspace((13 * n // 2,), torch.uint8, hi.device)
        bits, wide = (ws[i : i + 2 * n].view(torch.int16).view(hi.shape) for i in (0, 2 * n))
        words = ws[4 * n : 5 * n].view(torch.int16).view(mid.shape)
        even, odd, tmp = (ws[i : i + n // 2].view(mid.shape) for i in (5 * n, 11 * n // 2, 6 * n))
        torch.bitwise_and(mid, 0xF0, out=even)
        even |= torch.bitwise_right_shift(last, 4, out=tmp)
        torch.bitwise_left_shift(mid, 4, out=odd)  # uint8 shift drops the upper nibble
        odd |= torch.bitwise_and(last, 0x0F, out=tmp)
        if self.channel_major:  # tokens 2i and 2i + 1: the even and odd rows, one width per channel
            if width is not None:
                keep, filler = (m.view(b, h, 1, d) for m in width_masks(width, fill))
                for low in (even, odd):
                    low &= keep
                    low |= filler
            bits.copy_(hi)
            bits <<= 8  # int16 shift wraps to the same 16 bits
            rows = bits.unflatten(2, (t // 2, 2))
            rows[:, :, :, 0] |= words.copy_(even)
            rows[:, :, :, 1] |= words.copy_(odd)
        else:  # channels 2j and 2j + 1: int16 words of their low bytes, the even one first (little-endian)
            words.copy_(odd)
            words <<= 8
            words |= wide.view(-1)[: n // 2].view(mid.shape).copy_(even)
            if width is not None:  # one width per token: both bytes of a word
                keep, filler = (m.view(b, h, t, 1) for m in width_masks(width, fill, pair=True))
                words &= keep
                words |= filler
            bits.copy_(words.view(torch.uint8).view(hi.shape))  # the low bytes in channel order
            wide.copy_(hi)
            wide <<= 8
            bits |= wide
        x = bits.view(torch.float16)
        return x.clone() if out is None else out.copy_(x)  # the scratch is reused by the next read

    @property
    def high_bytes(self) -> torch.Tensor:
        """Value high bytes [B, H, T, D] (values only)."""
        return self.held[0]

    def nbytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.held) if self.held is not None else 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.held is not None:
            self.held = tuple(p.index_select(0, index) for p in self.held)


class AlignedKVStore(LayerStore):
    """fp16 K/V split into byte planes per complete block, an fp16 tail, and per-channel exponent maxima."""

    def __init__(self, layer_idx: int, info: ModelInfo, config: AlignedKVConfig, scaling: float | None = None):
        super().__init__(layer_idx, info)
        self.cfg = config
        self.scaling = scaling if scaling is not None else info.head_dim**-0.5
        self.k_split = _Split(config.block, channel_major=True)
        self.v_split = _Split(config.block, channel_major=False)
        self.k_tail: torch.Tensor | None = None  # [B, H_kv, r, D] fp16, r < block
        self.v_tail: torch.Tensor | None = None
        self.k_emax: torch.Tensor | None = None  # [B, H_kv, D] uint8
        self.v_emax: torch.Tensor | None = None
        self._query: torch.Tensor | None = None  # the decode step's post-RoPE query [B, H, 1, D]
        self._batch: int | None = None
        self.last_widths: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys [B,H_kv,D], values [B,H_kv,P])
        # the latest read: fixed byte counts (k, v, meta) + elements read at 8/12/16 bits (keys, values),
        # kept as a tensor so that decoding never waits for the device; summed over decode reads likewise
        self._last: tuple[list[int], torch.Tensor | None] | None = None
        self._sum_fixed = [0, 0, 0, 0]  # k tail, v tail, meta, K/V bytes held at the read
        self._sum_elems: torch.Tensor | None = None  # [6]: keys at 8/12/16 bits, values at 8/12/16 bits

    @property
    def length(self) -> int:
        return self.k_split.length + (0 if self.k_tail is None else self.k_tail.shape[TOKEN_DIM])

    # ---- store -------------------------------------------------------------------------------
    def _update_emax(self, old: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if old is None and self.cfg.channel_max == "code":
            new = exponent_field(x.amax(TOKEN_DIM))  # the code's first append: E of the signed max
        else:
            new = exponent_field(x).amax(TOKEN_DIM)
        new = new.to(torch.uint8)
        return new if old is None else torch.maximum(old, new)

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        b, _, n, _ = keys.shape
        self._batch = b
        if n == 0:
            return
        first = self.length == 0
        k16, v16 = keys.to(torch.float16), values.to(torch.float16)
        self.k_emax = self._update_emax(self.k_emax, k16)
        self.v_emax = self._update_emax(self.v_emax, v16)
        self.k_tail = k16 if self.k_tail is None else torch.cat([self.k_tail, k16], dim=TOKEN_DIM)
        self.v_tail = v16 if self.v_tail is None else torch.cat([self.v_tail, v16], dim=TOKEN_DIM)
        full = self.k_tail.shape[TOKEN_DIM] // self.cfg.block * self.cfg.block
        if full:  # complete blocks are split right away (before this step's attention)
            self.k_split.append(self.k_tail[..., :full, :])
            self.v_split.append(self.v_tail[..., :full, :])
            self.k_tail, self.v_tail = self.k_tail[..., full:, :].contiguous(), self.v_tail[..., full:, :].contiguous()
        decode = n == 1 and not first
        self._query = obs.queries if decode else None

    def _held_kv_bytes(self) -> int:
        return self.k_split.nbytes() + self.v_split.nbytes() + tensor_bytes(self.k_tail) + tensor_bytes(self.v_tail)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h_kv, d = self._batch or 0, self.info.n_kv_heads, self.info.head_dim
        if self.length == 0:
            empty = torch.zeros(b, h_kv, 0, d, dtype=dtype, device=self.info.device)
            self._last = ([0, 0, 0], None)
            return empty, empty.clone()
        p = self.k_split.length
        if self._query is None or p == 0:  # multi-token append, or nothing split yet: 16 bits
            k_bytes = self.k_split.nbytes() + tensor_bytes(self.k_tail)
            self._last = ([k_bytes, self._held_kv_bytes() - k_bytes, 0], None)
            self.last_widths = None
            return self._join(self.k_split, None, self.k_tail, dtype), self._join(
                self.v_split, None, self.v_tail, dtype
            )
        return self._decode_read(dtype)

    def _join(self, split: _Split, width: torch.Tensor | None, tail: torch.Tensor | None, dtype) -> torch.Tensor:
        """The complete blocks read at ``width`` followed by the fp16 tail, as ``dtype`` [B, H_kv, T, D]."""
        p, r = split.length, 0 if tail is None else tail.shape[TOKEN_DIM]
        b, h_kv, d = self._batch, self.info.n_kv_heads, self.info.head_dim
        out = torch.empty(b, h_kv, p + r, d, dtype=dtype, device=self.info.device)
        if p:
            split.read(width, self.cfg.fill, out=out[..., :p, :])
        if r:
            out[..., p:, :].copy_(tail)
        return out

    def _decode_read(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._query  # [B, H, 1, D]
        b, h, _, d = q.shape
        h_kv, g = self.info.n_kv_heads, h // self.info.n_kv_heads
        p = self.k_split.length
        # keys: one width per KV channel for all complete blocks
        k_width = key_widths(exponent_field(q[:, :, 0, :]), self.k_emax.to(torch.int32))  # [B, H_kv, D]
        k_hat = self._join(self.k_split, k_width, self.k_tail, dtype)
        # values: the step's probabilities from the keys as read, then one width per token
        scores = torch.matmul(q.float().reshape(b, h_kv, g, d), k_hat.float().transpose(-1, -2)) * self.scaling
        s = torch.softmax(scores, dim=-1).to(torch.float16)  # [B, H_kv, G, T], fp16 as the code keeps it
        s_full = s[..., :p]
        align = alignment_score(
            s_full, self.v_split.high_bytes, self.v_emax.to(torch.int32), self.cfg.lanes, self.cfg.o_exp
        )
        v_width = value_widths(s_full, align, VALUE_STEPS[self.cfg.v_steps])  # [B, H_kv, P]
        v_hat = self._join(self.v_split, v_width, self.v_tail, dtype)
        # bytes read: the fp16 tails in full, the complete blocks at their widths, and the metadata
        tail = tensor_bytes(self.k_tail)
        meta = tensor_bytes(self.k_emax) + tensor_bytes(self.v_emax) + b * h * self.cfg.lanes * d
        elems = torch.cat([_width_counts(k_width) * p, _width_counts(v_width) * d])  # int64 [6]
        self._last = ([tail, tail, meta], elems)
        self.last_widths = (k_width, v_width)
        for i, x in enumerate((tail, tail, meta, self._held_kv_bytes())):
            self._sum_fixed[i] += x
        self._sum_elems = elems if self._sum_elems is None else self._sum_elems + elems
        return k_hat, v_hat

    @staticmethod
    def _bytes(fixed: list[int], elems: torch.Tensor | None) -> dict[str, int]:
        """{k, v, meta} bytes from fixed counts + elements read at 8 / 12 / 16 bits."""
        out = dict(zip(("k", "v", "meta"), fixed[:3], strict=True))
        if elems is not None:
            n = elems.tolist()
            out["k"] += sum(w * x for w, x in zip(WIDTHS, n[:3], strict=True)) // 8
            out["v"] += sum(w * x for w, x in zip(WIDTHS, n[3:], strict=True)) // 8
        return out

    @property
    def last_read(self) -> dict[str, int] | None:
        """Bytes the latest ``read`` fetched: keys, values, metadata (None before any read)."""
        return None if self._last is None else self._bytes(*self._last)

    def last_read_bytes(self) -> int | None:
        last = self.last_read
        return None if last is None else sum(last.values())

    def memory(self) -> MemoryReport:
        r = MemoryReport()
        r.add("fp_tokens", self._held_kv_bytes())
        r.add("scales", tensor_bytes(self.k_emax) + tensor_bytes(self.v_emax))
        r.elements = 2 * (self._batch or 0) * self.info.n_kv_heads * self.length * self.info.head_dim
        r.payload_bits = 16.0 * r.elements
        return r

    def stats(self) -> dict[str, list[float]]:
        """Summed over this cache's decode steps: bytes read (k, v, meta), K/V bytes held at those
        reads, and key / value elements read at 8 / 12 / 16 bits (nothing before a decode read)."""
        if self._sum_elems is None:
            return {}
        read = self._bytes(self._sum_fixed, self._sum_elems)
        n = [float(x) for x in self._sum_elems.tolist()]
        return {
            "read_bytes": [float(read["k"]), float(read["v"]), float(read["meta"])],
            "held_bytes": [float(self._sum_fixed[3])],
            "k_bits": n[:3],
            "v_bits": n[3:],
        }

    def reorder(self, index: torch.Tensor) -> None:
        self.k_split.reorder(index)
        self.v_split.reorder(index)
        for name in ("k_tail", "v_tail", "k_emax", "v_emax", "_query"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        self._batch = len(index)


def _width_counts(width: torch.Tensor) -> torch.Tensor:
    """How many entries of ``width`` are 8 / 12 / 16 (int64 [3])."""
    return torch.bincount((width.flatten() - 8) >> 2, minlength=3)


class AlignedKV(KVCacheMethod):
    """AlignedKV (arXiv 2409.16546): precision-aligned partial reads of an fp16 KV cache at decode."""

    name = "alignedkv"
    description = "AlignedKV: fp16 held, 8/12/16 bits read per key channel / value token by precision alignment"
    report = ReportStyle("AlignedKV", "*", "C6", rank=70)

    config_class = AlignedKVConfig
    signals = frozenset({"queries"})

    def __init__(self, config: AlignedKVConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.scaling: float | None = None

    def check_model(self, info: ModelInfo) -> None:
        if info.head_dim % 2:
            raise MethodSpecError(
                f"{self.label}: head_dim={info.head_dim} is odd; the value nibble planes pair channels"
            )

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        """Read the attention scaling the model uses (for the probabilities the store computes)."""
        self.scaling = attention_scaling(model)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return AlignedKVStore(layer_idx, info, self.config, self.scaling)
