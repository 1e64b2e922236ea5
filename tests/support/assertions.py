"""Assertions of the exactness suite: cached vs no-cache outputs, token for token and logit for logit.

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from support.models import EOS, PAD

FP32_ATOL = 1e-4
# bf16/fp16 tolerance in units of eps * max|logit|: measured maxima 0.99 (bf16) and 1.89 (fp16), see above
ULP_FACTOR = {torch.bfloat16: 2.0, torch.float16: 3.0}


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
