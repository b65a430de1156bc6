"""gs:// workdirs (issue 23): every workdir file goes through famjax.paths (etils.epath -> gcsfs), orbax's arrays
through tensorstore's GCS driver, both pointed at a local GCS emulator (gcp-storage-emulator, in memory, in a
thread of this process): STORAGE_EMULATOR_HOST for gcsfs, TENSORSTORE_GCS_HTTP_URL and a fake
GOOGLE_AUTH_TOKEN_FOR_TESTING for tensorstore, so no fake filesystem is needed. A tiny run trains into
gs://<bucket>/run, resumes there, restores, is inspected by famjax.evals there, and has a truncated step moved
aside there; an unreachable gs:// workdir is one stderr line before any compile.
Skipped where gcsfs or gcp-storage-emulator is not installed (the `gcs` extra and the dev extras).
"""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import json
import os
import socket

# gcsfs reads this at import: without it every call first asks the storage-control API (which the emulator
# lacks) for the bucket's layout and logs a warning.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

pytest.importorskip("gcsfs")
emulator_server = pytest.importorskip("gcp_storage_emulator.server")

from test_cli_errors import assert_one_line, cli  # noqa: E402
from test_train_common import REPO, passkey_dir, tiny_cli, tiny_config  # noqa: E402,F401

from famjax import paths, restore  # noqa: E402
from famjax.errors import WorkdirError  # noqa: E402
from famjax.evals import __main__ as evals_main  # noqa: E402
from famjax.train import loop  # noqa: E402

BUCKET = "famjax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _emulator_env(port: int) -> dict:
    url = f"http://localhost:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _with_generation(download):
    """The emulator's object download, plus the x-goog-generation header real GCS sends and the emulator leaves
    out: without it tensorstore takes generation 0 and its next conditional read of that object (e.g. an OCDBT
    manifest) fails now and then with "Malformed StorageGeneration"."""
    def handler(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # noqa: BLE001  a missing object: the download answers 404 itself
            pass
        return download(request, response, storage, *args, **kwargs)
    return handler


@pytest.fixture(scope="module")
def gcs():
    """An in-memory GCS emulator holding the bucket BUCKET; yields the environment that points clients at it."""
    from gcp_storage_emulator.handlers import objects

    port = _free_port()
    env = _emulator_env(port)
    with pytest.MonkeyPatch.context() as mp:
        download = _with_generation(objects.download)
        for _, routes in emulator_server.HANDLERS:  # the routes to it, and objects.get's call for ?alt=media
            for method in [m for m, fn in routes.items() if fn is objects.download]:
                mp.setitem(routes, method, download)
        mp.setattr(objects, "download", download)
        # Its http.server prints a traceback whenever a client hangs up before the answer (BrokenPipeError).
        mp.setattr(emulator_server.server.HTTPServer, "handle_error", lambda *args: None)
        for k, v in env.items():
            mp.setenv(k, v)
        server = emulator_server.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        yield env
        server.stop()


def _names(path) -> list[str]:
    return sorted(paths.listdir(path))


def _truncate(step_dir) -> None:
    """Cuts every object of a step's parameters and train state to half (a write that stopped midway)."""
    def files(folder):
        for p in folder.iterdir():
            yield from files(p) if p.is_dir() else [p]

    for item in ("params", "train"):
        for f in files(step_dir / item):
            data = f.read_bytes()
            if len(data) > 1:
                f.write_bytes(data[:len(data) // 2])


def test_paths_layer_on_gcs(gcs):
    """The helpers the trainer uses: atomic text, listing, rename of a folder (copy + delete), the mirror."""
    root = paths.resolve(f"gs://{BUCKET}/layer/")
    assert str(root) == f"gs://{BUCKET}/layer"
    paths.write_text(root / "a" / "x.json", '{"k": 1}')
    paths.write_text(root / "a" / "sub" / "y", "y")
    assert json.loads(paths.read_text(root / "a" / "x.json")) == {"k": 1}
    assert _names(root) == ["a"] and _names(root / "a") == ["sub", "x.json"]
    paths.rename(root / "a", root / "corrupt-a")
    assert _names(root) == ["corrupt-a"] and paths.read_text(root / "corrupt-a" / "sub" / "y") == "y"
    mirror = paths.Mirror(root / "m", every_s=3600)
    with open(os.path.join(mirror.local, "log.txt"), "a") as f:
        f.write("1\n")
    mirror.sync()  # under every_s since it started: nothing sent
    assert not (root / "m" / "log.txt").exists()
    mirror.close()
    assert paths.read_text(root / "m" / "log.txt") == "1\n" and not os.path.exists(mirror.local)
    again = paths.Mirror(root / "m", fetch=("log.txt", "absent"))  # a resumed run appends to the fetched copy
    assert open(os.path.join(again.local, "log.txt")).read() == "1\n"
    again.close()
    paths.check_reachable(root)  # the bucket answers; writes and deletes its probe
    assert _names(root) == ["corrupt-a", "m"]


@pytest.mark.slow
def test_train_resume_and_restore_on_gcs(gcs, passkey_dir, tmp_path, monkeypatch, capsys):
    """Acceptance: checkpoints, config.json, metrics.jsonl and TensorBoard land in the bucket; a second train
    with more steps resumes from the saved step; restore_model loads the run from gs://, famjax.evals writes
    its results there; a truncated newest step is moved aside to corrupt-<step> in the bucket."""
    monkeypatch.chdir(tmp_path)  # a gs:// path taken as local would create ./gs:
    run = f"gs://{BUCKET}/run"
    first = loop.train(tiny_config(passkey_dir, steps=2), run)
    assert first.step == 2 and first.logdir == f"{run}/tensorboard"
    ckpts = paths.Path(run) / "checkpoints"
    assert restore.checkpoint_steps(ckpts) == [2]
    assert {"params", "train", "data", "config"} <= set(_names(ckpts / "2"))
    assert _names(run) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert any(n.startswith("events.out.tfevents") for n in _names(f"{run}/tensorboard"))
    second = loop.train(tiny_config(passkey_dir, steps=4), run)
    assert second.step == 4 and not second.preempted
    assert sorted(restore.checkpoint_steps(ckpts)) == [2, 4]
    lines = paths.read_text(f"{run}/metrics.jsonl").splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # the second run appended to the first's
    assert len(_names(f"{run}/tensorboard")) == 2  # one event file per run
    model, cfg = restore.restore_model(run)
    assert model.cfg == restore.model_config(cfg) and cfg.train.steps == 4
    capsys.readouterr()
    evals_main.main(["inspect", f"--model={run}", "--prompt=" + "a key " * 8, f"--out={run}/inspect",
                     "--chunk_size=32"])  # reads the run and writes its plots through gs://
    printed = capsys.readouterr().out.splitlines()  # the paths written
    assert f"{run}/inspect/fam_norms.json" in printed
    assert {p.rsplit("/", 1)[1] for p in printed} == set(_names(f"{run}/inspect"))
    _truncate(ckpts / "4")  # an unreadable newest step is moved aside (a remote rename) and the run goes on
    third = loop.train(tiny_config(passkey_dir, steps=6), run)
    assert third.step == 6 and _names(ckpts) == ["2", "4", "6", "corrupt-4"]
    assert sorted(restore.checkpoint_steps(ckpts)) == [2, 4, 6]
    assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


@pytest.mark.parametrize("case", ["no_bucket", "closed_port"])
def test_unreachable_gcs_workdir_is_one_line_before_compiling(gcs, passkey_dir, case):
    """famjax.main: exit 2, one stderr line naming the workdir, nothing compiled; generate likewise."""
    env = dict(gcs, FAMJAX_REACH_TIMEOUT_S="5")
    if case == "closed_port":
        env.update(_emulator_env(_free_port()))
    flags = [f"--config.{k}={v}" for k, v in tiny_cli(passkey_dir).items()]
    out = cli("famjax.main", "--workdir=gs://nope-bucket/x", *flags, env_extra=env)
    assert_one_line(out, "famjax.main", "gs://nope-bucket/x is not reachable", "check credentials")
    assert "compiling" not in out.stdout
    if case == "closed_port":
        gen = cli("famjax.generate", "--workdir=gs://nope-bucket/x", "--prompt=hi", env_extra=env)
        assert_one_line(gen, "famjax.generate", "gs://nope-bucket/x is not reachable")


def test_check_reachable_names_the_reason(gcs, monkeypatch):
    monkeypatch.setenv("FAMJAX_REACH_TIMEOUT_S", "5")
    with pytest.raises(WorkdirError, match="gs://nope-bucket/x is not reachable: no such bucket"):
        paths.check_reachable("gs://nope-bucket/x")
    paths.check_reachable("gs://nope-bucket/x", write=False)  # reading a missing bucket is "no such workdir"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://localhost:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("FAMJAX_REACH_TIMEOUT_S", "1")
    with pytest.raises(WorkdirError, match="not reachable: no answer in 1 s.*Cannot connect to host"):
        paths.check_reachable(f"gs://{BUCKET}/x")
    paths.check_reachable(os.getcwd())  # local paths are not checked here
