"""Hugging Face folders (config.json + safetensors) <-> famjax: Llama 2/3, Mistral, SmolLM (Llama), Qwen2, Gemma 1/2.

Import: `config_from_hf` maps config.json (+ a `famjax` section written by export, + the caller's overrides)
to a ModelConfig; `model_from_hf` checks every tensor's presence, shape and dtype before reading any, then
builds each famjax parameter shard by shard with its target sharding. Export writes what transformers loads:
config.json, model.safetensors (or shards + index), the FAM table in fam_init.safetensors, and the famjax
fields under config.json's "famjax" key.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import numpy as np

from famjax.convert.common import (
    FLOAT_DTYPES,
    ConvertError,
    SafetensorsFile,
    SafetensorsSource,
    TensorSource,
    build_model,
    initial_fam_table,
    model_params,
    write_safetensors,
)
from famjax.model import FamLM, ModelConfig

_LOG = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# transformers' defaults for fields a config.json may leave out.
_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "mistral": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "qwen2": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "gemma": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", head_dim=256),
    "gemma2": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}
# ModelConfig fields that the checkpoint decides (a caller cannot override them).
CHECKPOINT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "mlp_activation", "norm", "tie_embeddings", "embed_scale", "qkv_bias", "norm_offset",
                     "post_norms")
# famjax fields kept in config.json's "famjax" section by export (transformers ignores the section).
FAMJAX_FIELDS = ("attention", "block_size", "memory_blocks", "fam_len", "max_len", "dtype", "fam_zero_residual",
                 "fam_positions", "fam_stop_gradient", "fam_keep_norm")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "torch.float32": "float32",
                "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer old Llama checkpoints saved
FAM_FILE = "fam_init.safetensors"
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _model_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}


def _need_field(name: str, what: str, where: str) -> None:
    if name not in _model_fields():
        raise ConvertError(f"{where}: {what} needs famjax.ModelConfig.{name}, which this famjax does not have")


# ------------------------------------------------------------------------------------------- config
def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot parse: {e}") from None
    if not isinstance(hf, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return hf


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """Returns the ModelConfig of a Hugging Face config (dict of config.json).

    Defaults for what config.json cannot say: attention "full" (the checkpoint as it was trained), the
    checkpoint's dtype for `dtype` and `param_dtype`, famjax's defaults for the rest; then config.json's
    "famjax" section (written by export), then `overrides` (any ModelConfig field but CHECKPOINT_FIELDS).
    """
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = hf.get("architectures")
        raise ConvertError(f"{where}: model_type {model_type!r} (architectures {arch}) is not supported; "
                           f"supported: {', '.join(ARCHITECTURES)}")
    defaults = _DEFAULTS[model_type]
    missing = object()

    def get(key, default=missing):
        value = hf.get(key)
        if value is None:
            value = defaults.get(key, default)
        if value is missing:
            raise ConvertError(f"{where}: missing field {key!r}")
        return value

    def int_field(key, default=missing):
        value = get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConvertError(f"{where}: field {key!r} must be an integer > 0, got {value!r}")
        return value

    d, heads = int_field("hidden_size"), int_field("num_attention_heads")
    fields = dict(vocab_size=int_field("vocab_size"), d_model=d, num_layers=int_field("num_hidden_layers"),
                  num_heads=heads, num_kv_heads=int_field("num_key_value_heads", heads),
                  head_dim=int_field("head_dim", d // heads if d % heads == 0 else missing),
                  mlp_dim=int_field("intermediate_size"), norm="rms", norm_eps=float(get("rms_norm_eps")),
                  tie_embeddings=bool(get("tie_word_embeddings")))

    # RoPE: plain rotate-half RoPE only (transformers >= 5 writes rope_parameters, older rope_theta/rope_scaling).
    rope = hf.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type: must all agree
        kinds = {json.dumps(v, sort_keys=True) for v in rope.values()}
        if len(kinds) > 1:
            raise ConvertError(f"{where}: rope_parameters differ between layer types, which famjax does not support")
        rope = next(iter(rope.values()))
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConvertError(f"{where}: rope scaling {rope_type!r} is not supported (famjax has plain RoPE)")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConvertError(f"{where}: partial_rotary_factor={partial} is not supported (famjax rotates whole heads)")
    fields["rope_base"] = float(rope.get("rope_theta", hf.get("rope_theta") or 10_000.0))

    # Activation, biases, Gemma conventions.
    if model_type in ("llama", "mistral", "qwen2"):
        act = get("hidden_act")
        if act not in ("silu", "swish"):
            raise ConvertError(f"{where}: hidden_act {act!r} is not supported for {model_type} (famjax: silu)")
        fields["mlp_activation"] = "swiglu"
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConvertError(f"{where}: {key}=true is not supported (famjax has no o_proj/MLP biases)")
        if model_type == "qwen2":
            _need_field("qkv_bias", "Qwen2's q/k/v biases", where)
            fields["qkv_bias"] = True
    else:
        # transformers reads Gemma's legacy hidden_act "gelu" as the tanh approximation, as the releases meant.
        act = hf.get("hidden_activation") or get("hidden_act", "gelu_pytorch_tanh")
        if act not in _TANH_GELU + ("gelu",):
            raise ConvertError(f"{where}: hidden_activation {act!r} is not supported (famjax: tanh GELU)")
        if hf.get("attention_bias"):
            raise ConvertError(f"{where}: attention_bias=true is not supported (famjax has no attention biases)")
        _need_field("norm_offset", "Gemma's (1 + w) norms", where)
        fields.update(mlp_activation="geglu", embed_scale=True, norm_offset=1.0)
        if model_type == "gemma2":
            for name in ("post_norms", "attn_softcap", "final_softcap", "query_scale"):
                _need_field(name, "Gemma 2", where)
            def cap(key):  # absent: transformers' default; null: off
                return float((hf[key] if key in hf else defaults[key]) or 0.0)
            fields.update(post_norms=True, attn_softcap=cap("attn_logit_softcapping"),
                          final_softcap=cap("final_logit_softcapping"),
                          query_scale=float(get("query_pre_attn_scalar")) ** -0.5)

    dtype = _DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    fields.update(attention="full", dtype=dtype, param_dtype=dtype)

    section = hf.get("famjax") or {}
    if not isinstance(section, dict):
        raise ConvertError(f"{where}: field 'famjax' must be an object")
    for key, value in section.items():
        if key not in FAMJAX_FIELDS:
            raise ConvertError(f"{where}: famjax.{key} is not a famjax field this version reads")
        fields[key] = value
    known = _model_fields()
    for key, value in overrides.items():
        if key not in known:
            raise ConvertError(f"unknown ModelConfig field {key!r} in the overrides")
        if key in CHECKPOINT_FIELDS:
            raise ConvertError(f"{key!r} comes from the checkpoint ({where}) and cannot be overridden")
        fields[key] = value
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where}: {e}") from None

    window = hf.get("sliding_window") if (model_type != "qwen2" or hf.get("use_sliding_window")) else None
    if window and cfg.attention == "full" and window < cfg.max_len:
        _LOG.warning("%s: the checkpoint's sliding_window=%d is not reproduced: attention='full' sees all of "
                     "max_len=%d tokens (logits agree up to %d tokens)", where, window, cfg.max_len, window)
    return cfg


def hf_model_type(cfg: ModelConfig) -> str:
    """Returns the transformers model_type that represents a famjax model, or raises ConvertError."""
    def opt(name, default=None):
        return getattr(cfg, name, default)

    gemma2 = bool(opt("post_norms")) or bool(opt("attn_softcap")) or bool(opt("final_softcap")) \
        or opt("query_scale") is not None
    gemma = gemma2 or bool(opt("norm_offset", 0.0)) or cfg.embed_scale
    problems = []
    if cfg.norm != "rms":
        problems.append(f"norm={cfg.norm!r} (Hugging Face Llama/Gemma use RMSNorm)")
    if gemma:
        if cfg.mlp_activation != "geglu":
            problems.append(f"mlp_activation={cfg.mlp_activation!r} with Gemma conventions (needs geglu)")
        if opt("norm_offset", 0.0) != 1.0 or not cfg.embed_scale:
            problems.append("Gemma needs norm_offset=1.0 and embed_scale=True together")
        if opt("qkv_bias"):
            problems.append("qkv_bias with Gemma conventions")
        if gemma2 and not opt("post_norms"):
            problems.append("softcaps or query_scale without post_norms (Gemma 2 has both)")
    elif cfg.mlp_activation != "swiglu":
        problems.append(f"mlp_activation={cfg.mlp_activation!r} (Llama/Mistral/Qwen2 use swiglu)")
    if problems:
        raise ConvertError(f"no Hugging Face architecture represents this model: {problems[0]}")
    if gemma:
        if cfg.attention != "full" and not gemma2:
            _LOG.warning("Gemma 1 has no sliding window in transformers: exported as full attention "
                         "(attention=%r is kept in config.json's famjax section)", cfg.attention)
        return "gemma2" if gemma2 else "gemma"
    if opt("qkv_bias"):
        return "qwen2"
    return "llama" if cfg.attention == "full" else "mistral"


def sliding_window(cfg: ModelConfig) -> int | None:
    """The transformers sliding_window of a bswa/fam model: (m + 1) B, the farthest key a famjax token sees
    (the last token of a block), so no token sees a distance famjax never used; None for full attention."""
    return None if cfg.attention == "full" else (cfg.memory_blocks + 1) * cfg.block_size


def config_to_hf(cfg: ModelConfig, tokenizer=None) -> dict:
    """Returns the config.json of a famjax model (what transformers loads), with a "famjax" section."""
    model_type = hf_model_type(cfg)
    window = sliding_window(cfg)
    hf = dict(architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
              hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
              rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base),
              tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype, torch_dtype=cfg.param_dtype,
              attention_dropout=0.0, use_cache=True)
    layer_types = ["sliding_attention" if window else "full_attention"] * cfg.num_layers
    if model_type in ("llama", "mistral", "qwen2"):
        hf["hidden_act"] = "silu"
    if model_type in ("llama", "gemma", "gemma2"):
        hf["attention_bias"] = False
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = window
    if model_type == "qwen2":
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                  layer_types=layer_types)
    if model_type == "gemma":
        hf["hidden_act"] = "gelu_pytorch_tanh"
    if model_type == "gemma2":
        scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
        scalar = float(scale) ** -2  # transformers wants an int
        if abs(scalar - round(scalar)) > 1e-6 * scalar:
            raise ConvertError(f"query_scale={scale} is not representable in Gemma 2 (query_pre_attn_scalar = "
                               f"query_scale ** -2 = {scalar} must be an integer)")
        hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                  query_pre_attn_scalar=int(round(scalar)), attn_logit_softcapping=cfg.attn_softcap or None,
                  final_logit_softcapping=cfg.final_softcap or None, sliding_window=window or cfg.max_len,
                  layer_types=layer_types)
    if tokenizer is not None:
        for key in ("bos", "eos", "pad"):
            value = getattr(tokenizer, f"{key}_id", None)
            if value is not None:
                hf[f"{key}_token_id"] = int(value)
    hf["famjax"] = {k: getattr(cfg, k) for k in FAMJAX_FIELDS}
    return hf


# ------------------------------------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class Entry:
    """One famjax parameter and its Hugging Face tensor(s): `name` has "{i}" for stacked layers."""
    path: tuple
    name: str
    hf_shape: tuple
    to_famjax: object
    to_hf: object

    @property
    def layered(self) -> bool:
        return "{i}" in self.name


def tensor_plan(cfg: ModelConfig, model_type: str) -> list[Entry]:
    """Returns every famjax parameter (but fam_init) with its Hugging Face tensor, shape and transforms."""
    d, V, H, KV, hd, f = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim

    def same(x):
        return x

    def transpose(x):
        return x.T

    def heads_in(n):  # HF [n * hd, d] <-> famjax [d, n, hd]
        return (lambda x: x.T.reshape(d, n, hd)), (lambda x: x.reshape(d, n * hd).T)

    def bias(n):  # HF [n * hd] <-> famjax [n, hd]
        return (lambda x: x.reshape(n, hd)), (lambda x: x.reshape(n * hd))

    layer = "model.layers.{i}."
    plan = [Entry(("embed",), "model.embed_tokens.weight", (V, d), same, same)]
    norm2 = "pre_feedforward_layernorm" if model_type == "gemma2" else "post_attention_layernorm"
    plan += [Entry(("layers", "norm1", "scale"), layer + "input_layernorm.weight", (d,), same, same),
             Entry(("layers", "norm2", "scale"), layer + norm2 + ".weight", (d,), same, same)]
    if model_type == "gemma2":
        plan += [Entry(("layers", "norm_post_attn", "scale"), layer + "post_attention_layernorm.weight", (d,),
                       same, same),
                 Entry(("layers", "norm_post_ffn", "scale"), layer + "post_feedforward_layernorm.weight", (d,),
                       same, same)]
    for proj, n in (("q", H), ("k", KV), ("v", KV)):
        plan.append(Entry(("layers", "attn", proj), layer + f"self_attn.{proj}_proj.weight", (n * hd, d),
                          *heads_in(n)))
        if getattr(cfg, "qkv_bias", False):
            plan.append(Entry(("layers", "attn", f"{proj}_bias"), layer + f"self_attn.{proj}_proj.bias",
                              (n * hd,), *bias(n)))
    plan.append(Entry(("layers", "attn", "o"), layer + "self_attn.o_proj.weight", (d, H * hd),
                      lambda x: x.T.reshape(H, hd, d), lambda x: x.reshape(H * hd, d).T))
    if cfg.mlp_activation != "gelu":
        plan.append(Entry(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", (f, d), transpose, transpose))
    plan += [Entry(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", (f, d), transpose, transpose),
             Entry(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", (d, f), transpose, transpose),
             Entry(("final_norm", "scale"), "model.norm.weight", (d,), same, same)]
    if not cfg.tie_embeddings:
        plan.append(Entry(("lm_head",), "lm_head.weight", (V, d), transpose, transpose))
    return plan


def _names(entry: Entry, cfg: ModelConfig) -> list[str]:
    return [entry.name.format(i=i) for i in range(cfg.num_layers)] if entry.layered else [entry.name]


def check_tensors(cfg: ModelConfig, model_type: str, source: TensorSource, where: str) -> list[Entry]:
    """Checks that `source` holds exactly the tensors of `cfg` with the right shapes; returns the plan."""
    plan = tensor_plan(cfg, model_type)
    present = set(source.names())
    expected = [n for e in plan for n in _names(e, cfg)]
    lost = [n for n in expected if n not in present]
    if lost:
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        raise ConvertError(f"{where}: missing tensor {lost[0]!r}{more} for a {model_type} model with "
                           f"num_hidden_layers={cfg.num_layers}, tie_word_embeddings={cfg.tie_embeddings}")
    for e in plan:
        for n in _names(e, cfg):
            shape, dtype = tuple(source.shape(n)), source.dtype(n)
            if shape != e.hf_shape:
                raise ConvertError(f"{source.where(n)}: tensor {n!r} has shape {list(shape)}, config.json implies "
                                   f"{list(e.hf_shape)}")
            if dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{source.where(n)}: tensor {n!r} has dtype {dtype}, expected a float type")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in present - set(expected) - ignorable if not _IGNORED.match(n))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConvertError(f"{source.where(extra[0])}: unexpected tensor {extra[0]!r}{more}: not part of a "
                           f"{model_type} model with num_hidden_layers={cfg.num_layers}")
    return plan


def model_from_hf(hf: dict, source: TensorSource, *, where: str = "config.json", mesh=None, rules=None,
                  fam_init=None, fam_seed: int = 0, **overrides) -> FamLM:
    """Returns a FamLM from a Hugging Face config dict and a source of HF-named tensors (any TensorSource:
    a safetensors folder, or a GGUF reader that renames its tensors).

    mesh, rules: place every parameter with its logical sharding (famjax.model.sharding; default: the first
    local device). fam_init: None (the checkpoint's own initial table when `fam_init.safetensors` sits beside
    it with F rows, else `common.initial_fam_table`'s default), a name of `common.FAM_INITS` or an array [F, d].
    """
    return _build(config_from_hf(hf, where, **overrides), hf, source, where, mesh, rules, fam_init, fam_seed)


def _build(cfg, hf, source, where, mesh, rules, fam_init, fam_seed) -> FamLM:
    model_type = hf["model_type"]
    plan = check_tensors(cfg, model_type, source, where)
    leaves = {}
    for e in plan:
        if e.layered:
            leaves[e.path] = ("layer", lambda i, e=e: e.to_famjax(source.read(e.name.format(i=i))))
        else:
            leaves[e.path] = ("whole", lambda e=e: e.to_famjax(source.read(e.name)))
    if cfg.num_fam:
        table = _fam_table(cfg, source, fam_init, fam_seed, hf.get("bos_token_id"))
        leaves[("fam_init",)] = ("whole", lambda: table)
    return build_model(cfg, leaves, mesh=mesh, rules=rules)


def _fam_table(cfg: ModelConfig, source: TensorSource, fam_init, seed: int, bos_id) -> np.ndarray:
    want = (cfg.num_fam, cfg.d_model)
    if isinstance(fam_init, str):
        return initial_fam_table(source.read("model.embed_tokens.weight"), cfg.num_fam, embed_scale=cfg.embed_scale,
                                 seed=seed, init=fam_init, bos_id=bos_id)
    if fam_init is not None:
        table = np.asarray(fam_init, np.float32)
        if table.shape != want:
            raise ConvertError(f"fam_init must be [fam_len, d_model]={list(want)}, got {list(table.shape)}")
        return table
    folder = getattr(source, "folder", None)
    path = os.path.join(folder, FAM_FILE) if folder else None
    if path and os.path.isfile(path):
        stored = SafetensorsFile(path)
        if "fam_init" not in stored.entries:
            raise ConvertError(f"{path}: missing tensor 'fam_init'")
        if stored.entries["fam_init"][1] == want:
            return np.asarray(stored.read("fam_init"), np.float32)
        _LOG.warning("%s holds a table of shape %s, the model wants %s: initialising a new one", path,
                     list(stored.entries["fam_init"][1]), list(want))
    return initial_fam_table(source.read("model.embed_tokens.weight"), cfg.num_fam, embed_scale=cfg.embed_scale,
                             seed=seed, bos_id=bos_id)


def load_hf(folder: str, *, mesh=None, rules=None, fam_init=None, fam_seed: int = 0, **overrides):
    """Returns (FamLM, tokenizer or None) of a local Hugging Face folder (see famjax.convert.load_pretrained)."""
    from famjax.convert.tokenizer import load_tokenizer

    hf = read_config(folder)
    where = os.path.join(folder, "config.json")
    cfg = config_from_hf(hf, where, **overrides)  # config errors before any weight file is opened
    source = SafetensorsSource(folder)
    tokenizer = load_tokenizer(folder, hf)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        _LOG.warning("%s: the tokenizer has %d tokens, more than the model's vocab_size=%d", folder,
                     tokenizer.vocab_size, cfg.vocab_size)
    model = _build(cfg, hf, source, where, mesh, rules, fam_init, fam_seed)
    return model, tokenizer


# ------------------------------------------------------------------------------------------- export
_STALE = re.compile(r"^(model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors|"
                    + re.escape(FAM_FILE) + ")$")


def export_hf(model: FamLM, out_dir: str, tokenizer=None, *, max_shard_bytes: int = 5 << 30) -> str:
    """Writes a famjax model as a Hugging Face folder; returns out_dir (see famjax.convert.export_pretrained).

    Weights previously exported to out_dir (model*.safetensors, the index, fam_init.safetensors) are replaced.
    A model with LoRA adapters is exported merged (famjax.model.lora.merge_lora).
    """
    if getattr(model.cfg, "lora_rank", 0):
        from famjax.model.lora import merge_lora
        model = merge_lora(model)
    cfg = model.cfg
    hf = config_to_hf(cfg, tokenizer)  # raises before anything is written
    if tokenizer is not None:
        from famjax.convert.tokenizer import check_exportable
        check_exportable(tokenizer)
    plan = tensor_plan(cfg, hf["model_type"])
    params = model_params(model)
    dtype = np.dtype(cfg.weight_dtype)
    tensors = []
    for e in plan:
        leaf = params[e.path]
        for i, name in enumerate(_names(e, cfg)):
            def fetch(e=e, leaf=leaf, i=i):
                return e.to_hf(np.asarray(leaf[i] if e.layered else leaf))
            tensors.append((name, e.hf_shape, dtype, fetch))
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if _STALE.match(name):
            os.remove(os.path.join(out_dir, name))
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard)
            for name, shape, _, _ in shard:
                weight_map[name] = fname
                total += int(np.prod(shape)) * dtype.itemsize
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if cfg.num_fam:
        table = params[("fam_init",)]
        write_safetensors(os.path.join(out_dir, FAM_FILE),
                          [("fam_init", tuple(table.shape), np.dtype(table.dtype), lambda: np.asarray(table))])
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        from famjax.convert.tokenizer import save_tokenizer
        save_tokenizer(tokenizer, out_dir)
    return out_dir
