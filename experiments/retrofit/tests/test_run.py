"""The retrofit experiment (python -m experiments.retrofit.run): its preset validates and resolves to SmolLM2-135M,
--help works, and the whole script (LoRA training of FAM and BSWA, streaming PassKey, zero-shot base,
perplexity by position) runs end to end on a tiny random Llama exported with transformers to a temp folder."""
import json
import os
import subprocess
import sys

import pytest

from experiments.retrofit import run
from famjax.train.config import model_config, resolve, validate

# The suite's XLA flags (conftest.py) with one CPU device (the last occurrence of a flag wins).
ONE_DEVICE_XLA_FLAGS = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PRESET = os.path.join(REPO, "configs", "smollm2_fam_lora.py")


def test_help():
    res = subprocess.run([sys.executable, "-m", "experiments.retrofit.run", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage: python -m experiments.retrofit.run"), res.stdout[:200]
    for flag in ("--size", "--steps", "--init_from", "--bench", "--multipliers"):
        assert flag in res.stdout


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_preset_validates_and_resolves_to_smollm2(size):
    """The preset's architecture fields are SmolLM2-135M's (resolve reads them from the GGUF header and must
    change none), its PassKey data uses the GGUF's tokenizer, and both models of the experiment validate."""
    cfg = run.load_config(PRESET, size)
    validate(cfg)
    gguf = cfg.train.init_from
    assert gguf.endswith(".gguf") and os.path.isfile(gguf)
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.path) == ("gguf", gguf)
    assert cfg.data.passkey.key_position == "start" and cfg.fam.rsp_prob == 0.8
    assert cfg.train.trainable == "lora" and cfg.model.lora_rank == 64
    resolved = resolve(cfg)
    arch = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "mlp_activation", "norm", "rope_base", "tie_embeddings", "embed_scale")
    assert {k: resolved.model[k] for k in arch} == {k: cfg.model[k] for k in arch}
    assert resolved.model.norm_eps == pytest.approx(cfg.model.norm_eps)
    for name in run.MODELS:
        mcfg = resolve(run.model_config(cfg, name))
        validate(mcfg)
        m = model_config(mcfg)
        assert m.attention == name and m.block_size == cfg.model.block_size
        assert m.memory_blocks == cfg.model.memory_blocks
    # the longest training example fits a row
    import famjax.data as fd
    from famjax.data import passkey as pk

    tok = fd.make_tokenizer(cfg.data)
    assert pk.max_tokens(cfg.data.passkey, tok, "train") <= cfg.data.seq_len


def test_set_parses_values_as_the_fields_type():
    cfg = run.load_config(PRESET, "cpu", steps=7, sets={"fam.rpo": "false", "data.batch_size": "2",
                                                         "train.learning_rate": "2e-4",
                                                         "model.lora_targets": "('q', 'v')"})
    assert cfg.train.steps == 7 and cfg.fam.rpo is False and cfg.data.batch_size == 2
    assert cfg.train.learning_rate == 2e-4 and cfg.model.lora_targets == ("q", "v")
    with pytest.raises(ValueError, match="no field"):
        run.load_config(PRESET, "cpu", sets={"train.nonsense": "1"})


# ------------------------------------------------------------------------------------------ smoke run
def _tiny_llama(folder):
    """A random 2-layer Llama (GQA 4/2, untied) saved by transformers, with a small byte-level BPE tokenizer
    trained on the PassKey texts (tokenizer.json + tokenizer_config.json) in the same folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from famjax.data.passkey_text import template_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(template_texts() + ["0123456789"], trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, rope_theta=10_000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny_llama(str(tmp_path_factory.mktemp("retrofit") / "llama"))


def smoke_args(base: str, tmp_path) -> list[str]:
    """Flags that shrink the CPU preset to the tiny Llama: B 32, F 4, LoRA r 4, filler 8-48, 2 steps."""
    return [f"--init_from={base}", "--steps=2", "--examples=2", "--multipliers=1,2", "--eval_batch=2", "--chunk=64",
            "--ppl_tokens=200", f"--set=data.data_dir={tmp_path / 'data'}", "--set=data.read_threads=0",
            "--set=data.prefetch_batches=0", "--set=data.batch_size=2", "--set=data.seq_len=256",
            "--set=model.block_size=32", "--set=model.max_len=1024", "--set=fam.fam_len=4", "--set=model.lora_rank=4",
            "--set=data.passkey.train_filler_min=8", "--set=data.passkey.train_filler_max=48",
            "--set=data.passkey.train_examples=64", "--set=data.passkey.validation_examples=4",
            "--set=data.passkey.eval_examples=2", "--set=checkpoint.async_save=false", "--set=eval.batches=1"]


@pytest.mark.slow
def test_smoke_run_on_a_tiny_llama_writes_every_table(tiny_llama, tmp_path):
    """The whole script on a 2-layer random Llama (about a minute on the 2-core machine): both models train
    2 LoRA steps, every eval runs, every table and plot is written."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.retrofit.run", f"--out={out}", *smoke_args(tiny_llama, tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    rows = json.loads((out / "passkey.json").read_text())
    models = {r["model"] for r in rows}
    assert models == {run.BASE, "fam + LoRA", "bswa + LoRA"}
    for m in models:
        assert sorted(r["length"] for r in rows if r["model"] == m) == [48, 96]
        assert all(r["count"] == 2 for r in rows if r["model"] == m)
    ppl = json.loads((out / "perplexity.json").read_text())
    assert {r["model"] for r in ppl} == {"base full", "base as fam, no fine-tune", "base as bswa, no fine-tune",
                                         "fam + LoRA", "bswa + LoRA"}
    assert sum(r["tokens"] for r in ppl if r["model"] == "base full") == 199
    for stem in ("passkey", "perplexity"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.csv").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| fam + LoRA |" in summary and "## Perplexity by position" in summary and "## Training" in summary
    train = json.loads((out / "summary.json").read_text())["train"]
    assert {m: t["steps"] for m, t in train.items()} == {"fam": 2, "bswa": 2}
    # LoRA on a frozen base: the checkpoints hold the trained leaves and a pointer to the base
    for name in run.MODELS:
        assert (out / name / "checkpoints" / "2" / "base").is_dir()
    # a finished workdir is not trained again
    assert run.train_model(run.load_config(PRESET, "cpu", steps=2), str(out / "fam"), retrain=False)["seconds"] is None


@pytest.mark.slow
def test_throughput_measures_forward_and_the_trainers_step(tiny_llama, tmp_path):
    argv = smoke_args(tiny_llama, tmp_path)
    cfg = run.load_config(PRESET, "cpu", init_from=tiny_llama, steps=2,
                          sets=dict(a[len("--set="):].split("=", 1) for a in argv if a.startswith("--set=")))
    rows = run.measure_throughput(resolve(cfg), [64], steps=1)
    assert [(r["what"].split()[0], r["attention"], r["tokens"]) for r in rows] == [
        ("forward", "full", 64), ("train", "full", 64), ("forward", "fam", 64), ("train", "fam", 64)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert "| forward | fam | 64 |" in run.throughput_md(rows)
