"""What the K/V of each layer look like, learned from one real one-token forward pass.

Probing beats reading configs: head counts, head sizes, dtypes and devices (accelerate may put layers on
different devices) vary across model families, and the probe also reveals layers the store cannot
serve (recurrent state, KV sharing, indexers).

The forward pass reads every weight once (tens of milliseconds for a small model on CPU), so its result is
kept per model object and reused while nothing it depends on changed: the same parameter and buffer
objects with the same dtypes and devices, the same input device and the same config. Anything else (a
cast, a move, a replaced module, an edited config) probes again.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .compat import CACHE_KWARG


@dataclass(frozen=True)
class LayerLayout:
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None = None

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block of K and V takes in this layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
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
    tensors = [*model.parameters(), *model.buffers()]
    fingerprint = _structure_fingerprint(model)
    with _probed_lock:
        known = _probed.get(model)
    if known is not None and known.still_valid(tensors, fingerprint):
        result = known.result
    else:
        try:
            result = run_probe(model)
        except UnsupportedLayout as error:
            result = error
        with _probed_lock:
            _probed[model] = _Probed(tensors, fingerprint, result)
    if isinstance(result, UnsupportedLayout):
        raise UnsupportedLayout(str(result))
    return list(result)


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
    layouts = []
    for index, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise UnsupportedLayout(f"layer {index} keeps a {type(layer).__name__}, not per-token K/V")
        if not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
            raise UnsupportedLayout(f"layer {index} stored no per-token K/V during a forward pass")
        _, heads, _, head_dim = layer.keys.shape
        window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        layouts.append(LayerLayout(heads, head_dim, layer.keys.dtype, layer.keys.device, window))
    if not layouts:
        raise UnsupportedLayout("the model stored nothing in its cache")
    return layouts


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
