"""Every knob of an evaluation run in one dataclass, shared by the CLI and the Python API.

The defaults are the README's run: SmolLM2-135M-Instruct, MT-Bench with the ~1000-token shared system
prompt, a subset small enough to finish with all four modes in under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The modes a run can measure, by name (modes.MODES holds one class under each), and the two that the
# rest of the harness names. This module imports no other module of the harness: every one may import it.
BASELINE = "baseline"
PREFIX_CACHE = "prefix_cache"
MODE_NAMES: tuple[str, ...] = (BASELINE, "deepcopy", "cont_batching", PREFIX_CACHE)
HISTORY_CHOICES: tuple[str, ...] = ("model", "dataset")  # whose reply goes into the next turn's history
WORKER_STARTS: tuple[str, ...] = ("together", "staggered")
DEFAULT_SYSTEM_PROMPT = "default"  # EvalConfig.system_prompt value meaning data.default_system_prompt()


def redact_url(url: str) -> str:
    """A Redis URL without its password (``user:password@``), for results.json and the report."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


@dataclass
class EvalConfig:
    """Options of ``run_evaluation``; see ``python -m hf_prefix_cache_eval --help`` for each one."""

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    model_cache_dir: str | None = None
    dataset: str = "mtbench"
    conversations: int | None = 10
    max_turns: int | None = None
    max_context_tokens: int | None = 4096
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # "default", None (no shared prompt) or the text
    history: str = "model"
    max_new_tokens: int = 32
    modes: tuple[str, ...] = MODE_NAMES
    block_size: int = 16
    cache_memory: str | None = "1GiB"
    cache_blocks: int | None = None
    # the store as this fraction of the replay's working set (its distinct blocks with the dataset's
    # replies as history, retention_trace.py): e.g. 0.25 makes a round-robin replay evict between turns
    pool_fraction: float | None = None
    policy: str | None = None  # PrefixCache eviction policy ("retain", the default, or "lru")
    host_memory: str | None = None  # PrefixCache host tier size; None: no host tier
    disk: str | None = None  # PrefixCache disk tier folder; None: no disk tier
    disk_size: str | None = None
    remote: str | None = None  # PrefixCache remote (Redis) tier URL; with workers, the workers' server
    remote_min_tokens: int | None = None  # shortest remote hit worth fetching (None: the library's default)
    restart: bool = False  # replay every first turn in a fresh process over the filled disk tier
    workers: int | None = None  # replay disjoint conversations in this many processes sharing remote
    worker_start: str = "together"  # "together" or "staggered" (each after the previous one's first turn)
    warmup_calls: int = 2
    seed: int = 0
    context_bin_tokens: int | None = None  # None: a power of two giving at most 8 bins
    threads: int | None = None
    worker_thread: bool = True  # run generate() off the main thread, as continuous batching does
    output_dir: str | os.PathLike[str] | None = "results"
    run_name: str | None = None
    plots: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes copied into results.json

    def __post_init__(self) -> None:
        self.modes = tuple(dict.fromkeys(self.modes))
        unknown = [m for m in self.modes if m not in MODE_NAMES]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODE_NAMES)}")
        if BASELINE not in self.modes:  # every speedup and output check is against it
            self.modes = (BASELINE, *self.modes)
        if self.history not in HISTORY_CHOICES:
            raise ValueError(f"history must be one of {HISTORY_CHOICES}, got {self.history!r}")
        for name in (
            "conversations",
            "max_turns",
            "max_context_tokens",
            "cache_blocks",
            "threads",
            "context_bin_tokens",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("max_new_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_calls, int) or self.warmup_calls < 0:
            raise ValueError(f"warmup_calls must be a non-negative int, got {self.warmup_calls!r}")
        if self.disk_size is not None and self.disk is None:
            raise ValueError("disk_size needs disk (the disk tier folder)")
        self._check_subprocess_runs()
        if self.pool_fraction is not None:
            if isinstance(self.pool_fraction, bool) or not 0 < float(self.pool_fraction) <= 1:
                raise ValueError(f"pool_fraction must be in (0, 1], got {self.pool_fraction!r}")
            if self.cache_blocks is not None:
                raise ValueError("give pool_fraction or cache_blocks to size the prefix store, not both")
        if self.policy is not None and self.policy not in ("retain", "lru"):
            raise ValueError(f"policy must be 'retain' or 'lru', got {self.policy!r}")
        if self.cache_memory is None and self.cache_blocks is None:
            raise ValueError("give cache_memory or cache_blocks to size the prefix store")

    def _check_subprocess_runs(self) -> None:
        if self.restart and self.disk is None:
            raise ValueError(
                "--restart needs --disk DIR (EvalConfig.disk): the fresh process reads back the disk tier "
                "that the run fills"
            )
        if self.restart and PREFIX_CACHE not in self.modes:
            raise ValueError(
                f"--restart reads the disk tier that the {PREFIX_CACHE} mode fills: add {PREFIX_CACHE} to --modes"
            )
        if self.workers is not None:
            if not isinstance(self.workers, int) or self.workers < 1:
                raise ValueError(f"workers must be a positive int or None, got {self.workers!r}")
            if self.remote is None:
                raise ValueError(
                    "--workers needs --remote redis://HOST:PORT/DB (EvalConfig.remote): the worker "
                    "processes share one Redis/Valkey server"
                )
        if self.worker_start not in WORKER_STARTS:
            raise ValueError(f"worker_start must be one of {WORKER_STARTS}, got {self.worker_start!r}")
        if self.remote_min_tokens is not None and self.remote is None:
            raise ValueError("remote_min_tokens needs remote (a redis:// URL)")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modes"] = list(self.modes)
        if self.output_dir is not None:
            data["output_dir"] = os.fspath(self.output_dir)
        if self.remote is not None:
            data["remote"] = redact_url(self.remote)
        if self.system_prompt not in (None, DEFAULT_SYSTEM_PROMPT):
            data["system_prompt"] = f"<custom, {len(self.system_prompt)} characters>"
        return data

    def run_dir(self, stamp: str) -> Path | None:
        """Where this run's files go: ``output_dir/run_name`` (default ``<dataset>-<timestamp>``)."""
        if self.output_dir is None:
            return None
        name = self.run_name or f"{_slug(self.dataset)}-{stamp}"
        return Path(self.output_dir) / name


def _slug(text: str) -> str:
    stem = Path(text).stem if os.sep in text or "." in text else text
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-") or "run"
