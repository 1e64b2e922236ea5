"""The four ways of serving a multi-turn prompt that the evaluation puts side by side.

* ``baseline``      - ``generate()`` with no cache argument: every call prefills the whole prompt.
* ``deepcopy``      - transformers' documented recipe: the shared system prompt prefilled once into a
                      ``DynamicCache``, ``copy.deepcopy``-ed for every call whose prompt starts with it
                      (checked token by token; a prompt equal to the prefix would be fed twice, so it is
                      refused too). One fixed prefix, nothing learnt from earlier turns.
* ``cont_batching`` - transformers' continuous batching, ``generate_batch`` with a persistent manager
                      and ``allow_block_sharing=True``: its paged cache shares full blocks across calls.
* ``prefix_cache``  - ``hf_prefix_cache.PrefixCache`` through ``generate(cache=...)``, public API only.

Each mode owns its state, made fresh in ``setup``; ``generate`` returns the greedy tokens, TTFT,
end-to-end time and, where the mode can tell, how many prompt tokens it reused.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from transformers import ContinuousBatchingConfig, DynamicCache, GenerationConfig

import hf_prefix_cache
from hf_prefix_cache import CACHE_KWARG, PrefixCache

from .config import BASELINE, PREFIX_CACHE, redact_url
from .timing import FirstTokenTimer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Continuous batching logs each prefix hit at DEBUG level; it is the only public trace of its reuse.
CB_LOGGER_NAME = "ContinuousBatchingLogger"
FLUSH_TIMEOUT_S = 30
_CB_HIT = re.compile(r"Found a prefix match of (\d+) tokens for request (\S+)")


@dataclass
class Generation:
    """One mode's answer to one prompt."""

    tokens: list[int]  # generated ids, cut after the first stop token
    ttft_s: float
    e2e_s: float
    hit_tokens: int | None  # prompt tokens reused; None when the mode cannot tell
    note: str | None = None
    hit_tokens_by_tier: dict[str, int] | None = None  # where the hits came from (PrefixCache only)


@dataclass
class ModeContext:
    """What every mode shares: the model, greedy decoding settings, and the store sizing."""

    model: torch.nn.Module
    generation_config: GenerationConfig
    max_new_tokens: int
    block_size: int = 16
    cache_memory: str | int | None = "1GiB"
    cache_blocks: int | None = None
    policy: str | None = None  # PrefixCache eviction policy (None: the library's default)
    tiers: dict[str, Any] = field(default_factory=dict)  # PrefixCache host_memory / disk / disk_size
    recipe_prefix: list[int] | None = None  # the shared system prompt's tokens, for the deepcopy recipe
    max_request_tokens: int = 4096  # longest prompt + reply expected, to size continuous batching's cache
    # generate() runs here, off the main thread, like continuous batching's own generation thread:
    # CPU threading behaves differently on the main thread (much slower under load), and every mode must
    # compute under the same conditions. None runs generate() on the calling thread.
    executor: ThreadPoolExecutor | None = None

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the generation thread and return its result."""
        return self.executor.submit(function).result() if self.executor is not None else function()

    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation_config.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


def greedy_config(model: torch.nn.Module, max_new_tokens: int) -> GenerationConfig:
    """The model's generation config with sampling, beams and static caches turned off."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.num_return_sequences = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.cache_implementation = None
    return config


def shown_tiers(tiers: dict[str, Any]) -> dict[str, Any]:
    """The tier options as a report shows them: a remote URL without its password."""
    return {key: redact_url(value) if key == "remote" else value for key, value in tiers.items()}


def trim_at_stop(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    """Generated tokens up to and including the first stop token (generate() may pad after it)."""
    out = []
    for token in tokens:
        out.append(int(token))
        if token in stop_ids:
            break
    return out


class Mode:
    """Base class: a way of running ``generate`` on one prompt, with state that lives across calls."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""

    def __init__(self, context: ModeContext):
        self.context = context
        self.model = context.model
        self.available = True
        self.reason: str | None = None  # why the mode is unavailable
        self.setup_s = 0.0  # one-off work outside the measured calls
        self.notes: list[str] = []

    def setup(self) -> None:
        """Build fresh state for this mode."""

    def reset_after_warmup(self) -> None:
        """Forget what the warm-up stored, so the measured run starts cold."""

    def generate(self, prompt_ids: list[int]) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        """Release the mode's state and undo any change to the model."""

    def info(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "available": self.available,
            "reason": self.reason,
            "setup_s": self.setup_s,
            "notes": self.notes,
        }

    def disable(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        logger.warning("%s is not measured: %s", self.name, reason)

    # shared by the modes that go through generate()
    def _timed_generate(
        self, prompt_ids: list[int], per_call: Callable[[], dict[str, Any]] | None = None
    ) -> tuple[list[int], float, float]:
        """Greedy ``generate()`` on one prompt; ``per_call`` builds extra kwargs inside the timed region."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
        timer = FirstTokenTimer()
        start = time.perf_counter()

        def run() -> torch.Tensor:
            kwargs = per_call() if per_call is not None else {}
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.context.generation_config,
                streamer=timer,
                **kwargs,
            )

        sequences = self.context.call(run)
        end = time.perf_counter()
        tokens = trim_at_stop(sequences[0, len(prompt_ids) :].tolist(), self.context.stop_ids)
        return tokens, timer.ttft(start), end - start


class Baseline(Mode):
    """``generate()`` without any cache argument: no reuse at all."""

    name = BASELINE
    label = "generate(), no reuse"

    def generate(self, prompt_ids: list[int]) -> Generation:
        tokens, ttft, e2e = self._timed_generate(prompt_ids)
        return Generation(tokens, ttft, e2e, hit_tokens=0)


class DeepcopyRecipe(Mode):
    """transformers' documented prefix reuse: one prefilled ``DynamicCache``, deep-copied per call."""

    name = "deepcopy"
    label = "DynamicCache + deepcopy recipe"

    def __init__(self, context: ModeContext):
        super().__init__(context)
        self.prefix_cache: DynamicCache | None = None
        self.fallbacks = 0  # prompts that did not start with the prefix: recomputed in full

    def setup(self) -> None:
        prefix = self.context.recipe_prefix
        if not prefix:
            self.disable("no shared system prompt: the recipe needs one fixed prefix")
            return
        start = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([prefix], dtype=torch.long, device=self.model.device)

        def prefill() -> None:
            with torch.no_grad():
                self.model(input_ids=input_ids, use_cache=True, **{CACHE_KWARG: cache})

        self.context.call(prefill)
        self.prefix_cache = cache
        self.setup_s = time.perf_counter() - start
        self.notes.append(
            f"prefix of {len(prefix)} tokens prefilled once in {self.setup_s:.2f} s (not in TTFT)"
        )

    def applies_to(self, prompt_ids: Sequence[int]) -> bool:
        """The recipe is only valid when the prompt starts with the prefix and goes past it."""
        prefix = self.context.recipe_prefix or []
        return len(prompt_ids) > len(prefix) and list(prompt_ids[: len(prefix)]) == prefix

    def generate(self, prompt_ids: list[int]) -> Generation:
        if self.prefix_cache is None or not self.applies_to(prompt_ids):
            self.fallbacks += 1
            tokens, ttft, e2e = self._timed_generate(prompt_ids)
            return Generation(tokens, ttft, e2e, 0, note="prompt does not start with the prefix: recomputed")
        key = CACHE_KWARG
        # the copy is part of every call's cost, so it happens inside the timed region
        tokens, ttft, e2e = self._timed_generate(prompt_ids, lambda: {key: copy.deepcopy(self.prefix_cache)})
        return Generation(tokens, ttft, e2e, len(self.context.recipe_prefix))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "fallbacks": self.fallbacks}

    def close(self) -> None:
        self.prefix_cache = None


class ContinuousBatching(Mode):
    """``generate_batch`` with a persistent manager and block sharing; one request per call, as a turn."""

    name = "cont_batching"
    label = "continuous batching, block sharing"

    def __init__(self, context: ModeContext):
        super().__init__(context)
        self.config: ContinuousBatchingConfig | None = None
        self.hits_seen = False  # whether its debug log ever reported a prefix hit

    def setup(self) -> None:
        if not hasattr(self.model, "generate_batch"):
            self.disable("this transformers version has no generate_batch")
            return
        self.model.destroy_cached_continuous_batching_manager()  # a fresh manager, fresh paged cache
        self.config = ContinuousBatchingConfig(
            allow_block_sharing=True,
            page_size=self.context.block_size,
            num_blocks=self._num_blocks(),
            auto_switch_to_flash=False,  # same attention kernel as the other modes
        )
        self.notes.append(
            f"page_size={self.config.page_size}, num_blocks={self.config.num_blocks}; "
            "TTFT from its per-token timestamps; hits read from its DEBUG log"
        )

    def _num_blocks(self) -> int | None:
        size = self.context.block_size
        # Its paged cache also holds the request being computed, which PrefixCache keeps outside its
        # store: it gets the store's blocks plus room for the longest request, so both retain as much.
        live = math.ceil(self.context.max_request_tokens / size) + 1
        if self.context.cache_blocks is not None:
            return self.context.cache_blocks + live
        if self.context.cache_memory is None:
            return None
        per_block = _kv_bytes_per_token(self.model) * size
        return hf_prefix_cache.parse_bytes(self.context.cache_memory) // per_block + live

    def generate(self, prompt_ids: list[int]) -> Generation:
        with _capture_cb_hits() as hits:
            start = time.perf_counter()
            outputs = self.model.generate_batch(
                [list(prompt_ids)],
                generation_config=self.context.generation_config,
                continuous_batching_config=self.config,
                record_timestamps=True,
                progress_bar=False,
                persistent_manager=True,
                max_new_tokens=self.context.max_new_tokens,
            )
            end = time.perf_counter()
        if len(outputs) != 1:
            raise RuntimeError(f"generate_batch returned {len(outputs)} results for one request")
        request_id, output = next(iter(outputs.items()))
        if output.error is not None:
            raise RuntimeError(f"generate_batch failed: {output.error}")
        stamps = output.timestamps or []
        ttft = stamps[0] - start if stamps else float("nan")
        self.hits_seen = self.hits_seen or bool(hits)
        tokens = trim_at_stop(output.generated_tokens, self.context.stop_ids)
        return Generation(tokens, ttft, end - start, hits.get(request_id, 0))

    def close(self) -> None:
        if hasattr(self.model, "destroy_cached_continuous_batching_manager"):
            self.model.destroy_cached_continuous_batching_manager()


class PrefixCacheMode(Mode):
    """``hf_prefix_cache.PrefixCache`` passed to ``generate()``; only its public API is used."""

    name = PREFIX_CACHE
    label = "hf_prefix_cache.PrefixCache"

    def __init__(self, context: ModeContext):
        super().__init__(context)
        self.cache: PrefixCache | None = None
        self._installed_here = False

    def setup(self) -> None:
        was_installed = hf_prefix_cache.is_installed(self.model)
        sizing = (
            {"num_blocks": self.context.cache_blocks}
            if self.context.cache_blocks is not None
            else {"max_memory": self.context.cache_memory}
        )
        if self.context.policy is not None:
            sizing["policy"] = self.context.policy
        self.cache = PrefixCache(
            self.model, block_size=self.context.block_size, **sizing, **self.context.tiers
        )
        self._installed_here = not was_installed
        stats = self.cache.stats
        if stats.fallback:
            self.notes.append(f"PrefixCache fell back to recomputation: {stats.fallback}")
        self.notes.append(f"{stats.num_blocks} blocks of {stats.block_size} tokens")
        if self.context.tiers:
            self.notes.append(f"lower tiers: {shown_tiers(self.context.tiers)}")

    def reset_after_warmup(self) -> None:
        self.cache.clear()
        self.cache.reset_stats()

    def generate(self, prompt_ids: list[int]) -> Generation:
        key = CACHE_KWARG
        tokens, ttft, e2e = self._timed_generate(prompt_ids, lambda: {key: self.cache})
        last = self.cache.last_call
        return Generation(
            tokens, ttft, e2e, last.hit_tokens, hit_tokens_by_tier=dict(last.hit_tokens_by_tier)
        )

    def info(self) -> dict[str, Any]:
        stats = self.cache.stats.as_dict() if self.cache is not None else None
        return {**super().info(), "stats": stats}

    def close(self) -> None:
        if self.cache is not None and not self.cache.flush(timeout=FLUSH_TIMEOUT_S):
            # a disk tier's queued writes land before the run ends (a restart replay reads them)
            self.notes.append(f"queued tier writes were still pending after {FLUSH_TIMEOUT_S} s")
        if self.cache is not None and self._installed_here:
            hf_prefix_cache.uninstall(self.model)


MODES: dict[str, type[Mode]] = {
    mode.name: mode for mode in (Baseline, DeepcopyRecipe, ContinuousBatching, PrefixCacheMode)
}


def _kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V per token over all layers, from the config (to size the paged cache alike)."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * itemsize


class _HitCollector(logging.Filter):
    """Reads prefix hits off continuous batching's log and keeps its chatter off the terminal."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = _CB_HIT.search(record.getMessage())
        if match:
            self.hits[match.group(2)] = int(match.group(1))
        return record.levelno >= logging.ERROR


@contextmanager
def _capture_cb_hits() -> Iterator[dict[str, int]]:
    cb_logger = logging.getLogger(CB_LOGGER_NAME)
    collector = _HitCollector()
    level = cb_logger.level
    cb_logger.addFilter(collector)
    cb_logger.setLevel(logging.DEBUG)
    try:
        yield collector.hits
    finally:
        cb_logger.setLevel(level)
        cb_logger.removeFilter(collector)
