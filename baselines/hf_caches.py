"""Peer rows: what a transformers user would pick instead of this harness.

* ``dynamic`` — transformers' ``DynamicCache`` untouched: K/V in the model's dtype (fp32 on CPU,
  bf16/fp16 on GPU), grown by concatenation. The speed reference of ``python -m harness profile``.
* ``hf-quanto`` / ``hf-hqq`` — transformers' ``QuantizedCache`` with the optimum-quanto or HQQ
  backend, as ``generate(..., cache_implementation="quantized", cache_config={"backend": "quanto",
  "nbits": 4})`` makes it (transformers ``cache_utils.QuantizedLayer``). Options are that cache's,
  with its defaults: ``nbits`` (4), ``axis-key`` (0), ``axis-value`` (0), ``q-group-size`` (64),
  ``residual-length`` (128).

What the quantized cache does differently from the harness's methods (read from transformers'
``QuantizedLayer.update``, 5.x):

* **Prefill reads full precision.** The first update quantizes the prompt's K/V but returns them
  as computed, so the prompt's own attention is unquantized (KIVI's ``quantize_prefill=false``
  does the same); with the harness's one-forward WikiText-2 protocol such a cache changes nothing.
  The fair comparison is the streamed protocol (``wikitext2:prefill_chunk=N``), where every later
  piece attends to the stored, quantized history.
* **The residual.** Up to ``residual-length`` recent tokens stay in full precision; when the
  residual fills, the whole history is dequantized, joined with the residual and the new tokens and
  quantized again (each flush re-rounds the history; KIVI quantizes only the new group).
* **The axes.** ``axis`` is the backend's quantization axis over the ``[B, H, T, D]`` tensor with
  groups of ``q-group-size`` elements; the same axis serves keys and values by default (KIVI: keys
  per channel, values per token).

Memory is counted from the tensors each cache really holds (``harness.integration.peers``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from harness.interface import KVCacheMethod, LayerStore, MethodConfig, MethodSpecError, ModelInfo, ReportStyle
from harness.options import NonNegativeInt, OneOf, PositiveInt


def _peer_store(name: str) -> LayerStore:
    raise TypeError(f"{name} brings transformers' own cache (own_cache); it has no layer stores")


@dataclass
class DynamicConfig(MethodConfig):
    pass


class Dynamic(KVCacheMethod):
    """transformers' ``DynamicCache``, untouched: the reference a transformers user runs."""

    name = "dynamic"
    description = "transformers' DynamicCache untouched (K/V in the model's dtype): the speed reference"
    config_class = DynamicConfig
    report = ReportStyle("transformers", "x", "C9", rank=1)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return _peer_store(self.name)

    def own_cache(self, model: torch.nn.Module) -> Any:
        from harness.integration.peers import AccountedDynamicCache

        return AccountedDynamicCache(config=model.config)


@dataclass
class HFQuantizedConfig(MethodConfig):
    # each backend narrows nbits and the axes to what transformers accepts for it
    nbits: PositiveInt = 4
    axis_key: Annotated[int, Field(ge=-1, le=1)] = 0
    axis_value: Annotated[int, Field(ge=-1, le=1)] = 0
    q_group_size: PositiveInt = 64
    residual_length: NonNegativeInt = 128

    aliases: ClassVar[dict[str, str]] = {
        "axis-key": "axis_key",
        "axis-value": "axis_value",
        "q-group-size": "q_group_size",
        "residual-length": "residual_length",
    }
    #: set per backend: (import name, pip name)
    backend: ClassVar[str] = ""
    package: ClassVar[tuple[str, str]] = ("", "")

    def validate(self) -> None:
        who = f"hf-{self.backend}"
        module, pip = self.package
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise MethodSpecError(
                f"{who} needs the {pip} package (transformers' {self.backend} backend): "
                f"pip install 'moqae-harness[peers]' (or '{pip}')"
            )


@dataclass
class QuantoConfig(HFQuantizedConfig):
    backend: ClassVar[str] = "quanto"
    package: ClassVar[tuple[str, str]] = ("optimum.quanto", "optimum-quanto>=0.2.5")
    nbits: OneOf(2, 4) = 4  # transformers' checks for the quanto backend
    axis_key: OneOf(0, -1) = 0
    axis_value: OneOf(0, -1) = 0


@dataclass
class HQQConfig(HFQuantizedConfig):
    backend: ClassVar[str] = "hqq"
    package: ClassVar[tuple[str, str]] = ("hqq", "hqq")
    nbits: OneOf(1, 2, 3, 4, 8) = 4  # transformers' checks for the HQQ backend
    axis_key: OneOf(0, 1) = 0
    axis_value: OneOf(0, 1) = 0


class HFQuantized(KVCacheMethod):
    """transformers' ``QuantizedCache`` with one backend, untouched (see the module docstring)."""

    config_class = HFQuantizedConfig

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return _peer_store(self.name)

    def own_cache(self, model: torch.nn.Module) -> Any:
        from harness.integration.peers import AccountedQuantizedCache

        c = self.config
        return AccountedQuantizedCache(c.backend, model.config, nbits=c.nbits, axis_key=c.axis_key,
                                       axis_value=c.axis_value, q_group_size=c.q_group_size,
                                       residual_length=c.residual_length)  # fmt: skip

    @classmethod
    def report_sort_key(cls, config: dict[str, Any]) -> tuple:
        return (-float(config.get("nbits", 4)),)


class HFQuanto(HFQuantized):
    name = "hf-quanto"
    description = "transformers' QuantizedCache, optimum-quanto backend (nbits 2/4, residual 128): a peer row"
    config_class = QuantoConfig
    report = ReportStyle("transformers", "v", "C9", rank=25)


class HFHQQ(HFQuantized):
    name = "hf-hqq"
    description = "transformers' QuantizedCache, HQQ backend (nbits 1-8, residual 128): a peer row"
    config_class = HQQConfig
    report = ReportStyle("transformers", "^", "C9", rank=26)
