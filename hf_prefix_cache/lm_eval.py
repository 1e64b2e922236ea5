"""``python -m hf_prefix_cache.lm_eval ...``: lm-eval's own CLI, with the ``hf-prefix-cache`` model registered.

lm-eval discovers no plugins, so its ``lm_eval`` command cannot know the model; this runs the same CLI
after importing the integration, e.g. ``python -m hf_prefix_cache.lm_eval --model hf-prefix-cache
--model_args pretrained=PATH,block_size=16,max_memory=2GiB --tasks TASK --device cpu``.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from .integrations import lm_eval as _registers  # noqa: F401

    cli_evaluate()


if __name__ == "__main__":
    main()
