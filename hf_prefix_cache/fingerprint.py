"""A stable identity for a model's K/V: class, config, dtype and a sample of the weights.

Blocks computed by one model must never be served to another, nor to the same model after its weights
changed. Hashing every weight is too slow to do per call, so the fingerprint hashes a fixed strided
sample of each parameter (stable across processes), and ``weights_version`` (the sum of the parameters'
in-place version counters, a few microseconds) tells within a process when to recompute it.
"""

from __future__ import annotations

import json

import mmh3
import torch

from .hashing import HASH_SEED

_SAMPLES_PER_PARAMETER = 64


def weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter is modified in place (optimizer steps, ``load_state_dict``, ``copy_``)."""
    return sum(p._version for p in model.parameters())


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of class, config, dtype and sampled weights."""
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
            if param.device.type == "meta":  # offloaded to disk by accelerate: shape only
                continue
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
            sample = flat[::step][:_SAMPLES_PER_PARAMETER].to("cpu", torch.float64)
            hasher.update(sample.numpy().tobytes())
    return hasher.digest().hex()
