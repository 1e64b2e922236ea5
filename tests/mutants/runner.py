"""Run mutants one after the other, each in a fresh process: ``python -m mutants.runner OUT_DIR NAME...``.

Importing torch and transformers costs ~10 s of CPU, more than most mutants' tests. So this process
imports them once (and computes nothing), then forks one child per mutant: the child applies the mutant
through ``mutants.plugin`` and runs its tests with ``pytest.main``; the parent only waits. Each child
writes ``NAME.json`` (the plugin's report) and ``NAME.log`` (its output); the parent writes
``exit_codes.json``. Where ``os.fork`` is missing, each mutant gets a plain subprocess instead.

The mutants' tests run tiny models, whose small matrix products keep one core busy with Python more than
they use a second thread: so ``JOBS`` children (one per core by default, ``HF_PREFIX_CACHE_MUTANT_JOBS``
overrides) run at once, each with its share of the cores as torch threads. Every child is still its own
process, so one mutant never sees another's patch.
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
JOBS_ENV = "HF_PREFIX_CACHE_MUTANT_JOBS"  # children at once; default: one per core
PYTEST_ARGS = ["-q", "--no-header", "-p", "no:cacheprovider", "-p", "mutants.plugin"]


def _jobs() -> int:
    return max(1, int(os.environ.get(JOBS_ENV, 0)) or os.cpu_count() or 1)


def _start_forked(name: str, tests: tuple[str, ...], out: Path, threads: int) -> int:
    """Fork a child that applies ``name`` and runs ``tests``; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            log = os.open(out / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ[MUTANT_ENV], os.environ[REPORT_ENV] = name, str(out / f"{name}.json")
            os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes its tests start
            import pytest
            import torch

            torch.set_num_threads(threads)
            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _run_all_forked(names: tuple[str, ...], out: Path) -> dict[str, dict]:
    """Run every mutant in a forked child, ``_jobs()`` at a time; each is killed after ``TIMEOUT_S``."""
    jobs = min(_jobs(), len(names)) or 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
    waiting, running, results = list(names), {}, {}
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            running[_start_forked(name, by_name(name).tests, out, threads)] = (name, time.perf_counter())
        for pid, (name, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.perf_counter() - start > TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = -1
            else:
                continue
            del running[pid]
            results[name] = {"exit_code": code, "seconds": time.perf_counter() - start}
        time.sleep(0.05)
    return results


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

        results = _run_all_forked(names, out)
    else:
        results = {}
        for name in names:
            start = time.perf_counter()
            code = _run_subprocess(name, by_name(name).tests, out)
            results[name] = {"exit_code": code, "seconds": time.perf_counter() - start}
    (out / "exit_codes.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
