"""keep64-int3: the first ``keep`` tokens (attention sinks, StreamingLLM's observation) fp16, every
later token INT-``bits`` per token (asymmetric min-max over the head, ``harness.quant``).

An example of a method in its own package: one config, one layer store, one method class; the
entry point in pyproject.toml is the whole registration. Shapes: [B, H_kv, T, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    ModelInfo,
    Observation,
    ReportStyle,
)
from harness.options import NonNegativeInt, OneOf
from harness.storage import FullPrecisionSeq, QuantizedSeq, read_tokens


@dataclass
class Keep64Int3Config(MethodConfig):
    """Each option declares its type and range: the harness checks ``keep64-int3:bits=5`` against them
    (one ``error:`` line) before ``validate()``, which is left for rules between options (none here)."""

    keep: NonNegativeInt = 64  # leading tokens of every sequence kept fp16
    bits: OneOf(2, 3, 4, 8) = 3  # bits of every later token


class SinkStore(LayerStore):
    def __init__(self, layer_idx: int, info: ModelInfo, cfg: Keep64Int3Config):
        super().__init__(layer_idx, info)
        self.keep = cfg.keep
        self.k_fp, self.v_fp = FullPrecisionSeq(), FullPrecisionSeq()
        self.k_q = QuantizedSeq(cfg.bits, info.head_dim, axis=-1)  # one range per token per head
        self.v_q = QuantizedSeq(cfg.bits, info.head_dim, axis=-1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        n = max(0, min(self.keep - self.k_fp.length, keys.shape[-2]))  # tokens still going to fp16
        if n:
            self.k_fp.append(keys[..., :n, :])
            self.v_fp.append(values[..., :n, :])
        self.k_q.append(keys[..., n:, :])
        self.v_q.append(values[..., n:, :])

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return read_tokens([self.k_fp, self.k_q], dtype), read_tokens([self.v_fp, self.v_q], dtype)

    def memory(self) -> MemoryReport:
        total = MemoryReport()
        for seq in (self.k_fp, self.v_fp, self.k_q, self.v_q):
            total += seq.memory()
        return total


class Keep64Int3(KVCacheMethod):
    """The first 64 tokens fp16, INT3 for the rest."""

    name = "keep64-int3"
    description = "example plugin: the first 64 tokens fp16, INT3 per token for the rest (options keep, bits)"
    report = ReportStyle(family="Sink+INT3", marker="d", color="#8c564b", rank=65)
    config_class = Keep64Int3Config

    @classmethod
    def report_label(cls, label: str, config: dict) -> str:
        return f"{config.get('keep', 64)} fp16 + INT{config.get('bits', 3)} ({label})"

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return SinkStore(layer_idx, info, self.config)
