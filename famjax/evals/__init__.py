"""famjax evaluations, as notebook-friendly functions (the CLI is `python -m famjax.evals`).

    from famjax import evals
    scores = evals.evaluate_passkey(model, [(prompt, answer), ...], chunk_size=1024)
    rows = evals.compare_passkey({"fam": fam, "bswa": bswa}, {"x1": examples_1, "x16": examples_16})
    evals.plot_passkey_accuracy(rows)                              # a matplotlib Figure
    table = evals.perplexity_by_position(model, documents, chunk_size=1024)
    diag = evals.inspect_fam(model, tokens); evals.save_fam_plots(diag, "out/")
"""
from famjax.evals.fam_inspect import inspect_fam, save_fam_plots
from famjax.evals.passkey import (
    PassKeyScore,
    accuracy_by_length,
    compare_passkey,
    evaluate_passkey,
    exact_match,
    passkey_split_examples,
    write_rows,
)
from famjax.evals.perplexity import (
    bucket_sums,
    doubling_edges,
    format_table,
    perplexity_by_position,
    text_documents,
)
from famjax.evals.plots import (
    plot_fam_block,
    plot_fam_norms,
    plot_fam_readers,
    plot_fam_reads,
    plot_passkey_accuracy,
    plot_perplexity_by_position,
    save_png,
)

__all__ = ["PassKeyScore", "accuracy_by_length", "bucket_sums", "compare_passkey", "doubling_edges",
           "evaluate_passkey", "exact_match", "format_table", "inspect_fam", "passkey_split_examples",
           "perplexity_by_position", "plot_fam_block", "plot_fam_norms", "plot_fam_readers", "plot_fam_reads",
           "plot_passkey_accuracy", "plot_perplexity_by_position", "save_fam_plots", "save_png",
           "text_documents", "write_rows"]
