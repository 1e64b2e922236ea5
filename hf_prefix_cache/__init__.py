"""hf_prefix_cache: vLLM-style automatic prefix caching for Hugging Face ``transformers``."""

from .attachment import attach, attached, detach
from .cache import PrefixCache
from .compat import CACHE_KWARG
from .explain import HitReport
from .generation import install, is_installed, uninstall
from .memory import parse_bytes
from .priorities import ROLE_PRIORITIES, role_priorities
from .reasons import PrefixCacheFallbackWarning
from .scoring import Continuation, continuation_logprobs, score
from .stats import CacheStats, CallStats
from .store import BlockStore

__all__ = [
    "CACHE_KWARG",
    "ROLE_PRIORITIES",
    "BlockStore",
    "CacheStats",
    "CallStats",
    "Continuation",
    "HitReport",
    "PrefixCache",
    "PrefixCacheFallbackWarning",
    "attach",
    "attached",
    "continuation_logprobs",
    "detach",
    "install",
    "is_installed",
    "parse_bytes",
    "role_priorities",
    "score",
    "uninstall",
]
__version__ = "0.1.0"
