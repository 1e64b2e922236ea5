"""Exactness beyond the matrix: padding, rows that stop early, fallbacks, pipelines, stop strings,
accelerate offloading, a small pool under eviction, and negative controls proving the checks can fail."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.assertions import assert_exact, logit_tolerance, max_logit_diff
from support.calls import GEN, compare
from support.models import DECODER, EOS, PAD, char_tokenizer, model_for, random_ids, tiny_config, tiny_model
from support.oracle import StoredPrefixes, assert_reused, record_stored, stored_sequences
from support.scenarios import STRATEGIES, StopOnResidue, cat, left_pad, new_tokens, run_single_scenario
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config, StoppingCriteriaList

from hf_prefix_cache import PrefixCache, PrefixCacheFallbackWarning

# one intra-op thread and no deprecation noise (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("quiet_single_thread")

GREEDY = dict(do_sample=False, max_new_tokens=8)
CAUGHT = r"logit diff|differs|not a near tie"  # what assert_exact says when cached and no-cache runs differ


def fallback_warnings(records) -> list[str]:
    return [str(w.message) for w in records if issubclass(w.category, PrefixCacheFallbackWarning)]


# -- padding ------------------------------------------------------------------------------------------------
def test_right_padding_is_refused_clearly():
    model = model_for("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    rows = [random_ids(12, 1)[0].tolist(), random_ids(7, 2)[0].tolist()]
    ids = torch.tensor([r + [PAD] * (12 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (12 - len(r)) for r in rows])
    with pytest.raises(ValueError, match=r"padding_side.*left"):
        model.generate(ids, attention_mask=mask, cache=cache, **GREEDY)
    assert cache.store.pool.num_referenced == 0
    # the cache is still usable afterwards
    ids, mask = left_pad(rows)
    outcome = compare(model, cache, ids, mask, **GREEDY)
    assert_exact(outcome.ref, outcome.out)


def test_left_padded_batch_without_attention_mask():
    """generate() infers the mask from pad tokens; the cache must infer the same rows."""
    model = model_for("gemma3")
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    oracle = StoredPrefixes(4)
    first = random_ids(30, 3)
    cold = compare(model, cache, first, **GREEDY)
    record_stored(cold, oracle)
    ids, mask = left_pad([first[0, :26].tolist() + new_tokens(3, 4), new_tokens(9, 5)])
    outcome = compare(model, cache, ids, mask, pass_mask=False, **GREEDY)
    assert_exact(outcome.ref, outcome.out)
    assert assert_reused(outcome, oracle) > 0


def test_pad_id_inside_prompt_without_mask():
    """Tiny models (and real ones with a pad id that is also text) can emit the pad id mid-reply; a user who
    continues the conversation without a mask gets generate()'s inferred mask (zeros in the middle)."""
    model = model_for("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    ids = cat(random_ids(10, 6), [PAD], random_ids(9, 7))
    with pytest.warns(PrefixCacheFallbackWarning, match="not left padding"):
        outcome = compare(model, cache, ids, **GREEDY)  # no attention_mask: falls back, exactly
    assert_exact(outcome.ref, outcome.out)


# -- rows that stop early -------------------------------------------------------------------------------------
def _early_stop_batch(model):
    rows = [random_ids(22, 40)[0].tolist(), random_ids(17, 41)[0].tolist(), random_ids(26, 42)[0].tolist()]
    ids, mask = left_pad(rows)
    probe = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    # a token row 1 emits becomes an extra EOS: row 1 stops early, the others (most likely) later or never.
    # It is the first new token after which row 1's prompt + reply fill a block its prompt alone did not,
    # so that a reply block is stored (and checked) before the stop.
    reply = probe[1, ids.shape[1] :].tolist()
    first_block_end = len(rows[1]) // 4 * 4 + 4
    step = next(
        k
        for k in range(1, 8)
        if len(rows[1]) + k + 1 >= first_block_end and reply[k] not in [*reply[:k], EOS]
    )
    return rows, ids, mask, reply[step]


@pytest.mark.parametrize("how", ["eos", "stopping_criteria"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_rows_that_stop_early_store_no_padding(family, how):
    model = model_for(family)
    rows, ids, mask, stop = _early_stop_batch(model)
    width = ids.shape[1]
    if how == "eos":
        kwargs = dict(eos_token_id=[EOS, stop], pad_token_id=PAD)
        stop_ids = (EOS, stop)
    else:
        kwargs = dict(
            stopping_criteria=StoppingCriteriaList([StopOnResidue(width, modulus=3, min_new=2)]),
            pad_token_id=PAD,
        )
        stop_ids = (EOS,)
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    oracle = StoredPrefixes(4)
    outcome = compare(model, cache, ids, mask, do_sample=False, max_new_tokens=10, **kwargs)
    assert_exact(outcome.ref, outcome.out)
    record_stored(outcome, oracle, stop_ids=stop_ids)

    sequences = outcome.out.sequences
    steps = sequences.shape[1] - width
    padded_rows = reply_blocks = 0
    stored = stored_sequences(cache)
    for index, prompt in enumerate(rows):
        reply = sequences[index, width:].tolist()
        end = next((i + 1 for i, t in enumerate(reply) if t in stop_ids), None)
        if end is None:
            while reply and reply[-1] == PAD:
                reply.pop()
            end = len(reply)
        if end >= steps - 1:
            continue  # this row ran to the end: nothing but real tokens went through the model
        padded_rows += 1
        assert set(reply[end:]) <= {PAD}, f"row {index}: after its stop come pads {reply}"
        real = prompt + reply[:end]
        reply_blocks += len(real) // 4 > len(prompt) // 4  # a stored block holds reply tokens
        # the row's real tokens up to its stop are stored, as far as they fill blocks
        assert tuple(real[: len(real) // 4 * 4]) in stored or len(real) < 4
        # no stored block extends the row past its stop into the padding
        for prefix in stored:
            if len(prefix) > len(real) and list(prefix[: len(real)]) == real:
                pytest.fail(f"row {index}: block {prefix[len(real) :]} after the stop token was stored")
        # a later prompt that carries the pads as text does not hit past the stop
        follow = cat(real + reply[end:], new_tokens(6, 50 + index))
        again = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
        assert_exact(again.ref, again.out)
        # ... and hits exactly the row's real blocks, not one token of the padding after them
        assert again.hit_tokens == oracle.hit(follow[0].tolist()) == len(real) // 4 * 4
    assert padded_rows >= 1, "no row stopped early: the test would prove nothing"
    assert reply_blocks >= 1, "no early-stopped row filled a reply block: only prompts were checked"


# -- fallbacks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("assist", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_falls_back_with_one_warning(assist):
    model = model_for("llama")
    kwargs = (
        dict(assistant_model=model_for("llama", seed=1))
        if assist == "assistant_model"
        else dict(prompt_lookup_num_tokens=3)
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=4, num_blocks=64)
        prompt = cat(random_ids(16, 8), random_ids(16, 8))  # repetitive: prompt lookup finds candidates
        for _ in range(2):
            outcome = compare(model, cache, prompt, **GREEDY, **kwargs)
            assert_exact(outcome.ref, outcome.out)
            assert cache.store.pool.num_referenced == 0
    messages = fallback_warnings(records)
    assert len(messages) == 1 and "assisted" in messages[0], messages
    # the same cache still reuses prefixes in ordinary calls
    plain = compare(model, cache, prompt, **GREEDY)
    assert_exact(plain.ref, plain.out)
    again = compare(model, cache, prompt, **GREEDY)
    assert_exact(again.ref, again.out)
    assert again.hit_tokens == 28


def test_inputs_embeds_only_falls_back():
    model = model_for("llama")
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    ids = random_ids(20, 9)
    embeds = model.get_input_embeddings()(ids).detach()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ref = model.generate(inputs_embeds=embeds, **GREEDY, **GEN)
        out = model.generate(inputs_embeds=embeds, cache=cache, **GREEDY, **GEN)
    assert_exact(ref, out)
    assert len(fallback_warnings(records)) == 1
    assert "inputs_embeds" in fallback_warnings(records)[0]
    assert cache.store.pool.num_referenced == 0
    with_ids = compare(model, cache, ids, **GREEDY)  # the cache still works with token ids
    assert_exact(with_ids.ref, with_ids.out)


def _unservable(name: str):
    torch.manual_seed(0)
    if name == "llama-dynamic-rope":
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        config = LlamaConfig(**{**DECODER, "rope_parameters": rope})
    elif name == "phi3-longrope":
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
        }
        config = Phi3Config(
            **{**DECODER, "num_key_value_heads": 4, "max_position_embeddings": 128},
            original_max_position_embeddings=32,
            rope_parameters=rope,
        )
    elif name == "gemma3-bidirectional":
        config = Gemma3TextConfig(**{**tiny_config("gemma3").to_dict(), "use_bidirectional_attention": True})
    elif name == "mamba":
        from transformers import MambaConfig

        config = MambaConfig(
            vocab_size=96,
            hidden_size=64,
            state_size=8,
            num_hidden_layers=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    else:
        raise ValueError(name)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("llama-dynamic-rope", "dynamic"),
        ("phi3-longrope", "longrope"),
        ("gemma3-bidirectional", "bidirectional"),
        ("mamba", "linear_attention"),
    ],
)
def test_unservable_models_fall_back_up_front(name, reason):
    model = _unservable(name)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cache = PrefixCache(model, block_size=4, num_blocks=64)
        assert len(fallback_warnings(records)) == 1, fallback_warnings(records)
        assert cache.fallback and reason in cache.fallback
        assert cache.stats.fallback == cache.fallback and cache.store is None
        first = random_ids(40, 10)  # longer than longrope's original 32 positions
        outcome = compare(model, cache, first, **GREEDY)
        assert_exact(outcome.ref, outcome.out)
        follow = cat(outcome.out.sequences, new_tokens(5, 11))
        again = compare(model, cache, follow, torch.ones_like(follow), **GREEDY)
        assert_exact(again.ref, again.out)
        assert again.hit_tokens == 0 and cache.stats.hit_tokens == 0
    assert len(fallback_warnings(records)) == 1, "warn once, not per call"


# -- pipeline, stop strings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_kw", ["cache", "past_key_values"])
def test_text_generation_pipeline_reuses_the_conversation(cache_kw):
    from transformers import pipeline

    tokenizer = char_tokenizer()
    model = model_for("gemma3")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    chat = [
        {"role": "system", "content": "You are a tiny test model."},
        {"role": "user", "content": "Say something nice, please."},
    ]
    first_ref = pipe(chat, **GREEDY)
    first = pipe(chat, **GREEDY, **{cache_kw: cache})
    assert first == first_ref and cache.last_call.hit_tokens == 0
    first_ids = _chat_ids(tokenizer, chat)
    # what the first call stored: its prompt and the reply tokens that went through the model
    stored = model.generate(torch.tensor([first_ids]), **GREEDY)[0, :-1].tolist()
    assert len(stored) > len(first_ids) // 4 * 4 + 4, "the reply fills no block: replies would go unchecked"
    chat = [*first[0]["generated_text"], {"role": "user", "content": "And again?"}]
    second_ref = pipe(chat, **GREEDY)
    second = pipe(chat, **GREEDY, **{cache_kw: cache})
    assert second == second_ref
    second_ids = _chat_ids(tokenizer, chat)
    assert cache.last_call.prompt_tokens == len(second_ids)
    # the whole first turn, its reply included, up to the last full block both share
    shared = next((i for i, (a, b) in enumerate(zip(stored, second_ids)) if a != b), len(stored))
    assert cache.last_call.hit_tokens == min(shared, len(second_ids) - 1) // 4 * 4
    assert cache.last_call.hit_tokens > len(first_ids) // 4 * 4, "the first reply's blocks were not reused"
    assert cache.store.pool.num_referenced == 0
    # a batch through the pipeline (left padding by the tokenizer)
    texts = ["<s>u:hello there\n<s>a:", "<s>u:Say something nice, please.\n<s>a:"]
    batch_ref = pipe(texts, batch_size=2, **GREEDY)
    batch = pipe(texts, batch_size=2, **GREEDY, **{cache_kw: cache})
    assert batch == batch_ref


def _chat_ids(tokenizer, chat) -> list[int]:
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_stop_strings_with_a_tokenizer():
    tokenizer = char_tokenizer()
    model = model_for("mistral")
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    ids = tokenizer("<s>u:Tell me a long story about caches.\n<s>a:", return_tensors="pt").input_ids
    probe = model.generate(ids, do_sample=False, max_new_tokens=10)
    reply = tokenizer.decode(probe[0, ids.shape[1] :])
    stop = reply[3:5]  # stops generation after about 5 tokens
    kwargs = dict(do_sample=False, max_new_tokens=10, stop_strings=[stop], tokenizer=tokenizer)
    cold = compare(model, cache, ids, **kwargs)
    assert_exact(cold.ref, cold.out)
    assert cold.out.sequences.shape[1] - ids.shape[1] < 10, "the stop string did not stop generation"
    oracle = StoredPrefixes(4)
    record_stored(cold, oracle)
    follow = cat(cold.out.sequences, tokenizer("\n<s>u:more\n<s>a:", return_tensors="pt").input_ids)
    again = compare(model, cache, follow, **kwargs)
    assert_exact(again.ref, again.out)
    assert assert_reused(again, oracle) >= ids.shape[1] // 4 * 4


# -- accelerate --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offload", ["disk", "cpu_offload"])
def test_accelerate_offloaded_model(offload, tmp_path):
    import accelerate

    model = tiny_model("llama")
    plain = model_for("llama")  # same seed and config: same weights, not dispatched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    if offload == "disk":
        device_map = {
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
        model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    else:
        model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    cache = run_single_scenario(model, STRATEGIES["greedy"])
    assert cache.stats.hit_tokens > 0
    # and the dispatched model with the cache equals the plain model without one
    prompt = random_ids(30, 0)
    with_cache = model.generate(prompt, cache=cache, **GREEDY, **GEN)
    without = plain.generate(prompt, **GREEDY, **GEN)
    assert cache.last_call.hit_tokens == 28
    assert_exact(without, with_cache)


# -- a small pool: eviction under load -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_small_pool_evicts_and_stays_exact(family):
    """12 blocks for prompts of 11-27 tokens: blocks are evicted and reused while hits of 4-16 tokens
    (below, at and past the window of 8) keep coming; every call must stay exact."""
    model = model_for(family)
    cache = PrefixCache(model, block_size=4, num_blocks=12)
    base = random_ids(24, 12)[0].tolist()
    hits = 0
    for turn in range(8):
        prompt = cat(base[: 4 + 4 * (turn % 5)], new_tokens(7, 100 + turn))
        outcome = compare(model, cache, prompt, **GREEDY)
        assert_exact(outcome.ref, outcome.out, label=f"turn {turn}")
        assert outcome.forwards[0] == prompt.shape[1] - outcome.hit_tokens
        hits += outcome.hit_tokens
    assert cache.stats.evictions > 0 and hits > 0
    assert cache.store.pool.num_cached <= 12


# -- low precision tolerance ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_tolerance_is_no_cache_noise(dtype, family):
    """Measured on the CPU kernels this runs on (``torch.backends.cpu.get_cpu_capability()``), not on the
    one where the tolerance was first measured: the no-cache run differs from itself, when only its
    prefill is chunked differently, by less than the tolerance; the cached run differs from it by no more
    than that noise (2x, or 2 ulp where the noise is smaller); and a real error, noise on the stored keys,
    lands far outside both."""
    capability = torch.backends.cpu.get_cpu_capability()
    model = model_for(family, dtype)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    first = random_ids(30, 1)
    model.generate(first, cache=cache, **GREEDY)
    prompt = cat(first[:, :26], new_tokens(10, 2))
    ref = model.generate(prompt, **GREEDY, **GEN)
    noise = max(
        max_logit_diff(ref, model.generate(prompt, prefill_chunk_size=chunk, **GREEDY, **GEN))
        for chunk in (3, 5)
    )
    out = model.generate(prompt, cache=cache, **GREEDY, **GEN)
    assert cache.last_call.hit_tokens == 24
    tol = logit_tolerance(dtype, ref.logits)
    diff = max_logit_diff(ref, out)
    ulp = torch.finfo(dtype).eps * max(float(s.abs().max()) for s in ref.logits)
    assert noise <= tol, (
        f"on {capability} kernels the no-cache run differs from itself by {noise:.3g} > tolerance {tol:.3g}: "
        "the tolerance does not hold on this CPU (not a cache bug); measure it here before changing it"
    )
    assert diff <= tol and diff <= max(2 * noise, 2 * ulp), (capability, diff, noise, ulp)
    _add_key_noise(cache, 0)
    wrong = model.generate(prompt, cache=cache, **GREEDY, **GEN)
    # 20 noise seeds, this prompt: >= 2.8 tolerances and >= 5.7x max(noise, ulp) (mistral bf16, whose window
    # of 8 sees 7 corrupted slots; llama and gemma3 >= 7 and >= 17)
    assert caught_by(ref, wrong, dtype) >= 2 and max_logit_diff(ref, wrong) >= 4 * max(noise, ulp), capability


# -- negative controls ---------------------------------------------------------------------------------------------
def _warm_case(family: str, dtype: torch.dtype = torch.float32):
    model = model_for(family, dtype)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    oracle = StoredPrefixes(4)
    first = random_ids(30, 13)
    cold = compare(model, cache, first, **GREEDY)
    assert_exact(cold.ref, cold.out, dtype)
    record_stored(cold, oracle)
    return model, cache, oracle, cat(first[:, :26], new_tokens(8, 14))


def _add_key_noise(cache: PrefixCache, seed: int, scale: float = 0.5) -> None:
    """Seeded noise on every stored key (not on the global RNG, which earlier tests leave anywhere)."""
    generator = torch.Generator().manual_seed(seed)
    for keys in cache.store.kv.keys:
        keys.add_((scale * torch.randn(keys.shape, generator=generator)).to(keys.dtype))


def caught_by(ref, out, dtype: torch.dtype) -> float:
    """How far past the tolerance a greedy single-row run went, in tolerances: the largest |logit diff| over
    the steps ``assert_exact`` compares (up to and including the first differing token)."""
    width = ref.sequences.shape[1] - len(ref.logits)
    a, b = ref.sequences[0, width:].tolist(), out.sequences[0, width:].tolist()
    diverged = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    steps = min(len(ref.logits), len(out.logits)) if diverged is None else diverged + 1
    diff = max(float((ref.logits[i][0].float() - out.logits[i][0].float()).abs().max()) for i in range(steps))
    return diff / logit_tolerance(dtype, ref.logits)


@pytest.mark.parametrize("seed", [0, 1004])
@pytest.mark.parametrize(
    ("family", "dtype", "margin"),
    [
        ("llama", torch.float32, 100),
        ("mistral", torch.float32, 100),
        ("gemma3", torch.float32, 100),
        # 20 seeds: min 7.3x (median 9.8x) the tolerance; 1.2x when tiny Gemma3 had query_pre_attn_scalar 256
        ("gemma3", torch.bfloat16, 4),
        ("llama", torch.float16, 4),
    ],
)
def test_negative_control_noisy_kv_is_caught(family, dtype, margin, seed):
    """Noise on the stored keys is caught with a clear margin, also by the looser bf16/fp16 comparison
    (tolerance, near ties): the margin is what the noise moved the logits, in tolerances."""
    model, cache, oracle, prompt = _warm_case(family, dtype)
    _add_key_noise(cache, seed)
    outcome = compare(model, cache, prompt, **GREEDY)
    assert assert_reused(outcome, oracle) == 24  # the corrupted blocks really were served
    with pytest.raises(AssertionError, match=CAUGHT):
        assert_exact(outcome.ref, outcome.out, dtype)
    assert caught_by(outcome.ref, outcome.out, dtype) >= margin


@pytest.mark.parametrize(("family", "dtype"), [("llama", torch.float16), ("gemma3", torch.bfloat16)])
def test_negative_control_noisy_kv_beams_is_caught(family, dtype):
    """Beam search in bf16/fp16, where beams may differ at a near tie of the no-cache run: noise on the
    stored keys still fails, and the prefill's logits (every beam holds the prompt) are far outside the
    tolerance."""
    model, cache, oracle, prompt = _warm_case(family, dtype)
    _add_key_noise(cache, 0)
    outcome = compare(model, cache, prompt, **STRATEGIES["beam3_n2"].kwargs)
    assert assert_reused(outcome, oracle) == 24
    with pytest.raises(AssertionError, match=CAUGHT):
        assert_exact(outcome.ref, outcome.out, dtype, num_beams=3)
    prefill = float((outcome.ref.logits[0] - outcome.out.logits[0]).abs().max())
    assert prefill >= 3 * logit_tolerance(dtype, outcome.ref.logits)  # 20 seeds: min 4.7x (gemma3 bf16)


@pytest.mark.parametrize(("family", "which"), [("llama", "values"), ("mistral", "both")])
def test_negative_control_misplaced_kv_is_caught(family, which, monkeypatch):
    """K/V served one slot off must be caught. With full attention, rolling K and V together only permutes
    the (key, value) pairs the new tokens all see (RoPE is baked into K): invisible, so roll V alone there
    (each key gets its neighbour's value). With a sliding window, rolling both moves a token in or out of
    the window."""
    model, cache, oracle, prompt = _warm_case(family)
    read = cache.store.kv.read

    def misplaced(layer, block_ids):
        keys, values = read(layer, block_ids)
        return (keys.roll(1, dims=1) if which == "both" else keys), values.roll(1, dims=1)

    monkeypatch.setattr(cache.store.kv, "read", misplaced)
    outcome = compare(model, cache, prompt, **GREEDY)
    assert assert_reused(outcome, oracle) == 24
    with pytest.raises(AssertionError, match=CAUGHT):
        assert_exact(outcome.ref, outcome.out)


def test_negative_control_whole_prompt_trap_is_caught(monkeypatch):
    """Serving every block of a fully stored prompt (nothing left to compute) makes generate() feed the
    whole prompt again on top of the cache: the reuse check and the exactness check both catch it."""
    model, cache, oracle, _ = _warm_case("llama")
    prompt = random_ids(30, 13)[:, :28]  # 7 blocks, all stored by the cold call
    match = cache.store.match

    def greedy_match(namespace, tokens, hashes, max_blocks, *args, **kwargs):
        return match(namespace, tokens, hashes, len(hashes), *args, **kwargs)

    monkeypatch.setattr(cache.store, "match", greedy_match)
    outcome = compare(model, cache, prompt, **GREEDY)
    assert outcome.hit_tokens == 28
    with pytest.raises(AssertionError, match="hit_tokens"):
        assert_reused(outcome, oracle)
    with pytest.raises(AssertionError, match=CAUGHT):
        assert_exact(outcome.ref, outcome.out)


def test_negative_control_sliding_window_bookkeeping_is_caught(monkeypatch):
    """A sliding layer served its last window slots but told a wrong total length (as if the prefix were only
    those 7 slots): generate() trusts the cache length and recomputes from slot 7, which the prefill check
    catches. (Tokens and logits stay exact here: with 2 layers of window 8 the last token only sees 14
    positions back, all recomputed, so only the forward check can see this one.)"""
    from hf_prefix_cache.layers import PrefixSlidingLayer

    model, cache, oracle, prompt = _warm_case("mistral")
    load_prefix = PrefixSlidingLayer.load_prefix

    def forgetful(self, keys, values, total_length=None):
        load_prefix(self, keys, values, total_length=None)

    monkeypatch.setattr(PrefixSlidingLayer, "load_prefix", forgetful)
    outcome = compare(model, cache, prompt, **GREEDY)
    assert outcome.hit_tokens == 24  # what prepare() matched is right; the length the layers report is not
    assert outcome.forwards[0] == prompt.shape[1] - 7
    with pytest.raises(AssertionError, match="forwards fed"):
        assert_reused(outcome, oracle)


def _corrupt_block(cache, tokens: list[int], index: int) -> None:
    """Add noise to K and V of block ``index`` of the stored chain of ``tokens``, in every layer."""
    block = cache.store.pool.table[cache.block_hashes(tokens)[index]]
    for keys, values in zip(cache.store.kv.keys, cache.store.kv.values):
        keys[:, block.block_id].add_(torch.randn_like(keys[:, block.block_id]))
        values[:, block.block_id].add_(torch.randn_like(values[:, block.block_id]))


@pytest.mark.parametrize(
    ("family", "blocks", "caught"),
    [
        ("mistral", [0, 1, 2, 3], False),  # slots 0-15: older than the window of the cut at 24 (slots 17-23)
        ("mistral", [4], True),  # slots 16-19: inside that window
        ("gemma3", [0], True),  # its full-attention layer sees every slot
    ],
)
def test_sliding_window_reads_only_its_window(family, blocks, caught):
    """An all-sliding model must not depend on stored blocks older than the window before the cut (they
    are never loaded), and must depend on the blocks inside it; a mixed model depends on all of them."""
    model, cache, oracle, prompt = _warm_case(family)
    for index in blocks:
        _corrupt_block(cache, random_ids(30, 13)[0].tolist(), index)
    outcome = compare(model, cache, prompt, **GREEDY)
    assert assert_reused(outcome, oracle) == 24
    if caught:
        with pytest.raises(AssertionError, match=CAUGHT):
            assert_exact(outcome.ref, outcome.out)
    else:
        assert_exact(outcome.ref, outcome.out)


# -- more call shapes -------------------------------------------------------------------------------------------
def test_positional_generation_config_and_tensor_output():
    """generate(ids, GenerationConfig(...)) with a plain tensor result: the expansion comes from the
    positional config, and the reply is still stored (the next turn hits it)."""
    from transformers import GenerationConfig

    model = model_for("gemma3")
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    config = GenerationConfig(
        do_sample=True, top_k=20, num_return_sequences=2, max_new_tokens=8, pad_token_id=0, eos_token_id=2
    )
    prompt = random_ids(30, 15)
    outputs = []
    for kwargs in ({}, {"cache": cache}):
        torch.manual_seed(3)
        outputs.append(model.generate(prompt, config, **kwargs))
    assert torch.equal(outputs[0], outputs[1]) and outputs[1].shape[0] == 2
    assert cache.last_call.stored_blocks > 0 and cache.store.pool.num_referenced == 0
    follow = cat(outputs[1][1:], new_tokens(5, 16))
    if bool((follow == PAD).any()):
        pytest.skip("the sampled reply holds the pad id")
    again = compare(model, cache, follow, **GREEDY)
    assert_exact(again.ref, again.out)
    assert again.hit_tokens >= 36, "the second sampled reply's blocks were not stored"


def test_duplicate_rows_in_one_batch():
    model = model_for("mistral")
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    oracle = StoredPrefixes(4)
    row = random_ids(21, 17)[0].tolist()
    ids, mask = left_pad([row, new_tokens(9, 18), row])
    for _ in range(2):
        outcome = compare(model, cache, ids, mask, **GREEDY)
        assert_exact(outcome.ref, outcome.out)
        assert_reused(outcome, oracle)
        record_stored(outcome, oracle)
    assert outcome.hit_tokens > 0


class _Boom(Exception):
    pass


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exception_inside_generate_releases_everything(family):
    """A stopping criterion that raises mid-generation: nothing stays referenced, nothing half-written is
    served, and the next call is exact."""
    from transformers import StoppingCriteria

    class Raising(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise _Boom
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model = model_for(family)
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    oracle = StoredPrefixes(4)
    first = random_ids(30, 19)
    cold = compare(model, cache, first, **GREEDY)
    record_stored(cold, oracle)
    prompt = cat(first[:, :26], new_tokens(6, 20))
    with pytest.raises(_Boom):
        model.generate(prompt, cache=cache, stopping_criteria=StoppingCriteriaList([Raising()]), **GREEDY)
    assert cache.store.pool.num_referenced == 0
    again = compare(model, cache, prompt, **GREEDY)
    assert_exact(again.ref, again.out)
    assert assert_reused(again, oracle) == 24  # the failed call stored nothing


# -- the model changes after the cache was made ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    [
        "load_state_dict",
        "no_grad_copy",
        "data_copy",
        "data_assign",
    ],
)
def test_weight_update_after_caching_is_noticed(how):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1).state_dict()
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    prompt = random_ids(30, 21)
    model.generate(prompt, cache=cache, **GREEDY)
    if how == "load_state_dict":
        model.load_state_dict(other)
    else:
        for name, param in model.named_parameters():
            if how == "no_grad_copy":
                with torch.no_grad():
                    param.copy_(other[name])
            elif how == "data_copy":
                param.data.copy_(other[name])
            else:
                param.data = other[name].clone()
    outcome = compare(model, cache, prompt, **GREEDY)
    assert_exact(outcome.ref, outcome.out)
    assert outcome.hit_tokens == 0


def test_dtype_change_after_caching():
    """The stored float32 K/V cannot serve a bf16 model: the call falls back, exactly, and says why."""
    model = tiny_model("llama", seed=0)
    cache = PrefixCache(model, block_size=4, num_blocks=64)
    prompt = random_ids(30, 22)
    model.generate(prompt, cache=cache, **GREEDY)
    model.to(torch.bfloat16)
    with pytest.warns(PrefixCacheFallbackWarning, match="dtype or device changed"):
        outcome = compare(model, cache, prompt, **GREEDY)
    assert_exact(outcome.ref, outcome.out, torch.bfloat16)
    with pytest.raises(RuntimeError, match="create a new one"):
        cache.prepare(prompt)


def test_offloaded_models_sharing_a_store_do_not_share_blocks():
    import accelerate

    first = accelerate.cpu_offload(tiny_model("llama", seed=0), execution_device=torch.device("cpu"))
    second = accelerate.cpu_offload(tiny_model("llama", seed=1), execution_device=torch.device("cpu"))
    cache = PrefixCache(first, block_size=4, num_blocks=64)
    view = PrefixCache(second, store=cache.store)
    prompt = random_ids(30, 23)
    first.generate(prompt, cache=cache, **GREEDY)
    outcome = compare(second, view, prompt, **GREEDY)
    assert outcome.hit_tokens == 0
    assert_exact(outcome.ref, outcome.out)
