"""Generate text from a trained famjax model, streamed as it is produced.

    python -m famjax.generate --workdir=runs/x --prompt="Once upon a time" --max_new_tokens=200
    python -m famjax.generate --checkpoint=runs/x/checkpoints/1000 --prompt_file=book.txt --temperature=0.8

The prompt may be any length: it is streamed through the model in chunks (--chunk_size) with constant
memory. Generation stops at the tokenizer's eos (unless --no_stop_at_eos) or after --max_new_tokens.

A user error (a missing or empty prompt file, a workdir without checkpoints, a bad flag) is one line on
stderr and exit code 2; --verbose (or FAMJAX_VERBOSE=1) shows its traceback.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from famjax import infer
from famjax.cli import VERBOSE_HELP, user_errors
from famjax.errors import ConfigError, DataError


class TextStreamer:
    """Writes the decoded continuation to `out` as tokens arrive (row 0 of the batch).

    Decodes the whole continuation each time and writes the new suffix, holding back a trailing
    replacement character: a multi-byte character split over tokens must not print as garbage.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, tokens: np.ndarray, emitted: np.ndarray) -> None:
        if not emitted[0]:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.written:])
            self.out.flush()
            self.written = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.written:] + "\n")
        self.out.flush()


def run(model, tokenizer, text: str, *, max_new_tokens: int = 256, sampling: infer.Sampling = infer.GREEDY,
        seed: int = 0, chunk_size: int = 1024, add_bos: bool = True, stop_at_eos: bool = True,
        out=sys.stdout) -> infer.Generation:
    """Returns the Generation of `text`'s continuation, written to `out` as it is produced."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if add_bos and tokenizer.bos_id is not None:
        ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
    if ids.size == 0:
        raise DataError("the prompt encodes to no tokens and no bos token goes before it (--no_bos, or a tokenizer "
                        "without one): give a longer prompt")
    stops = [tokenizer.eos_id] if stop_at_eos and tokenizer.eos_id is not None else None
    streamer = TextStreamer(tokenizer, out)
    gen = infer.generate(model, [ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                         stop_tokens=stops, chunk_size=chunk_size, on_token=streamer)
    streamer.finish()
    return gen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m famjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run folder (newest checkpoint)")
    src.add_argument("--checkpoint", help="one checkpoint folder")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text")
    text.add_argument("--prompt_file", help="file holding the prompt text (UTF-8)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = no limit")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk_size", type=int, default=1024, help="prompt tokens per model call")
    p.add_argument("--no_bos", action="store_true", help="do not prepend the bos token")
    p.add_argument("--no_stop_at_eos", action="store_true", help="keep generating after eos")
    p.add_argument("--stats", action="store_true", help="print timings to stderr at the end")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p.parse_args(argv)


def _check_flags(args) -> infer.Sampling:
    """Returns the Sampling of the flags; raises ConfigError (one line naming the flag) on an impossible one."""
    try:
        sampling = infer.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:  # "temperature must be ...": the flag's name
        raise ConfigError(f"--{e}") from None
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise ConfigError(f"--chunk_size must be >= 1, got {args.chunk_size}")
    return sampling


def main(argv=None) -> None:
    args = parse_args(argv)
    with user_errors("famjax.generate", verbose=args.verbose):
        sampling = _check_flags(args)
        # Everything a user can get wrong is checked before the model is built: prompt, run, tokenizer.
        text = infer.load.read_prompt(args.prompt, args.prompt_file)
        path = args.workdir or args.checkpoint
        tokenizer = infer.load.tokenizer_for(infer.load.check_run(path))
        model, _ = infer.load.load_model(path)
        if sampling.top_k > model.cfg.vocab_size:
            raise ConfigError(f"--top_k must be <= the model's vocab_size {model.cfg.vocab_size}, "
                              f"got {sampling.top_k}")
        gen = run(model, tokenizer, text, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                  chunk_size=args.chunk_size, add_bos=not args.no_bos, stop_at_eos=not args.no_stop_at_eos)
    if args.stats:
        n = len(gen.tokens[0])
        print(f"[prefill {gen.prefill_seconds:.2f}s, {n} tokens in {gen.decode_seconds:.2f}s, "
              f"finish: {gen.finish_reason[0]}, state {gen.state.nbytes() / 2**20:.1f} MiB]", file=sys.stderr)


if __name__ == "__main__":
    main()
