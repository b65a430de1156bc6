"""Dataset names -> random-access sources of model examples (token ids, loss weights).

`passkey` and `local_text` are prepared here by famjax. Catalog names (`pg19`, `lm1b`, `c4`) must already be
prepared by the user in `data_dir`; array_record copies are read with tfds without tensorflow, tfrecord copies
are converted once to array_record with tfds's own converter, which needs tensorflow
(`pip install famjax[tf]`).
"""
from __future__ import annotations

import dataclasses
import functools
import glob as glob_lib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from famjax.data import local_text, passkey
from famjax.data.tokenizers import Tokenizer
from famjax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    tfds_name: str  # the tfds builder name (folder under data_dir)
    text_feature: str  # the feature holding one document's text
    batching: str  # what 'auto' batching means: 'packed' (short examples) or 'stream' (long documents)
    config: str = ""  # the tfds builder config, if it has several


CATALOG = {
    "pg19": CatalogEntry("pg19", "book_text", "stream"),
    "lm1b": CatalogEntry("lm1b", "text", "packed"),
    "c4": CatalogEntry("c4", "text", "packed", config="en"),
}
LOCAL_DATASETS = ("passkey", "local_text")
DATASETS = LOCAL_DATASETS + tuple(CATALOG)


@dataclasses.dataclass
class OpenedDataset:
    """A split opened for loading: `source[i]` is a raw record, `to_example(record)` a model example."""

    source: Any  # len() and [i], e.g. a tfds ArrayRecordDataSource
    to_example: Callable[[Any], dict]
    batching: str  # 'packed' or 'stream' when the config says 'auto'


def text_example(record: dict, *, feature: str, tok: Tokenizer) -> dict:
    """Returns {'tokens': int32 [L] = bos + text + eos, 'weights': float32 [L], 'answer': bool [L]}."""
    text = record[feature]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    ids = tok.encode(text)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    tokens = np.concatenate([np.asarray(bos, np.int32), ids, np.asarray(eos, np.int32)])
    n = len(tokens)
    return {"tokens": tokens, "weights": np.ones(n, np.float32), "answer": np.zeros(n, bool)}


def passkey_example(record: dict, *, other_weight: float) -> dict:
    """Returns {'tokens': int32 [L], 'weights': float32 [L] (1 on the answer, other_weight elsewhere),
    'answer': bool [L]}. weights[i] weighs predicting token i (so weights[0] is never used)."""
    answer = np.asarray(record["loss_mask"]) > 0
    weights = np.where(answer, 1.0, other_weight).astype(np.float32)
    return {"tokens": np.asarray(record["tokens"], np.int32), "weights": weights, "answer": answer}


def _find_prepared(data_dir: str, entry: CatalogEntry, version: str) -> tuple[str, dict]:
    """Returns (version folder, parsed dataset_info.json) of a prepared catalog dataset, newest first."""
    base = os.path.join(data_dir, entry.tfds_name)
    sub = os.path.join(base, entry.config) if entry.config else base
    infos = glob_lib.glob(os.path.join(sub, "*", "dataset_info.json"))
    if version:
        infos = [p for p in infos if os.path.basename(os.path.dirname(p)) == version]
    if not infos:
        return "", {}

    def vkey(p):
        return tuple(int(x) if x.isdigit() else 0 for x in os.path.basename(os.path.dirname(p)).split("."))

    path = max(infos, key=vkey)
    try:
        with open(path, encoding="utf-8") as f:
            return os.path.dirname(path), json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data_dir: cannot parse {path!r}: {e}") from None


def _tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _convert_to_array_record(version_dir: str) -> None:
    """Adds array_record shards beside tfrecord ones (tfds's converter; reading tfrecord needs tensorflow)."""
    from tensorflow_datasets.scripts.cli import convert_format_utils

    convert_format_utils.convert_dataset(out_dir=None, out_file_format="array_record",
                                         dataset_version_dir=version_dir, num_workers=1)


def _build_command(name: str, entry: CatalogEntry, data_dir: str) -> str:
    full = f"{entry.tfds_name}/{entry.config}" if entry.config else entry.tfds_name
    return f"tfds build {full} --data_dir={data_dir} --file_format=array_record"


def open_catalog(name: str, split: str, data_dir: str, version: str = ""):
    """Returns the array_record data source of a prepared catalog dataset's split (see the module doc)."""
    entry = CATALOG[name]
    vdir, info = _find_prepared(data_dir, entry, version)
    if not vdir:
        raise DataError(
            f"dataset {name!r} is not prepared in data_dir {data_dir!r}"
            f"{f' (catalog.version {version!r})' if version else ''}; prepare it once with "
            f"`{_build_command(name, entry, data_dir)}` (needs network and `pip install famjax[tf]`)")
    formats = {info.get("fileFormat", "tfrecord")} | set(info.get("alternativeFileFormats", []))
    if "array_record" not in formats:
        if not _tensorflow_available():
            raise DataError(
                f"dataset {name!r} in {vdir!r} is in tfrecord form, which needs tensorflow to read: "
                f"`pip install famjax[tf]` (famjax then converts it once to array_record in place), or "
                f"rebuild it with `{_build_command(name, entry, data_dir)}`")
        _convert_to_array_record(vdir)
    builder = tfds.builder_from_directory(vdir)
    if split not in builder.info.splits:
        raise DataError(f"split {split!r} is not in dataset {name!r}; "
                        f"available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def open_dataset(data_cfg, split: str, tok: Tokenizer) -> OpenedDataset:
    """Returns the split of `data_cfg.dataset` as a source plus the function that makes model examples."""
    name = data_cfg.dataset
    data_dir = os.path.expanduser(data_cfg.data_dir or "")
    if not data_dir:
        raise ConfigError(f"data_dir is required (where dataset {name!r} is prepared or cached)")
    if name == "passkey":
        src = passkey.data_source(data_cfg.passkey, tok, data_dir, split)
        fn = functools.partial(passkey_example, other_weight=float(data_cfg.passkey.loss_weight_other))
        return OpenedDataset(src, fn, "packed")
    if name == "local_text":
        src = local_text.data_source(data_cfg.local_text, data_dir, split)
        return OpenedDataset(src, functools.partial(text_example, feature="text", tok=tok), "stream")
    if name in CATALOG:
        if not os.path.isdir(data_dir):
            raise DataError(f"data_dir {data_dir!r} does not exist (needed for catalog dataset {name!r})")
        src = open_catalog(name, split, data_dir, data_cfg.catalog.version)
        fn = functools.partial(text_example, feature=CATALOG[name].text_feature, tok=tok)
        return OpenedDataset(src, fn, CATALOG[name].batching)
    raise ConfigError(f"dataset must be one of {DATASETS}, got {name!r}")
