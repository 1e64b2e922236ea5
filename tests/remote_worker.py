"""A separate interpreter for the remote-tier process tests: one tiny model, one PrefixCache whose only
lower tier is the Redis server at URL.

python remote_worker.py chat URL CONVERSATION TURNS [FIRST_TURN_FILE]
    replays TURNS turns of conversation CONVERSATION (a system prompt shared by every conversation, then
    its own user turns); each turn: generate() without and with the cache. With FIRST_TURN_FILE the
    first prompt is that file's token ids (another process's history) plus a new user turn.
    Prints one JSON line: per call equal / hit tokens / hits by tier, the final history, tier errors.
    Does NOT flush: interpreter exit must (atexit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SYSTEM_TOKENS = 24


def user_turn(conversation: int, turn: int) -> list[int]:
    from exactness import new_tokens

    return new_tokens(7, 1000 + 37 * conversation + turn)


def chat(url, conversation, turns, first_turn_file=""):
    import torch
    from exactness import new_tokens
    from tiny_models import tiny_model

    from hf_prefix_cache import PrefixCache

    model = tiny_model("llama", seed=0)
    cache = PrefixCache(model, block_size=4, num_blocks=256, remote=url, remote_min_tokens=0)
    conversation, turns = int(conversation), int(turns)
    if first_turn_file:
        history = json.loads(Path(first_turn_file).read_text())
    else:
        history = new_tokens(SYSTEM_TOKENS, 100)
    calls = []
    for turn in range(turns):
        ids = torch.tensor([history + user_turn(conversation, turn)])
        mask = torch.ones_like(ids)
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5, cache=cache)
        calls.append(
            {
                "equal": bool(torch.equal(ref, out)),
                "prompt_tokens": ids.shape[1],
                "hit_tokens": cache.last_call.hit_tokens,
                "by_tier": cache.last_call.hit_tokens_by_tier,
            }
        )
        history = out[0].tolist()
    stats = cache.stats
    print(
        json.dumps(
            {
                "calls": calls,
                "history": history,
                "tier_errors": stats.tier_errors,
                "remote": stats.tiers["remote"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"chat": chat}[mode](*args)
