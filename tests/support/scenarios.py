"""Scenarios of the exactness suite: how generate() is called (``STRATEGIES``), the prompts, and the
multi-call scenarios that check every call against the no-cache run and the oracle of what was stored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_prefix_cache import PrefixCache
from support.assertions import assert_exact
from support.calls import Outcome, compare
from support.models import PAD, random_ids
from support.oracle import StoredPrefixes, assert_reused, kv_tokens, record_stored


# -- small generate() companions ---------------------------------------------------------------------------
class RecordingStreamer(BaseStreamer):
    """Records every ``put`` (as lists of ids) and the ``end`` call; no tokenizer needed."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


class StopOnResidue(StoppingCriteria):
    """Stops a row once its last token is ``0 mod modulus`` (and after ``min_new`` tokens): rows stop at
    different, content-dependent steps, so a wrong cache that changes tokens also changes where they stop."""

    def __init__(self, prompt_width: int, modulus: int = 5, min_new: int = 2):
        self.prompt_width, self.modulus, self.min_new = prompt_width, modulus, min_new
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.calls += 1
        if input_ids.shape[1] - self.prompt_width < self.min_new:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return input_ids[:, -1] % self.modulus == 0


# -- prompts --------------------------------------------------------------------------------------------
def cat(*parts: torch.Tensor | list[int]) -> torch.Tensor:
    tensors = [p if isinstance(p, torch.Tensor) else torch.tensor([p], dtype=torch.long) for p in parts]
    return torch.cat([t.reshape(1, -1) for t in tensors], dim=1)


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def new_tokens(length: int, seed: int) -> list[int]:
    return random_ids(length, seed)[0].tolist()


# -- strategies ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    """How generate() is called; ``expand`` output rows per prompt; ``replies``: are replies stored."""

    name: str
    kwargs: dict
    seeded: bool = False
    expand: int = 1
    replies: bool = True
    chunk: int | None = None
    fresh: Callable[[int], dict] | None = None  # prompt width -> per-run stateful kwargs
    cache_kw: str = "cache"
    batchable: bool = True

    def __repr__(self) -> str:
        return self.name


def _streamer(width: int) -> dict:
    return {"streamer": RecordingStreamer()}


def _stopper(width: int) -> dict:
    return {"stopping_criteria": StoppingCriteriaList([StopOnResidue(width)])}


NEW = 8
STRATEGIES = {
    s.name: s
    for s in [
        Strategy("greedy", dict(do_sample=False, max_new_tokens=NEW)),
        Strategy("sample", dict(do_sample=True, top_k=20, max_new_tokens=NEW), seeded=True),
        Strategy(
            "sample_n3",
            dict(do_sample=True, top_k=20, num_return_sequences=3, max_new_tokens=NEW),
            seeded=True,
            expand=3,
        ),
        # Beam search reorders rows every step: only the prompt's blocks can be attributed and stored.
        Strategy(
            "beam3_n2",
            dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=NEW),
            expand=2,
            replies=False,
        ),
        Strategy(
            "beam_sample",
            dict(do_sample=True, top_k=20, num_beams=2, max_new_tokens=NEW),
            seeded=True,
            replies=False,
        ),
        Strategy("chunk5", dict(do_sample=False, prefill_chunk_size=5, max_new_tokens=NEW), chunk=5),
        Strategy("streamer", dict(do_sample=False, max_new_tokens=NEW), fresh=_streamer, batchable=False),
        Strategy("stopping", dict(do_sample=False, max_new_tokens=NEW), fresh=_stopper),
        Strategy("max_new_1", dict(do_sample=False, max_new_tokens=1)),
        Strategy(
            "generation_config",
            dict(
                generation_config=GenerationConfig(
                    do_sample=True,
                    top_k=20,
                    num_return_sequences=2,
                    max_new_tokens=NEW,
                    eos_token_id=2,
                    pad_token_id=0,
                )
            ),
            seeded=True,
            expand=2,
        ),
        Strategy("past_key_values_kw", dict(do_sample=False, max_new_tokens=NEW), cache_kw="past_key_values"),
        # logits processors that read the whole sequence (prompt included), not only what was computed
        Strategy(
            "processors",
            dict(
                do_sample=False,
                repetition_penalty=1.5,
                no_repeat_ngram_size=2,
                min_new_tokens=3,
                max_new_tokens=NEW,
            ),
        ),
    ]
}


def run_call(model, cache, strategy: Strategy, ids, mask=None, seed: int = 0) -> Outcome:
    if mask is None and bool((ids == PAD).any()):
        # A reply can contain the pad id as an ordinary token (tiny random models do); without a mask
        # generate() would infer middle padding from it (see test_pad_id_inside_prompt_without_mask).
        mask = torch.ones_like(ids)
    return compare(
        model,
        cache,
        ids,
        mask,
        seed=seed if strategy.seeded else None,
        fresh=(lambda: strategy.fresh(ids.shape[1])) if strategy.fresh else None,
        cache_kw=strategy.cache_kw,
        **strategy.kwargs,
    )


def check_call(outcome: Outcome, oracle, strategy: Strategy, dtype, label: str) -> int:
    assert_exact(outcome.ref, outcome.out, dtype, label, num_beams=strategy.kwargs.get("num_beams"))
    loaded = assert_reused(outcome, oracle, chunk=strategy.chunk, label=label)
    if strategy.fresh is _streamer:
        ref, out = outcome.ref_extras["streamer"], outcome.out_extras["streamer"]
        assert out.puts == ref.puts and out.ended == ref.ended == 1, f"{label}: streamer saw other tokens"
        assert len(out.puts) == outcome.out.sequences.shape[1] - outcome.width + 1  # prompt, then each token
    record_stored(outcome, oracle, expand=strategy.expand, replies=strategy.replies)
    return loaded


def conversation(sequences: torch.Tensor, row: int, pad_len: int, width: int, stop_ids=(2,)) -> list[int]:
    """Row ``row`` of generate()'s output without its left padding, its reply cut after the first stop
    token or before trailing padding (the prompt itself may contain stop tokens of earlier turns)."""
    prompt = sequences[row, pad_len:width].tolist()
    reply = sequences[row, width:].tolist()
    for index, token in enumerate(reply):
        if token in stop_ids:
            return prompt + reply[: index + 1]
    while reply and reply[-1] == PAD:
        reply.pop()
    return prompt + reply


def run_single_scenario(model, strategy: Strategy, dtype=torch.float32, seed: int = 0, num_blocks: int = 256):
    """Cold call, shared long prefix + new suffix, the same prompt again, then a continued conversation."""
    cache = PrefixCache(model, block_size=4, num_blocks=num_blocks)
    oracle = StoredPrefixes(4)
    first = random_ids(30, seed)
    cold = run_call(model, cache, strategy, first, seed=seed)
    check_call(cold, oracle, strategy, dtype, "cold")
    assert cold.hit_tokens == 0 and cold.forwards[0] == (strategy.chunk or 30)

    shared = cat(first[:, :22], new_tokens(10, seed + 1))  # 20 reusable tokens, past the window of 8
    warm = run_call(model, cache, strategy, shared, seed=seed + 1)
    assert check_call(warm, oracle, strategy, dtype, "shared prefix") == 20
    # All 32 tokens (8 blocks) are stored now: the last block must still be computed, not loaded.
    again = run_call(model, cache, strategy, shared, seed=seed + 2)
    assert check_call(again, oracle, strategy, dtype, "same prompt again") == 28

    row = (strategy.expand - 1) if strategy.replies else 0  # the last sampled alternative, when stored
    history = conversation(again.out.sequences, row, 0, again.width)
    follow = cat(history, new_tokens(6, seed + 3))
    turn = run_call(model, cache, strategy, follow, seed=seed + 3)
    loaded = check_call(turn, oracle, strategy, dtype, "conversation")
    assert loaded >= 32, "the conversation must reuse at least the previous prompt's blocks"
    if strategy.replies and len(history) - 1 >= 36:
        assert loaded >= 36, "the previous reply's blocks must be reused"
    assert cache.stats.calls == 4 and cache.stats.hit_tokens > 0 and cache.fallback is None
    return cache


def run_batch_scenario(model, strategy: Strategy, dtype=torch.float32, seed: int = 0):
    """A cold single call, then a left-padded batch of a shared-prefix hit, a miss and a long conversation
    (different lengths), compared row by row, then one follow-up per row that must hit its stored reply."""
    cache = PrefixCache(model, block_size=4, num_blocks=256)
    oracle = StoredPrefixes(4)
    first = random_ids(30, seed)
    cold = run_call(model, cache, strategy, first, seed=seed)
    check_call(cold, oracle, strategy, dtype, "cold")

    rows = [
        first[0, :22].tolist() + new_tokens(7, seed + 10),  # shared-prefix hit (20 tokens)
        new_tokens(11, seed + 11),  # miss
        conversation(cold.out.sequences, 0, 0, cold.width) + new_tokens(8, seed + 12),  # long continuation
    ]
    ids, mask = left_pad(rows)
    batch = run_call(model, cache, strategy, ids, mask, seed=seed + 1)
    loaded = check_call(batch, oracle, strategy, dtype, "batch")
    assert loaded > 0 and batch.hit_tokens > 0

    pads = [ids.shape[1] - len(r) for r in rows]
    for index, (prompt, pad) in enumerate(zip(rows, pads)):
        source = index * strategy.expand
        history = conversation(batch.out.sequences, source, pad, batch.width) if strategy.replies else prompt
        follow = cat(history, new_tokens(5, seed + 20 + index))
        again = run_call(model, cache, strategy, follow, seed=seed + 2 + index)
        row_loaded = check_call(again, oracle, strategy, dtype, f"follow-up of batch row {index}")
        assert row_loaded >= (len(prompt) // 4) * 4, f"batch row {index}: its prompt blocks were not stored"
        if strategy.replies:  # and its reply's, as far as they went through the model and fill blocks
            steps = batch.out.sequences.shape[1] - batch.width
            stored = kv_tokens(prompt, batch.out.sequences[source, batch.width :].tolist(), steps, (2,))
            assert row_loaded == min(len(stored), len(follow[0]) - 1) // 4 * 4, (
                f"batch row {index}: its reply blocks were not stored"
            )
    return cache
