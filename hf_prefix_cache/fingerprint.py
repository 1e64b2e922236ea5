"""A stable identity for a model's K/V: class, config, and the content of every weight.

Blocks computed by one model must never be served to another, nor to the same model after its weights
changed, in this process or (through the disk and Redis tiers) in another. The fingerprint is an
XXH3-128 digest of the raw bytes of every parameter and buffer (bf16 and quantized bytes as they are, no
conversion), so two checkpoints that differ in one element get different namespaces. Hashing runs at
~10 GB/s, too slow for every call, so it runs on the first call and again only when ``WeightsWatch``
says a tensor changed, and then only for the tensors that did (the digests of the others are kept,
per model object, weakly).

``WeightsWatch`` decides per call, well under a millisecond: it compares each tensor's identity
(object, storage, version counter, dtype, device, shape) and a few probed element values (writes through
``param.data`` bypass the version counter; loading new weights, EMA updates and adapter merges change
every element, so the probes see them). It re-reads the model's tensors whenever any module in the
process registered a parameter, buffer or submodule (torch's global registration hooks bump a counter),
so modules swapped or adapters added after construction are watched too, without walking the module
tree every call. A ``.data`` write that leaves every probed element equal is the one change it cannot
see (call ``cache.clear()`` or make a new model object); so is a tensor put into a module's
``_parameters`` dict directly, bypassing ``register_parameter`` and ``setattr``.

The attention implementation (``sdpa``, ``eager``, flash...) changes K/V rounding but no weight; it is
read per call by ``attention_namespace`` (``model.set_attn_implementation`` may switch it any time).
"""

from __future__ import annotations

import json
import threading
import weakref

import torch
import xxhash

from .hashing import HASH_SEED

_PROBES = 4  # probed elements per tensor, per call
_CHUNK = 64 << 20  # bytes copied off the device at a time while hashing
# model -> {per-tensor key: digest}: a tensor is hashed again only when its key (identity, probes) changed
_tensor_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (the WeightsWatch state it was hashed at, fingerprint): shared by every view of one model
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_registrations = 0  # bumped whenever any module registers a parameter, buffer or submodule
_hooks_lock = threading.Lock()
_hooks: list = []


def _registered(*_args) -> None:
    global _registrations
    _registrations += 1


def registration_epoch() -> int:
    """A number that changes whenever any ``nn.Module`` in the process registers (or is assigned) a
    parameter, buffer or submodule: what the model holds must be re-read then, and only then."""
    if not _hooks:
        with _hooks_lock:
            if not _hooks:
                modules = torch.nn.modules.module
                _hooks.extend(
                    register(_registered)
                    for register in (
                        modules.register_module_parameter_registration_hook,
                        modules.register_module_buffer_registration_hook,
                        modules.register_module_module_registration_hook,
                    )
                )
    return _registrations


def model_fingerprint(model: torch.nn.Module, state: tuple | None = None) -> str:
    """Hex digest of class, config and the content of every parameter and buffer.

    ``state`` is ``WeightsWatch.state`` when the caller has one: the digest is then reused while it is
    the same. Weights offloaded to the meta device (accelerate) cannot be read: such a model gets a
    process-local identity instead, so it never shares blocks with another model object.
    """
    if state is not None:
        known = _fingerprints.get(model)
        if known is not None and (known[0] is state or known[0] == state):
            return known[1]
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if not key.startswith("_") and key != "transformers_version"
    }
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    hasher.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode())
    hasher.update(weights_digest(model))
    fingerprint = hasher.hexdigest()
    if state is not None:
        _fingerprints[model] = (state, fingerprint)
    return fingerprint


def forget(model: torch.nn.Module) -> None:
    """Drop what is known of ``model``'s weights: its next fingerprint hashes every tensor again, so a
    change no probe saw (``cache.clear()`` after a ``.data`` write) gets its own namespace."""
    _fingerprints.pop(model, None)
    _tensor_digests.pop(model, None)


def weights_digest(model: torch.nn.Module) -> bytes:
    """XXH3-128 over every named parameter and buffer: name, shape, dtype and raw bytes. Tensors whose
    identity and probed values are unchanged since the last digest of this model are not read again."""
    known = _tensor_digests.get(model, {})
    kept: dict = {}
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    with torch.no_grad():
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, tensor in named:
                if tensor.device.type == "meta":  # offloaded (accelerate swaps these objects per forward)
                    digest = f"offloaded, process-local model {id(model)}".encode()
                else:
                    key = _tensor_key(tensor)
                    digest = known.get(key) or tensor_digest(tensor)
                    kept[key] = digest
                hasher.update(f"{kind}:{name}\x00".encode())
                hasher.update(digest)
    _tensor_digests[model] = kept
    return hasher.digest()


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """16-byte XXH3 digest of shape, dtype and raw bytes (``meta`` tensors: a process-local identity)."""
    hasher = xxhash.xxh3_128(seed=HASH_SEED)
    hasher.update(f"{tuple(tensor.shape)}:{tensor.dtype}\x00".encode())
    if tensor.device.type == "meta":
        hasher.update(f"offloaded, process-local tensor {id(tensor)}".encode())
        return hasher.digest()
    try:
        flat = raw_bytes(tensor)
        for start in range(0, flat.numel(), _CHUNK):
            hasher.update(flat[start : start + _CHUNK].cpu().numpy())
    except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass without plain storage
        hasher.update(f"unreadable, process-local tensor {id(tensor)}".encode())
    return hasher.digest()


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat uint8 tensor on its device: a view where it is contiguous."""
    data = tensor.detach()
    if data.layout != torch.strided:
        data = data.to_dense()
    flat = data.reshape(-1) if data.is_contiguous() else data.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _tensor_key(tensor: torch.Tensor) -> tuple:
    with torch.no_grad():
        probe = probe_view(tensor.detach())
        values = raw_bytes(probe.cpu()).numpy().tobytes() if probe is not None else b""
    return (*_identity(tensor), tensor.shape, values)


def _identity(tensor: torch.Tensor) -> tuple:
    """Object, storage, version counter, dtype, device (a reshape in place, ``resize_``, bumps the
    version). Kept to attributes that cost no allocation: this runs per tensor per call."""
    return (id(tensor), tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)


def probe_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-dim view (never a copy) of up to ``_PROBES`` elements spread over ``tensor``; None if empty.

    A later in-place write shows through it. Contiguous tensors give evenly strided elements from the
    first on; others the element at flat index ``numel // 2``."""
    count = tensor.numel()
    if not count:
        return None
    if tensor.is_contiguous():
        flat = tensor.view(-1)
        return flat[:: max(1, count // _PROBES)][:_PROBES]
    index, coordinates = count // 2, []
    for size in reversed(tensor.shape):
        coordinates.append(index % size)
        index //= size
    return tensor[tuple(reversed(coordinates))].view(1)


class TensorWatch:
    """Per call, a comparable state of a list of tensors: their identities plus probed values.

    The probes are views, made again only when a tensor's identity changed, so an in-place write shows
    through them; they keep the probed storages alive until that rebuild. The values cost one
    ``torch.cat`` and one copy to the host per device and dtype.
    """

    def __init__(self) -> None:
        self._identity: list | None = None
        self._probes: list[list[torch.Tensor]] = []  # probe views, one list per (device, dtype)

    def state(self, tensors: list[torch.Tensor]) -> tuple:
        identity = [_identity(t) for t in tensors]
        if identity != self._identity:
            self._identity, self._probes = identity, _make_probes(tensors)
        with torch.no_grad():
            values = tuple(raw_bytes(torch.cat(group).cpu()).numpy().tobytes() for group in self._probes)
        return tuple(identity), values


def _make_probes(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    with torch.no_grad():
        for t in tensors:
            if t.device.type != "meta" and (probe := probe_view(t.detach())) is not None:
                groups.setdefault((t.device, t.dtype), []).append(probe)
    return list(groups.values())


class WeightsWatch:
    """Tells, well under a millisecond, whether the model's weights may have changed since the last look.

    Watches every parameter and buffer the model holds now (re-read after any registration: a module
    swapped or an adapter added after construction is watched too), by identity and probed values
    (``TensorWatch``).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._watch = TensorWatch()
        self.state: tuple | None = None  # the state at the last ``changed()``: the fingerprint's cache key
        self._epoch: int | None = None
        self._parameters: list[torch.Tensor] = []
        self._tensors: list[torch.Tensor] = []

    def _refresh(self) -> None:
        epoch = registration_epoch()
        if epoch != self._epoch:
            self._parameters = list(self.model.parameters())
            self._tensors, self._epoch = [*self._parameters, *self.model.buffers()], epoch

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The watched tensors: every parameter and buffer, as the model holds them now (re-read only
        after a registration anywhere in the process)."""
        self._refresh()
        return self._tensors

    def changed(self) -> bool:
        """True on the first call and whenever a tensor was replaced, cast, moved or written."""
        state = self._watch.state(self.parameters)
        changed, self.state = state != self.state, state
        return changed

    def dtypes_and_devices(self) -> set[tuple[torch.dtype, torch.device]]:
        self._refresh()
        return {(p.dtype, p.device) for p in self._parameters}


def attention_namespace(model: torch.nn.Module) -> str:
    """The attention implementation of the model and its sub-configs, as a namespace part (read per
    call: ``sdpa`` and ``eager`` round K/V differently, in bf16 enough to flip tokens)."""
    config = getattr(model, "config", None)
    if config is None:
        return "attn:?"
    names = [str(getattr(config, "_attn_implementation", None))]
    for key in getattr(config, "sub_configs", None) or ():
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            names.append(f"{key}={sub._attn_implementation}")
    return "attn:" + ",".join(names)
