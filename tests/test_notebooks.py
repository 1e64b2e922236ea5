"""The notebooks in notebooks/: committed without outputs, listed in their README, and each runs end to end.

Each notebook is executed with nbclient in a kernel started from this interpreter (a kernelspec written
to a temporary folder, so neither a registered "python3" kernel nor the user's Jupyter set-up can send it
to another environment). A cell that raises fails the test. The notebooks load the real
SmolLM2-135M-Instruct, so these are slow tests; each takes a minute or two on two CPU cores (two run at once).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "hf-prefix-cache-tests"
CELL_TIMEOUT_S = 600
PARALLEL_KERNELS = 2  # notebooks executed at once (see executed_notebooks)


def _ids(paths):
    return [path.stem for path in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path):
    """Outputs and execution counts make diffs unreadable; clear them before committing."""
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; clear them with "
        f"`python tests/test_notebooks.py notebooks/{path.name}` (or Jupyter's Clear All Outputs, then save)"
    )
    assert "widgets" not in notebook.metadata, f"{path.name}: saved widget state in the metadata"


def clear_outputs(path: Path) -> bool:
    """Remove outputs, execution counts and execution metadata in place; returns whether anything changed."""
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    before = nbformat.writes(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    notebook.metadata.pop("widgets", None)
    after = nbformat.writes(notebook)
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


# Notebooks whose results are checked inside the notebook (a failing assert fails test_notebook_runs): what
# each must assert, so that the checks cannot be dropped while the notebook still runs.
CHECKED_RESULTS = {
    "multiturn_latency": ['["mismatches"] == 0', '"hit_tokens"] >= previous'],
    "block_size_and_memory": [
        '["evicted_blocks"] == 0',
        '["hit_tokens"] == expected',
        "hybrid_results.of_ideal.max() >= 0.9",
    ],
}


@pytest.mark.parametrize("name", sorted(CHECKED_RESULTS))
def test_notebook_asserts_its_results(name):
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    missing = [check for check in CHECKED_RESULTS[name] if check not in code]
    assert not missing, f"{name}.ipynb no longer checks {missing}"
    assert code.count("assert ") >= len(CHECKED_RESULTS[name])


def test_every_notebook_is_described_in_the_readme():
    readme = (NOTEBOOKS_DIR / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in NOTEBOOKS if path.name not in readme]
    assert not missing, f"notebooks/README.md does not mention {missing}"


@pytest.fixture(scope="module")
def smollm2_converted():
    """Convert the packaged GGUF once, here, so that no notebook's run includes the one-off ~20 s."""
    from hf_prefix_cache_eval.models import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernels started by this Python, whatever kernelspecs are registered elsewhere."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": "hf_prefix_cache tests"})
    spec = KernelSpecManager(kernel_dirs=[str(kernels)]).get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv

    def make() -> AsyncKernelManager:
        return AsyncKernelManager(
            kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
        )

    return make


async def _execute(path: Path, make_km, results: Path, threads: int, slots: asyncio.Semaphore):
    """Run ``path`` in a fresh kernel once a slot is free; returns (executed notebook, error or None, seconds)."""
    from nbclient import NotebookClient

    async with slots:
        notebook = nbformat.read(path, as_version=4)
        km = make_km()
        client = NotebookClient(
            notebook,
            km=km,
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # run in notebooks/, as a reader would
        )
        env = {
            **os.environ,
            # Files a notebook writes (the evaluation's results) go to a temporary folder, not the repository.
            "HF_PREFIX_CACHE_RESULTS": str(results / path.stem),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
        }
        start = time.perf_counter()
        error = None
        try:
            await client.async_execute(
                env=env
            )  # raises CellExecutionError, with the traceback, if a cell raises
        except Exception as exc:  # reported by this notebook's own test
            error = exc
        finally:
            if await km.is_alive():  # a client handed a kernel manager leaves the kernel running
                await km.shutdown_kernel(now=True)
        return notebook, error, time.perf_counter() - start


@pytest.fixture(scope="module")
def executed_notebooks(smollm2_converted, kernel_manager_factory, tmp_path_factory):
    """Every notebook executed, ``PARALLEL_KERNELS`` kernels at a time with the cores split between them.

    SmolLM2's matrices are small: a second torch thread speeds one kernel up only ~1.2x (a 1059-token
    prefill: 6.3 s with two threads, 7.5 s with one), so two one-thread kernels side by side get through
    the notebooks sooner than one two-thread kernel after the other. Each notebook still runs in a
    kernel of its own, shut down when it is done."""
    kernels = max(1, min(PARALLEL_KERNELS, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // kernels)
    results = tmp_path_factory.mktemp("results")

    async def run_all():
        slots = asyncio.Semaphore(kernels)
        return await asyncio.gather(
            *(_execute(path, kernel_manager_factory, results, threads, slots) for path in NOTEBOOKS)
        )

    return dict(zip([path.stem for path in NOTEBOOKS], asyncio.run(run_all())))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, executed_notebooks):
    notebook, error, elapsed = executed_notebooks[path.stem]
    if error is not None:
        raise error  # a cell raised: CellExecutionError, with the cell's traceback
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    print(f"{path.name}: executed in {elapsed:.1f} s")


if __name__ == "__main__":  # python tests/test_notebooks.py [NOTEBOOK ...]: clear outputs before committing
    for name in sys.argv[1:] or [str(p) for p in NOTEBOOKS]:
        print(("cleared " if clear_outputs(Path(name)) else "already clean ") + name)
