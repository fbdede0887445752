"""The one package that touches transformers internals (``cache``: the cache and attaching a
method; ``capture``: calibration and capture). ``harness.models`` loads models through transformers'
public ``from_pretrained`` API; nothing else in the project imports transformers or reaches into a
model's modules.

* ``model_info`` reads the attention geometry and refuses layer types the harness cannot serve.
* ``HarnessCache`` (a ``transformers.Cache``) holds one ``HarnessLayer`` (a ``DynamicLayer``) per
  decoder layer; each wraps the method's ``LayerStore``. ``update()`` stores the new K/V and returns
  what the store reconstructs, so quantization applies to prefill attention too, unless the method
  keeps prefill in full precision (KIVI's own code does).
* ``AttachedMethod`` installs only the hooks a method asks for: a forward hook on each ``k_proj``
  (pre-RoPE keys), on each block's ``input_layernorm`` (MoQAE's router input), and an attention
  function that delivers queries and attention probabilities (MiKV / H2O) to the layer stores.
* ``forward`` / ``generate`` call the model with a cache under whichever keyword the installed
  transformers release uses (``cache`` since 5.2x, ``past_key_values`` before).
* Calibration and capture, so that a method never touches a module itself: ``capture`` records,
  per layer and forward, pre-RoPE keys and values (k_proj / v_proj outputs), post-RoPE queries,
  block inputs, RoPE tables and attention probabilities as plain tensors (and, with ``grad``, the
  loss gradients of the k_proj / v_proj outputs, KVQuant's Fisher information), removing its
  hooks on exit; ``attention_projections`` gives each layer's q/k/v/o weights and biases as
  parameters (KVmix's weight gradients, QoQ's folds), ``WeightEdits`` changes them and restores
  them bit for bit; ``rope_tables`` / ``attention_scaling`` expose the model's RoPE and attention
  scale; ``calibration_mode`` sets eval mode and ``requires_grad`` for a calibration pass;
  ``model_fingerprint`` / ``model_name`` key calibration artefacts (``harness.files``).
"""

from harness.integration.cache import *  # noqa: F403
from harness.integration.cache import (  # noqa: F401  (names used elsewhere)
    HARNESS_ATTENTION,
    SERVED_LAYER_TYPES,
    AttachedMethod,
    HarnessCache,
    HarnessLayer,
    apply_rope,
    attention_probs,
    cache_kwargs,
    decoder_layers,
    forward,
    generate,
    model_info,
    rotary_embedding,
)
from harness.integration.capture import *  # noqa: F403
