"""Exactness matrix: generate() with a PrefixCache equals generate() without one, token for token and
logit for logit, while really reusing the stored prefix (see support/scenarios.py and support/oracle.py
for what each call checks).

Covering subset, not the cartesian product:
- every family (and the sliding variants of Qwen2/Qwen3/Phi3) x greedy, single row and left-padded batch;
- every strategy x llama (full), gemma3 (mixed sliding/full) and mistral (all sliding), single row;
  the batchable strategies x llama and gemma3, batch;
- bfloat16/float16 x sdpa/eager x llama, gemma3 and mistral (greedy, beams, batch); float32 eager x
  mistral, gemma3, qwen2-sliding, gpt2, phi3.
"""

from __future__ import annotations

import pytest
import torch
from support.models import model_for
from support.scenarios import STRATEGIES, run_batch_scenario, run_single_scenario

# one intra-op thread and no deprecation noise (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("quiet_single_thread")

FAMILIES = [
    "llama",
    "qwen2",
    "qwen2-sliding",
    "qwen3",
    "qwen3-sliding",
    "mistral",
    "phi3",
    "phi3-sliding",
    "gemma3",
    "gpt2",
]
BATCHABLE = [name for name, s in STRATEGIES.items() if s.batchable]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_single(family):
    run_single_scenario(model_for(family), STRATEGIES["greedy"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_batch(family):
    run_batch_scenario(model_for(family), STRATEGIES["greedy"])


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_single(strategy, family):
    run_single_scenario(model_for(family), STRATEGIES[strategy])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("strategy", [s for s in BATCHABLE if s != "greedy"])
def test_strategy_batch(strategy, family):
    run_batch_scenario(model_for(family), STRATEGIES[strategy])


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, attn, family):
    model = model_for(family, dtype, attn)
    run_single_scenario(model, STRATEGIES["greedy"], dtype)
    run_single_scenario(model, STRATEGIES["beam3_n2"], dtype)
    run_batch_scenario(model, STRATEGIES["greedy"], dtype)


@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen2-sliding", "gpt2", "phi3"])
def test_fp32_eager(family):
    model = model_for(family, torch.float32, "eager")
    run_batch_scenario(model, STRATEGIES["greedy"])
