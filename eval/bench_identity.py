"""What the model identity costs: the full-content weights digest once per model, and the per-call watch.

* hash throughput on 256 MiB: XXH3-128 (used) against BLAKE2b-128;
* SmolLM2-135M fp32 (and the same weights in bf16): ``PrefixCache`` construction (no weight is read),
  the first digest (every parameter and buffer), a reused digest, and the 8B bf16 extrapolation at the
  measured bytes/s;
* per call: ``WeightsWatch.changed()``, the whole ``cache.namespace`` (watch, attention implementation,
  adapters), and ``adapter_namespace`` with a LoRA (r=8 on q/k/v/o of every layer).

Run ``python -m hf_prefix_cache_eval.bench_identity``. CPU only; the machine may be shared, so the load
average is printed.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
import warnings

import torch
import xxhash

from hf_prefix_cache import PrefixCache
from hf_prefix_cache.adapters import adapter_namespace
from hf_prefix_cache.fingerprint import WeightsWatch, model_fingerprint

from .models import load_model

BYTES_8B_BF16 = 8.03e9 * 2  # Llama-3.1-8B: 8.03 billion parameters, 2 bytes each


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def digest_cold_s(model) -> float:
    """The first digest of ``model``: a fresh copy of every cache entry is forced by a new state key."""
    from hf_prefix_cache import fingerprint

    def cold():
        fingerprint._tensor_digests.pop(model, None)
        model_fingerprint(model)

    return median_s(cold, 3)


def main() -> None:
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    data = torch.randn(64 << 20).view(torch.uint8).numpy()  # 256 MiB
    for name, fn in [
        ("XXH3-128", lambda: xxhash.xxh3_128(data).digest()),
        ("BLAKE2b-128", lambda: hashlib.blake2b(data, digest_size=16).digest()),
    ]:
        seconds = median_s(fn, 3)
        print(f"{name}: {data.nbytes / seconds / 1e9:.2f} GB/s")

    model, _ = load_model("smollm2")
    model.eval()
    for dtype in (torch.float32, torch.bfloat16):
        subject = model.to(dtype)
        size = model_bytes(subject)
        cold = digest_cold_s(subject)
        rate = size / cold
        print(
            f"SmolLM2 {dtype}: {size / 1e6:.0f} MB digest {cold * 1000:.0f} ms ({rate / 1e9:.2f} GB/s); "
            f"8B bf16 ({BYTES_8B_BF16 / 1e9:.1f} GB) at that rate: {BYTES_8B_BF16 / rate:.1f} s"
        )
    model.to(torch.float32)

    construct = median_s(lambda: PrefixCache(model, max_memory="64MiB", install=False), 5)
    print(f"PrefixCache construction (no weight read): {construct * 1000:.1f} ms")
    cache = PrefixCache(model, max_memory="64MiB", install=False)
    start = time.perf_counter()
    assert cache.namespace
    print(f"first namespace (digest of every tensor): {(time.perf_counter() - start) * 1000:.0f} ms")
    watch = WeightsWatch(model)
    watch.changed()
    print(
        f"WeightsWatch.changed(), {len(watch.parameters)} tensors: {median_s(watch.changed, 200) * 1000:.3f} ms"
    )
    print(f"cache.namespace per call: {median_s(lambda: cache.namespace, 200) * 1000:.3f} ms")

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        lora = peft.get_peft_model(model, config).eval()
    adapter_namespace(lora)
    print(
        f"adapter_namespace per call (LoRA r=8 on q/k/v/o): {median_s(lambda: adapter_namespace(lora), 100) * 1000:.3f} ms"
    )
    lora_cache = PrefixCache(lora, max_memory="64MiB", install=False)
    assert lora_cache.namespace
    print(
        f"cache.namespace per call with that LoRA: {median_s(lambda: lora_cache.namespace, 100) * 1000:.3f} ms"
    )


if __name__ == "__main__":
    main()
