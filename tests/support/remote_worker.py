"""A separate interpreter for the remote-tier process tests: one tiny model, one PrefixCache whose only
lower tier is the Redis server at URL.

python tests/support/remote_worker.py chat URL CONVERSATION TURNS
    replays TURNS turns of conversation CONVERSATION (a system prompt shared by every conversation, then
    its own user turns); each turn: generate() without and with the cache.
python tests/support/remote_worker.py continue URL HISTORY_FILE...
    one call per file: that file's token ids (another process's conversation) plus a new user turn.

Both print one JSON line: per call equal / hit tokens / hits by tier, the final history, tier errors
and the remote tier's counters. Neither flushes: interpreter exit must (atexit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: support.*, mutants.*

SYSTEM_TOKENS = 24


def user_turn(conversation: int, turn: int) -> list[int]:
    from support.scenarios import new_tokens

    return new_tokens(7, 1000 + 37 * conversation + turn)


def chat(url, conversation, turns):
    from support.scenarios import new_tokens

    conversation = int(conversation)
    prompts = (lambda history, turn: history + user_turn(conversation, turn) for _ in range(int(turns)))
    run(url, new_tokens(SYSTEM_TOKENS, 100), prompts)


def continue_(url, *history_files):
    histories = [json.loads(Path(name).read_text()) for name in history_files]
    run(url, None, (lambda _, turn, h=h: h + user_turn(99, turn) for h in histories))


def run(url, history, prompts):
    """Each of ``prompts`` (history, turn) -> ids: generate() without and with the cache; print JSON."""
    import torch

    from hf_prefix_cache import PrefixCache
    from support.models import tiny_model

    model = tiny_model("llama", seed=0)
    cache = PrefixCache(model, block_size=4, num_blocks=256, remote=url, remote_min_tokens=0)
    calls = []
    for turn, prompt in enumerate(prompts):
        ids = torch.tensor([prompt(history, turn)])
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
    {"chat": chat, "continue": continue_}[mode](*args)
