"""attach(model) under the real clients that call generate() themselves: smolagents' TransformersModel (its
generate and its streaming path, which runs generate() in a thread of its own), pipeline("text-generation")
and lm-eval's HFLM.generate_until. Each runs a growing conversation (or few-shot prompts) plain, then
attached: the same text, the same last-position logits of every forward (within the fp32 tolerance), and
hits from the second call on. A tiny random Llama and a character-level tokenizer with a chat template,
saved to a folder: no hub access."""

from __future__ import annotations

import pytest
import torch
from support.models import char_tokenizer, tiny_model

from hf_prefix_cache import attach, detach
from hf_prefix_cache.generation import ATTACHED

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

TOLERANCE = 1e-4  # fp32
SYSTEM = "You are a careful assistant. Answer in one short line, then stop. " * 3
QUESTIONS = ["What is 2+2?", "And 3+3?", "Now add both.", "Say it in words."]


class LastLogits:
    """The last position's logits of every forward of ``model`` (one per prefill and decode step)."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self._handle = model.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.steps.append(output.logits[:, -1].detach().clone())

    def __enter__(self) -> LastLogits:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def assert_same_logits(ref: list[torch.Tensor], out: list[torch.Tensor], label: str = "") -> None:
    assert len(ref) == len(out), f"{label}: {len(out)} forwards != {len(ref)}"
    worst = max(float((a - b).abs().max()) for a, b in zip(ref, out))
    assert worst <= TOLERANCE, f"{label}: max |logit diff| {worst:.3g} > {TOLERANCE}"


def add_key_noise(cache, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    for keys in cache.store.kv.keys:
        keys.add_((scale * torch.randn(keys.shape, generator=generator)).to(keys.dtype))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Llama and its tokenizer (with a chat template) in a folder, as from_pretrained reads."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


# -- smolagents ---------------------------------------------------------------------------------------------
def agent_turns(tm, stream: bool, logits: LastLogits) -> tuple[list[str], list[list[torch.Tensor]]]:
    """A growing agent memory: system prompt, then each question and the model's reply, call by call."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    replies, steps = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        logits.steps.clear()
        if stream:
            reply = "".join(delta.content or "" for delta in tm.generate_stream(messages))
        else:
            reply = tm.generate(messages, stop_sequences=["?!"]).content
        replies.append(reply)
        steps.append(list(logits.steps))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return replies, steps


@pytest.fixture(scope="module")
def smol(saved):
    from smolagents import TransformersModel

    return TransformersModel(model_id=str(saved), device_map="cpu", max_new_tokens=12)


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
def test_smolagents_transformers_model_is_exact_attached(smol, stream):
    with LastLogits(smol.model) as logits:
        ref_replies, ref_steps = agent_turns(smol, stream, logits)
        cache = attach(smol.model, block_size=4, num_blocks=256)
        try:
            replies, steps = agent_turns(smol, stream, logits)
            hits = cache.stats.hit_tokens
            calls = cache.stats.calls
            # generate_stream runs each call in a new thread: the threads took turns with one view
            views = len(smol.model.__dict__[ATTACHED].pool.views)
        finally:
            detach(smol.model)
    assert replies == ref_replies
    for turn, (ref, out) in enumerate(zip(ref_steps, steps)):
        assert_same_logits(ref, out, f"turn {turn}")
    assert calls == len(QUESTIONS), "every agent step went through the attached store"
    assert views == 1
    assert hits > 0 and cache.last_call.hit_tokens > 0


def test_smolagents_negative_control_noisy_store_is_caught(smol):
    with LastLogits(smol.model) as logits:
        _, ref_steps = agent_turns(smol, False, logits)
        cache = attach(smol.model, block_size=4, num_blocks=256)
        try:
            messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
            smol.generate([*messages, {"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]}]}])
            add_key_noise(cache)
            _, steps = agent_turns(smol, False, logits)
        finally:
            detach(smol.model)
    with pytest.raises(AssertionError, match="logit diff"):
        assert_same_logits(ref_steps[0], steps[0])


# -- pipeline -----------------------------------------------------------------------------------------------
def test_text_generation_pipeline_is_exact_attached(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(saved))
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    calls = [  # one chat, then a left-padded batch of two (of different lengths), then the first again
        ([chats[0]], 1),
        ([chats[1], [*chats[2], {"role": "assistant", "content": "ok"}]], 2),
        ([chats[0]], 1),
    ]

    def run() -> tuple[list, list]:
        texts, steps = [], []
        with LastLogits(model) as logits:
            for chat_batch, batch_size in calls:
                logits.steps.clear()
                out = pipe(chat_batch, batch_size=batch_size, max_new_tokens=10, do_sample=False)
                texts.append([row[0]["generated_text"][-1]["content"] for row in out])
                steps.append(list(logits.steps))
        return texts, steps

    ref_texts, ref_steps = run()
    cache = attach(model, block_size=4, num_blocks=256)
    try:
        texts, steps = run()
    finally:
        detach(model)
    assert texts == ref_texts
    for call, (ref, out) in enumerate(zip(ref_steps, steps)):
        assert_same_logits(ref, out, f"call {call}")
    assert cache.stats.calls == 3 and cache.last_call.hit_tokens > 0, cache.stats


# -- lm-eval ------------------------------------------------------------------------------------------------
def test_lm_eval_generate_until_is_exact_attached(saved):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(saved), device="cpu", batch_size=1)
    shots = "".join(f"Q: {a}+{b}=?\nA: {a + b}\n\n" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)])
    requests = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(
                f"{shots}Q: {a}+{a}=?\nA:",
                {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
            ),
            idx=i,
        )
        for i, a in enumerate([11, 22, 333, 4])
    ]

    def run() -> tuple[list[str], list]:
        with LastLogits(model) as logits:
            return lm.generate_until(requests, disable_tqdm=True), list(logits.steps)

    ref_texts, ref_steps = run()
    cache = attach(model, block_size=4, num_blocks=256)
    try:
        texts, steps = run()
    finally:
        detach(model)
    assert texts == ref_texts
    assert_same_logits(ref_steps, steps)
    assert cache.stats.calls == len(requests)
    assert cache.stats.hit_tokens >= (len(requests) - 1) * 4 * (len(shots) // 4 - 1), cache.stats
