"""The notebooks in notebooks/ are valid and run top to bottom (smoke settings: FAMJAX_NB_SMOKE=1)."""
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def code_of(path: str) -> str:
    """The notebook's code cells as one script; IPython magics and shell lines (% !) become comments."""
    with open(path) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4, f"{path}: nbformat {nb['nbformat']}"
    parts = []
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("code", "markdown", "raw"), f"{path}: cell {i} type {cell['cell_type']}"
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"{path}: cell {i} has stored outputs (clear them before committing)"
        lines = ["# " + ln if ln.lstrip().startswith(("%", "!")) else ln
                 for ln in "".join(cell["source"]).splitlines()]
        parts.append(f"# --- cell {i}\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def test_there_are_notebooks():
    assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_compiles(path):
    compile(code_of(path), path, "exec")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(code_of(path))
    env = dict(os.environ, FAMJAX_NB_SMOKE="1", FAMJAX_NB_WORKDIR=str(tmp_path / "work"), MPLBACKEND="Agg",
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, str(script)], cwd=os.path.join(REPO, "notebooks"), env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{os.path.basename(path)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "max |whole - chunked|" in out.stdout
    assert (tmp_path / "work" / "run" / "metrics.jsonl").exists()
