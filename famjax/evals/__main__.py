"""famjax evaluations from the command line.

    python -m famjax.evals passkey --model=fam=runs/fam --model=bswa=runs/bswa --multipliers=1,4,16 \
        --limit=50 --out=evals/passkey
    python -m famjax.evals perplexity --model=fam=runs/fam --model=bswa=runs/bswa \
        --data=dataset=local_text --data=local_text.path=~/books --split=validation --out=evals/ppl
    python -m famjax.evals inspect --model=runs/fam --prompt_file=doc.txt --out=evals/inspect

--model is NAME=PATH or PATH (the name is then the folder's name); PATH is a workdir or checkpoint folder.
PATH and --out may be gs:// folders (famjax.paths; results are written locally and copied there at the end).
The data section comes from the first model's run config; --data=KEY=VALUE overrides a field of it.
A user error (a path without checkpoints, an unknown --data field, an empty prompt or text folder) is one line
on stderr and exit code 2; --verbose (or FAMJAX_VERBOSE=1) shows its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import os

import numpy as np

from famjax import paths
from famjax.cli import VERBOSE_HELP, user_errors
from famjax.errors import ConfigError, WorkdirError
from famjax.evals import run
from famjax.infer import load


def _specs(specs: list[str]) -> dict[str, str]:
    """Returns {name: path} of NAME=PATH / PATH specs (the name is then the folder's name)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if name in out:
            raise ConfigError(f"--model name {name!r} given twice; use NAME=PATH")
        out[name] = path
    return out


def _models(specs: list[str]) -> tuple[dict, object]:
    """Returns ({name: model}, run config of the first model) from NAME=PATH / PATH specs."""
    models, first = {}, None
    for name, path in _specs(specs).items():
        models[name], config = load.load_model(path)
        first = config if first is None else first
    return models, first


def _check_models(specs: list[str]):
    """Returns the run config of the first model after checking that every path holds a config and a checkpoint
    (one-line errors before any model is built or data prepared)."""
    configs = [load.check_run(path) for path in _specs(specs).values()]
    return configs[0]


def _override(data_cfg, items: list[str]):
    """Returns a copy of data_cfg with KEY=VALUE overrides (dotted keys, typed like the current value).

    Raises ConfigError (one line naming the item) on an unknown key or a value of the wrong type.
    """
    data_cfg = data_cfg.copy_and_resolve_references()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--data must be KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node, where = data_cfg, "data"
        for p in [*parents, leaf]:
            if not hasattr(node, "keys") or p not in node:
                near = difflib.get_close_matches(p, list(node.keys()) if hasattr(node, "keys") else [], n=1)
                hint = f" (did you mean {where}.{near[0]}?)" if near else ""
                raise ConfigError(f"--data {item!r}: {where} has no field {p!r}{hint}")
            if p != leaf:
                node, where = node[p], f"{where}.{p}"
        current = node[leaf]
        if hasattr(current, "keys"):
            raise ConfigError(f"--data {item!r}: data.{key} is a section; set one of its fields "
                              f"({', '.join(sorted(current.keys()))})")
        try:
            if current is None:
                node[leaf] = value
            elif isinstance(current, bool):
                if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(value)
                node[leaf] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, (tuple, list)):
                node[leaf] = tuple(type(current[0])(v) if current else int(v) for v in value.split(","))
            else:
                node[leaf] = type(current)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--data {item!r}: data.{key} takes {_kind(current)}, got {value!r}") from None
    return data_cfg


def _kind(value) -> str:
    """'an integer', 'a list of integers', ... (what a --data value must be)."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, (tuple, list)):
        item = names.get(type(value[0]) if value else int, "values").removeprefix("an ").removeprefix("a ")
        return f"a comma-separated list of {item}s"
    return names.get(type(value), f"a {type(value).__name__}")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    """The comma-separated integers of a flag; raises ConfigError naming the flag."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m famjax.evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", action="append", required=True, help="NAME=PATH or PATH (repeatable)")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--chunk_size", type=int, default=1024, help="tokens per model call")
    common.add_argument("--data", action="append", default=[], help="KEY=VALUE override of the data section")
    # Also after the subcommand; SUPPRESS keeps a subcommand without it from resetting the top-level value.
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)

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
    with user_errors("famjax.evals", verbose=args.verbose):
        _main(args)


def _main(args) -> None:
    # Every check that needs no model runs first: a user error costs one line, not a model load.
    if args.command == "inspect" and len(args.model) != 1:
        raise ConfigError(f"inspect takes one --model, got {len(args.model)}")
    if paths.is_remote(args.out):
        paths.check_reachable(args.out)
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise WorkdirError(f"--out {args.out} is a file: give a folder for the results")
    config = _check_models(args.model)
    with paths.local_folder(args.out) as out:  # a gs:// --out: written locally, copied there at the end
        _run(args, config, out)


def _run(args, config, out: str) -> None:
    """Runs the command, writing its results under the local folder `out`."""
    data_cfg = _override(config.data, args.data)
    if args.command == "passkey":
        mults = _ints("--multipliers", args.multipliers) or None
        models, _ = _models(args.model)
        run.run_passkey(models, data_cfg, out, multipliers=mults, limit=args.limit,
                        chunk_size=args.chunk_size, batch_size=args.batch_size)
    elif args.command == "perplexity":
        from famjax.evals.perplexity import text_documents

        docs = list(text_documents(data_cfg, args.split or data_cfg.eval_split, limit=args.limit))
        models, _ = _models(args.model)
        run.run_perplexity(models, docs, out, chunk_size=args.chunk_size, max_tokens=args.max_tokens,
                           first_bucket=args.first_bucket)
    else:
        detail = _ints("--detail_blocks", args.detail_blocks)
        text = load.read_prompt(args.prompt, args.prompt_file)
        tok = load.tokenizer_for(config)
        ids = np.asarray(tok.encode(text), np.int32)
        if tok.bos_id is not None:
            ids = np.concatenate([[tok.bos_id], ids]).astype(np.int32)
        models, _ = _models(args.model)
        model = next(iter(models.values()))
        written = run.run_inspect(model, ids[:args.max_tokens], out, detail_blocks=list(detail),
                                  chunk_blocks=max(1, args.chunk_size // model.cfg.block_size))
        print("\n".join(args.out.rstrip("/") + p[len(out):] if out != args.out else p for p in written))


if __name__ == "__main__":
    main()
