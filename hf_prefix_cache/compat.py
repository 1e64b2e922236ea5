"""The few places where transformers 5.23 and 5.24+ differ for us."""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)

# 5.24 renamed `past_key_values=` to `cache=` in generate() and forward(); the old name still works there.
CACHE_KWARG = "cache" if Version("5.24.0.dev0") <= TRANSFORMERS_VERSION else "past_key_values"
CACHE_KWARGS = ("cache", "past_key_values")
