"""Workdir files through one path layer, etils.epath: a local folder or a remote one (gs://bucket/run).

Every file the trainer, famjax.restore, famjax.generate and famjax.evals read or write in a workdir goes
through here (orbax writes its array files itself: tensorstore has its own GCS driver). Remote paths use
epath's fsspec backend (gcsfs for gs://, the `gcs` extra); local paths behave exactly as with os.path.

    run = paths.resolve("gs://bucket/run")          # an epath.Path; a local path becomes absolute
    paths.check_reachable(run)                      # WorkdirError in one line, before any compile
    paths.write_text(run / "config.json", text)     # never half-written
    mirror = paths.Mirror(run, fetch=("metrics.jsonl",))   # growing files: written locally, copied on sync
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time

from etils import epath
from etils.epath import backend

from famjax.errors import WorkdirError, one_line

Path = epath.Path

REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")  # the URIs epath sends to fsspec
REACH_TIMEOUT_ENV = "FAMJAX_REACH_TIMEOUT_S"
REACH_TIMEOUT_S = 60.0  # gcsfs itself gives up on an unreachable host after ~35 s of retries
PROBE = ".famjax_write_test"


def is_remote(path) -> bool:
    """Whether path (str or Path) is a remote URI (gs://, s3://, az://, hf://) rather than a local path."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def resolve(path) -> Path:
    """Returns path as an epath.Path: a local one absolute (os.path.abspath), a remote URI as given (without a
    trailing slash)."""
    path = os.fspath(path)
    if is_remote(path):
        return Path(path.rstrip("/"))
    return Path(os.path.abspath(path))


def read_text(path) -> str:
    """The UTF-8 text of a file."""
    return Path(path).read_text(encoding="utf-8")


def write_text(path, text: str) -> None:
    """Writes a file whole or not at all: locally a temporary file renamed over it (os.replace); remotely in one
    upload (an object store replaces an object atomically)."""
    path = Path(path)
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def listdir(path) -> list[str]:
    """The names in a folder ([] if it is not one)."""
    path = Path(path)
    return [p.name for p in path.iterdir()] if path.is_dir() else []


def rename(src, dst) -> None:
    """Renames a file or folder. Remotely (no rename in an object store) every object under src is copied
    server-side, then src deleted, through the fsspec filesystem epath itself uses for the path."""
    if not is_remote(src):
        Path(src).rename(dst)
        return
    fs = backend.fsspec_backend.fs(os.fspath(src))
    fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
    fs.rm(os.fspath(src), recursive=True)


def check_reachable(path, *, write: bool = True) -> None:
    """Raises WorkdirError (one line: "<path> is not reachable: <reason>; check credentials / the bucket")
    unless a remote path answers: with write, a probe object is written and deleted; else the path is looked
    up. A local path is not checked here. Gives up after $FAMJAX_REACH_TIMEOUT_S (default 60) seconds."""
    if not is_remote(path):
        return
    path = resolve(path)

    def probe():
        if write:
            target = path / f"{PROBE}_{os.getpid()}"
            target.write_text("")
            target.unlink()
        else:
            path.exists()

    timeout = float(os.environ.get(REACH_TIMEOUT_ENV, "") or REACH_TIMEOUT_S)
    with _quiet_fs_logs() as last_error:
        try:
            _call_with_timeout(probe, timeout)
        except ImportError as e:
            raise WorkdirError(f"{path} needs the filesystem package of its scheme ({one_line(e)}): "
                               "pip install 'famjax[gcs]' for gs://") from None
        except TimeoutError:
            seen = f" (last error: {last_error[-1]})" if last_error else ""
            raise WorkdirError(f"{path} is not reachable: no answer in {timeout:g} s{seen}; check credentials / "
                               "the bucket") from None
        except Exception as e:  # noqa: BLE001  whatever the fs raises: auth, DNS, HTTP, missing bucket
            reason = "no such bucket, or no access to it" if isinstance(e, FileNotFoundError) else one_line(e)
            raise WorkdirError(f"{path} is not reachable: {reason}; check credentials / the bucket") from None


def _call_with_timeout(fn, timeout_s: float) -> None:
    """Runs fn() in a daemon thread; re-raises its exception, or TimeoutError after timeout_s seconds (the thread
    is left to finish or die with the process)."""
    out: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  handed to the caller
            out.append(e)

    thread = threading.Thread(target=target, daemon=True, name="famjax-reach")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if out:
        raise out[0]


@contextlib.contextmanager
def _quiet_fs_logs(names=("gcsfs", "fsspec")):
    """Keeps the filesystem's retry logs (tracebacks included) off stderr while a probe runs; yields the list of
    their messages, newest last, for the one-line error."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):  # "_request retrying after exception: <the error>" -> "<the error>"
            seen.append(" ".join(record.getMessage().split("exception: ", 1)[-1].split())[:200])

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield seen
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


class Mirror:
    """A local folder whose files are copied to a remote folder, at the same relative paths, by sync().

    For files that grow during a run (TensorBoard event files, metrics.jsonl): an object store cannot append,
    so they are written locally and each changed file is uploaded whole, at most every `every_s` seconds and at
    close (which also deletes the local folder). `fetch` names files copied down first, so appends continue a
    resumed run's file.
    """

    def __init__(self, remote, *, every_s: float = 30.0, fetch: tuple[str, ...] = ()):
        self.remote = resolve(remote)
        self.local = tempfile.mkdtemp(prefix="famjax_mirror_")
        self.every_s = every_s
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()
        for name in fetch:
            src = self.remote / name
            if src.exists():
                with open(os.path.join(self.local, name), "wb") as f:
                    f.write(src.read_bytes())
                self._sent[name] = self._signature(name)

    def _signature(self, rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.local, rel))
        return st.st_size, st.st_mtime_ns

    def sync(self, *, force: bool = False) -> None:
        """Uploads the files changed since the last sync (unless the last was under every_s ago and not force)."""
        if not force and time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        for root, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local)
                sig = self._signature(rel)
                if self._sent.get(rel) != sig:
                    with open(os.path.join(self.local, rel), "rb") as f:
                        (self.remote / rel).write_bytes(f.read())
                    self._sent[rel] = sig

    def close(self) -> None:
        try:
            self.sync(force=True)
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def local_folder(path):
    """Yields a local folder standing for `path`: path itself if local; for a remote path a temporary folder whose
    files are copied to it on exit (for writers that only take local paths: plots, csv)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    mirror = Mirror(path)
    try:
        yield mirror.local
    finally:
        mirror.close()
