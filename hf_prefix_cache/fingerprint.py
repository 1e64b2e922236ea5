"""A stable identity for a model's K/V: class, config, dtype and a sample of the weights.

Blocks computed by one model must never be served to another, nor to the same model after its weights
changed. Hashing every weight is too slow to do per call, so the fingerprint hashes a fixed strided
sample of each parameter (stable across processes), and ``WeightsWatch`` decides cheaply, per call,
when to recompute it: it compares each parameter's storage, version counter, dtype and device, plus one
probed element per parameter (writes through ``param.data`` bypass the version counter; EMA updates and
adapter merges change every element, so the probe sees them).
"""

from __future__ import annotations

import json

import mmh3
import torch

from .hashing import HASH_SEED

_SAMPLES_PER_PARAMETER = 64


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of class, config, dtype and sampled weights.

    Weights offloaded to the meta device (accelerate) cannot be read: such a model gets a process-local
    identity instead, so it never shares blocks with another model object.
    """
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if not key.startswith("_") and key != "transformers_version"
    }
    hasher = mmh3.mmh3_x64_128(seed=HASH_SEED)
    hasher.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            hasher.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.device.type == "meta":
                hasher.update(f"offloaded, process-local model {id(model)}".encode())
                continue
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
            sample = flat[::step][:_SAMPLES_PER_PARAMETER].to("cpu", torch.float64)
            hasher.update(sample.numpy().tobytes())
    return hasher.digest().hex()


class WeightsWatch:
    """Tells, well under a millisecond, whether the model's weights may have changed since the last look.

    The per-call cost is one identity tuple per parameter and one ``torch.stack`` per device and dtype of
    the probed elements: the probes are 0-dim views, made again only when a parameter's identity changed,
    so an in-place write shows through them. They keep the probed storages alive until that rebuild.
    """

    def __init__(self, model: torch.nn.Module):
        self.parameters = list(model.parameters())
        self._last: tuple | None = None
        self._identity: list | None = None
        self._probes: list[list[torch.Tensor]] = []  # one list of 0-dim views per (device, dtype)

    def _identity_now(self) -> list:
        return [(p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters]

    def _make_probes(self) -> list[list[torch.Tensor]]:
        groups: dict[tuple, list[torch.Tensor]] = {}
        with torch.no_grad():
            for p in self.parameters:
                if p.device.type != "meta" and p.numel():
                    probe = _middle_element(p.detach())
                    groups.setdefault((p.device, p.dtype), []).append(probe)
        return list(groups.values())

    def _state(self) -> tuple:
        identity = self._identity_now()
        if identity != self._identity:
            self._identity, self._probes = identity, self._make_probes()
        with torch.no_grad():
            values = tuple(
                torch.stack(group).to(torch.float64).cpu().numpy().tobytes() for group in self._probes
            )
        return tuple(identity), values

    def changed(self) -> bool:
        """True on the first call and whenever a parameter was replaced, cast, moved or written."""
        state = self._state()
        changed, self._last = state != self._last, state
        return changed

    def dtypes_and_devices(self) -> set[tuple[torch.dtype, torch.device]]:
        return {(p.dtype, p.device) for p in self.parameters}


def _middle_element(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim view (never a copy, whatever the strides) of the element at flat index ``numel // 2``."""
    index, coordinates = tensor.numel() // 2, []
    for size in reversed(tensor.shape):
        coordinates.append(index % size)
        index //= size
    return tensor[tuple(reversed(coordinates))]
