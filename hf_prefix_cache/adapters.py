"""Which PEFT adapters act on a model's K/V right now, as a namespace suffix.

Switching adapters (``set_adapter``, ``disable_adapter()``, merging) or rescaling one (``set_scale``,
``scale_layer``, ``unscale_layer``) changes no parameter, so neither the fingerprint nor ``WeightsWatch``
can see it; yet K/V computed under adapter "a" are wrong under "b". vLLM puts the LoRA id into every
block's extra keys; here the namespace carries, per tuner layer, its type, the active, disabled and
merged adapters, their settings (every ``other_param_names`` entry: rank, alpha, scaling, ``use_dora``,
...; tensor-valued ones such as VeRA's shared projections by content) and a digest of their weights
(every ``adapter_layer_names`` entry, DoRA magnitudes included), all read per call. The weights digest
is recomputed only when a tensor's identity or probed values changed (``TensorWatch``), so a
``.data.copy_()`` of new adapter weights is seen. Models without ``peft`` layers get an empty suffix at
the cost of one dict lookup.
"""

from __future__ import annotations

import sys
import weakref

import torch
import xxhash

from .fingerprint import TensorWatch, registration_epoch, tensor_digest
from .hashing import HASH_SEED

_LAYER_SETTINGS = ("is_feedforward", "fan_in_fan_out")  # per layer, not per adapter, yet change K/V
# model -> (registration epoch, its tuner layers): the module tree is walked again only after a registration
_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (TensorWatch of the adapter tensors, their state when hashed last, their digest)
_weights_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_namespace(model: torch.nn.Module) -> str:
    """``""`` without PEFT adapters, else ``"/adapters:<digest>"`` of what acts on K/V now."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # peft was never imported: no model can hold its layers
        return ""
    epoch, known = registration_epoch(), _layers.get(model)
    if known is None or known[0] != epoch:
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)]
        known = _layers[model] = (epoch, found, {})
    _, layers, plans = known
    if not layers:
        return ""
    state: list = []
    tensors: list[torch.Tensor] = []
    for name, layer in layers:
        disabled = bool(layer.disable_adapters)
        active = () if disabled else tuple(layer.active_adapters)
        merged = tuple(layer.merged_adapters)
        extra = tuple(getattr(layer, attr, None) for attr in _LAYER_SETTINGS)
        state.append((name, type(layer).__qualname__, active, disabled, merged, extra))
        for adapter in sorted(set(active) | set(merged)):
            plan = plans.get((name, adapter))
            if plan is None:
                plan = plans[(name, adapter)] = _plan(layer, adapter)
            held, static, plain = plan
            tensors.extend(held)
            settings = [(attr, repr(_setting(layer, attr, adapter))) for attr in plain]
            state.append((name, adapter, static, settings))
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    hasher.update(repr(state).encode())
    hasher.update(_weights_digest(model, tensors))
    return f"/adapters:{hasher.hexdigest()}"


def forget(model: torch.nn.Module) -> None:
    """Drop the adapter digest kept for ``model``: the next call hashes the adapter weights again."""
    _weights_digests.pop(model, None)
    _layers.pop(model, None)


def _plan(layer, adapter: str) -> tuple[list[torch.Tensor], tuple, tuple[str, ...]]:
    """What of ``layer`` belongs to ``adapter``, found once per registration epoch: its tensors (weights,
    and tensor-valued settings such as VeRA's projections), a description of its containers and module
    settings (dropout), and the names of its plain settings (rank, alpha, scaling...), read per call."""
    tensors: list[torch.Tensor] = []
    static: list = []
    plain: list[str] = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is not None and hasattr(container, "keys") and adapter in container:
            held = _tensors_of(container[adapter])
            tensors.extend(held)
            static.append((attr, len(held)))
    for attr in layer.other_param_names:
        setting = getattr(layer, attr, None)
        if hasattr(setting, "keys") and adapter in setting:
            value = setting[adapter]
            if isinstance(value, (torch.Tensor, torch.nn.Module)):  # registered: a change bumps the epoch
                held = _tensors_of(value)
                tensors.extend(held)
                static.append((attr, type(value).__qualname__ if held else repr(value), len(held)))
            else:
                plain.append(attr)
    return tensors, tuple(static), tuple(plain)


def _setting(layer, attr: str, adapter: str):
    try:
        return getattr(layer, attr)[adapter]
    except (AttributeError, KeyError, TypeError):  # removed since the plan was made
        return None


def _tensors_of(item) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, torch.nn.Module):
        return [*item.parameters(), *item.buffers()]
    return []


def _weights_digest(model: torch.nn.Module, tensors: list[torch.Tensor]) -> bytes:
    """Digest of the adapter tensors' content, recomputed only when one was replaced, moved or written
    (in place, or through ``.data``: the probed values change)."""
    known = _weights_digests.get(model)
    watch = known[0] if known is not None else TensorWatch()
    state = watch.state(tensors)
    if known is not None and known[1] == state:
        return known[2]
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    with torch.no_grad():
        for tensor in tensors:
            hasher.update(tensor_digest(tensor))
    digest = hasher.digest()
    _weights_digests[model] = (watch, state, digest)
    return digest
