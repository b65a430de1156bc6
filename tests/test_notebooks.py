"""The notebooks in notebooks/ are clean in git, point at the repository of setup.py, and run top to bottom
through a real Jupyter kernel (nbclient + ipykernel) in their small settings (FAMJAX_NB_SMOKE=1)."""
import glob
import os
import re
import time

import nbformat
import pytest

# The suite's XLA flags (conftest.py) with one CPU device (the last occurrence of a flag wins).
ONE_DEVICE_XLA_FLAGS = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
NAMES = ["01_quickstart", "02_fam_mechanics", "03_passkey_fam_vs_bswa", "04_retrofit_smollm2"]


def repo_url() -> str:
    """The `url=` of setup.py: the one place the repository's address is written."""
    with open(os.path.join(REPO, "setup.py")) as f:
        match = re.search(r'^\s*url="(https://github\.com/[^"/]+/[^"/]+)",', f.read(), re.M)
    assert match, "setup.py has no url=\"https://github.com/<owner>/<repo>\""
    return match.group(1)


def read(path: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def source(nb, kind: str | None = None) -> str:
    return "\n".join(c.source for c in nb.cells if kind is None or c.cell_type == kind)


def test_the_notebooks():
    assert [os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped(path):
    nb = read(path)
    assert "widgets" not in nb.metadata, f"{path}: widget state in the notebook's metadata"
    for i, cell in enumerate(nb.cells):
        assert "widgets" not in cell.metadata, f"{path}: cell {i} has widget metadata"
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path}: cell {i} has stored outputs (clear them before committing)"
            assert cell.execution_count is None, f"{path}: cell {i} has an execution count (clear outputs)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_opens_in_colab_from_setup_url(path):
    """A Colab badge first, then a code cell that clones setup.py's URL on Colab only; no other repository."""
    nb, url = read(path), repo_url()
    name = os.path.basename(path)
    colab = f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/main/notebooks/{name}"
    assert nb.cells[0].cell_type == "markdown" and colab in nb.cells[0].source, f"{name}: no badge linking {colab}"
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in install.source and f"git clone -q --depth 1 {url} " in install.source
    others = set(re.findall(r"https://(?:colab\.research\.google\.com/)?github(?:\.com)?/[\w.-]+/[\w.-]+", source(nb)))
    assert others <= {url, colab.split("/blob/")[0]}, f"{name}: links to another repository: {others}"


def test_readme_colab_links_use_setup_url():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    slug = repo_url().removeprefix("https://github.com/")
    links = re.findall(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.]+)",
                       readme)
    assert sorted(name for _, name in links) == sorted(f"{n}.ipynb" for n in NAMES)
    assert {s for s, _ in links} == {slug}, f"README's Colab links name another repository than setup.py's {slug}"


def execute(path: str, tmp_path, **env) -> str:
    """Runs the notebook in a python3 kernel from notebooks/ (small settings); returns all its text output."""
    from nbclient import NotebookClient

    nb = read(path)
    kernel_env = dict(os.environ, FAMJAX_NB_SMOKE="1", FAMJAX_NB_WORKDIR=str(tmp_path / "work"), MPLBACKEND="Agg",
                      JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, **env)
    t0 = time.time()
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": NOTEBOOK_DIR}}
                   ).execute(env=kernel_env)  # a failing cell raises CellExecutionError with its traceback
    print(f"{os.path.basename(path)}: {time.time() - t0:.0f} s")
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


# What each notebook must print in its small settings: the numbers a reader is shown.
EXPECTED = {
    "01_quickstart": [r"max \|whole - chunked\| = \d", r"trained 2 steps in \d+ s, last loss",
                      r"4x N = +360 filler words: +\d+% exact \(\d/2\)"],
    "02_fam_mechanics": [r"max \|one call - chunks\| += [0-9.e-]+\n", r"max \|one call - token by token\| += ",
                         r"row 0 restarted: max \|\. - fresh\| = 0\.0\n", r"max \|FAM \(F=0\) - BSWA\| = 0\.0\n",
                         r"layer 1: share of the FAM's attention"],
    "03_passkey_fam_vs_bswa": [r"fam: 2 steps in", r"bswa: 2 steps in", r"bswa +\| +\d+% \(\d/2\) \| +\d+% \(\d/2\)"],
    "04_retrofit_smollm2": [r"full attention \(as trained\) +\d/1 exact", r"switched to fam +\d/1 exact",
                            r"fine-tuned 2 steps in", r"2x N = +96 filler tokens: \d/1 exact"],
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_a_kernel(path, tmp_path):
    text = execute(path, tmp_path)
    for pattern in EXPECTED[os.path.splitext(os.path.basename(path))[0]]:
        assert re.search(pattern, text), f"{os.path.basename(path)}: no output matching {pattern!r} in:\n{text}"
    if "01_quickstart" in path:
        assert (tmp_path / "work" / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_retrofit_notebook_skips_without_gguf(tmp_path):
    """Without the optional GGUF reader the retrofit notebook says so and runs the rest as empty cells."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "gguf.py").write_text("raise ImportError('No module named gguf (shadowed by a test)')\n")
    text = execute(os.path.join(NOTEBOOK_DIR, "04_retrofit_smollm2.ipynb"), tmp_path,
                   PYTHONPATH=str(tmp_path / "shadow"))
    assert "skipping the rest of this notebook: No module named gguf" in text
    assert "exact" not in text
