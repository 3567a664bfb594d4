"""Text or JSONL files -> a Megatron indexed dataset (``PREFIX.bin``/``PREFIX.idx``), offline.

What Megatron-LM's ``tools/preprocess_data.py`` does (not in the megatron-core wheel), for GPT
pretraining: every document is tokenized, an end-of-document token is appended, and megatron-core's
own ``IndexedDatasetBuilder`` writes one sequence per document, so the files are exactly what
``--data-path PREFIX`` reads.

Inputs: files or directories (searched recursively for ``pattern``). ``.jsonl``/``.json`` files hold
one JSON object per line whose ``json_key`` field is a document; any other file is one document.

Tokenizer: the user's Hugging Face ``tokenizer.json`` (or a directory holding one), or, without one,
a byte-level BPE trained on the corpus with Hugging Face ``tokenizers``. Either way a Megatron-ready
copy (``tokenizer.json`` + ``tokenizer_config.json`` naming the end-of-document token) is saved, and
training reads it through Megatron's own flags: ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR`` (megatron-core loads it with ``transformers.AutoTokenizer`` from the local
directory; nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
JSONL_SUFFIXES = (".jsonl", ".json")
BATCH_DOCUMENTS = 256  # documents per encode_batch call (tokenizers parallelises within a batch) ...
BATCH_CHARS = 1 << 20  # ... or fewer, once they hold this much text (progress stays frequent)


class DataError(ValueError):
    """Bad input for prepare-data; the message names the file or flag and the fix."""


@dataclass
class PrepareResult:
    """What ``prepare`` wrote. ``megatron_args``: the flags that train on it."""

    data_prefix: str
    tokenizer_dir: str
    tokenizer_source: str  # "trained on the corpus" or the user's path
    documents: int
    tokens: int  # including one end-of-document token per document
    vocab_size: int
    eod_id: int
    inputs: list[str]
    skipped_empty: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped_binary: list[str] = field(default_factory=list)

    @property
    def megatron_args(self) -> list[str]:
        return ["--data-path", self.data_prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", self.tokenizer_dir]

    def to_json(self) -> dict:
        return {**asdict(self), "megatron_args": self.megatron_args}


# ---------------------------------------------------------------- reading documents


def list_input_files(inputs: list[str], pattern: str = "*") -> list[Path]:
    """Files named, plus files under directories matching ``pattern`` (sorted, recursive; entries
    inside a directory that are hidden (``.git``, ``.venv``) or ``__pycache__`` are skipped)."""
    if not inputs:
        raise DataError("INPUT: give at least one text/JSONL file or directory")
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob(pattern) if p.is_file() and not any(
                part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: no files matching --glob {pattern!r} in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


class BinaryFileError(DataError):
    """A file with NUL bytes: binary (an image, a compiled module), not text."""


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    nul = data.find(b"\0", 0, 8192)  # git's test for binary: a NUL byte early in the file
    if nul >= 0:
        raise BinaryFileError(f"{path}: a binary file (NUL byte at offset {nul}), not text; leave it out or pick "
                              "text files with --glob")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out") from None


def iter_documents(files: list[Path], json_key: str = "text", explicit: set[Path] | None = None,
                   skipped: list[str] | None = None, binary: list[str] | None = None) -> Iterator[str]:
    """Documents in file order. Empty or binary files named in ``explicit`` are errors; those found in
    a directory are skipped (appended to ``skipped`` / ``binary``)."""
    explicit = explicit if explicit is not None else set(files)
    for path in files:
        try:
            text = _read_text(path)
        except BinaryFileError:
            if path in explicit:
                raise
            if binary is not None:
                binary.append(str(path))
            continue
        if not text.strip():
            if path in explicit:
                raise DataError(f"{path}: empty file (no text); remove it from the inputs")
            if skipped is not None:
                skipped.append(str(path))
            continue
        if path.suffix.lower() not in JSONL_SUFFIXES:
            yield text
            continue
        found = 0
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON object per line ({exc.msg}); "
                                f"JSONL needs one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise DataError(f"{path}:{number}: no string field {json_key!r}; pass --json-key NAME")
            if record[json_key].strip():
                found += 1
                yield record[json_key]
        if not found:
            raise DataError(f"{path}: no non-empty {json_key!r} documents")


# ---------------------------------------------------------------- tokenizer


# Byte-level BPE: 256 byte tokens plus the two special tokens. The upper bound keeps the trainer's
# allocation sane (tokenizers aborts the process on a failed allocation; 10**11 asked for 4.5 TB).
MIN_VOCAB_SIZE = 256 + 2
MAX_VOCAB_SIZE = 4_000_000


def train_tokenizer(documents: Callable[[], Iterator[str]], vocab_size: int):
    """A byte-level BPE (GPT-2 style: any UTF-8 text encodes, no unknown token) trained on the
    corpus with Hugging Face ``tokenizers``. Special tokens: ``<|endoftext|>`` = 0, ``<|pad|>`` = 1.
    The vocabulary may end up smaller than ``vocab_size`` on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size}: must be >= {MIN_VOCAB_SIZE} (256 byte tokens + 2 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents(), trainer=trainer)
    return tokenizer


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path, eod_token: str | None = None):
    """The user's tokenizer: a ``tokenizer.json`` or a directory with one (its
    ``tokenizer_config.json``, if any, supplies the special tokens). Returns (tokenizer, special
    tokens {eos_token, pad_token?, bos_token?})."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no such tokenizer (a Hugging Face tokenizer.json or a directory "
                        f"holding one); leave --tokenizer out to train one on the corpus")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"--tokenizer {file}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0]})") from None
    config_file = file.parent / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{config_file}: unreadable tokenizer config ({exc})") from None
    special = {name: _token_content(config.get(name)) for name in ("eos_token", "pad_token", "bos_token")}
    special = {k: v for k, v in special.items() if v is not None}
    if eod_token is not None:
        special["eos_token"] = eod_token
    elif "eos_token" not in special and tokenizer.token_to_id(EOD_TOKEN) is not None:
        special["eos_token"] = EOD_TOKEN
    if "eos_token" not in special:
        raise DataError(f"--tokenizer {path}: no end-of-document token known; pass --eod-token TOKEN "
                        f"(a token of its vocabulary, e.g. its </s>)")
    for name, token in special.items():
        if tokenizer.token_to_id(token) is None:
            flag = "--eod-token" if name == "eos_token" else str(config_file)
            raise DataError(f"{flag}: {token!r} ({name}) is not in the tokenizer's vocabulary")
    return tokenizer, special


def save_tokenizer(tokenizer, directory: str | Path, special: dict[str, str]) -> Path:
    """Write ``tokenizer.json`` + a ``tokenizer_config.json`` that ``transformers.AutoTokenizer``
    (Megatron's ``HuggingFaceTokenizer``) loads offline, with ``eos_token`` = the end-of-document
    token Megatron's GPT dataset uses (``tokenizer.eod``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return directory


# ---------------------------------------------------------------- writing


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) == BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def prepare(inputs: list[str], output_prefix: str, tokenizer: str | None = None, vocab_size: int = 8192,
            tokenizer_out: str | None = None, json_key: str = "text", pattern: str = "*",
            eod_token: str | None = None, progress: Callable[[str], None] | None = None,
            progress_every_s: float = 2.0) -> PrepareResult:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx`` (one sequence per document, the
    end-of-document id appended) and save the tokenizer to ``tokenizer_out`` (default
    ``<output_prefix>-tokenizer``). Token dtype: megatron-core's ``DType.optimal_dtype(vocab)``
    (uint16 below 65500 ids, else int32). Files are written under temporary names and renamed at the
    end, so a failed run leaves no half-written dataset. Raises DataError naming the file or flag.
    """
    start = time.perf_counter()
    files = list_input_files(inputs, pattern)
    explicit = {Path(name) for name in inputs if Path(name).is_file()}
    prefix = str(Path(output_prefix))
    out_dir = Path(prefix).parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--output-prefix {output_prefix}: cannot create {out_dir} ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise DataError(f"--output-prefix {output_prefix}: {out_dir} is not writable")
    tokenizer_dir = Path(tokenizer_out or f"{prefix}-tokenizer")

    if tokenizer is None and not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:  # before any announcement or import
        raise DataError(f"--vocab-size {vocab_size}: must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE:,}] "
                        "(256 byte tokens + 2 special tokens at least; real vocabularies are 32k-256k)")
    with warnings.catch_warnings():  # megatron-core's "TransformerEngine / Apex not installed" notes: not for data prep
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    if tokenizer is None:
        if progress:
            progress(f"prepare-data: training a byte-level BPE tokenizer (vocabulary {vocab_size}) on "
                     f"{len(files)} files")
        model = train_tokenizer(lambda: iter_documents(files, json_key, explicit), vocab_size)
        special = {"eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}
        source = "trained on the corpus"
    else:
        model, special = load_tokenizer(tokenizer, eod_token)
        source = str(tokenizer)
    eod_id = model.token_to_id(special["eos_token"])
    vocab = model.get_vocab_size(with_added_tokens=True)

    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=DType.optimal_dtype(vocab))
    documents = tokens = 0
    skipped: list[str] = []
    binary: list[str] = []
    encode_start = last = time.perf_counter()
    try:
        for batch in _batches(iter_documents(files, json_key, explicit, skipped, binary)):
            for encoding in model.encode_batch(batch, add_special_tokens=True):
                ids = np.asarray(encoding.ids + [eod_id], dtype=np.int64)
                builder.add_document(ids, [ids.size])
                documents += 1
                tokens += ids.size
            now = time.perf_counter()
            if progress and now - last >= progress_every_s:
                last, elapsed = now, now - encode_start
                progress(f"prepare-data: {documents:,} documents, {tokens:,} tokens "
                         f"({documents / elapsed:,.0f} documents/s, {tokens / elapsed:,.0f} tokens/s)")
        if documents == 0:
            raise DataError(f"{', '.join(inputs)}: no documents (all files are empty or binary)")
        builder.finalize(get_idx_path(tmp))
    except BaseException:
        builder.data_file.close()
        for path in (get_bin_path(tmp), get_idx_path(tmp)):
            Path(path).unlink(missing_ok=True)
        raise
    os.replace(get_bin_path(tmp), get_bin_path(prefix))
    os.replace(get_idx_path(tmp), get_idx_path(prefix))
    save_tokenizer(model, tokenizer_dir, special)
    result = PrepareResult(prefix, str(tokenizer_dir), source, documents, tokens, vocab, eod_id,
                           [str(p) for p in inputs], skipped, time.perf_counter() - start, binary)
    Path(f"{prefix}.prepare.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


def format_result(result: PrepareResult) -> str:
    import shlex

    lines = [f"prepared {result.documents:,} documents, {result.tokens:,} tokens (end-of-document included), "
             f"vocabulary {result.vocab_size:,}, in {result.seconds:.1f} s",
             f"  data:      {result.data_prefix}.bin / .idx",
             f"  tokenizer: {result.tokenizer_dir} ({result.tokenizer_source})"]
    if result.skipped_empty:
        lines.append(f"  skipped {len(result.skipped_empty)} empty files")
    if result.skipped_binary:
        lines.append(f"  skipped {len(result.skipped_binary)} binary files (NUL bytes): "
                     f"{', '.join(result.skipped_binary[:3])}{', ...' if len(result.skipped_binary) > 3 else ''}")
    lines.append(f"  train with: {shlex.join(result.megatron_args)}")
    if result.documents < 500:  # round(0.999 * N) == N: Megatron's default --split 969,30,1 gives an empty test split
        lines.append("  few documents: also pass --split 100,0,0 (or larger eval shares); megatron-core 0.19.2 "
                     "hangs building an empty test split")
    return "\n".join(lines)
