"""Which PEFT adapters act on a model's K/V right now, as a namespace suffix.

Switching adapters (``set_adapter``, ``disable_adapter()``, merging) changes no parameter, so neither the
fingerprint nor ``WeightsWatch`` can see it; yet K/V computed under adapter "a" are wrong under "b". vLLM
puts the LoRA id into every block's extra keys; here the namespace carries, per tuner layer, the active,
disabled and merged adapters plus a digest of the active adapters' weights and settings (rank, alpha,
scaling), read per call. Models without ``peft`` layers get an empty suffix at the cost of one dict lookup.
"""

from __future__ import annotations

import sys
import weakref

import mmh3
import torch

from .hashing import HASH_SEED

_FULL_HASH_LIMIT = 1 << 16  # adapter tensors up to this many elements are hashed whole, larger ones sampled
_SAMPLES = 4096
# model -> (identity of the adapter tensors hashed last time, their digest): hashing runs only on change
_weights_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_namespace(model: torch.nn.Module) -> str:
    """``""`` without PEFT adapters, else ``"/adapters:<digest>"`` of what acts on K/V now."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # peft was never imported: no model can hold its layers
        return ""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)]
    if not layers:
        return ""
    state: list = []
    tensors: list[torch.Tensor] = []
    for name, layer in layers:
        disabled = bool(layer.disable_adapters)
        active = () if disabled else tuple(layer.active_adapters)
        merged = tuple(layer.merged_adapters)
        state.append((name, active, disabled, merged))
        for adapter in sorted(set(active) | set(merged)):
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr, None)
                if container is not None and hasattr(container, "keys") and adapter in container:
                    item = container[adapter]
                    tensors.extend(item.parameters() if isinstance(item, torch.nn.Module) else [item])
            for attr in layer.other_param_names:
                setting = getattr(layer, attr, None)
                if hasattr(setting, "keys") and adapter in setting:
                    state.append((name, attr, adapter, repr(setting[adapter])))
    hasher = mmh3.mmh3_x64_128(seed=HASH_SEED)
    hasher.update(repr(state).encode())
    hasher.update(_weights_digest(model, tensors))
    return f"/adapters:{hasher.digest().hex()}"


def _weights_digest(model: torch.nn.Module, tensors: list[torch.Tensor]) -> bytes:
    """Digest of the adapter tensors, recomputed only when one was replaced, moved or written in place."""
    identity = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)
    known = _weights_digests.get(model)
    if known is not None and known[0] == identity:
        return known[1]
    hasher = mmh3.mmh3_x64_128(seed=HASH_SEED)
    with torch.no_grad():
        for tensor in tensors:
            if tensor.device.type == "meta":  # offloaded: unreadable, so process-local like the fingerprint
                hasher.update(f"offloaded adapter tensor {id(tensor)}".encode())
                continue
            flat = tensor.detach().reshape(-1)
            if flat.numel() > _FULL_HASH_LIMIT:
                flat = flat[:: flat.numel() // _SAMPLES]
            hasher.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
            hasher.update(flat.to("cpu", torch.float64).numpy().tobytes())
    digest = hasher.digest()
    _weights_digests[model] = (identity, digest)
    return digest
