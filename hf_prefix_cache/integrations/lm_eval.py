"""lm-evaluation-harness model ``hf-prefix-cache``: lm-eval's ``hf`` model whose calls reuse stored prefixes.

Few-shot contexts, and the context shared by a question's answer choices, are computed once and then
loaded from a ``PrefixCache``: ``loglikelihood`` (and ``loglikelihood_rolling``, which goes through the
same method) scores each request with ``PrefixCache.score`` one row at a time (lm-eval's right-padded,
maskless batches would hash pad ids), and ``generate_until`` passes the cache to ``generate()``. The
store is keyed by token ids, so reuse does not depend on lm-eval's request order. Importing this module
registers the name; ``python -m hf_prefix_cache.lm_eval`` runs lm-eval's CLI with it.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval loads them only into an empty registry)
import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from ..cache import PrefixCache
from ..compat import CACHE_KWARG
from ..tiers import registry as tier_registry

logger = logging.getLogger(__name__)

MODEL_NAME = "hf-prefix-cache"
# PrefixCache's own options, taken from model_args; every other model_arg is lm-eval's hf model's
CACHE_OPTIONS = ("block_size", "max_memory", "num_blocks", "cache_salt")  # plus every tier argument


@register_model(MODEL_NAME)
class PrefixCacheLM(HFLM):
    """lm-eval's ``HFLM`` with a ``PrefixCache`` (``self.prefix_cache``) built from ``model_args`` such as
    ``pretrained=PATH,block_size=16,max_memory=2GiB,disk=/tmp/kv``. Loglikelihood requests run one at a
    time whatever ``batch_size`` says (the reuse is what makes them cheap); ``batch_size`` still batches
    ``generate_until``."""

    def __init__(self, pretrained, **kwargs):
        names = (*CACHE_OPTIONS, *tier_registry.arguments())
        options = {name: kwargs.pop(name) for name in names if name in kwargs}
        if kwargs.get("batch_size") == "auto" or str(kwargs.get("batch_size", "")).startswith("auto"):
            raise ValueError(
                f"{MODEL_NAME} does not support batch_size='auto' (its loglikelihood requests run one at "
                "a time); pass batch_size=1 or a number"
            )
        super().__init__(pretrained, **kwargs)
        if self.backend != "causal":
            logger.warning(
                "%s: a %s model has no prefix reuse; it runs as lm-eval's hf", MODEL_NAME, self.backend
            )
        self.prefix_cache = PrefixCache(self.model, **options)

    def _score_row(self, tokens: list[int], contlen: int) -> torch.Tensor:
        """Logits ``[1, contlen, vocab]`` of the last ``contlen`` positions of ``tokens``, via the cache."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):  # as HFLM._model_call; under autocast the cache reuses nothing and says so
            return self.prefix_cache.score(ids, logits_to_keep=contlen)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's causal path, one request at a time, with the same order, logits cache, truncation and
        results; only the forward differs (it reuses the stored prefix and computes the rest)."""
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results = []
        reordered = Collator(
            requests,
            sort_fn=_by_length,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_input_tokens,
        )
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        )
        for chunk in reordered.get_batched(n=1):
            for request_str, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and len(continuation_enc) > 0
                assert len(continuation_enc) <= self.max_length
                total = len(context_enc) + len(continuation_enc)
                if total > self.max_length + 1:
                    logger.warning(
                        "Combined length of context (%d) and continuation (%d) exceeds the model's maximum "
                        "length (%d); truncating from the left",
                        len(context_enc),
                        len(continuation_enc),
                        self.max_length,
                    )
                tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
                logits = self._score_row(tokens, len(continuation_enc))
                logits = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [1, contlen, vocab]
                greedy_tokens = logits.argmax(dim=-1)
                for request_str, cont_toks, logits in reordered.get_cache(  # noqa: B020
                    req_str=request_str, cxt_toks=context_enc, cont_toks=continuation_enc, logits=logits
                ):
                    cont_toks = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                    max_equal = (greedy_tokens[:, -cont_toks.shape[1] :] == cont_toks).all()
                    picked = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
                    answer = (float(picked.sum()), bool(max_equal))
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    bar.update(1)
        bar.close()
        return reordered.get_original(results)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """HFLM's generate() call, given the cache (an explicit cache of the caller's wins)."""
        if not any(generation_kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            generation_kwargs[CACHE_KWARG] = self.prefix_cache
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def _by_length(request) -> tuple:
    """HFLM's order: longest first, ties by token ids."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _input_tokens(request) -> list[int]:
    """HFLM's logits-cache key: requests with the same input share one forward."""
    return request[-2] + request[-1][:-1]
