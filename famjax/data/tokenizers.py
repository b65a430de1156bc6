"""Tokenizers behind one small interface: byte-level, word-level, SentencePiece, Hugging Face, GGUF vocabulary.

Every tokenizer has `encode(text) -> np.int32 [n]`, `decode(ids) -> str`, `vocab_size`, the special ids
`pad_id`, `bos_id`, `eos_id` (`bos_id`/`eos_id` may be None where a model file has none), and a `fingerprint`
string that changes whenever the token ids it produces can change; prepared datasets that store token ids
(PassKey) key their cache folder on it, so a new tokenizer never reads stale ids.

A tokenizer file that is missing or not what its kind expects raises famjax.errors.TokenizerError (a ValueError)
naming the file and the kind; an impossible tokenizer section, famjax.errors.ConfigError.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from famjax.data.passkey_text import template_texts
from famjax.errors import ConfigError, TokenizerError

TOKENIZER_KINDS = ("byte", "word", "sentencepiece", "hf", "gguf")


class Tokenizer(Protocol):
    """What the data layer and the evals need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str

    def encode(self, text: str) -> np.ndarray:
        """Returns token ids, int32 [n], with no special tokens added."""

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`; special ids are dropped."""


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 so that 0, 1, 2 are pad, bos, eos. Needs no file."""

    OFFSET = 3

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.OFFSET
        self.fingerprint = "byte"

    def encode(self, text: str) -> np.ndarray:
        """Returns int32 [len(text.encode())]."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

    def decode(self, ids: Sequence[int]) -> str:
        b = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET)
        return b.decode("utf-8", errors="replace")


# Words, single digits (so a number's digits are separate tokens and a pass key is scored digit by digit)
# and single punctuation marks.
_WORD_RE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")
_NO_SPACE_BEFORE = set(".,;:!?)]}'\"")
WORD_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def split_words(text: str) -> list[str]:
    """Returns the word-level pieces of `text` (words, single digits, single punctuation marks)."""
    return _WORD_RE.findall(text)


def passkey_vocab() -> list[str]:
    """Returns the built-in word vocabulary: every word of the PassKey templates, digits, punctuation."""
    words: list[str] = []
    for text in template_texts():
        for w in split_words(text):
            if w not in words:
                words.append(w)
    for w in [str(d) for d in range(10)] + list(".,;:!?'\"-()"):
        if w not in words:
            words.append(w)
    return words


def build_word_vocab(texts: Iterable[str], max_size: int | None = None) -> list[str]:
    """Returns the most frequent pieces of `texts` (ties by first appearance), digits always included."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in split_words(text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: -counts[w])  # stable: ties keep first appearance
    digits = [str(d) for d in range(10)]
    words = digits + [w for w in words if w not in digits]
    return words if max_size is None else words[:max_size]


class WordTokenizer:
    """Word-level ids from a vocabulary: ids 0..3 are pad, bos, eos, unk; unknown words map to unk.

    About 4-5x fewer tokens than bytes on English, which is what makes long PassKey runs affordable on a
    CPU. Whitespace is not kept: `decode` rebuilds single spaces, without one before punctuation or between
    digits, so it is exact for text written that way (the PassKey templates are).
    """

    def __init__(self, words: Sequence[str], *, source: str = "passkey"):
        words = [w for w in words if w not in WORD_SPECIALS]
        self.itos = list(WORD_SPECIALS) + list(dict.fromkeys(words))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.itos)
        digest = hashlib.sha1("\n".join(self.itos).encode()).hexdigest()[:12]
        self.fingerprint = f"word-{digest}"
        self.source = source

    @classmethod
    def from_file(cls, path: str) -> WordTokenizer:
        """Returns a tokenizer from a vocabulary file: one word per line, UTF-8."""
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer.path: word vocabulary file {path!r} "
                                 f"{'is a folder' if os.path.isdir(path) else 'does not exist'} "
                                 "(tokenizer.kind 'word' reads one word per line, UTF-8)")
        try:
            with open(path, encoding="utf-8") as f:
                words = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise TokenizerError(f"tokenizer.path: word vocabulary file {path!r} is not UTF-8 text (byte "
                                 f"{e.start}); tokenizer.kind 'word' reads one word per line, UTF-8") from None
        except OSError as e:
            raise TokenizerError(f"tokenizer.path: cannot read word vocabulary file {path!r}: "
                                 f"{e.strerror or e}") from None
        if not words:
            raise TokenizerError(f"tokenizer.path: word vocabulary file {path!r} is empty (tokenizer.kind 'word' "
                                 "reads one word per line)")
        return cls(words, source=path)

    def save(self, path: str) -> None:
        """Writes the vocabulary (without the special tokens) one word per line."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.itos[len(WORD_SPECIALS):]) + "\n")

    def encode(self, text: str) -> np.ndarray:
        """Returns int32 [number of words, digits and punctuation marks in text]."""
        return np.asarray([self.stoi.get(w, self.unk_id) for w in split_words(text)], np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        prev = ""
        for i in ids:
            i = int(i)
            if i < len(WORD_SPECIALS) and i != self.unk_id:
                continue
            w = self.itos[i] if 0 <= i < self.vocab_size else "<unk>"
            glue = not out or w in _NO_SPACE_BEFORE or (w.isdigit() and prev.isdigit())
            out.append(w if glue else " " + w)
            prev = w
        return "".join(out)


class SentencePieceTokenizer:
    """A SentencePiece model file. A model without a pad id pads with id 0 (padding is always masked)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer.path: SentencePiece model file {path!r} "
                                 f"{'is a folder' if os.path.isdir(path) else 'does not exist'}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:  # noqa: BLE001  # sentencepiece raises OSError or RuntimeError depending on the damage
            raise TokenizerError(f"tokenizer.path: {path!r} is not a valid SentencePiece model ({e}); "
                                 "tokenizer.kind 'sentencepiece' needs a SentencePiece .model file") from None
        self.vocab_size = int(self.sp.GetPieceSize())
        self.pad_id = max(int(self.sp.pad_id()), 0)
        self.bos_id = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None
        self.eos_id = int(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        self.fingerprint = f"sp-{_file_digest(path)}"

    def encode(self, text: str) -> np.ndarray:
        """Returns int32 [n]."""
        return np.asarray(self.sp.EncodeAsIds(text), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


_HF_BOS = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_HF_EOS = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "[SEP]")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A local Hugging Face `tokenizer.json` (the `tokenizers` library; no transformers, no network).

    Special ids come from the config's token names if given, else from a `tokenizer_config.json` beside the
    file, else from common names (`<s>`, `</s>`, `<|begin_of_text|>`, ...). No pad token -> pad with eos or 0.
    """

    def __init__(self, path: str, *, bos_token: str = "", eos_token: str = "", pad_token: str = ""):
        from tokenizers import Tokenizer as _HF

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer.path: Hugging Face tokenizer file {path!r} does not exist "
                                 "(tokenizer.kind 'hf' reads a tokenizer.json, or a folder holding one)")
        self._path = path
        try:
            self.tok = _HF.from_file(path)
        except Exception as e:  # noqa: BLE001  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"tokenizer.path: {path!r} is not a valid tokenizer.json ({e}); tokenizer.kind "
                                 "'hf' needs the tokenizer.json of a Hugging Face tokenizer") from None
        names = self._config_names(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._find("bos_token", bos_token or names.get("bos_token"), _HF_BOS)
        self.eos_id = self._find("eos_token", eos_token or names.get("eos_token"), _HF_EOS)
        pad = self._find("pad_token", pad_token or names.get("pad_token"), _HF_PAD)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.fingerprint = f"hf-{_file_digest(path)}"

    @staticmethod
    def _config_names(cfg_path: str) -> dict:
        if not os.path.isfile(cfg_path):
            return {}
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"tokenizer.path: cannot parse {cfg_path!r} (beside the tokenizer.json of "
                                 f"tokenizer.kind 'hf'): {e}") from None
        out = {}
        for k in ("bos_token", "eos_token", "pad_token"):
            v = raw.get(k)
            if isinstance(v, dict):  # older files store AddedToken dicts
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        return out

    def _find(self, field: str, name: str | None, candidates: Sequence[str]) -> int | None:
        if name:
            i = self.tok.token_to_id(name)
            if i is None:
                raise ConfigError(f"tokenizer.{field}: token {name!r} is not in the vocabulary of "
                                  f"{self._path!r}")
            return int(i)
        for c in candidates:
            i = self.tok.token_to_id(c)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> np.ndarray:
        """Returns int32 [n], without the post-processor's special tokens (the data layer adds bos)."""
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


# llama.cpp's pre-tokenizer of a byte-level vocabulary (`tokenizer.ggml.pre`) -> how to split text before BPE,
# as in llama.cpp's llama-vocab.cpp: "gpt2": GPT-2's regex; "digits": every digit alone first, then GPT-2's
# regex (StarCoder-style vocabularies: SmolLM); "llama3": Llama 3's regex (BPE ignoring merges, as its
# tokenizer.json does).
_GGUF_PRE = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits", "codeshell": "digits",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3",
}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def gguf_field(reader, key: str, default=None, *, path: str = ""):
    """Returns the value of a GGUF metadata field (scalar, string or list) of a gguf.GGUFReader, or default when
    absent; an unreadable field raises TokenizerError (a ValueError; one line naming the file and field)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"{path}: cannot read GGUF metadata field {key!r}: {e}") from None


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gguf_byte_level_bpe(tokens, types, merges, pre: str):
    """Returns the `tokenizers.Tokenizer` of a GGUF byte-level BPE vocabulary (tokenizer.ggml.model "gpt2")."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HF

    spelling = _byte_level_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte-level spelling; respell any that is not (as transformers does).
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                     ignore_merges=pre == "llama3")
    tok = _HF(bpe)
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel: skipped, as transformers does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED and set(t) <= alphabet])
    return tok


def _merges_from_scores(tokens, scores) -> list[tuple[str, str]]:
    """Returns BPE merges that reproduce SentencePiece's highest-score-first merging: every split of a token into
    two tokens, ranked by the merged token's score (ties: shorter left, then shorter right piece)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _gguf_sentencepiece_bpe(tokens, types, merges, scores, add_space_prefix: bool):
    """Returns the `tokenizers.Tokenizer` of a GGUF SentencePiece BPE vocabulary (tokenizer.ggml.model "llama":
    Llama 2, Mistral, TinyLlama): "▁" for spaces (and before the text), byte fallback (<0x..> tokens)."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as _HF

    if merges is None:
        merges = _merges_from_scores(tokens, scores)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None, fuse_unk=True,
                     byte_fallback=True)
    tok = _HF(bpe)
    # As SentencePiece (and llama.cpp, and Llama 2's tokenizer.json): spaces become "▁" and one "▁" goes before
    # the text, even one that starts with a space; no pre-tokenizer, BPE runs over the whole text.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])
    return tok


class GGUFTokenizer(HFTokenizer):
    """The tokenizer stored inside a GGUF file (`tokenizer.ggml.*` metadata), as a `tokenizers` BPE.

    Byte-level BPE vocabularies (`tokenizer.ggml.model` = "gpt2": SmolLM, Llama 3, ...) with their merges and
    llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`; control tokens (`token_type` 3) are special tokens, kept
    whole in text and dropped by `decode`; user-defined ones (4) are kept whole too. Special ids come from
    `tokenizer.ggml.{bos,eos,padding}_token_id` (no pad id: eos, else 0). `encode` adds no special tokens.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer.path: GGUF file {path!r} "
                                 f"{'is a folder' if os.path.isdir(path) else 'does not exist'}")
        try:
            import gguf

            reader = gguf.GGUFReader(path, "r")
        except ImportError:
            raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
        except Exception as e:  # noqa: BLE001  # ValueError/IndexError/KeyError on a damaged or foreign file
            raise TokenizerError(f"tokenizer.path: {path!r} is not a readable GGUF file ({type(e).__name__}: "
                                 f"{e}); tokenizer.kind 'gguf' reads the vocabulary stored in a .gguf") from None
        self._setup(reader, path)

    @classmethod
    def from_reader(cls, reader, path: str) -> GGUFTokenizer:
        """Returns the tokenizer of an open `gguf.GGUFReader` (path only names the file in errors)."""
        self = cls.__new__(cls)
        self._setup(reader, os.fspath(path))
        return self

    def _setup(self, reader, path: str) -> None:
        def field(key, default=None):
            return gguf_field(reader, f"tokenizer.ggml.{key}", default, path=path)

        model = field("model")
        tokens = field("tokens")
        if model is None or tokens is None:
            missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
            raise TokenizerError(f"{path}: GGUF file has no vocabulary ({missing} is missing); use the model's own "
                                 "tokenizer file instead (tokenizer.kind 'hf' or 'sentencepiece')")
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"{path}: unsupported GGUF tokenizer.ggml.model {model!r}; famjax builds byte-level "
                                 "BPE ('gpt2') and SentencePiece BPE ('llama') vocabularies")
        types = field("token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{path}: GGUF tokenizer.ggml.token_type has {len(types)} entries for "
                                 f"{len(tokens)} tokens")
        merges = field("merges")
        pairs = None
        if merges is not None:
            pairs = []
            for i, m in enumerate(merges):
                parts = m.split(" ")
                if len(parts) != 2:
                    raise TokenizerError(f"{path}: GGUF tokenizer.ggml.merges[{i}] = {m!r} is not two tokens")
                pairs.append(tuple(parts))
        pre_name = field("pre", "default")
        scores, space = field("scores"), bool(field("add_space_prefix", True))
        if model == "gpt2":
            if pairs is None:
                raise TokenizerError(f"{path}: GGUF byte-level vocabulary has no tokenizer.ggml.merges")
            if pre_name not in _GGUF_PRE:
                raise TokenizerError(f"{path}: unsupported GGUF tokenizer.ggml.pre {pre_name!r}; known: "
                                     f"{', '.join(sorted(_GGUF_PRE))}")
            tok = _gguf_byte_level_bpe(tokens, types, pairs, _GGUF_PRE[pre_name])
        else:
            if pairs is None and scores is None:
                raise TokenizerError(f"{path}: GGUF SentencePiece vocabulary has neither tokenizer.ggml.merges nor "
                                     "tokenizer.ggml.scores")
            if scores is not None and len(scores) != len(tokens):
                raise TokenizerError(f"{path}: GGUF tokenizer.ggml.scores has {len(scores)} entries for "
                                     f"{len(tokens)} tokens")
            tok = _gguf_sentencepiece_bpe(tokens, types, pairs, scores, space)
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

        def special(key):
            i = field(key)
            if i is None:
                return None
            if not 0 <= int(i) < len(tokens):
                raise TokenizerError(f"{path}: GGUF tokenizer.ggml.{key}={i} is outside the vocabulary "
                                     f"({len(tokens)} tokens)")
            return int(i)

        self.bos_id, self.eos_id = special("bos_token_id"), special("eos_token_id")
        pad = special("padding_token_id")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        digest = hashlib.sha1()
        for part in (model, pre_name, str(space), "\n".join(tokens), "\n".join(merges or []),
                     ",".join(map(str, types)), ",".join(map(str, scores or []))):
            digest.update(part.encode("utf-8") + b"\0")
        self.fingerprint = f"gguf-{digest.hexdigest()[:12]}"


def make_tokenizer(data_cfg) -> Tokenizer:
    """Returns the tokenizer that `data_cfg.tokenizer` (or a tokenizer section itself) describes."""
    tcfg = data_cfg.tokenizer if hasattr(data_cfg, "tokenizer") else data_cfg
    kind = tcfg.kind
    path = os.path.expanduser(tcfg.get("path", "") or "")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer.from_file(path) if path else WordTokenizer(passkey_vocab())
    if kind in ("sentencepiece", "hf", "gguf") and not path:
        raise ConfigError(f"tokenizer.path is required for tokenizer.kind={kind!r}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "hf":
        return HFTokenizer(path, bos_token=tcfg.get("bos_token", ""), eos_token=tcfg.get("eos_token", ""),
                           pad_token=tcfg.get("pad_token", ""))
    if kind == "gguf":
        return GGUFTokenizer(path)
    raise ConfigError(f"tokenizer.kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
