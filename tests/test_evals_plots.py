"""Plot functions write PNGs of the requested pixel size; FAM inspection streams in chunks of blocks."""
import numpy as np
import pytest
from model_utils import make_model, random_tokens
from PIL import Image

from famjax import evals

L, b, nb, H, F, B = 2, 2, 5, 4, 3, 4


def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.random((L, b, nb, H, F, F + B))
    return {"fam_probs": probs / probs.sum(-1, keepdims=True),
            "token_fam_mass": rng.random((L, b, nb, B, H)),
            "fam_norm": rng.random((L, b, nb, F)) * 10}


def _size(path):
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("width, height", [(640, 480), (333, 211)])
def test_plots_have_requested_pixels(tmp_path, width, height):
    diag = _synthetic()
    rows = [{"model": m, "length": n, "accuracy": a} for m in ("fam", "bswa")
            for n, a in ((100, 1.0), (1000, 0.5), (10_000, 0.0))]
    ppl = {"fam": [{"lo": 1, "hi": 64, "perplexity": 9.0}, {"lo": 64, "hi": 128, "perplexity": 7.5}]}
    figs = {"passkey": evals.plot_passkey_accuracy(rows, width=width, height=height),
            "ppl": evals.plot_perplexity_by_position(ppl, width=width, height=height),
            "reads": evals.plot_fam_reads(diag["fam_probs"], width=width, height=height),
            "readers": evals.plot_fam_readers(diag["token_fam_mass"], row=1, width=width, height=height),
            "norms": evals.plot_fam_norms(diag["fam_norm"], width=width, height=height),
            "block": evals.plot_fam_block(diag["fam_probs"], layer=1, block=2, width=width, height=height)}
    for name, fig in figs.items():
        path = evals.save_png(fig, str(tmp_path / "sub" / f"{name}.png"))
        assert _size(path) == (width, height), name


def test_save_fam_plots_writes_every_file(tmp_path):
    paths = evals.save_fam_plots(_synthetic(), str(tmp_path), prefix="x_", detail_blocks=(0, 4), width=400,
                                 height=300)
    assert len(paths) == 3 + 2 * L
    assert all(_size(p) == (400, 300) for p in paths)


def test_wrong_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"fam_probs must be \[L, b, nb, H, F, F \+ B\]"):
        evals.plot_fam_reads(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="at least 50"):
        evals.plot_fam_norms(np.zeros((L, b, nb, F)), width=10)


def test_inspect_fam_in_chunks_equals_one_call():
    model, cfg, _ = make_model(seed=9, attention="fam", block_size=B, memory_blocks=1, fam_len=F, num_heads=H)
    tokens = random_tokens(b, 6 * B + 3, cfg.vocab_size, seed=4)  # a trailing partial block is dropped
    whole = evals.inspect_fam(model, tokens, chunk_blocks=6)
    parts = evals.inspect_fam(model, tokens, chunk_blocks=3)
    assert whole["fam_probs"].shape == (cfg.num_layers, b, 6, H, F, F + B)
    assert whole["token_fam_mass"].shape == (cfg.num_layers, b, 6, B, H)
    assert whole["fam_norm"].shape == (cfg.num_layers, b, 6, F)
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], atol=1e-5, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(whole["fam_probs"].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="whole block"):
        evals.inspect_fam(model, tokens[:, :B - 1])
