"""Mutants of issue 23, scoring calls: ``score`` returns the logits a plain forward returns for the asked
positions, computing each of them (tests/test_score.py), and the lm-eval model reuses prefixes through its
cache (tests/test_lm_eval.py)."""

from __future__ import annotations

from mutants.base import Mutant, replace_function

SCORE = "tests/test_score.py"
LM_EVAL = "tests/test_lm_eval.py"


def score_returns_shifted_logits() -> None:
    """The forward keeps one position more and drops the last: every logit is one position early."""

    def make(forward):
        def shifted(model, ids, mask, positions, keep, loaded=0, cache=None):
            return forward(model, ids, mask, positions, keep + 1, loaded, cache)[:, :-1]

        return shifted

    replace_function("hf_prefix_cache.scoring", "_forward", make)


def score_hit_reaches_into_requested_positions() -> None:
    """prepare() ignores logits_to_keep: the hit may cover positions whose logits were asked for."""
    from hf_prefix_cache import PrefixCache

    prepare = PrefixCache.prepare

    def only_the_last(self, *args, logits_to_keep=1, **kwargs):
        return prepare(self, *args, **kwargs)

    PrefixCache.prepare = only_the_last


def score_keeps_references_on_error() -> None:
    """A scoring call that raises keeps its block references (nothing releases them)."""
    from hf_prefix_cache import PrefixCache

    PrefixCache.release_if_mine = lambda self: None


def lm_eval_ignores_the_cache() -> None:
    """hf-prefix-cache scores every request with a plain forward of the whole input."""
    import torch

    from hf_prefix_cache.integrations.lm_eval import PrefixCacheLM

    def plain(self, tokens, contlen):
        with torch.no_grad():
            return self.model(torch.tensor([tokens], device=self.device)).logits[:, -contlen:]

    PrefixCacheLM._score_row = plain


MUTANTS = [
    Mutant(
        "score_returns_shifted_logits",
        "score() returns the logits of the requested positions, not those one position earlier",
        score_returns_shifted_logits,
        (
            f"{SCORE}::test_miss_then_hit_equal_plain_forward[llama]",
            f"{SCORE}::test_hit_stays_below_the_requested_positions[llama]",
            f"{SCORE}::test_continuation_logprobs_equal_plain_and_reuse_the_context[llama]",
            f"{LM_EVAL}::test_loglikelihoods_equal_hf_and_reuse_prefixes[lm-eval]",
        ),
    ),
    Mutant(
        "score_hit_reaches_into_requested_positions",
        "score() computes every position whose logits were asked for (the hit stays below them)",
        score_hit_reaches_into_requested_positions,
        (
            f"{SCORE}::test_hit_stays_below_the_requested_positions[llama]",
            f"{SCORE}::test_hit_stays_below_the_requested_positions[gemma3]",
        ),
    ),
    Mutant(
        "score_keeps_references_on_error",
        "a scoring call that raises releases the blocks it referenced",
        score_keeps_references_on_error,
        (f"{SCORE}::test_an_error_in_the_forward_leaks_no_reference[llama]",),
    ),
    Mutant(
        "lm_eval_ignores_the_cache",
        "the hf-prefix-cache lm-eval model reuses stored prefixes",
        lm_eval_ignores_the_cache,
        (
            f"{LM_EVAL}::test_loglikelihoods_equal_hf_and_reuse_prefixes[lm-eval]",
            f"{LM_EVAL}::test_loglikelihoods_equal_hf_and_reuse_prefixes[shuffled]",
        ),
    ),
]
