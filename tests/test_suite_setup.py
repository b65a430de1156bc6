"""The suite's own set-up (the repository's conftest.py): a test that crashes its pytest-xdist worker runs again
on a fresh worker, up to twice, and fails the run if it crashes a third time; files with a slow case run first."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CRASHING = '''
import os

def test_crashes_once():
    marker = os.path.join(os.environ["CRASH_MARKER_DIR"], "crashed")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()

def test_crashes_always():
    if os.environ.get("CRASH_ALWAYS"):
        os.abort()
'''


def run_pytest(tmp_path, select, **env):
    shutil.copy(os.path.join(ROOT, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_crash.py").write_text(CRASHING)
    env = {**os.environ, "CRASH_MARKER_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider",
                          "-k", select, "test_crash.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    return out.returncode, out.stdout.strip().splitlines()[-1], out.stdout


def test_a_crashed_test_reruns_and_a_third_crash_fails(tmp_path):
    rc, summary, out = run_pytest(tmp_path, "crashes_once")
    assert rc == 0, out
    assert "1 passed" in summary and "1 rerun" in summary, out
    assert "RERUN test_crash.py::test_crashes_once: its worker crashed" in out
    rc, summary, out = run_pytest(tmp_path, "crashes_always", CRASH_ALWAYS="1")
    assert rc == 1, out
    assert "1 failed" in summary and "2 rerun" in summary, out


def test_files_with_a_slow_case_are_collected_first(tmp_path):
    shutil.copy(os.path.join(ROOT, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = slow\n")
    (tmp_path / "test_a.py").write_text("def test_a1():\n    pass\n\ndef test_a2():\n    pass\n")
    (tmp_path / "test_b.py").write_text("import pytest\n\ndef test_b1():\n    pass\n\n"
                                        "@pytest.mark.slow\ndef test_b2():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids == ["test_b.py::test_b1", "test_b.py::test_b2", "test_a.py::test_a1", "test_a.py::test_a2"], out.stdout
