"""Run mutants one after the other, each in a fresh process: ``python -m mutants.runner OUT_DIR NAME...``.

Importing torch and transformers costs ~10 s of CPU, more than most mutants' tests. So this process
imports them once (and computes nothing), then forks one child per mutant: the child applies the mutant
through ``mutants.plugin`` and runs its tests with ``pytest.main``; the parent only waits. Each child
writes ``NAME.json`` (the plugin's report) and ``NAME.log`` (its output); the parent writes
``exit_codes.json``. Where ``os.fork`` is missing, each mutant gets a plain subprocess instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mutants.catalog import by_name
from mutants.plugin import MUTANT_ENV, REPORT_ENV

TIMEOUT_S = 600
PYTEST_ARGS = ["-q", "--no-header", "-p", "no:cacheprovider", "-p", "mutants.plugin"]


def _run_forked(name: str, tests: tuple[str, ...], out: Path) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            log = os.open(out / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ[MUTANT_ENV], os.environ[REPORT_ENV] = name, str(out / f"{name}.json")
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1
        time.sleep(0.05)


def _run_subprocess(name: str, tests: tuple[str, ...], out: Path) -> int:
    env = {**os.environ, MUTANT_ENV: name, REPORT_ENV: str(out / f"{name}.json")}
    with open(out / f"{name}.log", "w") as log:
        try:
            return subprocess.run(
                [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            return -1


def main(out_dir: str, *names: str) -> None:
    out = Path(out_dir)
    fork = hasattr(os, "fork")
    if fork:  # what every child needs, imported once; nothing is computed before forking
        import hypothesis  # noqa: F401
        import pandas  # noqa: F401
        import pytest  # noqa: F401
        import transformers.models.gemma3.modeling_gemma3
        import transformers.models.llama.modeling_llama
        import transformers.models.mistral.modeling_mistral  # noqa: F401

        import hf_prefix_cache  # noqa: F401
        import hf_prefix_cache_eval.runner  # noqa: F401
    results = {}
    for name in names:
        start = time.perf_counter()
        tests = by_name(name).tests
        code = _run_forked(name, tests, out) if fork else _run_subprocess(name, tests, out)
        results[name] = {"exit_code": code, "seconds": time.perf_counter() - start}
    (out / "exit_codes.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
