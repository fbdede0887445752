"""Token-sequence containers that methods compose into their ``LayerStore``.

* ``FullPrecisionSeq`` — tokens kept as 16-bit floats (the fp16 method, residual windows, sinks).
* ``TokenBuffer`` — a tensor growing along the token axis into spare capacity (amortised O(1)
  appends; the spare is reported as ``reserved_bytes``, beside the accounting); the sequences below
  keep their tensors in it.
* ``QuantizedSeq`` — tokens kept as packed codes + fp16 scale/zero (``harness.quant``), growing
  along the token axis. The group layout is fixed per sequence (per-token groups along channels, or
  per-channel groups of ``group`` tokens); each append must hold whole groups.
* ``SeqPairStore`` — one container for keys, one for values (fp16, uniform INT-N).
* ``WindowedPairStore`` — keys per channel and values per token, each as [quantized | fp16 window]
  (KIVI, KVmix, XQuant); subclasses say only when window tokens move into the quantized part.

Both report the bytes they really hold; nothing keeps a full-precision copy of quantized history.
Shapes: [B, H_kv, T, D].
"""

from __future__ import annotations

import torch

from harness.from_codes import decode_attention_over
from harness.interface import LayerStore, MemoryReport, ModelInfo, Observation, tensor_bytes
from harness.quant import QuantizedTensor, quantize

TOKEN_DIM = -2


def held_memory(t: QuantizedTensor | torch.Tensor | None) -> MemoryReport:
    """The accounting of one held tensor: packed codes + fp16 scale/zero, or float tokens."""
    r = MemoryReport()
    if isinstance(t, QuantizedTensor):
        r.add("codes", t.code_bytes)
        r.add("scales", t.meta_bytes)
        r.elements = r.quantized_elements = t.numel
        r.payload_bits = float(t.numel * t.bits)
    elif t is not None:
        r.add("fp_tokens", tensor_bytes(t))
        r.elements = r.fp_elements = t.numel()
        r.payload_bits = float(t.numel() * t.element_size() * 8)
    return r


class TokenBuffer:
    """A tensor [..., T, X] that grows along the token axis (-2) in place.

    Appends write into spare capacity; when it runs out, the buffer grows to the tokens held plus
    max(``GROW_MIN``, 1/8 of them) (amortised O(1) per appended token: no copy of the history per
    decode step, as concatenation makes). The first append keeps the tensor it is given, with no
    spare (a prefill allocates exactly what it holds). ``take_front`` drops the oldest tokens by
    moving a start offset; the live tokens move to a new buffer when an append needs the room.
    ``value`` is a view of the live tokens; ``reserved_bytes`` the capacity around them that holds
    no token (reported beside, never inside, a store's accounting).
    """

    GROW_MIN = 64

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None  # [..., capacity, X]
        self.start = 0
        self.n = 0

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.buf is None or self.n == 0 else self.buf[..., self.start : self.start + self.n, :]

    def append(self, x: torch.Tensor) -> None:
        t = x.shape[TOKEN_DIM]
        if t == 0:
            return
        if self.buf is None or self.n == 0:
            self.buf, self.start, self.n = x, 0, t
            return
        if self.start + self.n + t > self.buf.shape[TOKEN_DIM]:
            self._move(self.n + t)  # also when the buffer is still the caller's first tensor
        end = self.start + self.n
        self.buf[..., end : end + t, :].copy_(x)
        self.n += t

    def take_front(self, n: int) -> torch.Tensor:
        """Remove and return (a copy of) the oldest ``n`` tokens. Once the dropped front outgrows
        both ``GROW_MIN`` and the live tokens, these move to a buffer of their size plus the usual
        spare (a 2048-token prefill that keeps a 128-token window must not hold 2048 tokens' room;
        each move copies fewer tokens than were dropped since the last, so appends stay O(1))."""
        assert self.buf is not None and n <= self.n
        front = self.buf[..., self.start : self.start + n, :].clone()
        self.start, self.n = self.start + n, self.n - n
        if self.start >= max(self.GROW_MIN, self.n):
            self._move(self.n)
        return front

    def _move(self, need: int) -> None:
        """Copy the live tokens to the front of a new buffer with room for ``need`` tokens plus
        max(``GROW_MIN``, need / 8)."""
        live = self.buf[..., self.start : self.start + self.n, :]
        shape = (*live.shape[:-2], need + max(self.GROW_MIN, need // 8), live.shape[-1])
        self.buf = torch.empty(shape, dtype=live.dtype, device=live.device)
        self.buf[..., : self.n, :].copy_(live)
        self.start = 0

    @property
    def reserved_bytes(self) -> int:
        if self.buf is None:
            return 0
        row = self.buf[..., :1, :]
        return (self.buf.shape[TOKEN_DIM] - self.n) * row.numel() * row.element_size()

    def reorder(self, index: torch.Tensor) -> None:
        """Select along the batch axis (beam search); the result holds no spare capacity."""
        if self.n:
            self.buf, self.start = self.value.index_select(0, index), 0


class FullPrecisionSeq:
    """Tokens held in a float dtype: fp16 by default (the papers' reference); ``dtype=None`` keeps
    the model's compute dtype (the ``full`` method: no rounding at all). Stored in a ``TokenBuffer``."""

    def __init__(self, dtype: torch.dtype | None = torch.float16):
        self.dtype = dtype
        self.tokens = TokenBuffer()

    @property
    def data(self) -> torch.Tensor | None:
        """The tokens held, [B, H, T, D] (a view of the buffer), or None."""
        return self.tokens.value

    @property
    def length(self) -> int:
        return self.tokens.n

    def append(self, x: torch.Tensor) -> None:
        self.tokens.append(x.to(self.dtype) if self.dtype is not None else x)

    def take_front(self, n: int) -> torch.Tensor:
        """Remove and return the oldest ``n`` tokens (to hand them to a quantizer)."""
        return self.tokens.take_front(n)

    def read(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.data is None:
            return None
        return self.data.to(dtype) if out is None else out.copy_(self.data)

    def memory(self) -> MemoryReport:
        r = held_memory(self.data)
        r.reserved_bytes = self.tokens.reserved_bytes
        return r

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens.reorder(index)


class QuantizedSeq:
    """Tokens held as packed integer codes with fp16 scale/zero-point, each in a ``TokenBuffer``.

    ``axis=-1``: one range per token per group of ``group`` channels (per-token quantization).
    ``axis=-2``: one range per channel per group of ``group`` consecutive tokens (per-channel).
    A subclass changes how a part is quantized (``quantize_part``), not how it is kept.
    """

    def __init__(self, bits: int, group: int, axis: int, symmetric: bool = False):
        if axis not in (-1, -2):
            raise ValueError("axis must be -1 (per token) or -2 (per channel)")
        self.bits, self.group, self.axis, self.symmetric = bits, group, axis, symmetric
        self.codes, self.scale, self.zero = TokenBuffer(), TokenBuffer(), TokenBuffer()

    @property
    def q(self) -> QuantizedTensor | None:
        """What is held, as one ``QuantizedTensor`` of views into the buffers, or None."""
        if self.codes.n == 0:
            return None
        return QuantizedTensor(self.codes.value, self.scale.value, self.zero.value, self.bits, self.axis, self.group)

    @property
    def length(self) -> int:
        return self.codes.n

    def quantize_part(self, x: torch.Tensor) -> QuantizedTensor:
        return quantize(x, self.bits, self.group, self.axis, self.symmetric)

    @property
    def layout(self) -> tuple:
        """What decides the codes of a token: (bits, group, axis, symmetric)."""
        return self.bits, self.group, self.axis, self.symmetric

    def append(self, x: torch.Tensor) -> None:
        """Quantize and store ``x`` [B, H, T, D]; with axis=-2, T must be a multiple of ``group``."""
        if x.shape[TOKEN_DIM] == 0:
            return
        self.keep(self.quantize_part(x))

    def keep(self, part: QuantizedTensor) -> None:
        """Store an already quantized part (this sequence's layout) after the tokens held."""
        self.codes.append(part.codes)
        self.scale.append(part.scale)
        if part.zero is not None:
            self.zero.append(part.zero)

    def read(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        q = self.q
        return None if q is None else q.dequantize(dtype, out=out)

    def memory(self) -> MemoryReport:
        r = held_memory(self.q)
        r.reserved_bytes = self.codes.reserved_bytes + self.scale.reserved_bytes + self.zero.reserved_bytes
        return r

    def reorder(self, index: torch.Tensor) -> None:
        for buf in (self.codes, self.scale, self.zero):
            buf.reorder(index)


Seq = FullPrecisionSeq | QuantizedSeq


def read_tokens(seqs: list[Seq], dtype: torch.dtype) -> torch.Tensor | None:
    """The tokens of ``seqs`` in order, as one [B, H, T, D] tensor of ``dtype``: each sequence
    writes its reconstruction straight into its slice (no per-part tensors, no concatenation copy)."""
    present = [s for s in seqs if s.length]
    if len(present) <= 1:
        return present[0].read(dtype) if present else None
    first = present[0].data if isinstance(present[0], FullPrecisionSeq) else present[0].q.codes
    b, h, _, _ = first.shape
    d = present[0].data.shape[-1] if isinstance(present[0], FullPrecisionSeq) else present[0].q.shape[-1]
    out = torch.empty(b, h, sum(s.length for s in present), d, dtype=dtype, device=first.device)
    start = 0
    for s in present:
        s.read(dtype, out=out[..., start : start + s.length, :])
        start += s.length
    return out


def held_parts(seqs: list[Seq]) -> list[QuantizedTensor | torch.Tensor]:
    """What the non-empty sequences hold, in token order (codes or float tokens), for
    ``harness.from_codes.decode_attention_over``: a ``FullPrecisionSeq``'s tokens, any other
    sequence's ``QuantizedTensor`` ``q`` (a ``QuantizedSeq``, or a sequence that pairs codes held
    elsewhere with its own scales)."""
    return [s.data if isinstance(s, FullPrecisionSeq) else s.q for s in seqs if s.length]


def cat_tokens(parts: list[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate the non-empty parts along the token axis."""
    present = [p for p in parts if p is not None]
    return present[0] if len(present) == 1 else torch.cat(present, dim=TOKEN_DIM)


class SeqPairStore(LayerStore):
    """A layer store made of one sequence container for keys and one for values.

    Serves every method whose keys and values are each one ``FullPrecisionSeq`` / ``QuantizedSeq``
    that stores each appended token right away (fp16, uniform INT-N).
    """

    def __init__(self, layer_idx: int, info: ModelInfo, k: Seq, v: Seq):
        super().__init__(layer_idx, info)
        self.k, self.v = k, v

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        k, v = self.k, self.v
        if type(k) is QuantizedSeq and type(v) is QuantizedSeq and k.layout == v.layout:
            # one quantize call for both (groups never span K and V: the same codes and scales as two
            # calls, with half the per-call ops, which dominate a one-token decode step)
            both = k.quantize_part(torch.stack([keys, values]))  # [2, B, H, T, .]
            k.keep(both.select(0, 0))
            v.keep(both.select(0, 1))
            return
        k.append(keys)
        v.append(values)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.read(dtype), self.v.read(dtype)

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode attention from the codes (``harness.from_codes.decode_attention_over``)."""
        return decode_attention_over(query, held_parts([self.k]), held_parts([self.v]), scaling, mask)

    def memory(self) -> MemoryReport:
        r = self.k.memory()
        r += self.v.memory()
        return r

    def reorder(self, index: torch.Tensor) -> None:
        self.k.reorder(index)
        self.v.reorder(index)


class WindowedPairStore(LayerStore):
    """Keys per channel / values per token, each held as [quantized | fp16 window] in token order.

    The bookkeeping KIVI's residual, KVmix's recent-pivotal windows and XQuant share: counts, reads,
    decode attention from the codes, accounting and beam reorder. A subclass decides when window
    tokens are quantized (``append``); the two split points may differ. Shapes: [B, H_kv, T, D].
    """

    def __init__(self, layer_idx: int, info: ModelInfo, k_bits: int, v_bits: int, group: int):
        super().__init__(layer_idx, info)
        self.k_q: QuantizedSeq = QuantizedSeq(k_bits, group, axis=-2)  # per channel, groups of G tokens
        self.k_fp = FullPrecisionSeq()
        self.v_q: QuantizedSeq = QuantizedSeq(v_bits, group, axis=-1)  # per token, groups of G channels
        self.v_fp = FullPrecisionSeq()
        self._batch: int | None = None

    @property
    def key_counts(self) -> tuple[int, int]:
        """(quantized, fp16) key tokens held."""
        return self.k_q.length, self.k_fp.length

    @property
    def value_counts(self) -> tuple[int, int]:
        """(quantized, fp16) value tokens held."""
        return self.v_q.length, self.v_fp.length

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k = read_tokens([self.k_q, self.k_fp], dtype)
        if k is None:
            empty = torch.zeros(self._batch or 0, self.info.n_kv_heads, 0, self.info.head_dim, dtype=dtype)
            return empty, empty.clone()
        return k, read_tokens([self.v_q, self.v_fp], dtype)

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode attention from [quantized | fp16] keys and values without dequantizing the history
        (``harness.from_codes.decode_attention_over``; the two windows split at different tokens)."""
        keys, values = held_parts([self.k_q, self.k_fp]), held_parts([self.v_q, self.v_fp])
        return decode_attention_over(query, keys, values, scaling, mask)

    def key_memory(self) -> MemoryReport:
        r = self.k_q.memory()
        r += self.k_fp.memory()
        return r

    def value_memory(self) -> MemoryReport:
        r = self.v_q.memory()
        r += self.v_fp.memory()
        return r

    def memory(self) -> MemoryReport:
        r = self.key_memory()
        r += self.value_memory()
        return r

    def reorder(self, index: torch.Tensor) -> None:
        for seq in (self.k_q, self.k_fp, self.v_q, self.v_fp):
            seq.reorder(index)
