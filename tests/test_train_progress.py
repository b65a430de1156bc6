"""Progress people expect: a tqdm bar with ETA on a terminal, plain lines with an ETA elsewhere."""
import io
import time

from famjax.train import metrics as mlib

M = {"loss": 1.5, "accuracy": 0.5, "tokens_per_s": 1234.0, "mfu": 0.25, "lr": 1e-3, "grad_norm": 0.5,
     "fam_norm": 2.0}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_bar_with_eta_and_the_lines_above_it():
    term = _Terminal()
    p = mlib.Progress(0, 10, stream=term)
    assert p.bar is not None
    for s in range(1, 4):
        time.sleep(0.01)
        p.step(s)
    p.report(3, M)
    mlib.log("a log line")
    p.close()
    out = term.getvalue()
    assert "3/10" in out and "loss 1.5000 tok/s 1,234 MFU 25.0%" in out and "<" in out  # tqdm's [elapsed<eta]
    assert "step 3/10  loss 1.5000" in out and "a log line" in out  # written above the bar
    assert mlib._BAR is None


def test_log_files_get_plain_lines_with_eta(capsys):
    p = mlib.Progress(2, 10, stream=io.StringIO())
    assert p.bar is None
    p.step(3)  # the first step (with the compile) does not count
    time.sleep(0.05)
    p.step(4)
    p.report(4, M)
    p.step(10)
    p.report(10, M)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 4/10  loss 1.5000") and " eta 0m0" in lines[0]
    assert lines[1].startswith("step 10/10") and "eta" not in lines[1]
