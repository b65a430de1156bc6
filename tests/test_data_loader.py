"""make_iterator end to end: resume, hosts, seeds, local_text, catalog datasets, config errors."""
import json
import os
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

import famjax.data as fd
from famjax.data import catalog

BLOCK = 8


def passkey_cfg(data_dir, **over):
    cfg = fd.default_config()
    cfg.data_dir = str(data_dir)
    cfg.tokenizer.kind = "word"
    cfg.passkey.update(train_filler_min=10, train_filler_max=30, train_examples=60, validation_examples=10,
                       eval_multipliers=(1,), eval_examples=4, loss_weight_other=0.1)
    cfg.seq_len, cfg.batch_size = 160, 4
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for i in range(24):
        sub = d / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        n = int(rng.integers(5, 80))
        (sub / f"doc{i:02d}.txt").write_text(f"doc{i:02d} " + " ".join(rng.choice(words, n)))
    (d / "ignored.md").write_text("not a txt file")
    return d


def text_cfg(data_dir, folder, **over):
    cfg = fd.default_config()
    cfg.data_dir = str(data_dir)
    cfg.dataset = "local_text"
    cfg.local_text.path = str(folder)
    cfg.local_text.validation_fraction = 0.25
    cfg.seq_len, cfg.batch_size = 16, 4
    cfg.update(over)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("kind", ["passkey", "local_text"])
def test_resume_take_n_save_take_m_restore_take_m(tmp_path, text_dir, kind):
    cfg = passkey_cfg(tmp_path) if kind == "passkey" else text_cfg(tmp_path, text_dir)
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=1, process_count=2)
    take(it, 7)  # crosses an epoch boundary for local_text
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
    after = take(it, 9)
    it.close()
    cfg.prefetch_batches, cfg.read_threads = 0, 0  # resuming may change these freely
    it2 = fd.make_iterator(cfg, block_size=BLOCK, process_index=1, process_count=2)
    it2.set_state(state)
    assert_same(after, take(it2, 9))
    other = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="different data config"):
        other.set_state(state)


@pytest.mark.parametrize("kind", ["passkey", "local_text"])
def test_preparing_a_dataset_leaves_nothing_in_the_temp_dir(tmp_path, text_dir, kind, monkeypatch):
    """tfds creates, and never removes, a temporary folder to look for a fresh builder's metadata on GCS;
    famjax's builders skip that lookup."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    cfg = passkey_cfg(tmp_path / "data") if kind == "passkey" else text_cfg(tmp_path / "data", text_dir)
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    next(it)
    it.close()
    assert os.listdir(tmp) == []


def test_passkey_batches_for_the_trainer(tmp_path):
    cfg = passkey_cfg(tmp_path)
    b = next(fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1))
    assert b["tokens"].shape == (4, 160) and b["segment_start"].shape == (4, 160)
    assert b["tokens"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["segment_start"].dtype == bool
    # answer weight 1 on exactly 5 digits per example, 0.1 on the other real targets, 0 on padding
    n_examples = int(b["segment_start"].sum())
    assert int(b["answer_mask"].sum()) == 5 * n_examples and np.all(b["loss_mask"][b["answer_mask"]] == 1.0)
    others = b["loss_mask"][~b["answer_mask"]]
    assert set(np.unique(others).tolist()) <= {0.0, np.float32(0.1)}
    tok = fd.make_tokenizer(cfg)
    for r in range(4):
        ans = b["targets"][r][b["answer_mask"][r]]
        assert all(tok.decode(ans[i:i + 5]).isdigit() for i in range(0, len(ans), 5))


def test_passkey_chain_streams_joined_examples_train_split_only(tmp_path):
    cfg = passkey_cfg(tmp_path, seq_len=40, batch_size=2)  # examples (79-99 tokens) span several steps
    cfg.passkey.chain = 3
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    assert it.batching == "stream"
    examples = list(fd.passkey_examples(cfg, "train"))
    by_tokens = {tuple(ex["tokens"]) for ex in examples}
    # Follow row 0 through its first document: segment_start only at its first step, tokens run on.
    first = next(it)
    assert first["segment_start"].tolist() == [True, True]
    doc = [first["tokens"][0]]
    answers = int(first["answer_mask"][0].sum())
    while True:
        b = next(it)
        if b["segment_start"][0]:
            break
        doc.append(b["tokens"][0])
        answers += int(b["answer_mask"][0].sum())
    doc = np.concatenate(doc)
    tok = fd.make_tokenizer(cfg)
    starts = np.flatnonzero(doc == tok.bos_id)
    assert len(starts) == 3 and answers == 3 * 5  # three whole examples, each with its 5 answer digits
    pieces = np.split(doc, list(starts[1:]) + [int(np.max(np.flatnonzero(doc != tok.pad_id))) + 1])[:3]
    assert all(tuple(p) in by_tokens for p in pieces)
    # Evaluation splits stay single examples in packed rows.
    cfg.seq_len = 104
    assert fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1,
                            split="validation").batching == "packed"
    cfg.batching = "packed"
    with pytest.raises(ValueError, match="data.passkey.chain > 1"):
        fd.validate(cfg)
    cfg.batching, cfg.passkey.chain = "auto", 0
    with pytest.raises(ValueError, match="data.passkey.chain must be"):
        fd.validate(cfg)


def test_same_seed_same_batches_other_seed_other(tmp_path):
    def first(seed):
        cfg = passkey_cfg(tmp_path, seed=seed)
        return take(fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1), 3)

    assert_same(first(1), first(1))
    assert not np.array_equal(first(1)[0]["tokens"], first(2)[0]["tokens"])


def _epoch_ids(cfg, pi, pc, split):
    """Returns the PassKey keys / document first words one host reads in one epoch."""
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=pi, process_count=pc, split=split,
                          num_epochs=1)
    tok = it.tokenizer
    out = []
    for b in it:
        if it.batching == "stream":
            starts = np.nonzero(b["segment_start"])[0]
            out += [tok.decode(b["tokens"][r][:8]).split()[0] for r in starts]
        else:
            for r, s in zip(*np.nonzero(b["segment_start"])):
                ans = b["targets"][r, s:][b["answer_mask"][r, s:]][:5]
                out.append(tok.decode(ans))
    return out


@pytest.mark.parametrize("kind", ["passkey", "local_text"])
def test_two_hosts_read_disjoint_shards_that_cover_the_data(tmp_path, text_dir, kind):
    cfg = passkey_cfg(tmp_path) if kind == "passkey" else text_cfg(tmp_path, text_dir)
    split = "train"
    a, b = _epoch_ids(cfg, 0, 2, split), _epoch_ids(cfg, 1, 2, split)
    everything = _epoch_ids(cfg, 0, 1, split)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(everything) and len(everything) == len(set(everything))
    if kind == "passkey":
        assert len(everything) == 60
    else:
        n_val = len(_epoch_ids(cfg, 0, 1, "validation"))
        assert len(everything) + n_val == 24 and n_val > 0


def test_local_text_documents_whole_and_split_by_hash(tmp_path, text_dir):
    cfg = text_cfg(tmp_path, text_dir, seq_len=64, batch_size=2, shuffle=False)
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1, split="validation",
                          num_epochs=1)
    assert it.batching == "stream"
    tok = it.tokenizer
    docs, cur = {}, {}
    for b in it:
        for r in range(2):
            if b["doc_index"][r] < 0:
                continue
            if b["segment_start"][r]:
                cur[r] = []
            cur[r].append(b["tokens"][r])
            text = tok.decode(np.concatenate(cur[r]))
            docs[text.split()[0]] = text
    for name, text in docs.items():  # every document comes back whole, byte for byte
        path = next(text_dir.rglob(f"{name}.txt"))
        assert text == path.read_text()
        assert catalog.local_text.is_validation(os.path.relpath(path, text_dir), 0.25)


def test_local_text_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"local_text.path: no files match '\*\*/\*.txt' under .*empty"):
        fd.make_iterator(text_cfg(tmp_path / "d", empty), block_size=BLOCK, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"local_text.path: .*nowhere.* is not a folder"):
        fd.make_iterator(text_cfg(tmp_path / "d", tmp_path / "nowhere"), block_size=BLOCK, process_index=0,
                         process_count=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt.* is not valid UTF-8.*encoding_errors"):
        fd.make_iterator(text_cfg(tmp_path / "d", bad), block_size=BLOCK, process_index=0, process_count=1)
    (bad / "latin1.txt").unlink()
    os.symlink(tmp_path / "gone.txt", bad / "dangling.txt")
    with pytest.raises(ValueError, match=r"cannot read file .*dangling.txt"):
        fd.make_iterator(text_cfg(tmp_path / "d", bad), block_size=BLOCK, process_index=0, process_count=1)


def test_config_errors_name_the_field(tmp_path):
    cfg = passkey_cfg(tmp_path)
    cases = [
        ({"dataset": "pg20"}, r"data.dataset must be one of \('passkey', 'local_text', 'pg19'.*got 'pg20'"),
        ({"data_dir": ""}, "data.data_dir is required"),
        ({"batch_size": 6}, "data.batch_size must be divisible by the process count 4, got 6"),
        ({"seq_len": 100}, "data.seq_len must be a multiple of block_size 8, got 100"),
        ({"batching": "rows"}, r"data.batching must be one of \('auto', 'packed', 'stream'\)"),
    ]
    for over, msg in cases:
        bad = passkey_cfg(tmp_path)
        bad.update(over)
        with pytest.raises(ValueError, match=msg):
            fd.validate(bad, process_count=4, block_size=8)
    bad = passkey_cfg(tmp_path)
    bad.passkey.key_position = "middle"
    msg = r"data.passkey.key_position must be one of \('start', 'uniform', 'end'\)"
    with pytest.raises(ValueError, match=msg):
        fd.validate(bad)
    with pytest.raises(ValueError, match="more than data.seq_len 32"):
        fd.make_iterator(passkey_cfg(tmp_path, seq_len=32), block_size=8, process_index=0, process_count=1)
    fd.validate(cfg, process_count=4, block_size=8)  # the good config passes
    assert "dataset" in fd.default_config() and fd.default_config().tokenizer.kind == "byte"


# --- catalog datasets ---------------------------------------------------------------------------------

def _prepare_fake_lm1b(data_dir):
    """Writes an array_record 'lm1b' the way `tfds build lm1b --file_format=array_record` lays it out."""
    with tfds.core.registered.skip_registration():
        class Lm1b(tfds.core.GeneratorBasedBuilder):
            name = "lm1b"
            VERSION = tfds.core.Version("1.1.0")
            code_path = None

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(20), "test": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"text": f"sentence number {i} " + "x" * i}

    b = Lm1b(data_dir=str(data_dir), file_format="array_record")
    b.download_and_prepare()
    return b.data_dir


def test_catalog_array_record_reads_without_tensorflow(tmp_path):
    _prepare_fake_lm1b(tmp_path)
    cfg = passkey_cfg(tmp_path, dataset="lm1b", seq_len=64, batch_size=2)
    cfg.tokenizer.kind = "byte"
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1, split="test")
    assert it.batching == "packed"
    texts = []
    for b in it:
        for r, s in zip(*np.nonzero(b["segment_start"])):
            n = int(np.argmax(b["tokens"][r, s:] == 2))  # up to eos
            texts.append(it.tokenizer.decode(b["tokens"][r, s:s + n]))
    assert sorted(texts) == sorted(f"sentence number {i} " + "x" * i for i in range(4))


def test_catalog_missing_and_tfrecord_forms(tmp_path, monkeypatch):
    cfg = passkey_cfg(tmp_path / "nowhere", dataset="pg19")
    with pytest.raises(ValueError, match=r"data_dir .*nowhere.* does not exist"):
        fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    cfg = passkey_cfg(tmp_path, dataset="pg19")
    with pytest.raises(ValueError, match=r"'pg19' is not prepared .*tfds build pg19 --data_dir=.* "
                                         r"--file_format=array_record"):
        fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    vdir = _prepare_fake_lm1b(tmp_path)
    info_path = os.path.join(vdir, "dataset_info.json")
    with open(info_path) as fh:
        info = json.load(fh)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as fh:
        json.dump(info, fh)
    cfg = passkey_cfg(tmp_path, dataset="lm1b", seq_len=64, batch_size=2)
    monkeypatch.setattr(catalog, "_tensorflow_available", lambda: False)
    with pytest.raises(ValueError, match=r"tfrecord form.*pip install famjax\[tf\]"):
        fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1, split="test")
    # With tensorflow present the copy is converted once (tfds's converter, faked here) and then read.
    converted = []

    def fake_convert(version_dir):
        converted.append(version_dir)
        info["fileFormat"] = "array_record"
        with open(info_path, "w") as fh:
            json.dump(info, fh)

    monkeypatch.setattr(catalog, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(catalog, "_convert_to_array_record", fake_convert)
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1, split="test")
    assert converted == [vdir] and int(next(it)["segment_start"].sum()) > 0


def test_state_goes_through_grains_orbax_checkpoint_handler(tmp_path):
    import grain

    cfg = passkey_cfg(tmp_path / "data")
    it = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()  # what orbax's grain checkpoint args use
    (tmp_path / "ckpt").mkdir()
    handler.save(tmp_path / "ckpt", item=it)
    after = take(it, 3)
    it2 = fd.make_iterator(cfg, block_size=BLOCK, process_index=0, process_count=1)
    handler.restore(tmp_path / "ckpt", item=it2)
    assert_same(after, take(it2, 3))
