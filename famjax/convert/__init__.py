"""Pretrained checkpoints in and out of famjax: Hugging Face folders and GGUF files.

    model, tokenizer = famjax.convert.load_pretrained("path/to/hf_folder", attention="fam", block_size=64)
    famjax.convert.export_pretrained(model, "out/", tokenizer)

Every failure is a `ConvertError` (a ValueError) with a one-line message naming the file, tensor or field;
nothing is written anywhere by an import.
"""
from __future__ import annotations

import os

from famjax.convert.common import PICKLE_SUFFIXES, ConvertError, TensorSource, refuse_pickle

__all__ = ["ConvertError", "TensorSource", "export_pretrained", "load_pretrained", "smollm2_gguf"]


def load_pretrained(path, *, mesh=None, rules=None, fam_init=None, fam_seed: int = 0, **model_overrides):
    """Returns (FamLM, tokenizer) of a local Hugging Face folder (config.json + safetensors, single or sharded)
    or a `.gguf` file.

    model_overrides: ModelConfig fields the checkpoint does not decide (`attention`, `block_size`,
    `memory_blocks`, `fam_len`, `max_len`, `dtype`, `param_dtype`, ...). Without them the model is the
    checkpoint as trained: attention "full", dtype and param_dtype the checkpoint's.
    mesh, rules: place each parameter with its logical sharding (famjax.model.sharding names; the trainer's
    mesh.rules); default: everything on the first local device.
    fam_init: the initial FAM table for attention "fam": an array [fam_len, d_model] or the name of a rule,
    "mean" (the mean token embedding plus noise), "bos" (the BOS token's embedding in every row), "random"
    (embeddings of random vocabulary tokens) or "zeros", seeded by fam_seed; default: the one exported beside
    the checkpoint (fam_init.safetensors) if its shape fits, else "mean" (measured in benchmarks/RESULTS.md,
    "Retrofit: the initial FAM of a pretrained model"; docs/design.md, "Pretrained checkpoints").
    The tokenizer is None when the folder has none.
    """
    path = os.path.expanduser(os.fspath(path))
    kwargs = dict(mesh=mesh, rules=rules, fam_init=fam_init, fam_seed=fam_seed, **model_overrides)
    if path.lower().endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise ConvertError(f"{path}: no such GGUF file")
        from famjax.convert import gguf
        return gguf.load_gguf(path, **kwargs)
    if os.path.isfile(path):
        raise ConvertError(f"{path}: pass the Hugging Face folder (config.json + safetensors) or a .gguf file")
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such folder or .gguf file")
    from famjax.convert import hf
    return hf.load_hf(path, **kwargs)


def export_pretrained(model, out_dir, tokenizer=None, *, max_shard_bytes: int = 5 << 30) -> str:
    """Writes `model` as a Hugging Face folder transformers loads: config.json (+ a "famjax" section with
    attention, block_size, memory_blocks, fam_len, ...), model.safetensors (sharded with an index above
    max_shard_bytes), fam_init.safetensors for a FAM model, and tokenizer.json + tokenizer_config.json when
    a tokenizer is given. A bswa/fam model is exported with sliding_window=(memory_blocks + 1) * block_size
    (Mistral for the Llama family; Qwen2 and Gemma 2 natively; Gemma 1 has none): transformers then runs the
    weights without the FAM, and famjax reloads the whole model (FAM table and fields included). Returns out_dir."""
    from famjax.convert import hf
    return hf.export_hf(model, os.path.expanduser(os.fspath(out_dir)), tokenizer, max_shard_bytes=max_shard_bytes)


def __getattr__(name):
    if name == "smollm2_gguf":  # lives with the GGUF reader
        from famjax.convert import gguf
        return gguf.smollm2_gguf
    raise AttributeError(f"module 'famjax.convert' has no attribute {name!r}")
