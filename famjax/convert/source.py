"""A pretrained source (a Hugging Face folder or a .gguf file) without its weights: its ModelConfig and the
content hash that identifies it (what a LoRA run's checkpoints point to)."""
from __future__ import annotations

import hashlib
import json
import os

from famjax.convert.common import ConvertError

_HASHES: dict = {}


def source_config(path: str, **model_overrides):
    """Returns the ModelConfig load_pretrained(path, **model_overrides) would build, reading only the
    checkpoint's config (config.json, or the GGUF header), no weights."""
    from famjax.convert.hf import config_from_hf, read_config

    if path.lower().endswith(".gguf"):
        from famjax.convert.gguf import hf_config, open_gguf
        return config_from_hf(hf_config(open_gguf(path), path), path, **model_overrides)
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such Hugging Face folder or .gguf file")
    return config_from_hf(read_config(path), os.path.join(path, "config.json"), **model_overrides)


def source_files(path: str) -> list[str]:
    """The files whose bytes define a pretrained source: the .gguf file, or a folder's config.json, weight
    files (model.safetensors, or the index and its shards) and fam_init.safetensors when present."""
    if not os.path.isdir(path):
        return [path]
    names = {"config.json"}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        names.add("model.safetensors.index.json")
        with open(index, encoding="utf-8") as f:
            names.update(json.load(f).get("weight_map", {}).values())
    else:
        names.add("model.safetensors")
    names.add("fam_init.safetensors")
    return [os.path.join(path, n) for n in sorted(names) if os.path.isfile(os.path.join(path, n))]


def source_hash(path: str) -> str:
    """Returns "sha256:<hex>" of source_files(path) (each file's name and bytes), computed once per process
    for unchanged files (keyed by their sizes and modification times)."""
    path = os.path.abspath(path)
    files = source_files(path)
    key = (path, tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files))
    if key not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.relpath(f, path).encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _HASHES[key] = "sha256:" + h.hexdigest()
    return _HASHES[key]
