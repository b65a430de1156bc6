"""One-line user errors (issue 23) of famjax.generate and famjax.evals, and the typed errors behind them.

Every CLI case runs the real command line in a subprocess and checks: exit code 2, stderr exactly one line
`famjax.<prog>: ...` naming the file or field (nothing filtered: a stray warning on stderr fails the test). All
of them fail before a model is built, so they need no trained run: a workdir here is a run's config.json (from
the tiny test config), plus an empty checkpoints/1/params/ folder where the error must come after the checkpoint
check. The trainer meets the same data and tokenizer errors through famjax.data, checked in-process below.
"""
import json
import os
import subprocess
import sys

import pytest
from test_train_common import REPO, tiny_config

import famjax.data as fd
from famjax import restore
from famjax.data.tokenizers import make_tokenizer
from famjax.errors import CheckpointNotFoundError, ConfigError, DataError, FamjaxError, TokenizerError

LATIN1 = "caf\xe9 au lait".encode("latin-1")  # byte 3 is not UTF-8


def cli(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m module args` on the CPU from the repository root; returns the finished process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("FAMJAX_VERBOSE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_one_line(out: subprocess.CompletedProcess, prog: str, *words: str) -> None:
    """Exit code 2, stderr is one non-empty line `prog: ...` holding every word, no traceback on stdout (which
    may hold tfds's "preparing dataset" line)."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and out.stderr.endswith("\n") and lines[0].strip(), out.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    missing = [w for w in words if w not in lines[0]]
    assert not missing, (missing, lines[0])
    assert "Traceback" not in out.stdout, out.stdout


def _write_run(folder, cfg: dict, *, checkpoint: bool) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if checkpoint:  # what the checkpoint check looks for; no model is restored in these tests
        os.makedirs(os.path.join(folder, "checkpoints", "1", "params"))
    return str(folder)


def _gguf_without_vocab(path) -> str:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Runs, prompt files, text folders and tokenizer files, good and bad; {name: path}."""
    d = tmp_path_factory.mktemp("cli_errors")
    base = json.loads(restore.to_json(tiny_config(d / "data")))
    p = {"data_dir": str(d / "data")}

    p["no_checkpoints"] = _write_run(d / "no_checkpoints", base, checkpoint=False)  # config.json only
    p["run"] = _write_run(d / "run", base, checkpoint=True)
    removed = json.loads(json.dumps(base))
    removed["fam"]["inflate"] = 1.0
    p["removed_field"] = _write_run(d / "removed_field", removed, checkpoint=True)
    p["nowhere"] = str(d / "nowhere")

    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes(LATIN1)
    p.update(empty_prompt=str(d / "empty.txt"), latin1_prompt=str(d / "latin1.txt"),
             missing_prompt=str(d / "missing.txt"))

    for name, files in {"only_empty": {"a.txt": b""}, "latin1_text": {"ok.txt": b"fine", "bad.txt": LATIN1},
                        "one_file": {"a.txt": b"one short document"}}.items():
        os.makedirs(d / name)
        for f, data in files.items():
            (d / name / f).write_bytes(data)
        p[name] = str(d / name)

    (d / "random.model").write_bytes(bytes(range(256)) * 4)
    (d / "tokenizer.json").write_text("not json at all")
    tokenizers = {"sentencepiece": str(d / "random.model"), "hf": str(d / "tokenizer.json"),
                  "gguf": _gguf_without_vocab(d / "novocab.gguf"), "sentencepiece_missing": str(d / "gone.model")}
    for name, path in tokenizers.items():
        cfg = json.loads(json.dumps(base))
        cfg["data"]["tokenizer"].update(kind=name.split("_")[0], path=path)
        p[f"tok_{name}"] = _write_run(d / f"tok_{name}", cfg, checkpoint=True)
        p[f"tok_{name}_file"] = path
    return p


# ------------------------------------------------------------------------------------------------ generate
GENERATE_CASES = {
    # the run
    "no_checkpoints": (["--workdir={no_checkpoints}", "--prompt=hi"],
                       ["no checkpoints in {no_checkpoints}", "train first", "famjax.main"]),
    "missing_workdir": (["--workdir={nowhere}", "--prompt=hi"], ["no such workdir", "{nowhere}"]),
    "removed_field": (["--workdir={removed_field}", "--prompt=hi"],
                      ["unknown field fam.inflate", "{removed_field}/config.json"]),
    # the prompt
    "empty_prompt": (["--workdir={run}", "--prompt="], ["--prompt is empty"]),
    "empty_prompt_file": (["--workdir={run}", "--prompt_file={empty_prompt}"], ["{empty_prompt}", "is empty"]),
    "missing_prompt_file": (["--workdir={run}", "--prompt_file={missing_prompt}"],
                            ["{missing_prompt}", "no such file"]),
    "latin1_prompt_file": (["--workdir={run}", "--prompt_file={latin1_prompt}"],
                           ["{latin1_prompt}", "not valid UTF-8", "byte 3", "re-encode"]),
    # the run's tokenizer file
    "sentencepiece_random_bytes": (["--workdir={tok_sentencepiece}", "--prompt=hi"],
                                   ["{tok_sentencepiece_file}", "not a valid SentencePiece model"]),
    "sentencepiece_missing": (["--workdir={tok_sentencepiece_missing}", "--prompt=hi"],
                              ["{tok_sentencepiece_missing_file}", "SentencePiece", "does not exist"]),
    "hf_not_json": (["--workdir={tok_hf}", "--prompt=hi"], ["{tok_hf_file}", "not a valid tokenizer.json"]),
    "gguf_without_vocab": (["--workdir={tok_gguf}", "--prompt=hi"],
                           ["{tok_gguf_file}", "GGUF file has no vocabulary", "tokenizer.ggml.model"]),
    # a flag
    "bad_temperature": (["--workdir={run}", "--prompt=hi", "--temperature=-1"], ["--temperature must be"]),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_user_error_is_one_line(inputs, case):
    args, words = GENERATE_CASES[case]
    out = cli("famjax.generate", *[a.format(**inputs) for a in args])
    assert_one_line(out, "famjax.generate", *[w.format(**inputs) for w in words])


# ------------------------------------------------------------------------------------------------ evals
EVALS_CASES = {
    "missing_model": (["perplexity", "--model={nowhere}"], ["no such workdir", "{nowhere}"]),
    "model_without_checkpoints": (["perplexity", "--model=x={no_checkpoints}"],
                                  ["no checkpoints in {no_checkpoints}", "train first"]),
    "unknown_data_key": (["perplexity", "--model={run}", "--data=local_text.pth=x"],
                         ["local_text.pth=x", "no field 'pth'", "did you mean data.local_text.path"]),
    "bad_data_value": (["perplexity", "--model={run}", "--data=seq_len=long"],
                       ["seq_len=long", "data.seq_len takes an integer"]),
    "data_not_key_value": (["perplexity", "--model={run}", "--data=seq_len"], ["KEY=VALUE", "seq_len"]),
    "out_is_a_file": (["passkey", "--model={run}", "--out={empty_prompt}"], ["--out {empty_prompt} is a file"]),
    "inspect_two_models": (["inspect", "--model=a={run}", "--model=b={run}", "--prompt=hi"],
                           ["inspect takes one --model, got 2"]),
    "inspect_empty_prompt_file": (["inspect", "--model={run}", "--prompt_file={empty_prompt}"],
                                  ["{empty_prompt}", "is empty"]),
    "text_folder_of_one_empty_file": (["perplexity", "--model={run}", "--data=dataset=local_text",
                                       "--data=local_text.path={only_empty}"],
                                      ["{only_empty}/a.txt", "is empty"]),
    "text_file_not_utf8": (["perplexity", "--model={run}", "--data=dataset=local_text",
                            "--data=local_text.path={latin1_text}", "--data=local_text.validation_fraction=0.0",
                            "--split=train"],
                           ["{latin1_text}/bad.txt", "not valid UTF-8", "byte 3", "re-encode"]),
    "text_folder_missing": (["perplexity", "--model={run}", "--data=dataset=local_text",
                             "--data=local_text.path={nowhere}"], ["{nowhere}", "is not a folder"]),
    "text_split_without_files": (["perplexity", "--model={run}", "--data=dataset=local_text",
                                  "--data=local_text.path={one_file}", "--split=validation"],
                                 ["{one_file}", "split 'validation'", "validation_fraction"]),
}


@pytest.mark.parametrize("case", list(EVALS_CASES))
def test_evals_user_error_is_one_line(inputs, tmp_path, case):
    args, words = EVALS_CASES[case]
    command, *rest = [a.format(**inputs) for a in args]
    out = cli("famjax.evals", command, f"--out={tmp_path / 'out'}", f"--data=data_dir={inputs['data_dir']}", *rest)
    assert_one_line(out, "famjax.evals", *[w.format(**inputs) for w in words])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_the_traceback(inputs, how):
    args = ["--workdir", inputs["no_checkpoints"], "--prompt=hi"]
    out = cli("famjax.generate", *args, *(["--verbose"] if how == "flag" else []),
              env_extra={"FAMJAX_VERBOSE": "1"} if how == "env" else None)
    assert out.returncode == 1, out.stderr
    assert "Traceback (most recent call last)" in out.stderr
    assert "famjax.errors.CheckpointNotFoundError: no checkpoints in" in out.stderr.splitlines()[-1]


# ------------------------------------------------------------------------------------------------ in-process
def _text_cfg(data_dir, path, **local_text):
    cfg = fd.default_config()
    cfg.update(dataset="local_text", data_dir=str(data_dir), seq_len=32, batch_size=1, prefetch_batches=0,
               read_threads=0)
    cfg.local_text.path = str(path)
    cfg.local_text.update(local_text)
    return cfg


@pytest.mark.parametrize("folder,split,words", [
    ("only_empty", None, ["a.txt", "is empty"]),
    ("latin1_text", None, ["bad.txt", "not valid UTF-8", "byte 3", "re-encode it as UTF-8"]),
    ("nowhere", None, ["nowhere", "is not a folder", "does not exist"]),
    ("one_file", "validation", ["one_file", "falls in split 'validation'"]),
])
def test_trainer_data_errors_are_data_errors(inputs, tmp_path, folder, split, words):
    """What the trainer meets through famjax.data.make_iterator: a DataError (a ValueError), one line."""
    extra = {"validation_fraction": 0.0} if folder == "latin1_text" else {}
    with pytest.raises(DataError) as e:
        fd.make_iterator(_text_cfg(tmp_path, inputs[folder], **extra), block_size=16, process_index=0,
                         process_count=1, split=split)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_single_file_folder_trains(inputs, tmp_path):
    """One file lands in train (tfds refuses empty splits: the empty validation split is not written)."""
    it = fd.make_iterator(_text_cfg(tmp_path, inputs["one_file"]), block_size=16, process_index=0,
                          process_count=1)
    assert next(it)["tokens"].shape == (1, 32)
    it.close()


@pytest.mark.parametrize("kind,name", [("sentencepiece", "sentencepiece"), ("hf", "hf"), ("gguf", "gguf"),
                                       ("sentencepiece", "sentencepiece_missing"), ("word", "missing_word")])
def test_tokenizer_file_errors_name_the_file_and_kind(inputs, kind, name):
    path = inputs.get(f"tok_{name}_file") or inputs["nowhere"] + ".txt"
    cfg = fd.default_config().tokenizer
    cfg.update(kind=kind, path=path)
    with pytest.raises(TokenizerError) as e:
        make_tokenizer(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and path in msg, msg
    assert {"sentencepiece": "SentencePiece", "hf": "tokenizer.json", "gguf": "GGUF", "word": "word"}[kind] in msg


def test_config_and_checkpoint_errors_keep_their_builtin_types(inputs):
    cfg = fd.default_config()
    cfg.batching = "rows"
    with pytest.raises(ConfigError, match=r"data.batching must be one of"):
        fd.validate(cfg)
    with pytest.raises(CheckpointNotFoundError, match="train first") as e:
        restore.restore_model(inputs["no_checkpoints"])
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, FamjaxError)
    with pytest.raises(ConfigError, match="unknown field fam.inflate"):
        restore.load_config(inputs["removed_field"])
