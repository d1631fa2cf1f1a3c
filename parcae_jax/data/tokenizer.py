"""Tokenizers: train a lossless SentencePiece BPE model, or load one (ours or a Hugging Face tokenizer.json).

    python -m parcae_jax.data.tokenizer train --input shakespeare --vocab-size 4096 --output DIR
    python -m parcae_jax.data.tokenizer train --input 'data/*.parquet' --vocab-size 32768 --output DIR

Training settings and why:
  * BPE with `byte_fallback`: any character outside the learned vocabulary becomes its UTF-8 bytes, so
    there is no `<unk>` in practice and every string round-trips.
  * `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`, `add_dummy_prefix=False`:
    SentencePiece would otherwise rewrite the text (NFKC, collapsed spaces, a leading space), and
    `decode(encode(s)) == s` would fail.
  * SentencePiece trains on lines, so it never sees a newline; "\\n" is a user-defined symbol, i.e. one
    token, instead of a byte-fallback token.
  * SentencePiece writes spaces as "▁" (U+2581) and decodes every "▁" back to a space, so a literal
    U+2581 in the text is encoded through its three byte-fallback tokens instead (see `encode`).
  * `split_digits`: numbers are spelled digit by digit, as in the reference tokenizer (§8 of the spec).
  * ids 0..3 are pad, bos, eos, unk; ids 4.. are "\\n" and the 256 byte tokens, then learned pieces.

The output folder holds `tokenizer.model` (the SentencePiece model) and `tokenizer.json` (our metadata:
kind, vocab size, special ids, fingerprint, what it was trained on). The folder is built under a
temporary name and renamed at the end, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import abc
import argparse
import datetime
import hashlib
import heapq
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from parcae_jax import errors, fileio
from parcae_jax.data import sources
from parcae_jax.errors import UserError

MODEL_FILE = "tokenizer.model"
METADATA_FILE = "tokenizer.json"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
DEFAULT_MAX_CHARS = 200_000_000
_LINE_CHARS = 4096  # training lines are cut to this many characters: <= 16 KiB of UTF-8 each
_SPACE_MARK = "\u2581"  # SentencePiece's internal space symbol
_MIN_VOCAB = 4 + 1 + 256 + 8  # specials, "\n", byte tokens, and a few learned pieces


class TokenizerError(UserError, ValueError):
    """A tokenizer file or folder is missing or unusable (message names the path and the fix)."""


def file_fingerprint(path: str) -> str:
    """Short sha256 hex digest of a file's bytes: identifies the exact tokenizer a dataset was made with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------


class Tokenizer(abc.ABC):
    """Text <-> token ids. `encode` never adds BOS/EOS (the input pipeline adds BOS at document starts).

    Attributes: `bos_id`, `eos_id`, `pad_id`, `vocab_size` (ints), `fingerprint` (short hex of the
    model file's sha256), `path` (the model file). `declared_bos_id` / `declared_pad_id` are the ids
    the tokenizer itself declares (None when it declares none): what the official code reads, which
    then falls back to BOS 1 in CORE and PAD (ignore index) 0 in training.
    """

    kind: str
    path: str
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    fingerprint: str

    @property
    def declared_bos_id(self) -> int | None:
        return self.bos_id

    @property
    def declared_pad_id(self) -> int | None:
        return self.pad_id

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, possibly faster."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (pad/bos/eos) decode to nothing."""

    @abc.abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 byte length of each token's text, 0 for special tokens (for bits/byte)."""

    def describe(self) -> str:
        return (
            f"{self.kind} tokenizer {self.path} (vocab {self.vocab_size}, bos {self.bos_id}, "
            f"eos {self.eos_id}, pad {self.pad_id}, fingerprint {self.fingerprint})"
        )

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (ours from `train_tokenizer`, or any other BPE/unigram `.model`)."""

    kind = "sentencepiece"
    num_threads: int | None = None  # encode_batch threads; None: all cores (worker processes set 1)

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.path = os.path.abspath(model_path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{model_path}: SentencePiece model file not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({err})") from None
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{model_path}: the model defines no BOS or EOS token; retrain it with both")
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        self.fingerprint = file_fingerprint(self.path)
        # Byte-fallback ids spelling a literal U+2581 (see the module docstring); None without byte pieces.
        pieces = [f"<0x{b:02X}>" for b in _SPACE_MARK.encode()]
        ids = [self._sp.piece_to_id(p) for p in pieces]
        self._space_mark_ids = ids if all(self._sp.is_byte(i) for i in ids) else None

    def __getstate__(self):  # reload from the file in worker processes instead of pickling the model
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _encode_escaped(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                ids.extend(self._space_mark_ids)
            ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def encode(self, text: str) -> list[int]:
        if self._space_mark_ids is not None and _SPACE_MARK in text:
            return self._encode_escaped(text)
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        out = self._sp.encode(texts, out_type=int, num_threads=self.num_threads)
        if self._space_mark_ids is not None:
            for i, text in enumerate(texts):
                if _SPACE_MARK in text:
                    out[i] = self._encode_escaped(text)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        sp = self._sp
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace(_SPACE_MARK, " ").encode())
        return lengths


# Special-token names tried in order when an HF tokenizer does not say which is which.
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (e.g. the official Parcae byte-level BPE, GPT-2, Llama).

    BOS/EOS/PAD come from the arguments, else from a `tokenizer_config.json` next to the file, else from
    well-known special-token names; PAD falls back to EOS. Only the first two count as declared
    (`declared_bos_id`, `declared_pad_id`): a bare official tokenizer.json declares none, and the
    official code then uses its fallbacks.
    """

    kind = "huggingface"

    def __init__(self, tokenizer_json_path: str, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = os.path.abspath(tokenizer_json_path)
        self._overrides = (bos_id, eos_id, pad_id)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{tokenizer_json_path}: tokenizer.json not found")
        try:
            self._tok = RustTokenizer.from_file(self.path)
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(
                f"{tokenizer_json_path}: not a Hugging Face tokenizers file ({err})"
            ) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.fingerprint = file_fingerprint(self.path)
        named = self._configured_special_tokens()
        self._declared_bos = bos_id if bos_id is not None else self._token_id(named.get("bos_token"))
        self._declared_pad = pad_id if pad_id is not None else self._token_id(named.get("pad_token"))
        self.bos_id = self._find_id("BOS", bos_id, named.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._find_id("EOS", eos_id, named.get("eos_token"), _EOS_NAMES)
        try:
            self.pad_id = self._find_id("PAD", pad_id, named.get("pad_token"), _PAD_NAMES)
        except TokenizerError:
            self.pad_id = self.eos_id  # padding is masked out of the loss, any id will do

    @property
    def declared_bos_id(self) -> int | None:
        return self._declared_bos

    @property
    def declared_pad_id(self) -> int | None:
        return self._declared_pad

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def __getstate__(self):
        return {"path": self.path, "overrides": self._overrides}

    def __setstate__(self, state):
        self.__init__(state["path"], *state["overrides"])

    def _configured_special_tokens(self) -> dict[str, str]:
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if not os.path.isfile(config_path):
            return {}
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        names = {key: _token_content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
        return {k: v for k, v in names.items() if v}

    def _find_id(self, what: str, given: int | None, configured: str | None, names: Sequence[str]) -> int:
        if given is not None:
            if not 0 <= given < self.vocab_size:
                raise TokenizerError(
                    f"{self.path}: {what} id {given} outside the vocabulary ({self.vocab_size})"
                )
            return int(given)
        for name in ([configured] if configured else []) + list(names):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        raise TokenizerError(
            f"{self.path}: no {what} token found (tried {', '.join(names)}); "
            f"pass {what.lower()}_id explicitly"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _is_byte_level(self) -> bool:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        return any(part.get("type") == "ByteLevel" for part in parts)

    def token_byte_lengths(self) -> np.ndarray:
        from tokenizers.pre_tokenizers import ByteLevel

        byte_chars = set(ByteLevel.alphabet())  # byte-level BPE spells each byte as one of these 256 chars
        byte_level = self._is_byte_level()
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or i in specials:
                continue
            if byte_level and all(c in byte_chars for c in token):
                lengths[i] = len(token)
            elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
                lengths[i] = 1  # SentencePiece-style byte fallback
            else:
                lengths[i] = len(token.replace(_SPACE_MARK, " ").encode())
        return lengths


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _is_our_metadata(json_path: str) -> bool:
    """Our tokenizer.json is small metadata with a "kind" key; HF's has "model"/"version" instead."""
    try:
        with open(json_path, encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and head.get("kind") == "sentencepiece"


def load_tokenizer(path: str) -> Tokenizer:
    """A folder (ours: tokenizer.model + tokenizer.json; Hugging Face / official Parcae: tokenizer.json)
    or a file (`*.model` SentencePiece, `tokenizer.json` Hugging Face or our metadata)."""
    path = os.path.expanduser(str(path))
    expected = (
        f"a {MODEL_FILE} (SentencePiece, made by `python -m parcae_jax.data.tokenizer train`) or a "
        f"Hugging Face tokenizer.json"
    )
    if os.path.isdir(path):
        model, json_path = os.path.join(path, MODEL_FILE), os.path.join(path, METADATA_FILE)
        if os.path.isfile(model):
            return SentencePieceTokenizer(model)
        if os.path.isfile(json_path) and not _is_our_metadata(json_path):
            return HFTokenizer(json_path)
        raise TokenizerError(f"{path}: folder holds no usable tokenizer; expected {expected} inside it")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such file or folder; expected {expected} or a folder with one")
    if path.endswith(".json"):
        if _is_our_metadata(path):
            return SentencePieceTokenizer(os.path.join(os.path.dirname(path), MODEL_FILE))
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"{path}: unknown tokenizer file type; expected {expected}")


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def _doc_rank(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest())


def sample_documents(inputs: Sequence[str], max_chars: int) -> tuple[list[str], int]:
    """Stream the documents of `inputs` (source specs or paths) and keep an even, deterministic sample of at
    most `max_chars` characters: the documents with the smallest content hashes (a bottom-k sample by hash,
    so the choice does not depend on position). Returns (documents in input order, documents seen)."""
    kept: list[tuple[int, int, str]] = []  # max-heap on hash rank via negation: (-rank, index, text)
    total = seen = 0
    for spec in inputs:
        for text in sources.iter_documents(spec):
            seen += 1
            if not text:
                continue
            text = text[:max_chars]
            rank = _doc_rank(text)
            if total + len(text) > max_chars and kept and rank > -kept[0][0]:
                continue  # would be the first one evicted
            heapq.heappush(kept, (-rank, seen, text))
            total += len(text)
            while total > max_chars:
                total -= len(heapq.heappop(kept)[2])
    return [text for _, _, text in sorted(kept, key=lambda k: k[1])], seen


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on sentences (lines) of at most `max_sentence_length` bytes; no empty ones."""
    for doc in documents:
        for line in doc.split("\n"):
            for start in range(0, len(line), _LINE_CHARS):
                yield line[start:start + _LINE_CHARS]


def _machine_independent(model: bytes) -> bytes:
    """The model records the trainer's thread count (the pieces do not depend on it); pin it to 1 so the
    fingerprint is the same on every machine. Left as is when the protobuf module is unavailable."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return model
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.num_threads = 1
    return proto.SerializeToString()


def train_tokenizer(inputs: Sequence[str], vocab_size: int, output_dir: str,
                    max_chars: int = DEFAULT_MAX_CHARS, overwrite: bool = False,
                    log=print) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE tokenizer on `inputs` (source specs or file paths, see `sources`) and write
    `output_dir/{tokenizer.model, tokenizer.json}`; returns the loaded tokenizer."""
    import sentencepiece as spm

    if not inputs:
        raise TokenizerError("no training input given; pass --input shakespeare or files")
    if vocab_size < _MIN_VOCAB:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the specials and 256 byte tokens alone "
                             f"take 261 ids; use at least {_MIN_VOCAB}")
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise TokenizerError(f"{output_dir}: already exists and is not empty; choose another --output or "
                             "pass --overwrite (overwrite=True in Python)")
    started = time.time()
    documents, seen = sample_documents(inputs, max_chars)
    chars, sampled = sum(len(d) for d in documents), len(documents)
    if not chars:
        raise TokenizerError(f"inputs {list(inputs)} contain no text ({seen} documents, all empty)")
    log(f"tokenizer: training on {sampled} of {seen} documents, {chars:,} characters")

    model_bytes = io.BytesIO()
    try:
        # Sentences come from an iterator and the model goes to memory: no file paths end up inside the
        # model file, so the same corpus always gives the same bytes (and the same fingerprint).
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents), model_writer=model_bytes, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            input_sentence_size=0, shuffle_input_sentence=False,  # the sample above is already bounded
            max_sentence_length=4 * _LINE_CHARS, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerError(
            f"SentencePiece training failed ({err}); vocab_size {vocab_size} must cover the 261 fixed ids "
            f"plus every kept character, and {chars:,} characters of text must yield that many pieces"
        ) from None
    del documents

    with fileio.replacing_folder(output_dir) as tmp_dir:  # the complete folder appears in one step
        with open(os.path.join(tmp_dir, MODEL_FILE), "wb") as f:
            f.write(_machine_independent(model_bytes.getvalue()))
        tokenizer = SentencePieceTokenizer(os.path.join(tmp_dir, MODEL_FILE))
        metadata = {
            "kind": "sentencepiece", "model_type": "bpe", "model_file": MODEL_FILE,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id, "unk_id": UNK_ID, "fingerprint": tokenizer.fingerprint,
            "inputs": [str(i) for i in inputs], "max_chars": max_chars, "training_chars": chars,
            "documents_seen": seen, "documents_sampled": sampled, "sentencepiece_version": spm.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        with open(os.path.join(tmp_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
            f.write("\n")
    log(f"tokenizer: wrote {output_dir} in {time.time() - started:.1f} s")
    return SentencePieceTokenizer(os.path.join(output_dir, MODEL_FILE))


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece BPE tokenizer")
    train.add_argument("--input", nargs="+", required=True,
                       help="source specs or paths: shakespeare, parquet:GLOB, jsonl:GLOB, text:GLOB")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="output folder (must not exist or be empty)")
    train.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                       help="train on an even sample of at most this many characters")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(args.input, args.vocab_size, args.output, args.max_chars, args.overwrite)
    print(tokenizer.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
