"""Hybrid models on a GPU: exactness with the fast kernels, and time to first token, in one short run.

Two parts, for a machine with CUDA (random weights and random token ids: nothing to download):

* **exact** - tiny Qwen3.5 / Qwen3-Next / OLMo-hybrid (Gated DeltaNet + attention) and Bamba (Mamba2 +
  attention) configs in a three-turn chat, each turn compared with ``generate()`` without a cache: same
  tokens, max |logit diff|, hit tokens, and which kernels ran (flash-linear-attention's Triton kernels
  when installed, else the torch reference);
* **ttft** - a Qwen3.5-0.8B-shaped hybrid (24 layers, 3 Gated DeltaNet : 1 attention, bf16, vocabulary
  cut to 32k) at ``prefix + new`` prompt tokens: no cache, warm (the prefix and its state snapshot
  stored), cold (a new cache inside the timed call) and split (a new salt on an existing store: the
  prefill split at the snapshot positions), interleaved, medians; plus the bytes of one snapshot.

Run: ``python -m hf_prefix_cache_eval.gpu_hybrid [--prefix 2000 8000] [--repeats 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from hf_prefix_cache import CACHE_KWARG, PrefixCache

SMALL = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
)
GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)
LAYERS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
TINY = {
    "qwen3_5_text": dict(head_dim=64, num_hidden_layers=4, layer_types=LAYERS, **GDN),
    "qwen3_next": dict(
        head_dim=64,
        num_hidden_layers=4,
        layer_types=LAYERS,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        **GDN,
    ),
    "olmo_hybrid": dict(num_hidden_layers=4, layer_types=LAYERS, **GDN),
    "bamba": dict(
        num_hidden_layers=4,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=64,
        mamba_d_state=64,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=64,
    ),
}
QWEN35_08B = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=24,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    max_position_embeddings=32768,
)


def model_of(family: str, fields: dict, device: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[family](bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)
    with torch.device(device):  # weights initialised where they run (a 0.8B model inits in seconds on a GPU)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kernels_used() -> dict:
    from transformers.utils import import_utils

    return {
        "flash_linear_attention": bool(
            getattr(import_utils, "is_flash_linear_attention_available", lambda: False)()
        ),
        "causal_conv1d": bool(getattr(import_utils, "is_causal_conv1d_available", lambda: False)()),
        "mamba_ssm": bool(getattr(import_utils, "is_mamba_2_ssm_available", lambda: False)()),
    }


def exact(device: str) -> list[dict]:
    rows = []
    for family, fields in TINY.items():
        for dtype in (torch.float32, torch.bfloat16):
            model = model_of(family, {**SMALL, **fields}, device, dtype)
            cache = PrefixCache(model, block_size=16, max_memory="256MiB")
            generator = torch.Generator().manual_seed(1)
            ids = torch.randint(3, 512, (1, 300), generator=generator).to(device)
            for turn in range(3):
                kwargs = dict(
                    max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True
                )
                mask = torch.ones_like(ids)
                ref = model.generate(ids, attention_mask=mask, **kwargs)
                out = model.generate(ids, attention_mask=mask, **kwargs, **{CACHE_KWARG: cache})
                diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref.logits, out.logits))
                largest = max(float(a.float().abs().max()) for a in ref.logits)
                rows.append(
                    {
                        "family": family,
                        "dtype": str(dtype).removeprefix("torch."),
                        "turn": turn + 1,
                        "prompt_tokens": ids.shape[1],
                        "hit_tokens": cache.last_call.hit_tokens,
                        "same_tokens": bool(torch.equal(ref.sequences, out.sequences)),
                        "max_logit_diff": diff,
                        "max_logit": largest,
                    }
                )
                new = torch.randint(3, 512, (1, 40), generator=generator).to(device)
                ids = torch.cat([out.sequences, new], dim=1)
            del model, cache
    return rows


def ttft(device: str, prefix_tokens: int, new_tokens: int, repeats: int) -> dict:
    model = model_of("qwen3_5_text", QWEN35_08B, device, torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 32000, (1, prefix_tokens), generator=generator)
    prompts = [
        torch.cat([prefix, torch.randint(3, 32000, (1, new_tokens), generator=generator)], 1).to(device)
        for _ in range(repeats + 1)
    ]

    def generate(ids, **kwargs):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **kwargs
        )

    warm = PrefixCache(model, max_memory="8GiB")
    generate(torch.cat([prefix.to(device), torch.tensor([[2]], device=device)], 1), **{CACHE_KWARG: warm})
    shared = PrefixCache(model, max_memory="8GiB")
    salts = iter(range(10**6))
    calls = {
        "no_cache": lambda ids: generate(ids),
        "warm": lambda ids: generate(ids, **{CACHE_KWARG: warm}),
        "cold": lambda ids: generate(ids, **{CACHE_KWARG: PrefixCache(model, max_memory="8GiB")}),
        "split": lambda ids: generate(
            ids, **{CACHE_KWARG: PrefixCache(model, store=shared.store, cache_salt=f"run {next(salts)}")}
        ),
    }
    outputs = {mode: calls[mode](prompts[0]) for mode in calls}  # warm-up
    mismatches = [mode for mode in calls if not torch.equal(outputs[mode], outputs["no_cache"])]
    seconds: dict[str, list[float]] = {mode: [] for mode in calls}
    order = random.Random(0)
    for ids in prompts[1:]:
        modes = list(calls)
        order.shuffle(modes)
        for mode in modes:
            sync(device)
            start = time.perf_counter()
            calls[mode](ids)
            sync(device)
            seconds[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    stats = warm.stats
    return {
        "prompt_tokens": prefix_tokens + new_tokens,
        "median_ms": {mode: round(value * 1000, 1) for mode, value in median.items()},
        "no_cache / warm": round(median["no_cache"] / median["warm"], 2),
        "cold / no_cache": round(median["cold"] / median["no_cache"], 3),
        "split / no_cache": round(median["split"] / median["no_cache"], 3),
        "warm_hit_tokens": warm.last_call.hit_tokens,
        "bytes_per_snapshot": stats.snapshot_bytes // max(1, stats.snapshots),
        "bytes_per_block": warm.store.kv.block_bytes(),
        "mismatches": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefix", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
    result["kernels"] = kernels_used()
    result["torch"] = torch.__version__
    print(json.dumps({k: result[k] for k in ("device", "kernels", "torch")}), flush=True)
    if not args.skip_exact:
        result["exact"] = exact(args.device)
        for row in result["exact"]:
            print(json.dumps(row), flush=True)
    result["ttft"] = []
    for prefix in args.prefix:
        result["ttft"].append(ttft(args.device, prefix, args.new_tokens, args.repeats))
        print(json.dumps(result["ttft"][-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 1 if any(r["mismatches"] for r in result["ttft"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
