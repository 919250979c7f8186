"""Bad inputs are refused up front, naming the file, field or value: the tokenizer at start, token ids
as each shard is read, and shard checksums by tools/inspect_shards.py."""

import json
from itertools import islice

import numpy as np
import pytest

from data.shards import Manifest, ShardError, read_shard, write_manifest
from pretrain.config import ConfigError, load_config
from pretrain.objectives import load_run_tokenizer
from pretrain.objectives.lm import LanguageModeling
from tools import build_shards, inspect_shards, train_tokenizer

TINY = "pretrain/configs/tiny.yaml"
TOKENIZER_VOCAB = 300
CONTEXT = 8
SAMPLES_PER_SHARD = 4


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    texts = [f"word{i} and some text {i * 7}" for i in range(200)]
    train_tokenizer.train_tokenizer(texts, TOKENIZER_VOCAB, show_progress=False).save(str(path))
    return path


def run_tokenizer(path, vocab_size=TOKENIZER_VOCAB):
    return load_run_tokenizer(load_config(TINY, [f"data.tokenizer={path}", f"training.lm.vocab_size={vocab_size}"]))


def test_a_tokenizer_that_fits_the_model_loads(tokenizer_file):
    assert run_tokenizer(tokenizer_file).get_vocab_size() == TOKENIZER_VOCAB


def test_missing_tokenizer_names_the_field_and_file(tmp_path):
    with pytest.raises(ConfigError, match=f"data.tokenizer: tokenizer file {tmp_path / 'nope.json'} does not exist"):
        run_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["just some text\n", json.dumps({"vocab": {"a": 0}})], ids=["text", "other_json"])
def test_a_file_that_is_no_tokenizer_is_named(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"data.tokenizer: tokenizer file {path} is not a valid tokenizers JSON file"):
        run_tokenizer(path)


def test_a_tokenizer_larger_than_the_model_vocabulary_names_both_sizes(tokenizer_file):
    with pytest.raises(ConfigError) as e:
        run_tokenizer(tokenizer_file, vocab_size=TOKENIZER_VOCAB - 1)
    assert str(e.value) == (f"data.tokenizer {tokenizer_file} has {TOKENIZER_VOCAB} tokens, more than "
                            f"training.lm.vocab_size {TOKENIZER_VOCAB - 1}: the model could not embed every id")


def write_shards(directory, shards: list[np.ndarray], vocab_size: int = TOKENIZER_VOCAB) -> Manifest:
    """A shard directory holding exactly `shards` ([SAMPLES_PER_SHARD, CONTEXT + 1] ids each), whose
    manifest claims `vocab_size` whatever the ids are."""
    directory.mkdir()
    writer = build_shards.ShardWriter(directory, SAMPLES_PER_SHARD, CONTEXT + 1)
    for rows in shards:
        for row in rows:
            writer.write(row.astype(np.uint16), "code")
    manifest = Manifest(directory=directory, context_length=CONTEXT, dtype="uint16", vocab_size=vocab_size,
                        tokenizer_path="tokenizer.json", tokenizer_sha256="0" * 64, shards=tuple(writer.shards),
                        leftover_tokens={"code": 3}, totals={}, build={})
    write_manifest(manifest)
    return manifest


def clean_shards(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, TOKENIZER_VOCAB, (SAMPLES_PER_SHARD, CONTEXT + 1)) for _ in range(count)]


@pytest.fixture
def bad_id_shards(tmp_path):
    """Two shards; the second's samples 2 and 3 hold ids past the vocabulary its manifest claims."""
    shards = clean_shards(2)
    shards[1][2, 5], shards[1][3, 0] = 4000, 5000
    return write_shards(tmp_path / "shards", shards)


def test_an_id_past_the_vocabulary_names_shard_sample_and_id(bad_id_shards):
    read_shard(bad_id_shards, 0, TOKENIZER_VOCAB)
    with pytest.raises(ShardError) as e:
        read_shard(bad_id_shards, 1, TOKENIZER_VOCAB)
    assert str(e.value) == (f"{bad_id_shards.shard_path(1)}: sample 2 holds token id 4000, outside the model's "
                            f"vocabulary of {TOKENIZER_VOCAB} ids (the shards were built with a larger tokenizer, "
                            "or are corrupt)")
    assert read_shard(bad_id_shards, 1, 5001)[0][3, 0] == 5000


def lm_batches(shards, vocab_size):
    cfg = load_config(TINY, [f"data.shards={shards}", f"training.lm.vocab_size={vocab_size}",
                             f"training.lm.context_length={CONTEXT}", "training.micro_batch_size=2",
                             "data.num_workers=0"])
    return LanguageModeling(cfg).batches("train", dp_rank=0, dp_size=1)


def test_the_lm_loader_checks_ids_against_the_configured_vocabulary(bad_id_shards):
    with pytest.raises(ShardError, match=f"{bad_id_shards.shard_path(1)}: sample 2 holds token id 4000"):
        list(islice(lm_batches(bad_id_shards.directory, TOKENIZER_VOCAB), 4))
    assert len(list(islice(lm_batches(bad_id_shards.directory, 5001), 4))) == 4


def test_shards_of_a_larger_tokenizer_are_refused_before_reading(tmp_path):
    manifest = write_shards(tmp_path / "shards", clean_shards(2), vocab_size=TOKENIZER_VOCAB + 1)
    with pytest.raises(ConfigError, match=f"tokenizer vocab {TOKENIZER_VOCAB + 1} exceeds "
                                          f"training.lm.vocab_size {TOKENIZER_VOCAB}"):
        lm_batches(manifest.directory, TOKENIZER_VOCAB)


def test_inspect_prints_the_manifest_summary(tmp_path, capsys):
    manifest = write_shards(tmp_path / "shards", clean_shards(3))
    inspect_shards.main([str(manifest.directory)])
    out = capsys.readouterr().out
    assert f"3 shards, 12 samples of {CONTEXT + 1} tokens (context length {CONTEXT}), uint16" in out
    assert out.splitlines()[-1].split() == ["code", "3", "12", str(12 * (CONTEXT + 1)), "3"]


def test_inspect_verify_passes_a_clean_set(tmp_path, capsys):
    manifest = write_shards(tmp_path / "shards", clean_shards(3))
    inspect_shards.main([str(manifest.directory), "--verify"])
    captured = capsys.readouterr()
    assert "all 3 shards match their sha256" in captured.out
    assert "verified 3/3 shards" in captured.err and "MB/s" in captured.err and "ETA" in captured.err


def test_inspect_verify_names_every_corrupt_or_missing_shard(tmp_path, capsys):
    manifest = write_shards(tmp_path / "shards", clean_shards(4))
    corrupt = manifest.shard_path(1)
    data = bytearray(corrupt.read_bytes())
    data[600] ^= 0x01
    corrupt.write_bytes(bytes(data))
    manifest.shard_path(3).unlink()
    with pytest.raises(SystemExit) as e:
        inspect_shards.main([str(manifest.directory), "--verify"])
    assert e.value.code == (f"error: shard file {corrupt} does not match the sha256 listed in "
                            f"{manifest.directory / 'manifest.json'}\n"
                            f"error: shard file {manifest.shard_path(3)} listed in "
                            f"{manifest.directory / 'manifest.json'} does not exist")
    assert "verified 4/4 shards" in capsys.readouterr().err
