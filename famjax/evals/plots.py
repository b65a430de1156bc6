"""Matplotlib figures of the evals: PassKey accuracy, perplexity by position, FAM inspection heatmaps.

Every function returns a `matplotlib.figure.Figure` of exactly width x height pixels at `dpi` (a notebook
shows it as is) built without pyplot, so no global state or GUI backend is involved; `save_png` writes it.
FAM inspection arrays follow the contract of `FamLM.inspect` (shapes in each docstring).
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WIDTH, HEIGHT, DPI = 960, 600, 100


def new_figure(width: int = WIDTH, height: int = HEIGHT, dpi: int = DPI) -> Figure:
    """Returns an empty Agg-backed figure of width x height pixels."""
    if width < 50 or height < 50 or dpi < 10:
        raise ValueError(f"figure must be at least 50 x 50 pixels at dpi >= 10, got {width}x{height} @ {dpi}")
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str) -> str:
    """Writes fig as a PNG at its own size (no tight bbox, so the pixel size is what was asked); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    return path


def _grid(fig: Figure, n: int):
    cols = min(n, 4)
    rows = -(-n // cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _finish_log_x(fig: Figure, ax, xlabel: str, ylabel: str, title: str) -> Figure:
    """Returns fig after giving its one-axes line plot a log x axis, labels, grid and legend."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_passkey_accuracy(rows: list[dict], *, title: str = "PassKey retrieval", **size) -> Figure:
    """Returns accuracy vs filler length (log x), one line per model.

    rows: dicts with 'model', 'length', 'accuracy' (as from famjax.evals.passkey.compare_passkey).
    """
    fig = new_figure(**size)
    ax = fig.add_subplot(1, 1, 1)
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["length"], r["accuracy"]) for r in rows if r["model"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_ylim(-0.05, 1.05)
    return _finish_log_x(fig, ax, "filler length (tokens)", "exact-match accuracy", title)


def plot_perplexity_by_position(results: dict[str, list[dict]], *, title: str = "Perplexity by position",
                                **size) -> Figure:
    """Returns perplexity vs position bucket (log x), one line per model.

    results: model name -> rows {'lo', 'hi', 'perplexity'} (famjax.evals.perplexity.perplexity_by_position);
    each bucket is drawn at its geometric middle.
    """
    fig = new_figure(**size)
    ax = fig.add_subplot(1, 1, 1)
    for name, rows in results.items():
        x = [np.sqrt(r["lo"] * r["hi"]) for r in rows]
        ax.plot(x, [r["perplexity"] for r in rows], marker="o", label=name)
    return _finish_log_x(fig, ax, "tokens read before the predicted token", "perplexity", title)


def _check(name: str, x, ndim: int, layout: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {x.shape}")
    return x


def plot_fam_reads(fam_probs, *, row: int = 0, **size) -> Figure:
    """Returns, per layer, what the FAM reads at each update: heatmap [blocks, F + B] (mean over heads and
    FAM queries) of the attention of the FAM queries over [previous FAM | the block's tokens].

    fam_probs: [L, b, nb, H, F, F + B]; row: which batch row.
    """
    p = _check("fam_probs", fam_probs, 6, "[L, b, nb, H, F, F + B]")[:, row]
    num_fam = p.shape[3]
    fig = new_figure(**size)
    for layer, ax in enumerate(_grid(fig, p.shape[0])):
        im = ax.imshow(p[layer].mean(axis=(1, 2)), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.axvline(num_fam - 0.5, color="white", linewidth=1)  # FAM columns | block columns
        ax.set_title(f"layer {layer}: FAM reads")
        ax.set_xlabel(f"key: FAM 0..{num_fam - 1} | block token 0..{p.shape[4] - num_fam - 1}")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_fam_block(fam_probs, *, layer: int, block: int, row: int = 0, **size) -> Figure:
    """Returns one FAM update in detail: per head, heatmap [F queries, F + B keys].

    fam_probs: [L, b, nb, H, F, F + B].
    """
    p = _check("fam_probs", fam_probs, 6, "[L, b, nb, H, F, F + B]")[layer, row, block]
    fig = new_figure(**size)
    for h, ax in enumerate(_grid(fig, p.shape[0])):
        ax.imshow(p[h], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
        ax.axvline(p.shape[1] - 0.5, color="white", linewidth=1)
        ax.set_title(f"layer {layer} block {block} head {h}")
        ax.set_xlabel("key (FAM | block)")
        ax.set_ylabel("FAM query")
    fig.tight_layout()
    return fig


def plot_fam_readers(token_fam_mass, *, row: int = 0, **size) -> Figure:
    """Returns, per layer, who reads the FAM: heatmap [blocks, B] of each token's attention mass on the FAM
    rows (mean over heads).

    token_fam_mass: [L, b, nb, B, H].
    """
    m = _check("token_fam_mass", token_fam_mass, 5, "[L, b, nb, B, H]")[:, row]
    fig = new_figure(**size)
    for layer, ax in enumerate(_grid(fig, m.shape[0])):
        im = ax.imshow(m[layer].mean(axis=-1), aspect="auto", interpolation="nearest", cmap="magma",
                       vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}: token mass on FAM")
        ax.set_xlabel("token in block")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_fam_norms(fam_norm, *, row: int = 0, **size) -> Figure:
    """Returns FAM row norms over blocks: per layer the mean over the F rows, shaded between min and max.

    fam_norm: [L, b, nb, F]. A norm that grows without bound over blocks is the failure to watch for.
    """
    n = _check("fam_norm", fam_norm, 4, "[L, b, nb, F]")[:, row]
    fig = new_figure(**size)
    ax = fig.add_subplot(1, 1, 1)
    blocks = np.arange(1, n.shape[1] + 1)
    for layer in range(n.shape[0]):
        line, = ax.plot(blocks, n[layer].mean(axis=-1), label=f"layer {layer}")
        ax.fill_between(blocks, n[layer].min(axis=-1), n[layer].max(axis=-1), alpha=0.2,
                        color=line.get_color())
    ax.set_xlabel("FAM update (block)")
    ax.set_ylabel("FAM row norm")
    ax.set_title("FAM norms per layer (mean, min-max band)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
