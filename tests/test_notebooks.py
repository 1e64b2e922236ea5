"""The notebooks in notebooks/: committed without outputs, listed in their README, and each runs end to end.

Each notebook is executed with nbclient in a kernel started from this interpreter (a kernelspec written
to a temporary folder, so neither a registered "python3" kernel nor the user's Jupyter set-up can send it
to another environment). A cell that raises fails the test. The notebooks load the real
SmolLM2-135M-Instruct, so these are slow tests; each takes a minute or two on two CPU cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "hf-prefix-cache-tests"
CELL_TIMEOUT_S = 600


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
    "block_size_and_memory": ['["evicted_blocks"] == 0', '["hit_tokens"] == expected'],
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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, smollm2_converted, kernel_manager_factory, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # Files a notebook writes (the evaluation's results) go to a temporary folder, not into the repository.
    monkeypatch.setenv("HF_PREFIX_CACHE_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        km=kernel_manager_factory(),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # run in notebooks/, as a reader would
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell raises
    elapsed = time.perf_counter() - start
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
