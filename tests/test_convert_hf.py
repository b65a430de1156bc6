"""famjax.convert with Hugging Face folders: tiny random Llama (GQA untied, MQA tied), Qwen2 (q/k/v biases),
Gemma (MQA) and Gemma 2 models made by transformers (PyTorch, float32) give the same logits in famjax (full
attention, and BSWA whose window covers the sequence); export -> transformers -> same logits; import ->
export -> import gives identical parameters; sharded safetensors; tokenizer.json; every broken input gives its
one-line ConvertError and nothing is written."""
import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import famjax.convert as fc
from famjax.convert import ConvertError
from famjax.convert.common import FAM_NOISE, model_params

V, T = 97, 24
TOL = 1e-4
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              head_dim=8, max_position_embeddings=128)
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mqa_tied": (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                      rope_theta=1e5)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    "gemma_mqa": (transformers.GemmaConfig, dict(num_key_value_heads=1)),
    "gemma2": (transformers.Gemma2Config, dict(num_key_value_heads=2, sliding_window=64)),
}
# What a bswa/fam export becomes in transformers.
EXPORTED_AS = {"llama_gqa_untied": "MistralForCausalLM", "llama_mqa_tied": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "gemma_mqa": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
BSWA = dict(attention="bswa", block_size=8, memory_blocks=3)  # the window covers T = 24 tokens
FAM = dict(attention="fam", block_size=8, memory_blocks=3, fam_len=4)
IDS = np.random.default_rng(0).integers(0, V, (2, T)).astype(np.int32)


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def famjax_logits(model, ids=IDS):
    return np.asarray(model(ids)[0])


def params(model):
    return {"/".join(k): np.asarray(v) for k, v in model_params(model).items()}


def listing(root):
    return sorted((os.path.relpath(d, root), tuple(sorted(fs))) for d, _, fs in os.walk(root))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{case: (folder, transformers model, its logits)} of tiny random float32 models."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (config_cls, extra)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra),
                                                              attn_implementation="eager").float().eval()
        with torch.no_grad():  # large random weights (norms and biases too) so every convention shows
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        folder = str(root / name)
        model.save_pretrained(folder)
        out[name] = (folder, model, hf_logits(model))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_dirs, case):
    folder, _, ref = hf_dirs[case]
    full, tok = fc.load_pretrained(folder)
    assert tok is None and full.cfg.attention == "full" and full.cfg.param_dtype == "float32"
    np.testing.assert_allclose(famjax_logits(full), ref, atol=TOL, rtol=0)
    bswa, _ = fc.load_pretrained(folder, **BSWA)
    np.testing.assert_allclose(famjax_logits(bswa), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_reload_and_roundtrip(hf_dirs, tmp_path, case):
    """A FAM model is exported as what transformers loads (sliding window (m + 1) B, FAM table beside it):
    transformers' logits equal the original's; importing the export gives identical parameters."""
    folder, _, ref = hf_dirs[case]
    model, _ = fc.load_pretrained(folder, **FAM, fam_seed=3)
    out = fc.export_pretrained(model, tmp_path / "out")
    assert os.path.isfile(os.path.join(out, "fam_init.safetensors"))
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["famjax"]["attention"] == "fam" and hf["famjax"]["fam_len"] == 4
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back).__name__ == EXPORTED_AS[case]
    if case != "gemma_mqa":  # Gemma 1 has no sliding window in transformers
        assert back.config.sliding_window == 32
    np.testing.assert_allclose(hf_logits(back), ref, atol=TOL, rtol=0)
    again, _ = fc.load_pretrained(out)
    assert again.cfg == model.cfg
    a, b = params(model), params(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_full_attention_exports_as_llama(hf_dirs, tmp_path):
    folder, _, ref = hf_dirs["llama_gqa_untied"]
    model, _ = fc.load_pretrained(folder)
    fc.export_pretrained(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back).__name__ == "LlamaForCausalLM" and not back.config.tie_word_embeddings
    np.testing.assert_allclose(hf_logits(back), ref, atol=TOL, rtol=0)
    assert not os.path.exists(tmp_path / "fam_init.safetensors")


def test_sharded_safetensors_both_ways(hf_dirs, tmp_path):
    _, hf_model, ref = hf_dirs["llama_gqa_untied"]
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    model, _ = fc.load_pretrained(tmp_path / "sharded")
    np.testing.assert_allclose(famjax_logits(model), ref, atol=TOL, rtol=0)
    fc.export_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    np.testing.assert_allclose(hf_logits(back), ref, atol=TOL, rtol=0)
    again, _ = fc.load_pretrained(tmp_path / "out")
    a, b = params(model), params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    fc.export_pretrained(again, tmp_path / "out")  # a single file now: the old shards are gone
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("model")) == ["model.safetensors"]


def test_bfloat16_checkpoint_and_dtype_overrides(hf_dirs, tmp_path):
    bf16 = copy.deepcopy(hf_dirs["qwen2"][1]).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    model, _ = fc.load_pretrained(tmp_path)
    assert model.cfg.param_dtype == model.cfg.dtype == "bfloat16"
    assert model.embed[...].dtype == jax.numpy.bfloat16
    ref = bf16.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), ref)
    fc.export_pretrained(model, tmp_path / "out")  # written as BF16, read back by transformers bit for bit
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16
    for name, tensor in bf16.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    f32, _ = fc.load_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    assert f32.embed[...].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(f32.embed[...]), ref)


def test_mesh_placement(hf_dirs):
    """Each parameter is created with the sharding its logical axes get through the trainer's rules."""
    folder, _, ref = hf_dirs["llama_gqa_untied"]
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("q_heads", "tensor"),
             ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("fam", None), ("layers", None))
    model, _ = fc.load_pretrained(folder, mesh=mesh, rules=rules)
    state = nnx.state(model, nnx.Param)
    q = state["layers"]["attn"]["q"][...]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor")), 4)
    assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (2, 16, 2, 8)
    embed = state["embed"][...]  # vocab 97 is not divisible by 2: replicated on "tensor"
    assert embed.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "fsdp")), 2)
    np.testing.assert_allclose(famjax_logits(model), ref, atol=TOL, rtol=0)


def test_initial_fam_table(hf_dirs):
    """The table is the mean token embedding plus FAM_NOISE x the embeddings' std noise (x sqrt(d) for Gemma)."""
    for case, scale in (("llama_gqa_untied", 1.0), ("gemma_mqa", 32 ** 0.5)):
        folder, hf_model, _ = hf_dirs[case]
        model, _ = fc.load_pretrained(folder, attention="fam", fam_len=8, block_size=8)
        table = np.asarray(model.fam_init[...]) / scale
        emb = hf_model.model.embed_tokens.weight.detach().numpy().astype(np.float64)
        noise = (table - emb.mean(0)) / (FAM_NOISE * emb.std())
        assert abs(noise.std() - 1) < 0.25 and abs(noise.mean()) < 0.25
        assert np.all(np.std(table, axis=0) > 0)  # rows differ
    custom = np.ones((8, 32), np.float32)
    model, _ = fc.load_pretrained(folder, attention="fam", fam_len=8, block_size=8, fam_init=custom)
    np.testing.assert_array_equal(np.asarray(model.fam_init[...]), custom)


def test_named_fam_init(hf_dirs):
    """fam_init="bos": every row is the bos token's embedding (x sqrt(d) for Gemma); "zeros"; "random": rows
    of the embedding; an unknown name or a checkpoint without a bos id is a one-line ConvertError."""
    for case, scale in (("llama_mqa_tied", 1.0), ("gemma_mqa", 32 ** 0.5)):
        folder, hf_model, _ = hf_dirs[case]
        emb = hf_model.model.embed_tokens.weight.detach().numpy()
        bos = hf_model.config.bos_token_id
        model, _ = fc.load_pretrained(folder, **FAM, fam_init="bos")
        np.testing.assert_allclose(np.asarray(model.fam_init[...]), np.repeat(emb[bos][None] * scale, 4, 0),
                                   rtol=1e-6)
    model, _ = fc.load_pretrained(folder, **FAM, fam_init="zeros")
    assert not np.any(np.asarray(model.fam_init[...]))
    model, _ = fc.load_pretrained(folder, **FAM, fam_init="random", fam_seed=1)
    rows = np.asarray(model.fam_init[...]) / scale
    assert all(np.abs(emb - r).max(1).min() < 1e-5 for r in rows)
    with pytest.raises(ConvertError, match="fam_init must be one of"):
        fc.load_pretrained(folder, **FAM, fam_init="sink")
    from famjax.convert.common import initial_fam_table
    with pytest.raises(ConvertError, match="bos token id"):
        initial_fam_table(emb, 4, embed_scale=False, init="bos", bos_id=None)


def _make_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "the", "pass", "key", "is", "1", "2", "3", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))


def test_tokenizer_json(hf_dirs, tmp_path):
    src = tmp_path / "with_tok"
    shutil.copytree(hf_dirs["llama_mqa_tied"][0], src)
    _make_tokenizer(src)
    model, tok = fc.load_pretrained(src)
    text = "the pass key is 1 2 3 ."
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and list(ids) == [4, 5, 6, 7, 8, 9, 10, 11]  # no special tokens added
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 12)
    assert tok.decode([1, *ids, 2]) == text and tok.fingerprint.startswith("hf-")
    out = fc.export_pretrained(model, tmp_path / "out", tok)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text, add_special_tokens=False) == list(ids)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    _, again = fc.load_pretrained(out)
    assert list(again.encode(text)) == list(ids) and (again.bos_id, again.eos_id) == (1, 2)
    # Without tokenizer_config.json the special ids come from config.json.
    os.remove(src / "tokenizer_config.json")
    cfg = json.load(open(src / "config.json"))
    json.dump(dict(cfg, bos_token_id=2, eos_token_id=[1, 2]), open(src / "config.json", "w"))
    _, tok = fc.load_pretrained(src)
    assert (tok.bos_id, tok.eos_id) == (2, 1)


# ------------------------------------------------------------------------------------------- broken inputs
def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


def _edit_tensors(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    fn(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _shard_missing(folder):
    json.dump({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))


def _pickle_only(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"not to be unpickled")


BROKEN = {  # name: (edit of a copy of the untied Llama folder, load_pretrained overrides, words of the message)
    "unsupported architecture": (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 {}, ["model_type 'gpt2'", "not supported"]),
    "missing field": (lambda d: _edit_config(d, hidden_size=None), {}, ["'hidden_size'"]),
    "rope scaling": (lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), {},
                     ["'llama3'"]),
    "attention bias": (lambda d: _edit_config(d, attention_bias=True), {}, ["attention_bias"]),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), {},
                       ["missing tensor 'model.layers.1.mlp.up_proj.weight'"]),
    "missing lm_head": (lambda d: _edit_tensors(d, lambda t: t.pop("lm_head.weight")), {},
                        ["missing tensor 'lm_head.weight'"]),
    "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)})), {},
        ["unexpected tensor 'model.layers.2.mlp.up_proj.weight'"]),
    "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)})), {},
        ["'model.layers.0.self_attn.k_proj.weight'", "[8, 32]", "[16, 32]"]),
    "wrong config for the tensors": (lambda d: _edit_config(d, intermediate_size=64), {},
                                     ["'model.layers.0.mlp.gate_proj.weight'", "[48, 32]"]),
    "integer tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.norm.weight": torch.zeros(32, dtype=torch.int32)})), {}, ["'model.norm.weight'", "I32"]),
    "truncated file": (_truncate, {}, ["model.safetensors", "truncated"]),
    "missing shard": (lambda d: (os.remove(os.path.join(d, "model.safetensors")), _shard_missing(d)), {},
                      ["model-00001-of-00002.safetensors", "does not exist"]),
    "pickle weights": (_pickle_only, {}, ["pytorch_model.bin", "convert them to safetensors"]),
    "no config": (lambda d: os.remove(os.path.join(d, "config.json")), {}, ["no config.json"]),
    "checkpoint field override": (lambda d: None, {"d_model": 64}, ["'d_model'", "cannot be overridden"]),
    "unknown override": (lambda d: None, {"colour": 1}, ["'colour'"]),
    "invalid override": (lambda d: None, {"attention": "sparse"}, ["attention"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_input_one_line_error_nothing_written(hf_dirs, tmp_path, monkeypatch, name):
    edit, overrides, words = BROKEN[name]
    folder = tmp_path / "model"
    shutil.copytree(hf_dirs["llama_gqa_untied"][0], folder)
    edit(str(folder))
    work = tmp_path / "workdir"
    work.mkdir()
    monkeypatch.chdir(work)
    before = listing(tmp_path)
    with pytest.raises(ConvertError) as info:
        fc.load_pretrained(folder, **overrides)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError), message
    for w in words:
        assert w in message, message
    assert listing(tmp_path) == before


def test_pickle_file_and_bad_paths_refused(tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04not a pickle to open")
    with pytest.raises(ConvertError, match="never unpickles.*safetensors"):
        fc.load_pretrained(pt)
    with pytest.raises(ConvertError, match="no such folder"):
        fc.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConvertError, match="no such GGUF"):
        fc.load_pretrained(tmp_path / "nowhere.gguf")


def test_export_refuses_unrepresentable_model_before_writing(tmp_path):
    model = famjax_model(norm="layer")
    with pytest.raises(ConvertError, match="norm='layer'"):
        fc.export_pretrained(model, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ConvertError, match="cannot export a ByteTokenizer"):
        from famjax.data.tokenizers import ByteTokenizer
        fc.export_pretrained(famjax_model(), tmp_path / "out", ByteTokenizer())
    assert not os.path.exists(tmp_path / "out")


def famjax_model(**changes):
    from famjax import FamLM, ModelConfig

    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, mlp_dim=48, attention="full", **changes)
    return FamLM(cfg, rngs=nnx.Rngs(0))
