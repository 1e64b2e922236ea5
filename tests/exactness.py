"""Helpers of the exactness suite: run generate() with and without a PrefixCache and compare everything.

A check is only worth something if it can fail, so besides "same tokens, same logits" every warm call is
held to what it must have reused: an oracle (``StoredPrefixes``) replays which blocks earlier calls
stored, the cache's ``last_call.hit_tokens`` must equal the oracle's hit, and a forward pre-hook proves
that generate() fed the model only the tokens that were not loaded.

Logit tolerances (CPU, tiny models, measured over 210 compared calls of the greedy/batch/beam scenarios
of llama, gemma3 and mistral, sdpa and eager; see also ``test_low_precision_tolerance_is_no_cache_noise``):
float32 cached vs uncached differ by <= 1.7e-6 (eager often bit-identical), so 1e-4 leaves a 60x margin.
In bfloat16/float16 the cached prefill multiplies matrices of another shape, which rounds differently:
max 0.023 in bf16 and 0.0049 in fp16, i.e. <= 1.0 and <= 1.9 units of ``eps * max|logit|`` (1-2 ULP of
the largest logit), the same as the no-cache run's own noise when only its prefill is chunked
differently (``prefill_chunk_size=5``: bf16 0.016-0.018, fp16 0.002-0.003). The tolerance is
``2 * eps * max|logit|`` in bf16 and ``3 * eps * max|logit|`` in fp16 (bf16 ~0.05, fp16 ~0.009 at
|logit| ~3): no looser, because a tiny model can be so insensitive that 100% noise on the stored keys
moved bf16 logits by only 0.09 (``test_negative_control_noisy_kv_is_caught``). Tokens must be identical,
except at a near tie the no-cache run itself had (see ``assert_exact``; seen once in the 210 calls, bf16).
These maxima were measured on AVX2 kernels; ``test_low_precision_tolerance_is_no_cache_noise`` measures
the no-cache run's own noise again on the kernels that run the suite.

Beam search in bf16/fp16 (``assert_beams_match``): which hypotheses stay running is itself decided by
near ties of accumulated scores, so the running beams of two runs can differ without any cache (measured
on AVX2: 144 no-cache runs against the same with ``prefill_chunk_size`` 3/5/7, 3 families x fp16/bf16 x
sdpa/eager x 4 prompts: beam sets differed in 14 runs, first at cut-off gaps of 0-0.35 tolerances, and
the returned sequences in 8 of them; shared beams stayed within 0.57 tolerances, their scores within
0.86; the scalar kernels, ``ATEN_CPU_CAPABILITY=default``, changed no beam). Beams are therefore compared
by the tokens they hold, never by row or nearest logits, and all 144 runs pass ``assert_beams_match``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tiny_models import EOS, PAD, random_ids, tiny_config
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_prefix_cache import PrefixCache

GEN = dict(output_logits=True, output_scores=True, return_dict_in_generate=True)  # scores: beam replay
FP32_ATOL = 1e-4
# bf16/fp16 tolerance in units of eps * max|logit|: measured maxima 0.99 (bf16) and 1.89 (fp16), see above
ULP_FACTOR = {torch.bfloat16: 2.0, torch.float16: 3.0}


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


class ForwardLog:
    """A forward pre-hook on the top model: how many new tokens each forward() was fed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.lengths: list[int] = []
        self.batches: list[int] = []
        self._handle = None

    def _hook(self, module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self.lengths.append(int(tokens.shape[1]))
        self.batches.append(int(tokens.shape[0]))

    def __enter__(self) -> ForwardLog:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# -- tolerances ---------------------------------------------------------------------------------------------
def logit_tolerance(dtype: torch.dtype, logits: Sequence[torch.Tensor]) -> float:
    """1e-4 in float32; ``ULP_FACTOR * eps * max|logit|`` in bf16/fp16, a few ULP (see the module docstring)."""
    if dtype == torch.float32:
        return FP32_ATOL
    largest = max(float(step.float().abs().max()) for step in logits)
    return ULP_FACTOR[dtype] * torch.finfo(dtype).eps * max(1.0, largest)


def max_logit_diff(ref, out) -> float:
    return max(
        (float((a.float() - b.float()).abs().max()) for a, b in zip(ref.logits, out.logits)), default=0.0
    )


def assert_exact(
    ref, out, dtype: torch.dtype = torch.float32, label: str = "", num_beams: int | None = None
) -> float:
    """Same sequences token for token (row by row), same number of steps, logits within tolerance.

    In bf16/fp16 one exception (greedy only, where output rows are logit rows): a row may take another
    token at a step where the no-cache run itself was within tolerance of a tie between the two tokens
    (1-ULP noise flips an argmax there, exactly as changing ``prefill_chunk_size`` does without any cache);
    that row is compared up to that step only. Beam search in bf16/fp16 (logit rows are running beams, not
    output rows) is judged by ``assert_beams_match``, which applies the same near-tie rule to the beams'
    cut-off. Returns the max |logit diff| over what was compared."""
    tol = logit_tolerance(dtype, ref.logits)
    if dtype == torch.float32:
        return _assert_identical(ref, out, tol, dtype, label)
    if ref.sequences.shape[0] != ref.logits[0].shape[0]:  # beams: logit rows are the running beams
        assert num_beams, f"{label}: beam search output: pass num_beams to compare running beams"
        return assert_beams_match(ref, out, tol, dtype, label, num_beams)
    width = ref.sequences.shape[1] - len(ref.logits)
    worst, near_ties = 0.0, 0
    for row in range(ref.sequences.shape[0]):
        a, b = ref.sequences[row, width:].tolist(), out.sequences[row, width:].tolist()
        steps = min(len(ref.logits), len(out.logits))
        assert ref.sequences[row, :width].tolist() == out.sequences[row, :width].tolist()
        diverged = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
        end = steps if diverged is None else diverged + 1
        for step in range(end):
            diff = float((ref.logits[step][row].float() - out.logits[step][row].float()).abs().max())
            assert diff <= tol, (
                f"{label}: row {row} step {step}: |logit diff| {diff:.3g} > {tol:.3g} ({dtype})"
            )
            worst = max(worst, diff)
        if diverged is None:
            # equal lengths unless a diverged row ended the run earlier or later (checked below)
            continue
        near_ties += 1
        logits = ref.logits[diverged][row].float()
        margin = float(logits[a[diverged]] - logits[b[diverged]])
        assert margin <= tol, (
            f"{label}: row {row} step {diverged}: cached took {b[diverged]} instead of {a[diverged]}, "
            f"a no-cache margin of {margin:.3g} > tolerance {tol:.3g}: not a near tie"
        )
    if not near_ties:
        assert ref.sequences.shape == out.sequences.shape, (
            f"{label}: sequences shape {tuple(out.sequences.shape)} != no-cache {tuple(ref.sequences.shape)}"
        )
    return worst


def _assert_identical(ref, out, tol: float, dtype, label: str) -> float:
    """Identical sequences, the same number of steps, logits within ``tol`` row for row."""
    _assert_same_sequences(ref, out, label)
    assert len(ref.logits) == len(out.logits), f"{label}: {len(out.logits)} logit steps != {len(ref.logits)}"
    diff = max_logit_diff(ref, out)
    assert diff <= tol, f"{label}: max |logit diff| {diff:.3g} > tolerance {tol:.3g} ({dtype})"
    return diff


def _assert_same_sequences(ref, out, label: str) -> None:
    assert ref.sequences.shape == out.sequences.shape, (
        f"{label}: sequences shape {tuple(out.sequences.shape)} != no-cache {tuple(ref.sequences.shape)}"
    )
    for row, (a, b) in enumerate(zip(ref.sequences.tolist(), out.sequences.tolist())):
        assert a == b, f"{label}: row {row} differs from the no-cache run:\n no-cache {a}\n cached   {b}"


# -- beam search: compare running beams by the hypothesis they hold ---------------------------------------------
Hypothesis = tuple[int, tuple[int, ...]]  # (batch item, generated tokens)


@dataclass
class BeamReplay:
    """The running beams of one beam-search generate(), rebuilt from its per-step scores.

    ``hypotheses[t][row]`` is what logit row ``row`` of step ``t`` continues; ``running[t][row]`` its
    accumulated log-probability; ``candidates[t][item]`` the sorted scores of step ``t``'s best
    ``num_beams + 1`` continuations that do not end in a stop token (the last kept and the first dropped
    one frame the cut-off; a stop token's continuation scores -1e9 there, as in generate())."""

    hypotheses: list[list[Hypothesis]]
    running: list[torch.Tensor]
    candidates: list[torch.Tensor]


def replay_beams(
    scores: Sequence[torch.Tensor], num_beams: int, eos_ids: int | Iterable[int] | None = (EOS,)
) -> BeamReplay:
    """Replays transformers' beam selection (``_beam_search``: running scores + processed log-probs, top
    ``num_beams`` continuations that do not hit a stop token) on ``output_scores``, with the same float32
    additions, so it picks exactly the hypotheses generate() picked (checked against real runs in
    ``test_beam_replay_follows_generate``). Needs ``output_scores=True``."""
    items = scores[0].shape[0] // num_beams
    hypotheses: list[list[Hypothesis]] = [[(item, ()) for item in range(items) for _ in range(num_beams)]]
    running = torch.zeros(items, num_beams)
    running[:, 1:] = -1e9
    replay = BeamReplay(hypotheses, [running.reshape(-1)], [])
    stops = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or ()), dtype=torch.long)
    keep = max(2, 1 + len(stops)) * num_beams  # generate()'s beams_to_keep
    for step, step_scores in enumerate(scores):
        vocab = step_scores.shape[-1]
        total = (step_scores.float().reshape(items, num_beams, vocab) + running[:, :, None]).reshape(
            items, -1
        )
        # the same two topk calls as generate(): bf16 logits tie exactly, and ties go the way topk breaks them
        values, indices = total.topk(keep)
        values = values + torch.isin(indices % vocab, stops).to(torch.float32) * -1.0e9
        order = values.topk(num_beams)[1]
        replay.candidates.append(values.sort(descending=True)[0][:, : num_beams + 1])
        if step + 1 == len(scores):
            break
        previous = replay.hypotheses[-1]
        nxt = []
        for item in range(items):
            for index in indices[item, order[item]].tolist():
                parent = previous[item * num_beams + index // vocab]
                nxt.append((item, (*parent[1], index % vocab)))
        running = values.gather(1, order)
        replay.hypotheses.append(nxt)
        replay.running.append(running.reshape(-1))
    return replay


def assert_beams_match(
    ref, out, tol: float, dtype, label: str, num_beams: int, eos_ids: int | Iterable[int] | None = (EOS,)
) -> float:
    """Beam search in bf16/fp16, judged on what is promised rather than on which row holds what.

    - Every running hypothesis that both runs hold at a step has logits within ``tol`` (rows are matched
      by the tokens they continue, not by position or by nearest logits).
    - A hypothesis that only one run holds is accepted only where the no-cache run's own scores had a near
      tie at that step's cut-off: its no-cache score is within ``tol`` of the last kept (if the no-cache run
      dropped it) or of the first dropped continuation (if it kept it). 1-ulp noise breaks such a tie either
      way, as changing ``prefill_chunk_size`` does without any cache. The continuations of a hypothesis
      accepted that way have no counterpart to compare with, and each one may push out one hypothesis
      of the other run; everything else is compared.
    - The returned sequences are identical, except those that continue such an accepted hypothesis (each
      of which may push one returned sequence of the other run out), or the same ones swapped at a near
      tie of their no-cache scores.
    Returns the max |logit diff| over the hypotheses both runs held."""
    assert ref.scores is not None and out.scores is not None, "beam comparison needs output_scores=True"
    assert ref.sequences.shape[1] - len(ref.logits) == out.sequences.shape[1] - len(out.logits), label
    mine, theirs = replay_beams(ref.scores, num_beams, eos_ids), replay_beams(out.scores, num_beams, eos_ids)
    steps = min(len(ref.logits), len(out.logits))
    worst, accepted = 0.0, 0
    for step in range(steps):
        ref_rows, out_rows = _rows_by_hypothesis(mine, step), _rows_by_hypothesis(theirs, step)
        for hypothesis in sorted(ref_rows.keys() & out_rows.keys()):
            for a, b in zip(ref_rows[hypothesis], out_rows[hypothesis]):
                diff = float((ref.logits[step][a].float() - out.logits[step][b].float()).abs().max())
                assert diff <= tol, (
                    f"{label}: step {step}, beam {hypothesis}: |logit diff| {diff:.3g} > tolerance {tol:.3g} "
                    f"({dtype})"
                )
                worst = max(worst, diff)
        if step + 1 < steps:
            accepted += _check_beam_cutoff(mine, theirs, step, ref.scores[step], num_beams, tol, label)
    assert accepted or len(ref.logits) == len(out.logits), (
        f"{label}: {len(out.logits)} logit steps != {len(ref.logits)}"
    )
    _assert_returned_explained(ref, out, mine, theirs, num_beams, tol, label)
    return worst


def _assert_returned_explained(
    ref, out, mine: BeamReplay, theirs: BeamReplay, num_beams: int, tol: float, label: str
) -> None:
    """The returned sequences are identical, except that each one only one run returned may continue a
    hypothesis only that run held (accepted at a near tie), and push one of the other run's out; the same
    sequences in another order are accepted only where their no-cache scores tie within ``tol``."""
    assert ref.sequences.shape[0] == out.sequences.shape[0], f"{label}: another number of returned rows"
    width = ref.sequences.shape[1] - len(ref.logits)
    items = ref.logits[0].shape[0] // num_beams
    per_item = ref.sequences.shape[0] // items

    def returned(run) -> list[list[tuple[int, ...]]]:
        rows = [tuple(_trim(r[width:])) for r in run.sequences.tolist()]
        return [rows[i * per_item : (i + 1) * per_item] for i in range(items)]

    def held_alone(replay: BeamReplay, other: BeamReplay) -> set[Hypothesis]:
        return {h for a, b in zip(replay.hypotheses, other.hypotheses) for h in set(a) - set(b)}

    only_ref, only_out = held_alone(mine, theirs), held_alone(theirs, mine)
    for item, (a, b) in enumerate(zip(returned(ref), returned(out))):
        if a == b:
            continue
        ref_alone = [s for s in a if s not in b]
        out_alone = [s for s in b if s not in a]
        explained_ref = [s for s in ref_alone if any((item, s[:t]) in only_ref for t in range(1, len(s) + 1))]
        explained_out = [s for s in out_alone if any((item, s[:t]) in only_out for t in range(1, len(s) + 1))]
        assert len(ref_alone) - len(explained_ref) <= len(explained_out) and len(out_alone) - len(
            explained_out
        ) <= len(explained_ref), (
            f"{label}: prompt {item}: returned sequences differ from the no-cache run beyond what its near "
            f"ties explain:\n no-cache {a}\n cached   {b}"
        )
        if not ref_alone and not out_alone:  # the same sequences in another order: a near tie of their scores
            rows = range(item * per_item, (item + 1) * per_item)
            scores = getattr(ref, "sequences_scores", None)
            swapped = (
                [float(scores[r]) for r, x, y in zip(rows, a, b) if x != y]
                if scores is not None
                else [0, 2 * tol]
            )
            assert max(swapped) - min(swapped) <= tol, (
                f"{label}: prompt {item}: returned in another order, no-cache scores {swapped} not a near tie"
            )


def _trim(tokens: list[int]) -> list[int]:
    """A returned row's generated tokens without the padding after its stop token."""
    end = len(tokens)
    while end > 1 and tokens[end - 1] in (PAD, EOS) and tokens[end - 2] in (PAD, EOS):
        end -= 1
    return tokens[:end]


def _rows_by_hypothesis(replay: BeamReplay, step: int) -> dict[Hypothesis, list[int]]:
    rows: dict[Hypothesis, list[int]] = {}
    for row, hypothesis in enumerate(replay.hypotheses[step]):
        rows.setdefault(hypothesis, []).append(row)
    return rows


def _check_beam_cutoff(
    mine: BeamReplay,
    theirs: BeamReplay,
    step: int,
    scores: torch.Tensor,
    num_beams: int,
    tol: float,
    label: str,
) -> int:
    """The selection after ``step``: every hypothesis only one run kept must sit at a near tie of the
    no-cache run's cut-off, or continue (or be pushed out by a continuation of) one accepted earlier.
    Returns how many were accepted at a near tie."""
    before = set(mine.hypotheses[step]) & set(theirs.hypotheses[step])
    kept, other = set(mine.hypotheses[step + 1]), set(theirs.hypotheses[step + 1])
    parent_row: dict[Hypothesis, int] = {}
    for row, hypothesis in enumerate(mine.hypotheses[step]):
        parent_row.setdefault(hypothesis, row)  # step 0: the prompt's first row, the only one scored 0
    near_ties, pushed_out = 0, {True: 0, False: 0}
    for hypothesis in sorted(kept ^ other):
        item, tokens = hypothesis
        only_ref = hypothesis in kept
        if (item, tokens[:-1]) not in before:
            continue  # continues a hypothesis accepted earlier: nothing to compare it with
        row = parent_row[(item, tokens[:-1])]
        score = float(mine.running[step][row] + scores[row].float()[tokens[-1]])
        last_kept, first_dropped = (float(v) for v in mine.candidates[step][item, num_beams - 1 :])
        gap = score - first_dropped if only_ref else last_kept - score
        if gap <= tol:
            near_ties += 1
        else:
            pushed_out[only_ref] += 1
            where = "kept" if only_ref else "dropped"
            successors = [h for h in (other if only_ref else kept) if (h[0], h[1][:-1]) not in before]
            assert pushed_out[only_ref] <= len(successors), (
                f"{label}: step {step}: beam {hypothesis} is held by one run only, and the no-cache run "
                f"{where} it {gap:.3g} away from its cut-off (tolerance {tol:.3g}): not a near tie, "
                f"|logit diff| too large for beams to differ"
            )
    return near_ties


# -- the oracle of what was stored ----------------------------------------------------------------------------
class StoredPrefixes:
    """Which block-aligned token prefixes the store should hold, replayed from the calls (no eviction)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.prefixes: set[tuple[int, ...]] = set()

    def store(self, tokens: Sequence[int]) -> None:
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            self.prefixes.add(tuple(tokens[:end]))

    def hit(self, tokens: Sequence[int]) -> int:
        """Longest stored block-aligned prefix, never the whole prompt (the last token is computed)."""
        hit = 0
        for end in range(self.block_size, len(tokens), self.block_size):
            if tuple(tokens[:end]) not in self.prefixes:
                break
            hit = end
        return hit


def real_tokens(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's tokens without its left padding."""
    if mask is None:
        return ids.tolist()
    return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]


def kv_tokens(
    prompt: list[int], generated: list[int], steps: int, stop_ids: Iterable[int], pad: int | None = PAD
) -> list[int]:
    """The tokens of one output row whose K/V went through the model and may be stored: the prompt, then
    the reply up to and including the first stop token, else without its trailing padding (a pad id the
    model generated mid-reply is text), minus the last sampled token (it is never fed)."""
    stop_ids = set(stop_ids)
    reply = list(generated)
    for index, token in enumerate(reply):
        if token in stop_ids:
            reply = reply[: index + 1]
            break
    else:
        while reply and reply[-1] == pad:
            reply.pop()
    return prompt + reply[: max(0, steps - 1)]


# -- one compared call -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    ref: Any
    out: Any
    forwards: list[int]
    hit_tokens: int
    width: int
    rows: list[list[int]]
    ref_extras: dict = field(default_factory=dict)
    out_extras: dict = field(default_factory=dict)


def compare(
    model,
    cache: PrefixCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    fresh: Callable[[], dict] | None = None,
    cache_kw: str = "cache",
    pass_mask: bool = True,
    **kwargs,
) -> Outcome:
    """generate() once without and once with ``cache`` (same seed, same inputs); nothing asserted yet.

    ``fresh`` makes the per-run stateful kwargs (streamers, stopping criteria) so both runs get their own.
    """
    mask_kw = {"attention_mask": attention_mask} if (attention_mask is not None and pass_mask) else {}
    ref_extras = fresh() if fresh else {}
    out_extras = fresh() if fresh else {}
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(input_ids, **mask_kw, **GEN, **kwargs, **ref_extras)
    with ForwardLog(model) as log:
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids, **mask_kw, **GEN, **kwargs, **out_extras, **{cache_kw: cache})
    assert cache.store is None or cache.store.pool.num_referenced == 0, "blocks still referenced after a call"
    return Outcome(
        ref,
        out,
        log.lengths,
        cache.last_call.hit_tokens,
        input_ids.shape[1],
        real_tokens(input_ids, attention_mask),
        ref_extras,
        out_extras,
    )


def expected_prefill(new_tokens: int, chunk: int | None) -> list[int]:
    if chunk is None:
        return [new_tokens]
    return [min(chunk, new_tokens - start) for start in range(0, new_tokens, chunk)]


def assert_reused(
    outcome: Outcome, oracle: StoredPrefixes, *, chunk: int | None = None, label: str = ""
) -> int:
    """hit_tokens equals what the stored prefixes allow, and the prefill was fed only the rest.

    Returns the common loaded length L (left-padded layout: L = min over rows of pad + hit)."""
    pads = [outcome.width - len(row) for row in outcome.rows]
    hits = [oracle.hit(row) for row in outcome.rows]
    loaded = min(p + h for p, h in zip(pads, hits))
    expected_hit = sum(max(0, loaded - p) for p in pads)
    assert outcome.hit_tokens == expected_hit, (
        f"{label}: hit_tokens {outcome.hit_tokens} != {expected_hit} expected (row hits {hits}, pads {pads})"
    )
    prefill = expected_prefill(outcome.width - loaded, chunk)
    assert outcome.forwards[: len(prefill)] == prefill, (
        f"{label}: forwards fed {outcome.forwards[: len(prefill) + 1]}, expected prefill {prefill} "
        f"(width {outcome.width} - loaded {loaded})"
    )
    return loaded


def record_stored(
    outcome: Outcome,
    oracle: StoredPrefixes,
    *,
    expand: int = 1,
    replies: bool = True,
    stop_ids: Iterable[int] = (2,),
) -> None:
    """Tell the oracle what this call stored: each row's prompt, plus (unless beams moved rows) the
    replies of its ``expand`` output rows."""
    sequences = outcome.out.sequences
    steps = sequences.shape[1] - outcome.width
    for index, prompt in enumerate(outcome.rows):
        oracle.store(prompt)
        if not replies:
            continue
        for source in range(index * expand, (index + 1) * expand):
            generated = sequences[source, outcome.width :].tolist()
            oracle.store(kv_tokens(prompt, generated, steps, stop_ids))


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


# -- models ---------------------------------------------------------------------------------------------
VARIANTS = {
    # Qwen2/Qwen3/Phi3 with their sliding window on: layer 0 full, layer 1 sliding (Phi3: all sliding).
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "phi3-sliding": ("phi3", dict(sliding_window=8)),
}


@functools.cache
def model_for(name: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0):
    """A shared tiny model (never mutated by the tests; each test makes its own PrefixCache)."""
    family, overrides = VARIANTS.get(name, (name, {}))
    torch.manual_seed(seed)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    if overrides:
        config = type(config)(**config.to_dict())  # recompute derived fields such as layer_types
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


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


def _call(model, cache, strategy: Strategy, ids, mask=None, seed: int = 0) -> Outcome:
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


def _check(outcome: Outcome, oracle, strategy: Strategy, dtype, label: str) -> int:
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
    cold = _call(model, cache, strategy, first, seed=seed)
    _check(cold, oracle, strategy, dtype, "cold")
    assert cold.hit_tokens == 0 and cold.forwards[0] == (strategy.chunk or 30)

    shared = cat(first[:, :22], new_tokens(10, seed + 1))  # 20 reusable tokens, past the window of 8
    warm = _call(model, cache, strategy, shared, seed=seed + 1)
    assert _check(warm, oracle, strategy, dtype, "shared prefix") == 20
    # All 32 tokens (8 blocks) are stored now: the last block must still be computed, not loaded.
    again = _call(model, cache, strategy, shared, seed=seed + 2)
    assert _check(again, oracle, strategy, dtype, "same prompt again") == 28

    row = (strategy.expand - 1) if strategy.replies else 0  # the last sampled alternative, when stored
    history = conversation(again.out.sequences, row, 0, again.width)
    follow = cat(history, new_tokens(6, seed + 3))
    turn = _call(model, cache, strategy, follow, seed=seed + 3)
    loaded = _check(turn, oracle, strategy, dtype, "conversation")
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
    cold = _call(model, cache, strategy, first, seed=seed)
    _check(cold, oracle, strategy, dtype, "cold")

    rows = [
        first[0, :22].tolist() + new_tokens(7, seed + 10),  # shared-prefix hit (20 tokens)
        new_tokens(11, seed + 11),  # miss
        conversation(cold.out.sequences, 0, 0, cold.width) + new_tokens(8, seed + 12),  # long continuation
    ]
    ids, mask = left_pad(rows)
    batch = _call(model, cache, strategy, ids, mask, seed=seed + 1)
    loaded = _check(batch, oracle, strategy, dtype, "batch")
    assert loaded > 0 and batch.hit_tokens > 0

    pads = [ids.shape[1] - len(r) for r in rows]
    for index, (prompt, pad) in enumerate(zip(rows, pads)):
        source = index * strategy.expand
        history = conversation(batch.out.sequences, source, pad, batch.width) if strategy.replies else prompt
        follow = cat(history, new_tokens(5, seed + 20 + index))
        again = _call(model, cache, strategy, follow, seed=seed + 2 + index)
        row_loaded = _check(again, oracle, strategy, dtype, f"follow-up of batch row {index}")
        assert row_loaded >= (len(prompt) // 4) * 4, f"batch row {index}: its prompt blocks were not stored"
        if strategy.replies:  # and its reply's, as far as they went through the model and fill blocks
            steps = batch.out.sequences.shape[1] - batch.width
            stored = kv_tokens(prompt, batch.out.sequences[source, batch.width :].tolist(), steps, (2,))
            assert row_loaded == min(len(stored), len(follow[0]) - 1) // 4 * 4, (
                f"batch row {index}: its reply blocks were not stored"
            )
    return cache


# -- a tiny offline tokenizer ------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>a:{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer over the tiny models' 96 ids: <pad>=0, <s>=1, </s>=2, then 93
    characters (newline and printable ASCII but ` ~ ^), with a small chat template. No download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127) if chr(c) not in "`~^"]
    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    assert len(vocab) == 96
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stored_sequences(cache: PrefixCache) -> set[tuple[int, ...]]:
    """The full token prefix (from position 0) of every block in the store, rebuilt from block keys
    (``key = (parent_ref, tokens, extra_keys)``, parent_ref ``("block", id, generation)`` or ``("root", ns)``)."""
    pool = cache.store.pool
    by_ref = {block.ref: block for block in pool.table.values()}
    prefixes = set()
    for block in pool.table.values():
        tokens: list[int] = []
        node = block
        while node is not None:
            parent_ref, own, _ = node.key
            tokens[:0] = own
            node = by_ref.get(parent_ref) if parent_ref[0] == "block" else None
            if parent_ref[0] == "block" and node is None:
                tokens = []  # orphan (parent evicted): cannot be rebuilt, and can never hit
                break
        if tokens:
            prefixes.add(tuple(tokens))
    return prefixes


@pytest.fixture(autouse=True)
def quiet_single_thread():  # autouse where a test module imports it
    """No deprecation noise; one intra-op thread (tiny matrices: 2 threads only spin, and under a loaded
    machine they made this suite 3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch.set_num_threads(threads)
