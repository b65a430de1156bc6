"""What every checkpoint converter shares: the error type, safetensors I/O, placing parameters with their
target sharding tensor by tensor, and the initial FAM table of a converted model.

safetensors is read and written here directly (the format is an 8-byte header length, a JSON header, raw
little-endian data): reading maps the file (`numpy.memmap`), so a tensor is copied once, into the leaf
being placed, and never unpickled; bfloat16 comes through `ml_dtypes` (the `safetensors` package's numpy
backend cannot return it). Writing streams one tensor at a time from the devices.
"""
from __future__ import annotations

import abc
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict as flatten
from flax.traverse_util import unflatten_dict as unflatten

from famjax.errors import FamjaxError
from famjax.model import FamLM, ModelConfig


class ConvertError(FamjaxError, ValueError):
    """A checkpoint cannot be imported or exported; the message is one line naming the file, tensor or field."""


# safetensors dtype names <-> numpy dtypes (8-bit floats and complex types are not supported).
ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 << 20


def refuse_pickle(path: str) -> None:
    """Raises ConvertError for a PyTorch pickle file: famjax never unpickles."""
    raise ConvertError(f"{path}: PyTorch pickle weights are refused (famjax never unpickles); convert them to "
                       "safetensors first, e.g. transformers' model.save_pretrained(dir, safe_serialization=True)")


class SafetensorsFile:
    """One .safetensors file: its header is parsed and checked against the file size on construction;
    `read(name)` returns a read-only view into the memory-mapped file (no copy)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise ConvertError(f"{path}: not a safetensors file (header length {n})")
                if 8 + n > size:
                    raise ConvertError(f"{path}: truncated safetensors file (header needs {8 + n} bytes, "
                                       f"file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            raise ConvertError(f"{path}: not a safetensors file (header is not a JSON object)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, self.size = 8 + n, size
        available = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{path}: tensor {name!r} has a malformed header entry") from None
            if dtype not in ST_DTYPES:
                raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, which famjax does not read "
                                   f"(supported: {', '.join(ST_DTYPES)})")
            nbytes = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dtype].itemsize
            if end - begin != nbytes or begin < 0:
                raise ConvertError(f"{path}: tensor {name!r} header is inconsistent ({dtype} {list(shape)} needs "
                                   f"{nbytes} bytes, offsets {begin}..{end})")
            if end > available:
                raise ConvertError(f"{path}: truncated file: tensor {name!r} ends at byte {self.data_start + end}, "
                                   f"file has {size}")
            self.entries[name] = (dtype, shape, begin, end)
        self._map = None

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, ST_DTYPES[dtype])
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[self.data_start + begin:self.data_start + end].view(ST_DTYPES[dtype]).reshape(shape)


class TensorSource(abc.ABC):
    """Named tensors of a checkpoint, read one at a time: what a converter maps onto famjax parameters.

    A GGUF (or any other) reader implements the same five methods with Hugging Face tensor names to reuse
    `famjax.convert.hf.model_from_hf`.
    """

    @abc.abstractmethod
    def names(self) -> Iterable[str]:
        """The tensor names."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape."""

    @abc.abstractmethod
    def dtype(self, name: str) -> str:
        """safetensors dtype name ("F32", "BF16", ...)."""

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor's values."""

    @abc.abstractmethod
    def where(self, name: str) -> str:
        """The file a tensor lives in, for error messages."""


class SafetensorsSource(TensorSource):
    """The safetensors weights of a Hugging Face folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists. Every header is checked (truncation, dtypes) on construction."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        self._where: dict[str, str] = {}
        self._files: dict[str, SafetensorsFile] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise ConvertError(f"{index}: not a valid safetensors index (no weight_map object)") from None
            for name, fname in weight_map.items():
                path = os.path.join(folder, str(fname))
                if os.path.basename(path) != fname or not os.path.isfile(path):
                    raise ConvertError(f"{index}: shard {fname!r} of tensor {name!r} does not exist")
                if fname not in self._files:
                    self._files[fname] = SafetensorsFile(path)
                if name not in self._files[fname].entries:
                    raise ConvertError(f"{path}: missing tensor {name!r} (listed in model.safetensors.index.json)")
                self._where[name] = fname
        elif os.path.isfile(single):
            self._files["model.safetensors"] = SafetensorsFile(single)
            self._where = {n: "model.safetensors" for n in self._files["model.safetensors"].entries}
        else:
            pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
            if pickles:
                refuse_pickle(os.path.join(folder, pickles[0]))
            raise ConvertError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.folder = folder

    def names(self):
        return self._where.keys()

    def _entry(self, name):
        return self._files[self._where[name]].entries[name]

    def shape(self, name):
        return self._entry(name)[1]

    def dtype(self, name):
        return self._entry(name)[0]

    def read(self, name):
        return self._files[self._where[name]].read(name)

    def where(self, name):
        return os.path.join(self.folder, self._where[name])


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes a .safetensors file, fetching one tensor at a time: tensors are (name, shape, dtype, fetch)."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = {"__metadata__": dict(metadata or {"format": "pt"}), **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, fetch in tensors:
            arr = np.ascontiguousarray(np.asarray(fetch(), dtype=dtype))
            if arr.shape != tuple(shape):
                raise ConvertError(f"{path}: tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}")
            f.write(arr.tobytes())


# ------------------------------------------------------------------------------------------- placement
def abstract_model(mcfg: ModelConfig):
    """Returns (graphdef, abstract params pure dict, logical PartitionSpecs pure dict) of a FamLM."""
    from flax import nnx

    model = nnx.eval_shape(lambda: FamLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def target_sharding(spec, shape, mesh=None, rules=None):
    """Returns the sharding a parameter gets: its logical spec through `rules` on `mesh`, or the first local
    device when mesh is None (the default: a single-device model, as famjax.restore gives)."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from famjax.model.sharding import logical_to_spec

    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    if not rules:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh.shape, shape))


def place(shape, dtype, sharding, per_layer: Callable[[int], np.ndarray] | None = None,
          whole: Callable[[], np.ndarray] | None = None) -> jax.Array:
    """Returns a jax.Array built shard by shard: each addressable shard reads only its layers from the
    source (`per_layer(i)` gives layer i of a stacked leaf, `whole()` an unstacked leaf), cast to dtype."""
    dtype = np.dtype(dtype)

    def shard(index):
        index = tuple(index) if index is not None else (slice(None),) * len(shape)
        if per_layer is None:
            return np.array(np.asarray(whole())[index], dtype=dtype)  # a copy: never alias the file map
        layers = range(shape[0])[index[0]]
        out = np.empty((len(layers),) + tuple(len(range(n)[s]) for n, s in zip(shape[1:], index[1:])), dtype)
        for j, i in enumerate(layers):
            out[j] = np.asarray(per_layer(i))[index[1:]]
        return out
    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def build_model(mcfg: ModelConfig, leaves: Mapping[tuple, tuple], *, mesh=None, rules=None) -> FamLM:
    """Returns a FamLM whose parameters are built leaf by leaf with their target sharding.

    leaves: {famjax param path: ("layer", fn(i) -> layer i) | ("whole", fn() -> array)}; every parameter of
    the model must be covered (a missing one is a converter bug, reported as such).
    """
    from flax import nnx

    graphdef, abstract, specs = abstract_model(mcfg)
    flat, flat_specs = flatten(abstract), flatten(specs)
    missing = sorted("/".join(p) for p in flat if p not in leaves)
    if missing:
        raise ConvertError(f"internal: no source for famjax parameter(s) {', '.join(missing)}")
    params = {}
    for path, a in flat.items():
        kind, fn = leaves[path]
        sharding = target_sharding(flat_specs[path], a.shape, mesh, rules)
        params[path] = place(a.shape, a.dtype, sharding, **({"per_layer": fn} if kind == "layer" else {"whole": fn}))
    return nnx.merge(graphdef, unflatten(params))


def model_params(model: FamLM) -> dict[tuple, jax.Array]:
    """Returns {path tuple: array} of a model's parameters (nnx.to_pure_dict, flattened)."""
    from flax import nnx

    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------------------- FAM table
FAM_NOISE = 0.1  # noise std of the "mean" initial FAM table, relative to the embeddings' per-coordinate std
FAM_INITS = ("mean", "bos", "random", "zeros")  # the named initial FAM tables; the first is the default


def initial_fam_table(embed: np.ndarray, num_fam: int, *, embed_scale: bool, seed: int = 0, init: str = "mean",
                      bos_id: int | None = None) -> np.ndarray:
    """Returns the initial FAM table [F, d] of a converted model (docs/design.md, "Pretrained checkpoints";
    benchmarks/fam_init.py measures the choices), times sqrt(d) when the model scales its embeddings (Gemma:
    fam_init is not scaled by the model):

    - "mean" (default): the mean token embedding plus Gaussian noise of FAM_NOISE times the embeddings'
      per-coordinate std;
    - "bos": every row is the embedding of the checkpoint's bos token `bos_id`;
    - "random": the embeddings of F distinct vocabulary tokens drawn at random;
    - "zeros": all zeros.
    Reads `embed` [V, d] (a memory map is fine) in chunks, in float64; seed: "mean" and "random" only.
    """
    vocab, d = embed.shape
    rng = np.random.default_rng(seed)
    if init == "bos":
        if bos_id is None or not 0 <= int(bos_id) < vocab:
            raise ConvertError(f"fam_init='bos' needs the checkpoint's bos token id (bos_token_id), got {bos_id!r}; "
                               f"pick another of {FAM_INITS} or pass a table")
        table = np.repeat(np.asarray(embed[int(bos_id)], np.float64)[None], num_fam, axis=0)
    elif init == "mean":
        total, sq = np.zeros(d), np.zeros(d)
        for start in range(0, vocab, 8192):
            rows = np.asarray(embed[start:start + 8192], np.float64)
            total += rows.sum(0)
            sq += np.square(rows).sum(0)
        mean = total / vocab
        std = float(np.sqrt(max(np.mean(sq / vocab - mean ** 2), 0.0)))
        table = mean[None, :] + FAM_NOISE * std * rng.standard_normal((num_fam, d))
    elif init == "random":
        ids = np.sort(rng.choice(vocab, size=num_fam, replace=num_fam > vocab))
        table = np.stack([np.asarray(embed[int(i)], np.float64) for i in ids])
    elif init == "zeros":
        table = np.zeros((num_fam, d))
    else:
        raise ConvertError(f"fam_init must be one of {FAM_INITS} or an array [fam_len, d_model], got {init!r}")
    if embed_scale:
        table = table * d ** 0.5
    return table.astype(np.float32)
