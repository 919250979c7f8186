"""Special tokens, tokenizer training and loading, corpus reading, and the stdlib corpus tool."""

import json
import random
from pathlib import Path

import pytest

from cromwell.data.documents import iter_documents
from cromwell.data.tokenizer import (
    BOS_ID, EOS, EOS_ID, NUM_PREDICTOR_TOKENS, PAD_ID, SPECIAL_TOKENS, USER, load_tokenizer,
    predictor_token, predictor_token_id, special_id,
)
from cromwell.data.corpus import stdlib as stdlib_corpus
from cromwell.tools import train_tokenizer

VOCAB_SIZE = 400
TINY_CONFIG = Path(__file__).parents[1] / "pretrain" / "configs" / "tiny.yaml"


def fixture_texts(n: int = 200) -> list[str]:
    rng = random.Random(0)
    syllables = ["de", "ret", "cla", "im", "po", "se", "lf", "va", "lue", "na", "ïve", "stra", "ße", "日本", "語", "🙂"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer.train_tokenizer(fixture_texts(), VOCAB_SIZE, show_progress=False).save(str(path))
    return path


def test_special_tokens_have_fixed_ids(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert SPECIAL_TOKENS[3:3 + NUM_PREDICTOR_TOKENS] == tuple(f"<|predictor_{i}|>" for i in range(1, 9))
    assert predictor_token_id(1) == 3 and predictor_token_id(8) == 10
    assert SPECIAL_TOKENS[11:] == (
        "<|image|>", "<|image_start|>", "<|image_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
    )
    assert tokenizer.get_vocab_size() == VOCAB_SIZE


@pytest.mark.parametrize("bad", [0, NUM_PREDICTOR_TOKENS + 1])
def test_predictor_token_out_of_range(bad):
    with pytest.raises(ValueError, match=f"index {bad} is outside 1..8"):
        predictor_token(bad)


def test_special_id_of_unknown_token():
    with pytest.raises(ValueError, match="'<|nope|>' is not one of the special tokens"):
        special_id("<|nope|>")


@pytest.mark.parametrize("text", [
    "plain words",
    "  leading and trailing spaces  \n\n",
    "tabs\tand\r\nCRLF lines\n",
    "unicode: naïve Straße 日本語 🙂 never seen: ∮ ℵ₀ ǅ",
    "",
])
def test_encode_decode_round_trips(tokenizer_file, text):
    tokenizer = load_tokenizer(tokenizer_file)
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_encode_to_one_id_and_round_trip(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    text = f"{USER}hi 🙂{EOS}{predictor_token(3)}"
    ids = tokenizer.encode(text).ids
    assert special_id(USER) in ids and EOS_ID in ids and predictor_token_id(3) == ids[-1]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_vocab_size_below_special_and_byte_tokens_is_rejected():
    with pytest.raises(ValueError, match="vocab size 100 is too small.*need 274"):
        train_tokenizer.train_tokenizer(["abc"], 100, show_progress=False)


def test_load_tokenizer_names_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"tokenizer file {missing} does not exist"):
        load_tokenizer(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=f"tokenizer file {corrupt} is not a valid tokenizers JSON"):
        load_tokenizer(corrupt)


def test_load_tokenizer_rejects_other_special_token_order(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["some text"], trainers.BpeTrainer(special_tokens=[EOS], show_progress=False))
    path = tmp_path / "other.json"
    other.save(str(path))
    with pytest.raises(ValueError, match=rf"{path}: special token <\|pad\|> has id None, expected 0"):
        load_tokenizer(path)


def test_iter_documents_reads_files_dirs_and_jsonl(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.jsonl").write_text(
        json.dumps({"text": "one", "source": "code"}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
    )
    (corpus / "sub" / "a.txt").write_text("three")
    (corpus / ".hidden").write_text("never read")
    single = tmp_path / "notes.md"
    single.write_text("four")
    assert list(iter_documents([corpus, single])) == [
        ("one", "code"), ("two", "corpus"), ("three", "corpus"), ("four", "notes"),
    ]


def test_iter_documents_names_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"input {tmp_path / 'missing'} does not exist"):
        list(iter_documents([tmp_path / "missing"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2: a record needs a string field 'text' or a chat's 'messages'"):
        list(iter_documents([bad]))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=f"{bad}:1: not valid JSON"):
        list(iter_documents([bad]))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=f"input file {binary} is not UTF-8"):
        list(iter_documents([binary]))


def write_jsonl_corpus(directory):
    directory.mkdir()
    with open(directory / "docs.jsonl", "w") as f:
        for text in fixture_texts():
            f.write(json.dumps({"text": text}) + "\n")


def test_train_tokenizer_cli(tmp_path, capsys):
    write_jsonl_corpus(tmp_path / "corpus")
    output = tmp_path / "out" / "tokenizer.json"
    train_tokenizer.main(["--input", str(tmp_path / "corpus"), "--output", str(output), "--vocab-size", "300"])
    assert load_tokenizer(output).get_vocab_size() == 300
    total_bytes = sum(len(t.encode()) for t in fixture_texts())
    assert f"read 200 documents, {total_bytes / 1e6:.1f} MB of text" in capsys.readouterr().out


def test_vocab_size_comes_from_the_config_unless_given(tmp_path):
    assert train_tokenizer.vocab_size_from_config(str(TINY_CONFIG)) == 4096
    write_jsonl_corpus(tmp_path / "corpus")
    output = tmp_path / "tokenizer.json"
    train_tokenizer.main([
        "--input", str(tmp_path / "corpus"), "--output", str(output),
        "--config", str(TINY_CONFIG), "--vocab-size", "320",
    ])
    assert load_tokenizer(output).get_vocab_size() == 320


def fake_stdlib(root):
    files = {
        "abc.py": "a = 1\n",
        "json/__init__.py": "j = 2\n",
        "json/decoder.py": "d = 3\n" * 50,
        "zz.py": "z = 4\n",
        "test/test_x.py": "excluded\n",
        "json/tests/t.py": "excluded\n",
        "idlelib/i.py": "excluded\n",
        "site-packages/pkg/p.py": "excluded\n",
        "notes.txt": "not python\n",
        "pydoc_data/topics.py": "topics = {'while': 'The while statement', 'assert': 'Assert statements'}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_stdlib_corpus_selects_sorts_caps_and_skips_reruns(tmp_path):
    stdlib = tmp_path / "lib"
    fake_stdlib(stdlib)
    out = tmp_path / "corpus"
    # The cap (in MiB) fits abc.py, json/__init__.py and json/decoder.py (300 bytes) but not zz.py.
    counts = stdlib_corpus.write_corpus(out, 312 / 2**20, stdlib)
    records = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert [(r["source"], r["path"]) for r in records] == [
        ("stdlib_code", "abc.py"), ("stdlib_code", "json/__init__.py"), ("stdlib_code", "json/decoder.py"),
        ("stdlib_docs", "pydoc_data/topics.py:assert"), ("stdlib_docs", "pydoc_data/topics.py:while"),
    ]
    assert records[3]["text"] == "Assert statements"
    assert counts["stdlib_code"] == {"documents": 3, "bytes": 312}
    written = (out / "corpus.jsonl").stat().st_mtime_ns
    stdlib_corpus.write_corpus(out, 312 / 2**20, stdlib)
    assert (out / "corpus.jsonl").stat().st_mtime_ns == written
    stdlib_corpus.write_corpus(out, 1.0, stdlib)
    assert len((out / "corpus.jsonl").read_text().splitlines()) == 6
    # The corpus directory reads as its documents only: the args file is hidden.
    assert [s for _, s in iter_documents([out])] == ["stdlib_code"] * 4 + ["stdlib_docs"] * 2


def test_stdlib_corpus_of_this_python_has_code_and_docs(tmp_path):
    import sysconfig

    counts = stdlib_corpus.write_corpus(tmp_path, 0.2, Path(sysconfig.get_paths()["stdlib"]))
    assert 0 < counts["stdlib_code"]["bytes"] <= 0.2 * 2**20
    assert counts["stdlib_docs"]["documents"] > 50
