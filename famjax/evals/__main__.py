"""famjax evaluations from the command line.

    python -m famjax.evals passkey --model=fam=runs/fam --model=bswa=runs/bswa --multipliers=1,4,16 \
        --limit=50 --out=evals/passkey
    python -m famjax.evals perplexity --model=fam=runs/fam --model=bswa=runs/bswa \
        --data=dataset=local_text --data=local_text.path=~/books --split=validation --out=evals/ppl
    python -m famjax.evals inspect --model=runs/fam --prompt_file=doc.txt --out=evals/inspect

--model is NAME=PATH or PATH (the name is then the folder's name); PATH is a workdir or checkpoint folder.
The data section comes from the first model's run config; --data=KEY=VALUE overrides a field of it.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from famjax.evals import run
from famjax.infer import load


def _models(specs: list[str]) -> tuple[dict, object]:
    """Returns ({name: model}, run config of the first model) from NAME=PATH / PATH specs."""
    models, first = {}, None
    for spec in specs:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if name in models:
            raise ValueError(f"--model name {name!r} given twice; use NAME=PATH")
        models[name], config = load.load_model(path)
        first = config if first is None else first
    return models, first


def _override(data_cfg, items: list[str]):
    """Returns a copy of data_cfg with KEY=VALUE overrides (dotted keys, typed like the current value)."""
    data_cfg = data_cfg.copy_and_resolve_references()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--data must be KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node = data_cfg
        for p in parents:
            node = node[p]
        current = node[leaf]
        if isinstance(current, bool):
            node[leaf] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, (tuple, list)):
            node[leaf] = tuple(type(current[0])(v) if current else int(v) for v in value.split(","))
        else:
            node[leaf] = type(current)(value)
    return data_cfg


def _text(args) -> str:
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    return args.prompt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m famjax.evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", action="append", required=True, help="NAME=PATH or PATH (repeatable)")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--chunk_size", type=int, default=1024, help="tokens per model call")
    common.add_argument("--data", action="append", default=[], help="KEY=VALUE override of the data section")

    pk = sub.add_parser("passkey", parents=[common], help="PassKey accuracy per filler length")
    pk.add_argument("--multipliers", default="", help="eval_xM splits, e.g. 1,4,16 (default: the config's)")
    pk.add_argument("--limit", type=int, default=None, help="examples per split")
    pk.add_argument("--batch_size", type=int, default=1)

    ppl = sub.add_parser("perplexity", parents=[common], help="long-document perplexity by position")
    ppl.add_argument("--split", default="", help="split (default: data.eval_split)")
    ppl.add_argument("--limit", type=int, default=8, help="documents")
    ppl.add_argument("--max_tokens", type=int, default=None, help="tokens read per document")
    ppl.add_argument("--first_bucket", type=int, default=64, help="width of the first position bucket")

    ins = sub.add_parser("inspect", parents=[common], help="FAM attention heatmaps and norms")
    text = ins.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--prompt_file")
    ins.add_argument("--max_tokens", type=int, default=4096)
    ins.add_argument("--detail_blocks", default="", help="blocks drawn per head, e.g. 0,5")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    models, config = _models(args.model)
    data_cfg = _override(config.data, args.data)
    if args.command == "passkey":
        mults = tuple(int(m) for m in args.multipliers.split(",")) if args.multipliers else None
        run.run_passkey(models, data_cfg, args.out, multipliers=mults, limit=args.limit,
                        chunk_size=args.chunk_size, batch_size=args.batch_size)
    elif args.command == "perplexity":
        from famjax.evals.perplexity import text_documents

        docs = text_documents(data_cfg, args.split or data_cfg.eval_split, limit=args.limit)
        run.run_perplexity(models, list(docs), args.out, chunk_size=args.chunk_size, max_tokens=args.max_tokens,
                           first_bucket=args.first_bucket)
    else:
        if len(models) != 1:
            raise ValueError("inspect takes one --model")
        tok = load.tokenizer_for(config)
        ids = np.asarray(tok.encode(_text(args)), np.int32)
        if tok.bos_id is not None:
            ids = np.concatenate([[tok.bos_id], ids]).astype(np.int32)
        model = next(iter(models.values()))
        paths = run.run_inspect(model, ids[:args.max_tokens], args.out,
                                detail_blocks=[int(b) for b in args.detail_blocks.split(",") if b],
                                chunk_blocks=max(1, args.chunk_size // model.cfg.block_size))
        print("\n".join(paths))


if __name__ == "__main__":
    main()
