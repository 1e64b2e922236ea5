"""The eval harness's tiny chat set-up: a character-level ChatML tokenizer built offline and the tiny
Llama of ``support.models`` sized for it (so the whole harness runs in seconds, without a download)."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from support.models import tiny_model

SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "You are a tiny assistant for tests. Answer briefly and politely, always."  # > 4 blocks of 16


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and newline) plus ChatML specials; no download."""
    vocab = {token: i for i, token in enumerate(SPECIALS + [chr(i) for i in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.padding_side = "left"
    return tokenizer


def chat_model(vocab_size: int):
    """The tiny Llama (seed 0) with ``vocab_size`` ids and 2048 positions; pad 0, eos 2 in its generation config."""
    model = tiny_model("llama", vocab_size=vocab_size, max_position_embeddings=2048)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model
