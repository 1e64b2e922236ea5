"""Time to first token, read from inside ``generate()`` rather than guessed from the total.

``generate()`` calls ``streamer.put()`` once with the prompt before any forward pass, then once per
generated token; the first call after the prompt is the moment the first new token exists. This is the
same clock (``time.perf_counter``) the caller reads before the call, so TTFT includes everything the call
did first: a cache lookup, a deep copy, the prefill.
"""

from __future__ import annotations

import os
import time

from transformers.generation.streamers import BaseStreamer


class FirstTokenTimer(BaseStreamer):
    """A streamer that only records when the first generated token arrived (and when generation ended)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self.puts = 0

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True  # generate() streams the prompt first
            return
        self.puts += 1
        if self.first_token_time is None:
            self.first_token_time = now

    def end(self) -> None:
        self.end_time = time.perf_counter()

    def ttft(self, start: float) -> float:
        """Seconds from ``start`` to the first generated token (NaN if none was generated)."""
        return self.first_token_time - start if self.first_token_time is not None else float("nan")


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): other processes' CPU use, printed
    beside every timing since this machine is shared."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
