"""Bad inputs are refused up front, naming the file, field or value: the tokenizer at start, token ids
as each sample is read."""

import json
from itertools import islice

import numpy as np
import pytest

from cromwell.data.shards import ShardError
from cromwell.pretrain.config import ConfigError, load_config
from cromwell.pretrain.objectives import load_run_tokenizer
from cromwell.pretrain.objectives.lm import LanguageModeling
from cromwell.tools import train_tokenizer
from cromwell.data.writer import write_source

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
    return load_run_tokenizer(load_config(TINY, [f"data.tokenizer={path}", f"model.vocab_size={vocab_size}"]))


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
                            f"model.vocab_size {TOKENIZER_VOCAB - 1}: the model could not embed every id")


def write_shards(directory, rows: np.ndarray, vocab_size: int = TOKENIZER_VOCAB):
    """A corpus of one source "code" holding exactly `rows` ([n, CONTEXT + 1] ids), whose manifest
    claims `vocab_size` whatever the ids are."""
    return write_source(directory, "code", rows, SAMPLES_PER_SHARD, vocab_size)


def clean_rows(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, TOKENIZER_VOCAB, (count, CONTEXT + 1))


def lm_batches(shards, vocab_size):
    cfg = load_config(TINY, [f"data.shards={shards}", f"model.vocab_size={vocab_size}",
                             f"training.lm.context_length={CONTEXT}", "training.micro_batch_size=2",
                             "training.batch_size=2", "data.num_workers=0"])
    return LanguageModeling(cfg).batches("train", dp_rank=0, dp_size=1)


def test_the_lm_loader_checks_ids_against_the_configured_vocabulary(tmp_path):
    rows = clean_rows(8)
    rows[5, 3] = 4000
    write_shards(tmp_path / "shards", rows)
    with pytest.raises(ShardError, match=rf"shard {tmp_path / 'shards'}/code/shard-000001.tar member "
                                         rf"0000000005.tokens.npy holds token id 4000, outside the "
                                         f"model's vocabulary of {TOKENIZER_VOCAB} ids"):
        list(islice(lm_batches(tmp_path / "shards", TOKENIZER_VOCAB), 4))
    assert len(list(islice(lm_batches(tmp_path / "shards", 5001), 4))) == 4


def test_shards_of_a_larger_tokenizer_are_refused_before_reading(tmp_path):
    write_shards(tmp_path / "shards", clean_rows(8), vocab_size=TOKENIZER_VOCAB + 1)
    with pytest.raises(ConfigError, match=f"tokenizer vocab {TOKENIZER_VOCAB + 1} exceeds "
                                          f"model.vocab_size {TOKENIZER_VOCAB}"):
        lm_batches(tmp_path / "shards", TOKENIZER_VOCAB)
