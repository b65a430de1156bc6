"""`local_text`: every text file under a folder, one document per file, as a TF-free tfds dataset.

Documents are stored as text (not token ids), so one prepared copy serves every tokenizer. Each file goes to
`train` or `validation` by a hash of its path relative to the folder: adding a file never moves another one.
The cache folder name is a digest of the folder, the glob and every file's (path, size, mtime), so editing
the folder prepares a fresh copy instead of silently reading the old one. A split no file falls in is not
written (a small folder may have no validation file); asking for it is a DataError that says so.

Problems with the folder or its files (missing, no matching file, only empty files, a file that is not UTF-8)
raise famjax.errors.DataError (a ValueError) naming the folder or file.
"""
from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import os

import tensorflow_datasets as tfds

from famjax.data import tfds_util
from famjax.errors import ConfigError, DataError

BUILDER_NAME = "famjax_local_text"
ENCODING_ERRORS = ("strict", "replace", "ignore")


def list_files(path: str, pattern: str) -> list[str]:
    """Returns the sorted relative paths under `path` matching `pattern` (directories excluded)."""
    if not path:
        raise ConfigError("local_text.path is required for dataset 'local_text'")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        what = "it is a file" if os.path.exists(root) else "it does not exist"
        raise DataError(f"local_text.path: {path!r} is not a folder ({what}); give the folder that holds the "
                        "text files (one document per file)")
    # lexists, not isfile: a dangling link must fail loudly when read rather than vanish from the data.
    matches = glob_lib.glob(os.path.join(root, pattern), recursive=True)
    files = sorted(os.path.relpath(p, root) for p in matches
                   if os.path.lexists(p) and not os.path.isdir(p))
    if not files:
        raise DataError(f"local_text.path: no files match {pattern!r} under {path!r} (local_text.glob)")
    return files


def is_validation(relpath: str, fraction: float) -> bool:
    """Returns whether a file belongs to the validation split: its path hash falls below `fraction`."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < fraction


def read_document(root: str, relpath: str, errors: str) -> str:
    """Returns a file's text; raises DataError (one line naming the file) if it cannot be read or decoded."""
    p = os.path.join(root, relpath)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"local_text: cannot read file {p!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"local_text: file {p!r} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set local_text.encoding_errors to 'replace' "
                        "or 'ignore' to read it anyway") from None


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """Where the documents come from; the name is a digest of it and of the files' sizes and times."""

    root: str = ""
    pattern: str = "**/*.txt"
    validation_fraction: float = 0.05
    encoding_errors: str = "strict"
    files: tuple = ()


def local_text_config(lt_cfg) -> LocalTextConfig:
    """Returns the builder config for the `data.local_text` config section (lists the folder now)."""
    root = os.path.abspath(os.path.expanduser(lt_cfg.path or ""))
    files = tuple(list_files(lt_cfg.path, lt_cfg.glob))
    h = hashlib.sha1(f"{root}|{lt_cfg.glob}|{lt_cfg.validation_fraction}|{lt_cfg.encoding_errors}".encode())
    text_bytes = 0
    for rel in files:
        try:
            st = os.stat(os.path.join(root, rel))
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
            text_bytes += st.st_size
        except OSError:  # dangling link: read_document reports it by name during preparation
            h.update(f"{rel}|missing".encode())
            text_bytes += 1
    if not text_bytes:
        which = repr(os.path.join(root, files[0])) if len(files) == 1 else f"all {len(files)} files"
        raise DataError(f"local_text.path: {which} matching {lt_cfg.glob!r} under {lt_cfg.path!r} "
                        f"{'is' if len(files) == 1 else 'are'} empty; put text in the folder (one document per "
                        "file)")
    name = f"{os.path.basename(root) or 'root'}_{h.hexdigest()[:12]}"
    name = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
    return LocalTextConfig(name=name, version="1.0.0", description=f"text files under {root}", root=root,
                           pattern=lt_cfg.glob, validation_fraction=float(lt_cfg.validation_fraction),
                           encoding_errors=lt_cfg.encoding_errors, files=files)


class FamjaxLocalText(tfds.core.GeneratorBasedBuilder):
    """One document per text file; splits train and validation by path hash."""

    VERSION = tfds.core.Version("1.0.0")
    # See passkey.FamjaxPasskey: no checksums file exists, and looking for one needs importlib_resources.
    code_path = None
    BUILDER_CONFIGS = [LocalTextConfig(name="default")]  # noqa: RUF012  (tfds reads this class attribute)

    def _info(self):
        return tfds_util.LocalDatasetInfo(
            builder=self,
            description="Local text files, one document per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        val = [f for f in c.files if is_validation(f, c.validation_fraction)]
        train = [f for f in c.files if not is_validation(f, c.validation_fraction)]
        # tfds refuses to write a split without examples: a split no file falls in is left out.
        return {name: self._generate_examples(files) for name, files in (("train", train), ("validation", val))
                if files}

    def _generate_examples(self, files):
        c = self.builder_config
        for rel in files:
            yield rel, {"text": read_document(c.root, rel, c.encoding_errors), "path": rel}


def data_source(lt_cfg, data_dir: str, split: str):
    """Returns the random-access source of a split ([i] -> {'text', 'path'}), preparing it if needed."""
    builder = tfds_util.prepare(lambda: FamjaxLocalText(config=local_text_config(lt_cfg), data_dir=data_dir,
                                                        file_format="array_record"))
    if split not in builder.info.splits:
        if split in ("train", "validation"):
            n = len(builder.builder_config.files)
            raise DataError(f"local_text: no file of local_text.path {lt_cfg.path!r} falls in split {split!r} "
                            f"({n} file{'s' if n != 1 else ''}, local_text.validation_fraction "
                            f"{lt_cfg.validation_fraction}; files go to validation by a hash of their path): add "
                            "files, change validation_fraction, or use the other split")
        raise DataError(f"split {split!r} is not in dataset 'local_text'; "
                        f"available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)
