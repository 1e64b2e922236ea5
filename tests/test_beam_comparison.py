"""The bf16/fp16 beam-search comparison (``assert_beams_match``) on synthetic runs, and its replay of
transformers' beam selection on real ones: it accepts what CPU-kernel noise can do to beam search
(a near tie at the cut-off broken the other way, beams held in another row order) and nothing else."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.assertions import assert_beams_match, logit_tolerance, replay_beams
from support.calls import GEN
from support.models import EOS, model_for, random_ids

# one intra-op thread and no deprecation noise (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("quiet_single_thread")

TOL = 0.01
VOCAB = 8
LOW = -20.0  # log-prob of every token a step does not name
STOP = (EOS,)


def _scores(row_scores: dict[int, float]) -> torch.Tensor:
    row = torch.full((VOCAB,), LOW)
    for token, score in row_scores.items():
        row[token] = score
    return row


def _run(steps: list[list[dict[int, float]]], final: list[list[int]]):
    """A fake beam-search output of one prompt: ``steps[t][row]`` are the log-probs of running row ``row`` at
    step ``t`` (used as its logits too), ``final`` the returned generated tokens."""
    scores = tuple(torch.stack([_scores(row) for row in step]) for step in steps)
    return SimpleNamespace(
        sequences=torch.tensor([[9, 9, *tokens] for tokens in final]),
        scores=scores,
        logits=tuple(s.clone() for s in scores),
    )


def _two_runs(gap: float, flip: bool = True):
    """Two beams. Step 0 keeps 3 (-1.0) and 4 (-1.5). At step 1 the no-cache run keeps (3, 3) at -1.5 and
    (4, 3) at -2.0 and drops (3, 4) at ``-2.0 - gap``. With ``flip`` the other run's scores (not its logits:
    beam scores accumulate the noise of every earlier step) put (3, 4) ``gap / 2`` above (4, 3), so it
    holds (3, 4) instead. Both return (3, 3, 5)."""
    first = {3: -1.0, 4: -1.5, 6: -3.0}
    steps = [
        [first, first],
        [{3: -0.5, 4: -1.0 - gap}, {3: -0.5, 5: -4.0}],
        [{5: -0.1, 6: -0.2}, {5: -0.7}],  # (3, 3) and (4, 3)
    ]
    ref, out = _run(steps, [[3, 3, 5]]), _run(steps, [[3, 3, 5]])
    if flip:
        out.scores[1][0, 4] = -1.0 + gap / 2
        out.logits[2][1] = _scores({5: -0.3, 7: -0.9})  # its row 1 is (3, 4): a beam the no-cache run lacks
    return ref, out


def test_replay_rebuilds_the_running_hypotheses():
    ref, out = _two_runs(0.004)
    assert replay_beams(ref.scores, 2, STOP).hypotheses == [
        [(0, ()), (0, ())],
        [(0, (3,)), (0, (4,))],
        [(0, (3, 3)), (0, (4, 3))],
    ]
    assert replay_beams(out.scores, 2, STOP).hypotheses[2] == [(0, (3, 3)), (0, (3, 4))]
    assert replay_beams(ref.scores, 2, STOP).candidates[1][0].tolist() == pytest.approx([-1.5, -2.0, -2.004])


def test_beams_differing_at_a_near_tie_are_accepted():
    ref, out = _two_runs(0.004)
    assert assert_beams_match(ref, out, TOL, torch.float16, "near tie", 2, STOP) == 0.0


def test_beams_differing_without_a_near_tie_are_rejected():
    ref, out = _two_runs(0.5)
    with pytest.raises(
        AssertionError, match=r"beam \(0, \(3, 4\)\).*0.5 away from its cut-off.*not a near tie"
    ):
        assert_beams_match(ref, out, TOL, torch.float16, "no tie", 2, STOP)
    ref, out = _two_runs(1.5 * TOL)  # just past the tolerance
    with pytest.raises(AssertionError, match="not a near tie"):
        assert_beams_match(ref, out, TOL, torch.float16, "no tie", 2, STOP)


def test_a_logit_diff_on_a_shared_beam_is_rejected():
    ref, out = _two_runs(0.004)
    out.logits[2][0, 6] += 0.05  # the shared beam (3, 3)
    with pytest.raises(AssertionError, match=r"step 2, beam \(0, \(3, 3\)\): \|logit diff\| 0.05"):
        assert_beams_match(ref, out, TOL, torch.float16, "shared", 2, STOP)
    ref, out = _two_runs(0.004)
    out.logits[1][1, 5] += 0.05  # the shared beam (4,) at step 1, before the runs part
    with pytest.raises(AssertionError, match=r"step 1, beam \(0, \(4,\)\): \|logit diff\| 0.05"):
        assert_beams_match(ref, out, TOL, torch.float16, "shared", 2, STOP)


def test_beams_are_matched_by_hypothesis_not_by_nearest_row():
    """The other run holds the same beams, but gives each the other's logits (as a cache serving the K/V
    of one beam to another would): every row has an identical row in the other run, so nearest-row
    matching would pass; matching by hypothesis does not."""
    ref, out = _two_runs(0.0, flip=False)
    out.logits[2][0], out.logits[2][1] = ref.logits[2][1].clone(), ref.logits[2][0].clone()
    with pytest.raises(AssertionError, match=r"step 2, beam \(0, \(3, 3\)\): \|logit diff\|"):
        assert_beams_match(ref, out, TOL, torch.float16, "swapped", 2, STOP)


def test_beams_held_in_another_row_order_are_accepted():
    """Two kept beams whose order a near tie flips sit in swapped rows: they are still compared, each with
    itself."""
    ref, out = _two_runs(0.0, flip=False)
    ref.scores[1][1, 3] = -0.001  # (4, 3) at -1.501, just below (3, 3) at -1.5
    out.scores[1][1, 3] = 0.001  # the other run: (4, 3) at -1.499, first
    out.logits[2][0], out.logits[2][1] = ref.logits[2][1].clone(), ref.logits[2][0].clone()
    assert replay_beams(out.scores, 2, STOP).hypotheses[2] == [(0, (4, 3)), (0, (3, 3))]
    assert assert_beams_match(ref, out, TOL, torch.float16, "order", 2, STOP) == 0.0
    out.logits[2][0, 5] += 0.05
    with pytest.raises(AssertionError, match=r"beam \(0, \(4, 3\)\): \|logit diff\| 0.05"):
        assert_beams_match(ref, out, TOL, torch.float16, "order", 2, STOP)


def test_different_final_sequences_are_rejected():
    ref, out = _two_runs(0.0, flip=False)  # no near tie anywhere: the returned sequences must be identical
    out.sequences[0, -1] = 6
    with pytest.raises(AssertionError, match="returned sequences differ from the no-cache run"):
        assert_beams_match(ref, out, TOL, torch.float16, "final", 2, STOP)
    ref, out = _two_runs(0.004)  # a near tie, but (3, 3, 6) does not continue the beam it let in
    out.sequences[0, -1] = 6
    with pytest.raises(AssertionError, match="beyond what its near ties explain"):
        assert_beams_match(ref, out, TOL, torch.float16, "final", 2, STOP)


def test_a_returned_sequence_that_continues_a_near_tie_beam_is_accepted():
    """The other run returns (3, 4, 5): it continues (3, 4), the beam only it held after the near tie."""
    ref, out = _two_runs(0.004)
    out.sequences[0, 3] = 4
    assert assert_beams_match(ref, out, TOL, torch.float16, "final", 2, STOP) == 0.0
    ref, out = _two_runs(0.5)  # the same without a near tie
    out.sequences[0, 3] = 4
    with pytest.raises(AssertionError, match="not a near tie"):
        assert_beams_match(ref, out, TOL, torch.float16, "final", 2, STOP)


def test_beam_replay_follows_generate():
    """On real beam searches (fp32 and fp16, with stop tokens allowed), every returned sequence was a
    running hypothesis of the replay at each of its steps: the replay picks what generate() picked."""
    for dtype in (torch.float32, torch.float16):
        model = model_for("llama", dtype)
        for seed in range(4):
            prompt = random_ids(12 + seed, 40 + seed)
            out = model.generate(
                prompt, do_sample=False, num_beams=3, num_return_sequences=3, max_new_tokens=8, **GEN
            )
            replay = replay_beams(out.scores, 3, model.generation_config.eos_token_id or STOP)
            assert len(replay.hypotheses) == len(out.scores)
            for tokens in out.sequences[:, prompt.shape[1] :].tolist():
                while tokens and tokens[-1] in (0, EOS) and len(tokens) > 1 and tokens[-2] in (0, EOS):
                    tokens.pop()  # padding after a finished hypothesis
                for step in range(min(len(tokens), len(replay.hypotheses))):
                    assert (0, tuple(tokens[:step])) in replay.hypotheses[step], (dtype, seed, tokens, step)


@pytest.mark.parametrize(
    ("family", "dtype", "length", "seed"),
    [
        ("llama", torch.float32, 22, 502),
        ("gemma3", torch.bfloat16, 22, 502),
        ("llama", torch.float16, 20, 500),
    ],
)
def test_replayed_beams_hold_what_generate_computed(family, dtype, length, seed):
    """Each replayed hypothesis, fed to the model in one plain forward, gives the logits generate() logged
    for its row (within the no-cache noise). bf16 logits tie exactly: in the gemma3 case a replay that
    broke such ties its own way named a beam whose logits were 2.0 away from that row's."""
    model = model_for(family, dtype)
    prompt = random_ids(length, seed)
    out = model.generate(
        prompt, do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=8, **GEN
    )
    replay = replay_beams(out.scores, 3, EOS)
    tol = logit_tolerance(dtype, out.logits)
    for step, hypotheses in enumerate(replay.hypotheses):
        for row, (_, tokens) in enumerate(hypotheses):
            ids = torch.cat([prompt, torch.tensor([tokens], dtype=torch.long)], dim=1)
            with torch.no_grad():
                direct = model(ids).logits[0, -1].float()
            diff = float((direct - out.logits[step][row].float()).abs().max())
            assert diff <= tol, (step, row, tokens, diff)


def test_returned_sequences_swapped_only_at_a_near_tie_of_their_scores():
    """Two returned sequences in the other order: accepted where the no-cache run scored them within the
    tolerance of each other, rejected otherwise."""
    for gap, accepted in ((0.004, True), (0.5, False)):
        ref, out = _two_runs(0.0, flip=False)
        ref.sequences = torch.tensor([[9, 9, 3, 3, 5], [9, 9, 4, 3, 5]])
        out.sequences = ref.sequences.flip(0)
        ref.sequences_scores = torch.tensor([-1.0, -1.0 - gap])
        if accepted:
            assert assert_beams_match(ref, out, TOL, torch.float16, "order", 2, STOP) == 0.0
        else:
            with pytest.raises(AssertionError, match="returned in another order"):
                assert_beams_match(ref, out, TOL, torch.float16, "order", 2, STOP)


def test_a_near_tie_at_the_first_step_is_judged_on_the_scored_prompt_row():
    """At step 0 every row holds the prompt, and only the first is scored 0 (the others -1e9): a beam
    held by one run only at the first cut-off is judged on its score from that row."""
    for gap, accepted in ((0.004, True), (0.5, False)):
        first = {3: -1.0, 4: -1.5, 6: -1.5 - gap}
        steps = [[first, first], [{5: -0.1}, {5: -0.2}]]
        ref, out = _run(steps, [[3, 5]]), _run(steps, [[3, 5]])
        out.scores[0][:, 6] = -1.5 + gap / 2  # the other run keeps (6,) instead of (4,)
        assert replay_beams(out.scores, 2, STOP).hypotheses[1] == [(0, (3,)), (0, (6,))]
        if accepted:
            assert assert_beams_match(ref, out, TOL, torch.float16, "first", 2, STOP) == 0.0
        else:
            with pytest.raises(AssertionError, match=r"step 0: beam \(0, \(4,\)\).*not a near tie"):
                assert_beams_match(ref, out, TOL, torch.float16, "first", 2, STOP)
