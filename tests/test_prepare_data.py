"""micromoe prepare-data: text/JSONL -> Megatron indexed dataset, read back through megatron-core;
clear errors; and training on the prepared corpus through the demo's launcher path
(scripts/train_single_node.sh configs/tiny-cpu.yaml), stock vs --micro-ep, with routing analysed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from micromoe_megatron.cli import main as cli_main
from micromoe_megatron.training.prepare_data import DataError, format_result, prepare, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nIt was the best of times, it was the worst of times.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Ünïcödé text: naïve café, 日本語, emoji \U0001f600 and tabs\tincluded.",
]


def _megatron_tokenizer(directory):
    """The tokenizer exactly as Megatron's training builds it for --tokenizer-type HuggingFaceTokenizer."""
    from types import SimpleNamespace

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = SimpleNamespace(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(directory), chat_template=None, vocab_file=None,
        merge_file=None, special_tokens=None, tokenizer_hf_no_use_fast=False, trust_remote_code=False,
        tokenizer_hf_no_include_special_tokens=False, metadata_path=None, pad_vocab_size=False)
    return build_tokenizer(args)


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.document_indices.tolist()


def test_round_trip_through_megatron_indexed_dataset(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(DOCS[:2]):
        (tmp_path / "corpus" / f"doc{i}.txt").write_text(text)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"text": DOCS[2], "id": 7}) + "\n\n" + json.dumps({"text": DOCS[0]}) + "\n")
    lines = []
    result = prepare([str(tmp_path / "corpus"), str(jsonl)], str(tmp_path / "out" / "data"), vocab_size=300,
                     progress=lines.append, progress_every_s=0.0)
    assert "training a byte-level BPE tokenizer" in lines[0]
    assert "4 documents" in lines[-1] and "documents/s" in lines[-1] and "tokens/s" in lines[-1]
    documents = [*DOCS[:2], DOCS[2], DOCS[0]]  # directory files sorted, then the JSONL lines in order

    megatron = _megatron_tokenizer(result.tokenizer_dir)
    expected = [megatron.tokenize(text) + [megatron.eod] for text in documents]
    sequences, boundaries = _read_back(result.data_prefix)
    assert sequences == expected  # one sequence per document, ending in the end-of-document id
    assert boundaries == list(range(len(documents) + 1))
    assert megatron.eod == result.eod_id and megatron.eod not in sum((s[:-1] for s in sequences), [])
    assert megatron.detokenize(sequences[2][:-1]) == DOCS[2]  # byte-level: any UTF-8 round-trips
    assert (result.documents, result.tokens) == (4, sum(map(len, expected)))
    assert result.vocab_size == megatron.vocab_size <= 300
    saved = json.loads(Path(f"{result.data_prefix}.prepare.json").read_text())
    assert saved["megatron_args"] == ["--data-path", result.data_prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                                      "--tokenizer-model", result.tokenizer_dir]


def test_users_tokenizer_file_is_used_and_saved_for_training(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0] * 3)
    trained = train_tokenizer(lambda: iter(DOCS), vocab_size=280)
    user_dir = save_tokenizer(trained, tmp_path / "user", {"eos_token": "<|pad|>"})  # unusual eod: honoured
    result = prepare([str(tmp_path / "a.txt")], str(tmp_path / "d"), tokenizer=str(user_dir / "tokenizer.json"))
    assert result.tokenizer_source == str(user_dir / "tokenizer.json")
    assert result.eod_id == trained.token_to_id("<|pad|>")
    sequences, _ = _read_back(result.data_prefix)
    assert sequences == [trained.encode(DOCS[0] * 3).ids + [result.eod_id]]
    assert _megatron_tokenizer(result.tokenizer_dir).eod == result.eod_id


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.txt: no such file or directory"),
    ("empty", "empty.txt: empty file"),
    ("latin1", "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    ("tokenizer", "--tokenizer {tmp}/nope: no such tokenizer"),
    ("bad-jsonl", "bad.jsonl:2: not a JSON object per line"),
    ("json-key", "keys.jsonl:1: no string field 'text'; pass --json-key NAME"),
    ("vocab", "--vocab-size 100: must be in [258, "),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, case, message):
    (tmp_path / "ok.txt").write_text(DOCS[0])
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "keys.jsonl").write_text('{"body": "a"}\n')
    inputs = {"missing": ["missing.txt"], "empty": ["ok.txt", "empty.txt"], "latin1": ["latin1.txt"],
              "tokenizer": ["ok.txt"], "bad-jsonl": ["bad.jsonl"], "json-key": ["keys.jsonl"],
              "vocab": ["ok.txt"]}[case]
    argv = ["prepare-data", *(str(tmp_path / name) for name in inputs), "--output-prefix", str(tmp_path / "out" / "d"),
            "--json"]
    argv += {"tokenizer": ["--tokenizer", str(tmp_path / "nope")], "vocab": ["--vocab-size", "100"]}.get(case, [])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("micromoe prepare-data: error: ")
    assert message.format(tmp=tmp_path) in err
    assert not list(tmp_path.glob("out/d*"))  # nothing half-written


def test_error_while_writing_leaves_no_dataset(tmp_path):
    """With the user's tokenizer nothing is read before writing starts: a bad second file stops the
    run mid-way, and neither the dataset nor its temporary files remain."""
    user_dir = save_tokenizer(train_tokenizer(lambda: iter(DOCS), vocab_size=280), tmp_path / "tok",
                              {"eos_token": "<|endoftext|>"})
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="b.txt: not UTF-8 text"):
        prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "out" / "d"),
                tokenizer=str(user_dir))
    assert list((tmp_path / "out").iterdir()) == []


def test_empty_files_inside_a_directory_are_skipped_not_fatal(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.py").write_text(DOCS[1])
    (tmp_path / "c" / "__init__.py").write_text("")
    (tmp_path / "c" / "notes.txt").write_text(DOCS[0])
    for hidden in (".git", "__pycache__", ".venv/lib"):  # a source tree's binaries are not text: skipped
        (tmp_path / "c" / hidden).mkdir(parents=True)
        (tmp_path / "c" / hidden / "blob.py").write_bytes(b"\x80\x81 binary")
    # A binary file that happens to be valid UTF-8 (NUL bytes) is skipped in a directory, refused by name.
    (tmp_path / "c" / "model.py").write_bytes(b"\x00\x01\x02 weights\x00")
    result = prepare([str(tmp_path / "c")], str(tmp_path / "d"), vocab_size=260, pattern="*.py")
    assert result.documents == 1 and result.skipped_empty == [str(tmp_path / "c" / "__init__.py")]
    assert result.skipped_binary == [str(tmp_path / "c" / "model.py")]
    assert "skipped 1 binary files (NUL bytes)" in format_result(result)
    with pytest.raises(DataError, match=r"model.py: a binary file \(NUL byte at offset 0\), not text"):
        prepare([str(tmp_path / "c" / "model.py"), str(tmp_path / "c" / "a.py")], str(tmp_path / "e"),
                vocab_size=260)
    with pytest.raises(DataError, match="no files matching --glob"):
        prepare([str(tmp_path / "c")], str(tmp_path / "d"), pattern="*.rs")


def test_launcher_names_the_missing_data_flags():
    from types import SimpleNamespace

    from micromoe_megatron.training.pretrain_gpt import check_data_args

    none = dict(mock_data=False, data_path=None, data_args_path=None, train_data_path=None, valid_data_path=None,
                test_data_path=None, per_split_data_args_path=None, tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=None)
    with pytest.raises(SystemExit, match="no training data: pass --data-path PREFIX"):
        check_data_args(SimpleNamespace(**none))
    with pytest.raises(SystemExit, match="HuggingFaceTokenizer needs --tokenizer-model DIR"):
        check_data_args(SimpleNamespace(**{**none, "data_path": ["d/corpus"]}))
    with pytest.raises(SystemExit, match="--data-path d/corpus: no d/corpus.idx"):
        check_data_args(SimpleNamespace(**{**none, "data_path": ["d/corpus"], "tokenizer_model": "d/tok", "split": None}))
    check_data_args(SimpleNamespace(**{**none, "mock_data": True, "tokenizer_type": "NullTokenizer"}))


def test_launcher_refuses_a_split_that_leaves_a_split_without_documents(tmp_path):
    """Megatron's default --split 969,30,1 on a 3-document corpus leaves the test split empty, and
    megatron-core then loops forever building it: refused in one line naming --split and the fix."""
    from types import SimpleNamespace

    from micromoe_megatron.training.pretrain_gpt import check_data_args

    for i, text in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(text)
    prepare([str(tmp_path / f"doc{i}.txt") for i in range(len(DOCS))], str(tmp_path / "d"), vocab_size=260)
    args = dict(mock_data=False, data_path=["1.0", str(tmp_path / "d")], data_args_path=None, train_data_path=None,
                valid_data_path=None, test_data_path=None, per_split_data_args_path=None,
                tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tok")
    for split in (None, "99,1,0"):
        with pytest.raises(SystemExit, match=r"gives the (test|validation) split of .* no document.*--split 100,0,0"):
            check_data_args(SimpleNamespace(**args, split=split))
    check_data_args(SimpleNamespace(**args, split="100,0,0"))
    check_data_args(SimpleNamespace(**args, split="2,1,0"))


# ---------------------------------------------------------------- training on the prepared corpus


def _launch(config_args: list[str]):
    from tests.launch import Run, _free_port, _GRAD_NORM, _ITERATION

    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    command = ["bash", str(REPO / "scripts" / "train_single_node.sh"), str(REPO / "configs" / "tiny-cpu.yaml"),
               *config_args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    return Run(proc.returncode, log, {int(i): float(v) for i, v in _ITERATION.findall(log)},
               {int(i): float(v) for i, v in _GRAD_NORM.findall(log)})


def test_training_on_prepared_text_matches_stock_and_its_routing_is_analysed(tmp_path):
    """The demo's path: prepare-data on real text (Python sources), then configs/tiny-cpu.yaml through
    scripts/train_single_node.sh with Megatron's defaults, stock and --micro-ep: the same losses and
    grad norms (to fp32 rounding, as in tests/test_pretrain.py), the loss falls, and micromoe analyze
    reads the run's own routing trace and writes its plots. The MicroEP run re-places its experts
    (--micro-ep-placement adaptive, threshold 0, every 3 iterations) on this skewed real routing: the
    experts and their distributed-optimizer state migrate between steps, and the run is still stock's."""
    import micromoe_megatron

    sources = sorted(Path(micromoe_megatron.__file__).parent.rglob("*.py"))
    result = prepare([str(p) for p in sources], str(tmp_path / "data" / "corpus"), vocab_size=512)
    common = [*result.megatron_args, "--train-iters", "12", "--log-interval", "1"]
    stock = _launch(["--no-micro-ep", *common]).check()
    trace = tmp_path / "trace"
    micro = _launch([*common, "--moe-routing-trace-path", str(trace), "--micro-ep-placement", "adaptive",
                     "--micro-ep-replacement-interval", "3", "--micro-ep-replacement-threshold", "0",
                     "--micro-ep-check-replicas-interval", "3"]).check()

    assert sorted(micro.losses) == list(range(1, 13))
    for name in ("losses", "grad_norms"):  # fp32: expert GEMMs on other ranks may differ in the last bit
        ours, theirs = getattr(micro, name), getattr(stock, name)
        assert sorted(ours) == sorted(theirs) and all(abs(ours[i] - theirs[i]) <= 1e-5 * abs(theirs[i]) for i in ours)
    assert "HuggingFaceTokenizer" in micro.log and "MicroEP on: d=2" in micro.log
    checks = re.findall(r"MicroEP re-placement check \[iteration (\d+)\]: (\d+) layer", micro.log)
    assert [int(i) for i, _ in checks] == [3, 6, 9, 12]
    assert sum(int(n) for _, n in checks) > 0, "the skewed real routing should have been re-placed"
    # The launcher feeds the time gate: measured expert time per token and migration cost, per layer.
    gates = re.findall(r"layer \d+: [^;\n]*?gain ([-\d.e+]+) ms vs migration ([-\d.e+]+) ms, experts ([-\d.e+]+) us per "
                       r"token", micro.log)
    assert gates and all(float(per_token) > 0 for _, _, per_token in gates), "expert time per token was not measured"
    lines = [line for line in micro.log.splitlines() if "re-placement check" in line]
    assert any(float(migration) > 0 for _, migration, _ in gates), f"no migration cost in the gate: {lines}"
    assert np.mean([micro.losses[i] for i in (10, 11, 12)]) < micro.losses[1] - 0.5  # falls clearly
    plots = tmp_path / "plots"
    assert cli_main(["analyze", str(trace), "--experts", "8", "--ep", "2", "--micro-ep", "2",
                     "--plot-dir", str(plots), "--json"]) == 0
    assert sorted(p.name for p in plots.glob("*.png")) and all(p.stat().st_size > 0 for p in plots.glob("*.png"))
