"""What the K/V of each layer look like: read from the config, and confirmed by a real forward pass.

A real forward is the authority: head counts, head sizes, dtypes and devices (accelerate may put layers
on different devices) vary across model families, and a forward also reveals layers the store cannot
serve (recurrent state, KV sharing, indexers). But a probe forward reads every weight once (about 100 ms
for SmolLM2-135M on CPU), so a new ``PrefixCache`` does not run one when it can avoid it:

* ``predict_layout`` reads the layout from the config, for a model in one floating dtype on one device
  (the common case). The store starts *unconfirmed*: it holds nothing and hits nothing until the first
  call's own K/V confirm the prediction (``PrefixCache.commit``); a wrong prediction is replaced by a
  probe's answer before anything is stored.
* ``probe_layout`` runs the probe forward where the layout must be known before any call: tiers (their
  entries are checked against it on the first lookup), a multi-device or multi-dtype model.

A confirmed result is kept per model object and reused while nothing it depends on changed: the same
parameter and buffer objects with the same dtypes and devices, the same input device and the same config.
Anything else (a cast, a move, a replaced module, an edited config) is learned again.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
)

from .compat import CACHE_KWARG

# The cache layer classes a probe may find: per-token K/V, recurrent state (hybrid models), or nothing.
SERVED_LAYER_CLASSES = (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
    LinearAttentionAndFullAttentionLayer,
    DummyLayer,
)


@dataclass(frozen=True)
class LayerLayout:
    """One cache layer: its K/V (``num_heads == 0``: none) and how many recurrent states it keeps beside
    them (``states``: linear attention, SSM or short-convolution layers of hybrid models)."""

    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None = None
    states: int = 0

    @property
    def holds_kv(self) -> bool:
        return self.num_heads > 0

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block of K and V takes in this layer."""
        itemsize = self.dtype.itemsize
        return 2 * self.num_heads * block_size * self.head_dim * itemsize


class UnsupportedLayout(Exception):
    """The model's cache has layers that token blocks cannot reproduce."""


class _Probed:
    """One probe's result and what it depended on; tensors are held weakly (a dead one never matches)."""

    def __init__(self, tensors: list[torch.Tensor], fingerprint: tuple, result):
        self.tensors = [weakref.ref(t) for t in tensors]
        self.dtypes_and_devices = [(t.dtype, t.device) for t in tensors]
        self.fingerprint = fingerprint
        self.result = result

    def still_valid(self, tensors: list[torch.Tensor], fingerprint: tuple) -> bool:
        if fingerprint != self.fingerprint or len(tensors) != len(self.tensors):
            return False
        for tensor, ref, (dtype, device) in zip(tensors, self.tensors, self.dtypes_and_devices):
            if ref() is not tensor or tensor.dtype != dtype or tensor.device != device:
                return False
        return True


_probed: weakref.WeakKeyDictionary[torch.nn.Module, _Probed] = weakref.WeakKeyDictionary()
_probed_lock = threading.Lock()


def probe_layout(model: torch.nn.Module) -> list[LayerLayout]:
    """Every cache layer of ``model`` as a probe forward finds it (reused while the model is unchanged);
    raise UnsupportedLayout if the store cannot serve it."""
    result = _known(model)
    if result is None:
        try:
            result = run_probe(model)
        except UnsupportedLayout as error:
            result = error
        remember_layout(model, result)
    if isinstance(result, UnsupportedLayout):
        raise UnsupportedLayout(str(result))
    return list(result)


def known_layout(model: torch.nn.Module) -> list[LayerLayout] | None:
    """The confirmed layout kept for ``model`` if nothing it depends on changed since; runs nothing."""
    result = _known(model)
    if result is None or isinstance(result, UnsupportedLayout):
        return None
    return list(result)


def remember_layout(model: torch.nn.Module, result: list[LayerLayout] | UnsupportedLayout) -> None:
    """Keep a confirmed layout (or why there is none) for ``model`` as it is now."""
    state = _Probed([*model.parameters(), *model.buffers()], _structure_fingerprint(model), result)
    with _probed_lock:
        _probed[model] = state


def _known(model: torch.nn.Module):
    with _probed_lock:
        known = _probed.get(model)
    if known is None:
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return known.result if known.still_valid(tensors, _structure_fingerprint(model)) else None


def predict_layout(model: torch.nn.Module) -> list[LayerLayout] | None:
    """The layout the config implies, or None where it may not say enough (then probe).

    Only for a model whose parameters share one floating dtype on one device, without accelerate hooks:
    then every layer's K/V have that dtype and device. Layer kinds and windows come from the same
    ``DynamicCache(config=...)`` a probe reads them from. The first call confirms the rest.
    """
    tensors = list(model.parameters())
    if not tensors or any(hasattr(module, "_hf_hook") for module in model.modules()):
        return None
    dtype, device = tensors[0].dtype, tensors[0].device
    if not dtype.is_floating_point or device.type == "meta" or _input_device(model) != device:
        return None
    if any(t.dtype != dtype or t.device != device for t in tensors):
        return None
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        head_dim = hidden // heads
    if not all(isinstance(n, int) and n > 0 for n in (kv_heads, head_dim)):
        return None
    layers = DynamicCache(config=config).layers
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None  # the probe says why, or finds out
    windows = [
        layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in layers
    ]
    return [LayerLayout(kv_heads, head_dim, dtype, device, window) for window in windows]


def _structure_fingerprint(model: torch.nn.Module) -> tuple:
    """What besides the tensors decides the probe's answer: the input device and every config field."""
    configs = [model.config, model.config.get_text_config(decoder=True)]
    return (str(_input_device(model)), *(repr(sorted(vars(config).items())) for config in configs))


def run_probe(model: torch.nn.Module) -> list[LayerLayout]:
    """Run one token through ``model`` and describe every cache layer; raise UnsupportedLayout if needed."""
    config = model.config.get_text_config(decoder=True)
    token = getattr(config, "bos_token_id", None)
    token = token[0] if isinstance(token, (list, tuple)) else token
    input_ids = torch.tensor([[token if isinstance(token, int) else 0]], device=_input_device(model))
    with torch.no_grad():
        cache = _probe_forward(model, input_ids, config)
    for index, layer in enumerate(cache.layers):
        if type(layer) not in SERVED_LAYER_CLASSES:
            raise UnsupportedLayout(
                f"layer {index} keeps a {type(layer).__name__}, neither per-token K/V nor a recurrent state"
            )
    return describe_layers(cache.layers)


def describe_layers(layers: list) -> list[LayerLayout]:
    """The layout of the K/V that ``layers`` hold after a forward pass; raise UnsupportedLayout where a
    layer holds none, or values shaped unlike its keys (the pool keeps both alike)."""
    layouts: list[LayerLayout | None] = []
    for index, layer in enumerate(layers):
        states = getattr(layer, "number_of_states", 0) if hasattr(layer, "conv_states") else 0
        if isinstance(layer, DummyLayer) or (states and not isinstance(layer, DynamicLayer)):
            layouts.append(None if not states else _state_only(layer, index, states))
            continue
        if states and isinstance(layer, DynamicSlidingWindowLayer):
            raise UnsupportedLayout(f"layer {index} keeps a recurrent state beside a sliding window")
        keys, values = layer.keys, layer.values
        if not layer.is_initialized or keys is None or keys.dim() != 4:
            raise UnsupportedLayout(f"layer {index} stored no per-token K/V during a forward pass")
        if values is None or (values.shape, values.dtype, values.device) != (
            keys.shape,
            keys.dtype,
            keys.device,
        ):
            raise UnsupportedLayout(
                f"layer {index} keeps values of another shape, dtype or device than its keys"
            )
        _, heads, _, head_dim = keys.shape
        window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        layouts.append(LayerLayout(heads, head_dim, keys.dtype, keys.device, window, states))
    with_kv = [layout for layout in layouts if layout is not None and layout.holds_kv]
    if not with_kv:
        raise UnsupportedLayout("the model stored no per-token K/V in its cache (no attention layer)")
    first = with_kv[0]
    # a layer without K/V takes the first K/V layer's dtype and device (its pool tensors are empty)
    return [layout or LayerLayout(0, 0, first.dtype, first.device) for layout in layouts]


def _state_only(layer, index: int, states: int) -> LayerLayout:
    """A layer with recurrent state and no K/V (its K/V pool tensors are empty)."""
    conv = next((state for state in layer.conv_states.values() if state is not None), None)
    if conv is None:
        raise UnsupportedLayout(f"layer {index} kept no recurrent state during a forward pass")
    return LayerLayout(0, 0, conv.dtype, conv.device, None, states)


def _probe_forward(model: torch.nn.Module, input_ids: torch.Tensor, config) -> DynamicCache:
    """The cache after one forward pass, through the base transformer when there is one: the LM head (a
    vocabulary-sized matmul, a good part of a one-token forward) adds nothing to the cache."""
    base = getattr(model, "base_model", model)
    if base is not model and isinstance(base, torch.nn.Module):
        cache = DynamicCache(config=config)
        try:
            base(input_ids=input_ids, use_cache=True, **{CACHE_KWARG: cache})
            return cache
        except TypeError:  # a base model with another signature: probe through the whole model
            pass
    cache = DynamicCache(config=config)
    model(input_ids=input_ids, use_cache=True, **{CACHE_KWARG: cache})
    return cache


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return model.device
