"""Mutants of the model identity (issue 19 item 3, issue 20, and the namespace before them): the weights
digest, the per-call watch, the attention implementation, the PEFT adapter digest, the cache salt. Each
names the tests (tests/test_identity.py, tests/test_peft.py, tests/test_core_api.py) that must fail."""

from __future__ import annotations

import torch
import xxhash

from mutants.base import mutant, replace_function

API = "tests/test_core_api.py"
IDENTITY = "tests/test_identity.py"
PEFT = "tests/test_peft.py"


@mutant(
    "fingerprint_samples",
    breaks="two checkpoints differing in one weight element never share a namespace",
    tests=(
        f"{IDENTITY}::test_one_unsampled_weight_element_written_in_place_misses",
        f"{IDENTITY}::test_one_weight_element_edited_in_another_model_object_misses_through_the_disk",
        f"{IDENTITY}::test_models_differing_in_one_embedding_row_share_no_blocks_through_the_disk",
    ),
)
def fingerprint_samples() -> None:
    """The old fingerprint: 64 strided elements of each parameter, as float64; buffers not read."""

    def make(weights_digest):
        def sampled(model):
            hasher = xxhash.xxh3_128()
            with torch.no_grad():
                for name, param in model.named_parameters():
                    flat = param.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
                    hasher.update(f"{name}:{tuple(param.shape)}".encode() + sample.numpy().tobytes())
            return hasher.digest()

        return sampled

    replace_function("hf_prefix_cache.fingerprint", "weights_digest", make)


@mutant(
    "fingerprint_skips_buffers",
    breaks="buffers (rotary frequencies) are part of the fingerprint",
    tests=(f"{IDENTITY}::test_a_changed_buffer_misses",),
)
def fingerprint_skips_buffers() -> None:
    """The weights digest reads parameters only (rotary frequencies and other buffers are not hashed)."""

    def make(weights_digest):
        def parameters_only(model):
            model.named_buffers = lambda *args, **kwargs: iter(())
            try:
                return weights_digest(model)
            finally:
                del model.named_buffers

        return parameters_only

    replace_function("hf_prefix_cache.fingerprint", "weights_digest", make)


@mutant(
    "watch_probes_no_values",
    breaks="a write through .data (no version bump) is seen by its probed values",
    tests=(
        f"{IDENTITY}::test_a_new_checkpoint_written_into_the_same_object_misses[data]",
        f"{PEFT}::test_the_adapter_digest_reads_values_not_identities[lora]",
    ),
)
def watch_probes_no_values() -> None:
    """WeightsWatch and the adapter digest key on (object, storage, version) only: no probed values."""
    from hf_prefix_cache.fingerprint import TensorWatch

    state = TensorWatch.state

    def identity_only(self, tensors):
        return state(self, tensors)[0], ()

    TensorWatch.state = identity_only


@mutant(
    "watch_list_fixed_at_construction",
    breaks="tensors registered after the cache was made are watched",
    tests=(f"{IDENTITY}::test_a_module_swapped_after_the_cache_was_made_is_watched",),
)
def watch_list_fixed_at_construction() -> None:
    """WeightsWatch reads the model's tensors once: a module swapped in later is never watched."""
    from hf_prefix_cache.fingerprint import WeightsWatch

    parameters = WeightsWatch.parameters.fget

    def first_list(self):
        if not hasattr(self, "_mutant_list"):
            self._mutant_list = parameters(self)
        return self._mutant_list

    WeightsWatch.parameters = property(first_list)


@mutant(
    "attention_not_in_namespace",
    breaks="the attention implementation is part of the namespace, read per call",
    tests=(f"{IDENTITY}::test_attention_implementations_are_separate_namespaces",),
)
def attention_not_in_namespace() -> None:
    """sdpa, eager and flash attention share one namespace."""
    replace_function(
        "hf_prefix_cache.fingerprint", "attention_namespace", lambda original: lambda model: "attn:"
    )


@mutant(
    "adapter_digest_identity_only",
    breaks="the adapter digest reads values: a .data.copy_() of adapter weights changes it",
    tests=(
        f"{PEFT}::test_the_adapter_digest_reads_values_not_identities[lora]",
        f"{PEFT}::test_the_adapter_digest_reads_values_not_identities[dora]",
        f"{PEFT}::test_the_adapter_digest_reads_values_not_identities[ia3]",
    ),
)
def adapter_digest_identity_only() -> None:
    """The adapter weights digest is recomputed only when a tensor's (id, data_ptr, _version) changed."""

    def make(weights_digest):
        known: dict = {}

        def by_identity(model, tensors):
            identity = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
            key = id(model)
            if key in known and known[key][0] == identity:
                return known[key][1]
            digest = weights_digest(model, tensors)
            known[key] = (identity, digest)
            return digest

        return by_identity

    replace_function("hf_prefix_cache.adapters", "_weights_digest", make)


@mutant(
    "adapter_digest_ignores_scaling",
    breaks="set_scale / scale_layer / unscale_layer and scaling edits start a new namespace (issue 20)",
    tests=(
        f"{PEFT}::test_set_scale_and_scale_layer_start_a_new_namespace[lora]",
        f"{PEFT}::test_set_scale_and_scale_layer_start_a_new_namespace[dora]",
        f"{PEFT}::test_set_scale_and_scale_layer_start_a_new_namespace[loha]",
    ),
)
def adapter_digest_ignores_scaling() -> None:
    """The adapter suffix ignores each layer's ``scaling`` (``set_scale``, ``scale_layer``, edits)."""

    def make(adapter_namespace):
        def without_scaling(model):
            layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
            saved = [layer.scaling for layer in layers]
            for layer in layers:
                layer.scaling = dict.fromkeys(layer.scaling, 1.0)
            try:
                return adapter_namespace(model)
            finally:
                for layer, scaling in zip(layers, saved):
                    layer.scaling = scaling

        return without_scaling

    replace_function("hf_prefix_cache.adapters", "adapter_namespace", make)


@mutant(
    "clear_keeps_digests",
    breaks="clear() re-hashes every weight, so K/V of an unseen edit never land in the old namespace",
    tests=(
        f"{IDENTITY}::test_an_unprobed_data_write_is_seen_after_clear_and_never_poisons_the_old_namespace",
    ),
)
def clear_keeps_digests() -> None:
    """cache.clear() keeps the weights digest: a change no probe saw keeps the old namespace."""
    replace_function("hf_prefix_cache.fingerprint", "forget", lambda original: lambda model: None)


@mutant(
    "watch_walks_every_call",
    breaks="the per-call watch walks the model and remakes probes only after a registration",
    tests=(f"{IDENTITY}::test_unchanged_calls_neither_walk_the_model_nor_make_probes_again",),
)
def watch_walks_every_call() -> None:
    """The per-call watch re-reads the model's tensors and remakes its probes on every call."""
    import itertools

    from hf_prefix_cache import fingerprint

    counter = itertools.count()
    fingerprint.registration_epoch = lambda: next(counter)


# -- namespaces: the cache salt, the weights, their watch, the active adapters ------------------------
@mutant(
    "namespace_ignores_salt",
    breaks="caches with different salts never share blocks",
    tests=(f"{API}::test_salts_do_not_share_blocks",),
)
def namespace_ignores_salt() -> None:
    from hf_prefix_cache import PrefixCache

    init = PrefixCache.__init__

    def unsalted(self, *args, cache_salt=None, **kwargs):
        init(self, *args, **kwargs)

    PrefixCache.__init__ = unsalted


@mutant(
    "fingerprint_ignores_weights",
    breaks="another model never hits",
    tests=(f"{API}::test_another_model_never_hits",),
)
def fingerprint_ignores_weights() -> None:
    """Two models of one class and config share a namespace whatever their weights."""

    def make(model_fingerprint):
        def class_and_config(model):
            return f"{type(model).__qualname__}:{model.config.to_json_string()}".encode().hex()[:64]

        return class_and_config

    replace_function("hf_prefix_cache.fingerprint", "model_fingerprint", make)


@mutant(
    "weights_watch_blind",
    breaks="a weight update invalidates stored blocks",
    tests=(f"{API}::test_a_weight_update_invalidates_stored_blocks",),
)
def weights_watch_blind() -> None:
    """Weight updates after the first call go unnoticed: stale blocks keep hitting."""
    from hf_prefix_cache.fingerprint import WeightsWatch

    changed = WeightsWatch.changed

    def first_time_only(self):
        if getattr(self, "_mutant_seen", False):
            return False
        self._mutant_seen = True
        return changed(self)

    WeightsWatch.changed = first_time_only


@mutant(
    "adapters_ignored",
    breaks="PEFT adapters are part of the namespace",
    tests=(
        "tests/test_peft.py::test_switching_adapters_is_exact_and_hits_stay_within_an_adapter[peft_model]",
    ),
)
def adapters_ignored() -> None:
    """The namespace ignores which PEFT adapters are active."""
    replace_function("hf_prefix_cache.adapters", "adapter_namespace", lambda original: lambda model: "")
