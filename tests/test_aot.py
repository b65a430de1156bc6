"""famjax.tools.aot: the real train and decode steps compiled for a TPU topology on the CPU (libtpu, no TPUs).

The topology's compile-only devices are separate from the 8 fake CPU devices of conftest.py.
"""
import json
import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("libtpu")
# The suite's persistent compilation cache (conftest.py) stores these compile-only TPU programs but cannot load
# them back (no TPU client): JAX warns and compiles again. The CLI turns the cache off instead.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning")

from famjax.tools import aot  # noqa: E402
from famjax.train.config import sibling_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "passkey_tiny.py")
SMALL = {"model.vocab_size": 256, "model.d_model": 64, "model.num_heads": 2, "model.mlp_dim": 128,
         "model.attention": "fam", "data.seq_len": 64, "data.batch_size": 8}
TOPOLOGY = "v5e:2x2"


def _config(**overrides):
    cfg = sibling_config(CONFIG, "passkey_tiny").get_config()
    for key, value in {**SMALL, **overrides}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


def _cli(*args):
    # The same matmul precision as this process (conftest.py), so that both compile the same programs.
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": str(jax.config.jax_default_matmul_precision)}
    return subprocess.run([sys.executable, "-m", "famjax.tools.aot", f"--config={CONFIG}", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_small_fam_config_compiles_with_memory_and_flops(tmp_path):
    report = aot.compile_for_topology(_config(), TOPOLOGY)
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4 and report["fits"]
    assert report["hbm_bytes"] == 16 << 30 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    train, decode = report["programs"]["train_step"], report["programs"]["decode_step"]
    assert train["batch"] == [8, 64] and decode["batch"] == [4, 1]  # one decode row per data device
    for p in (train, decode):
        assert 0 < p["argument_bytes"] <= p["peak_bytes"] < report["hbm_bytes"] and p["fits"]
        assert p["margin_bytes"] == report["hbm_bytes"] - p["peak_bytes"]
        assert p["flops"] > 0 and p["bytes_accessed"] > 0
    assert train["alias_bytes"] > 0  # the train state is donated
    # FLOPs are per device, and XLA counts a loop body once: at least the matmuls of one (scanned) layer and
    # the head, forward and backward (6 N t), for 2 rows x 64 tokens; the two layers' would be more.
    layer, head = 4 * 64 * 64 + 3 * 64 * 128, 256 * 64
    assert 6 * (layer + head) * 2 * 64 < train["flops"] < 6 * (2 * layer + head) * 2 * 64
    assert "train_step [8x64]" in aot.format_report(report) and aot.not_fitting(report) is None

    # The command line: same numbers in its JSON, the table on stdout, exit 0.
    out = tmp_path / "report.json"
    args = [f"--config.{k}={v}" for k, v in SMALL.items()]
    r = _cli(f"--topology={TOPOLOGY}", f"--json={out}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train_step [8x64]" in r.stdout and "decode_step [4x1]" in r.stdout
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_offloaded_residuals_are_reported_in_host_memory():
    """fam_remat="offload" keeps the FAM loop's residuals in host memory: the report shows them beside the HBM."""
    report = aot.compile_for_topology(_config(**{"model.remat": "full", "model.fam_remat": "offload"}), TOPOLOGY)
    train = report["programs"]["train_step"]
    assert train["fits"] and train["host_temp_bytes"] > 0
    assert "GiB of host memory per device" in aot.format_report(report)
    assert not aot.compile_for_topology(_config(), TOPOLOGY)["programs"]["train_step"]["host_temp_bytes"]


@pytest.mark.slow
def test_programs_are_traced_for_the_topology_platform():
    """On this CPU host the model picks TPU kernels for a TPU topology: attention_impl "auto" compiles the Pallas
    kernel into the train step (a Mosaic custom call), "xla" does not."""
    devices = aot.topology_devices(TOPOLOGY)
    for impl, pallas in (("auto", True), ("xla", False)):
        cfg = aot.prepare(_config(**{"model.attention_impl": impl}))
        text = aot.compile_train_step(cfg, aot.meshlib.make_mesh(cfg.mesh, devices)).as_text()
        assert ('custom_call_target="tpu_custom_call"' in text) == pallas, impl


def test_config_too_big_for_the_chip_exits_1_with_one_line():
    r = _cli(f"--topology={TOPOLOGY}", *[f"--config.{k}={v}" for k, v in SMALL.items()],
             "--config.model.d_model=4096", "--config.model.mlp_dim=16384", "--config.model.num_heads=32",
             "--config.model.num_layers=4", "--config.data.batch_size=40", "--config.data.seq_len=192")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train_step does not fit on TPU v5 lite" in lines[0] and "GiB over" in lines[0]


def test_bad_topology_exits_2_with_one_line():
    r = _cli("--topology=v9:2x2")
    assert r.returncode == 2 and not r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "v9:2x2" in r.stderr, r.stderr


@pytest.mark.parametrize("args,says", [
    (["--topology=v5e"], "--topology must be"),
    (["--topology=v5p:3x3x3"], "chips_per_host_bounds"),
    ([f"--topology={TOPOLOGY}", "--config.model.d_model=-4"], "model: d_model must be an integer > 0"),
    ([f"--topology={TOPOLOGY}", "--config.model.nope=1"], "no field 'nope'"),
    ([f"--topology={TOPOLOGY}", "--config.mesh.shape=(3,1,1)"], "needs 3 devices, there are 4"),
    ([f"--topology={TOPOLOGY}", "--config.mesh.shape=(1,-1,3)"], "cannot fill 4 devices"),
    ([f"--config={os.path.join(REPO, 'configs', 'nope.py')}", f"--topology={TOPOLOGY}"], "nope.py"),
])
def test_bad_input_exits_2_with_one_line(args, says, capsys):
    assert aot.main(["aot", f"--config={CONFIG}", *args]) == 2
    out = capsys.readouterr()
    assert not out.out and len(out.err.strip().splitlines()) == 1 and says in out.err, out.err


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(aot.UserError, match=r"pip install famjax\[tpu\]"):
        aot.topology_devices(TOPOLOGY)
