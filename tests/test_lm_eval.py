"""lm-eval model ``hf-prefix-cache`` against lm-eval's own ``hf`` on the local few-shot task: the same
per-sample loglikelihoods, accuracy and generations, in lm-eval's order and shuffled, with prefixes reused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from support.models import DECODER

from hf_prefix_cache.integrations.lm_eval import PrefixCacheLM

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "lm_eval_tasks"
TASK = "prefix_mc"
LIMIT = 12  # documents: 48 requests
TOLERANCE = 1e-4  # fp32 (tests/exactness.py)


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on the task's own text (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["Question: Answer:"]
    for file in (TASKS / TASK).glob("*.json"):
        for line in file.read_text().splitlines():
            doc = json.loads(line)
            texts += [doc["question"], *doc["choices"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny random llama and its tokenizer saved to a folder, as lm-eval loads models."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(**{**DECODER, "vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def requests_(task_manager) -> list[Instance]:
    task = task_manager.load([TASK])["tasks"][TASK]
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    return list(task.instances)


@pytest.fixture(scope="module")
def hf(pretrained) -> HFLM:
    return HFLM(pretrained=pretrained, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def expected(hf, requests_) -> list[tuple[float, bool]]:
    return hf.loglikelihood(requests_, disable_tqdm=True)


def ours(pretrained, **options) -> PrefixCacheLM:
    return PrefixCacheLM(pretrained=pretrained, device="cpu", dtype="float32", block_size=8, **options)


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    assert max(abs(a[0] - e[0]) for a, e in zip(actual, expected)) <= TOLERANCE
    assert [a[1] for a in actual] == [e[1] for e in expected]


@pytest.mark.parametrize("order", ["lm-eval", "shuffled"])
def test_loglikelihoods_equal_hf_and_reuse_prefixes(pretrained, requests_, expected, order):
    model = ours(pretrained, max_memory="16MiB")
    indices = list(range(len(requests_)))
    if order == "shuffled":
        random.Random(0).shuffle(indices)
    actual = model.loglikelihood([requests_[i] for i in indices], disable_tqdm=True)
    assert_same(actual, [expected[i] for i in indices])
    stats = model.prefix_cache.stats
    # the five-shot context is shared by every request: most prompt tokens come from the store
    assert stats.hit_tokens > 0.6 * stats.prompt_tokens, stats


def test_negative_control_wrong_stored_kv_is_caught(pretrained, requests_, expected):
    model = ours(pretrained, max_memory="16MiB")
    model.loglikelihood(requests_[:4], disable_tqdm=True)
    store = model.prefix_cache.store
    for layer in range(len(store.layouts)):
        for pool in (store.kv.keys[layer], store.kv.values[layer]):
            pool.add_(torch.randn_like(pool))
    actual = model.loglikelihood(requests_, disable_tqdm=True)
    with pytest.raises(AssertionError):
        assert_same(actual, expected)


def test_same_accuracy_and_samples_through_simple_evaluate(pretrained, hf, task_manager):
    """model_args as a string, with the cache's options (tiers included) beside lm-eval's."""

    def run(model, **kwargs):
        result = simple_evaluate(
            model=model, tasks=[TASK], task_manager=task_manager, limit=LIMIT, log_samples=True, **kwargs
        )
        samples = sorted(result["samples"][TASK], key=lambda sample: sample["doc_id"])
        return result["results"][TASK]["acc,none"], [s["resps"] for s in samples], result

    acc_hf, resps_hf, _ = run(hf)
    acc, resps, result = run(
        "hf-prefix-cache",
        model_args=f"pretrained={pretrained},dtype=float32,block_size=16,max_memory=2MiB,host_memory=4MiB",
        device="cpu",
        batch_size=1,
    )
    assert acc == acc_hf
    flat = [r for doc in resps for choice in doc for r in choice]
    flat_hf = [r for doc in resps_hf for choice in doc for r in choice]
    assert_same(flat, flat_hf)
    assert result["config"]["model"] == "hf-prefix-cache"


def test_model_args_reach_the_cache_and_auto_batch_is_refused(pretrained):
    model = ours(pretrained, max_memory="2MiB")
    assert model.prefix_cache.block_size == 8
    assert model.prefix_cache.stats.capacity_bytes <= 2 * 2**20
    with pytest.raises(ValueError, match="batch_size"):
        ours(pretrained, batch_size="auto")


def test_generate_until_equals_hf_and_hits(pretrained, hf, requests_):
    contexts = sorted({request.arguments[0] for request in requests_})[:6]
    until = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    generations = [
        Instance("generate_until", {}, (context, dict(until)), i) for i, context in enumerate(contexts)
    ]
    expected = hf.generate_until(generations, disable_tqdm=True)
    model = ours(pretrained, max_memory="16MiB", batch_size=2)
    actual = model.generate_until(generations, disable_tqdm=True)
    assert actual == expected
    assert model.prefix_cache.stats.hit_tokens > 0


def test_loglikelihood_rolling_equals_hf(pretrained, hf, requests_):
    texts = [request.arguments[0] for request in requests_[:8:4]]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    expected = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
    actual = ours(pretrained, max_memory="16MiB").loglikelihood_rolling(rolling, disable_tqdm=True)
    assert max(abs(a - e) for a, e in zip(actual, expected)) <= TOLERANCE


def test_registry_keeps_the_built_in_models():
    from lm_eval.api.registry import get_model

    assert get_model("hf-prefix-cache") is PrefixCacheLM
    assert get_model("hf") is HFLM


def test_cli_runs_with_the_model_registered(pretrained):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "hf_prefix_cache.lm_eval",
        "--model",
        "hf-prefix-cache",
        "--model_args",
        f"pretrained={pretrained},dtype=float32,block_size=8,max_memory=4MiB",
        "--tasks",
        TASK,
        "--include_path",
        str(TASKS),
        "--device",
        "cpu",
        "--limit",
        "3",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hf-prefix-cache" in done.stdout and "acc" in done.stdout
