"""Data path throughput: the mixture loader against direct reads, start-up at the full corpus's scale, and
tokenization against the tokenizer alone.

Loader: tokens/s of data.loader.TokenBatches (the stage-1 mixture's eight weights; 1 and 2 workers, and in
the training process) against reading the same shards' token arrays directly with tarfile + numpy
(sequentially, every member), and against webdataset's own reader, in interleaved rounds on a
synthetic corpus of 2048-token samples. Target: loader / direct >= 0.8 (RESULT: the lower of 1 and
2 workers). Also: the loader's rate over what training consumes per rank (the tiny config at its
CPU MFU, a 1B-parameter model at 40% MFU of an H100's bf16 peak), and the share of a 1B step's
time that reading a micro batch in the training process costs: every tensor-parallel rank reads
its data-parallel rank's samples itself (from the page cache after the first) instead of
receiving them by broadcast, and this says what that costs.

Scale: start-up (manifests read, loader built, first micro batch read) and state size for a corpus
of 100 shards against one of 120,000 shards of 5 MB (600 GB): the 120,000-shard manifests describe
shards of which only those the first batch reads are written. Target: ratio < 2, state size equal.

Tokenization: MB/s of tools/build_shards.py (tokenize, pack, write shards, checksums) against
tokenizers' encode_batch on the same text (the stdlib corpus of `make train`), with 1 and 2
processes (encode_batch: 1 and 2 threads). Target >= 0.8. Projected: 5 TB on 1,000 cores at the
measured 1-process rate.

    python bench/data_throughput.py [--rounds 9] [--samples 2000]
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from cromwell.bench.machine import machine
from cromwell.bench.timing import interleaved, paired_ratio
from cromwell.data.loader import Plan, TokenBatches
from cromwell.data.mixture import integer_weights
from cromwell.data.shards import CRC_NAME, Location, read_corpus, sample_crcs
from cromwell.model.config import ModelConfig
from cromwell.pretrain.config import load_config
from cromwell.pretrain.throughput import flops_per_token, peak_flops_per_device
from cromwell.data.writer import build_shards, write_corpus_index, write_shard, write_source

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DESIGN_WEIGHTS = {"stack_v2": 30, "codecontests": 10, "github_prs": 10, "arxiv": 10, "openstax": 5,
                "stackoverflow": 5, "vision_text": 25, "financial_code": 5}
CONTEXT = 2048
VOCAB = 32_000
SAMPLES_PER_SHARD = 256
H100_BF16_DENSE = 989e12


def synthetic_corpus(root: Path, samples_per_source: int) -> None:
    rng = np.random.default_rng(0)
    for name in DESIGN_WEIGHTS:
        write_source(root, name, rng.integers(0, VOCAB, (samples_per_source, CONTEXT + 1)), SAMPLES_PER_SHARD, VOCAB)


def direct_reader(root: Path):
    """Every sample of every shard, in order, with tarfile + numpy: the reference."""
    paths = sorted(root.glob("*/shard-*.tar"))
    while True:
        for path in paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    yield np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)


def webdataset_reader(root: Path):
    import webdataset as wds

    urls = [str(p) for p in sorted(root.glob("*/shard-*.tar"))]
    while True:
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            yield sample["tokens.npy"]


def bench_loader(root: Path, rounds: int, samples: int) -> dict:
    micro = 8
    loaders = {w: TokenBatches(root, weights=DESIGN_WEIGHTS, vocab_size=VOCAB, global_batch=micro, micro_batch_size=micro,
                               dp_rank=0, dp_size=1, seed=1, num_workers=w) for w in (0, 1, 2)}
    for loader in loaders.values():
        next(loader)  # workers started outside the timing
    direct, wds_iter = direct_reader(root), webdataset_reader(root)
    batches = samples // micro

    def run_loader(w):
        return lambda: [next(loaders[w]) for _ in range(batches)]

    def run_direct():
        [torch.from_numpy(next(direct).astype(np.int64)) for _ in range(batches * micro)]

    def run_wds():
        [torch.from_numpy(next(wds_iter).astype(np.int64)) for _ in range(batches * micro)]

    try:
        seconds = interleaved([run_loader(1), run_loader(2), run_direct, run_wds, run_loader(0)], rounds)
    finally:
        for loader in loaders.values():
            loader.close()
    tokens = batches * micro * CONTEXT
    names = ("loader_1w", "loader_2w", "direct", "wds", "loader_0w")
    rate = {name: tokens / statistics.median(s) for name, s in zip(names, seconds)}
    return {"tokens_per_round": tokens, "tokens_per_s": rate,
            "loader_1w_vs_direct": paired_ratio(seconds[2], seconds[0]),
            "loader_2w_vs_direct": paired_ratio(seconds[2], seconds[1]),
            "loader_0w_vs_direct": paired_ratio(seconds[2], seconds[4]),
            "webdataset_vs_direct": paired_ratio(seconds[2], seconds[3])}


def consumption() -> dict:
    """Tokens/s one rank trains on: the tiny config on this CPU at its measured MFU, and a 1B model on an H100."""
    tiny = load_config(ROOT / "pretrain" / "configs" / "tiny.yaml")
    peak, _ = peak_flops_per_device("cpu", torch.float32)
    tiny_mfu = 0.5  # `make train`'s logged median on these machines (bench/results/trainer_overhead_cpu_zero1.json)
    tiny_rate = tiny_mfu * peak / flops_per_token(tiny.model, tiny.model.padded_vocab_size(), tiny.training.lm.context_length)
    one_b = ModelConfig(hidden_size=2048, num_layers=16, num_heads=16, ffn_hidden_size=5632)
    params = one_b.num_layers * (4 * 2048**2 + 3 * 2048 * 5632) + 2 * 32_000 * 2048
    one_b_rate = 0.4 * H100_BF16_DENSE / flops_per_token(one_b, 32_000, 4096)
    return {"tiny_cpu_tokens_per_s": tiny_rate, "tiny_cpu_mfu": tiny_mfu, "one_b_params": params,
            "one_b_h100_tokens_per_s": one_b_rate, "one_b_h100_mfu": 0.4}


def scaled_corpus(root: Path, shards: int) -> None:
    """Manifests for `shards` shards of about 5 MB per source (8 sources), with only the shards that
    the first micro batch reads written: the others are never opened at start-up."""
    per_shard = 5_000_000 // (2 * (CONTEXT + 1) + 1024)
    num_samples = shards // len(DESIGN_WEIGHTS) * per_shard
    for name in DESIGN_WEIGHTS:
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps({
            "format_version": 2, "source": name, "context_length": CONTEXT, "dtype": "uint16", "vocab_size": VOCAB,
            "tokenizer_sha256": "0" * 64, "samples_per_shard": per_shard, "num_samples": num_samples,
            "documents": 0, "input_tokens": 0, "leftover_tokens": 0, "build": {}}))
    write_corpus_index(root)
    plan = Plan(read_corpus(Location(root)), integer_weights(DESIGN_WEIGHTS), 1, 8)
    source, shard, _ = plan.locate(np.arange(8))
    rng = np.random.default_rng(0)
    for name in DESIGN_WEIGHTS:  # sparse: only the entries of the shards written below hold data
        with open(root / name / CRC_NAME, "wb") as f:
            f.truncate(4 * num_samples)
    for j, s in set(zip(source.tolist(), shard.tolist())):
        rows = rng.integers(0, VOCAB, (min(per_shard, num_samples - s * per_shard), CONTEXT + 1)).astype(np.uint16)
        write_shard(root / plan.names[j], s, s * per_shard, rows)
        with open(root / plan.names[j] / CRC_NAME, "r+b") as f:
            f.seek(4 * s * per_shard)
            f.write(sample_crcs(rows))


def bench_startup(tmp: Path, rounds: int) -> dict:
    roots = {}
    for shards in (100, 120_000):
        roots[shards] = tmp / f"scale_{shards}"
        scaled_corpus(roots[shards], shards)
    states, memory = {}, {}

    def start(shards):
        def fn():
            loader = TokenBatches(roots[shards], weights=DESIGN_WEIGHTS, vocab_size=VOCAB, global_batch=8,
                                  micro_batch_size=8, dp_rank=0, dp_size=1, seed=1, num_workers=0)
            next(loader)
            states[shards] = loader.state_dict()
            loader.close()
        return fn

    for shards in roots:
        tracemalloc.start()
        start(shards)()
        memory[shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    seconds = interleaved([start(120_000), start(100)], rounds)
    sizes = {s: len(json.dumps(states[s])) for s in states}
    leaves = {s: sum(len(v) if isinstance(v, dict) else 1 for v in states[s].values()) for s in states}
    return {"startup_s": {s: statistics.median(x) for s, x in zip((120_000, 100), seconds)},
            "ratio": paired_ratio(seconds[0], seconds[1]), "state_json_bytes": sizes, "state_entries": leaves,
            "peak_python_bytes": memory, "shard_bytes": 5_000_000, "corpus_bytes_120k": 120_000 * 5_000_000}


def ensure_stdlib_corpus() -> tuple[Path, Path]:
    corpus, tokenizer = ROOT / "runs" / "tiny" / "corpus", ROOT / "runs" / "tiny" / "tokenizer.json"
    subprocess.run([sys.executable, "tools/stdlib_corpus.py", "--output", str(corpus)], cwd=ROOT, check=True,
                   capture_output=True)
    if not tokenizer.is_file():
        subprocess.run([sys.executable, "tools/train_tokenizer.py", "--config", "pretrain/configs/tiny.yaml",
                        "--input", str(corpus), "--output", str(tokenizer)], cwd=ROOT, check=True, capture_output=True)
    return corpus, tokenizer


_ENCODE = """
import json, sys, time
from tokenizers import Tokenizer
texts = [json.loads(l)["text"] for l in open(sys.argv[1])]
tok = Tokenizer.from_file(sys.argv[2])
tok.encode_special_tokens = True
start = time.perf_counter()
tok.encode_batch(texts, add_special_tokens=False)
print(time.perf_counter() - start)
"""


def bench_tokenize(tmp: Path, rounds: int) -> dict:
    corpus, tokenizer = ensure_stdlib_corpus()
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in open(corpus / "corpus.jsonl"))
    out = {"text_mb": text_bytes / 1e6}
    for procs in (1, 2):
        def build(procs=procs):
            target = tmp / f"tok_{procs}_{time.monotonic_ns()}"
            with contextlib.redirect_stdout(io.StringIO()):
                build_shards([corpus], tokenizer, target, 256, workers=procs, samples_per_shard=256,
                             show_progress=False)

        def encode(procs=procs):
            env = dict(os.environ, RAYON_NUM_THREADS=str(procs), TOKENIZERS_PARALLELISM="true")
            result = subprocess.run([sys.executable, "-c", _ENCODE, str(corpus / "corpus.jsonl"), str(tokenizer)],
                                    env=env, check=True, capture_output=True, text=True)
            times.append(float(result.stdout.split()[-1]))

        times: list[float] = []
        build_seconds = interleaved([build, encode], rounds)[0]
        out[f"{procs}p"] = {"build_mb_per_s": text_bytes / 1e6 / statistics.median(build_seconds),
                            "encode_batch_mb_per_s": text_bytes / 1e6 / statistics.median(times),
                            "ratio": paired_ratio(times, build_seconds)}
    per_core = out["1p"]["build_mb_per_s"]
    out["projected_5tb_on_1000_cores_hours"] = 5e6 / (per_core * 1000) / 3600
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--samples", type=int, default=2000, help="samples per timed loader round")
    parser.add_argument("--samples-per-source", type=int, default=2500)
    args = parser.parse_args()
    started, at_start = time.time(), machine()
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        tmp = Path(tmp)
        synthetic_corpus(tmp / "corpus", args.samples_per_source)
        loader = bench_loader(tmp / "corpus", args.rounds, args.samples)
        use = consumption()
        startup = bench_startup(tmp, args.rounds * 3)
        tokenize = bench_tokenize(tmp, max(3, args.rounds // 3))
    best = max(loader["tokens_per_s"]["loader_1w"], loader["tokens_per_s"]["loader_2w"])
    result = {
        "benchmark": "data_throughput", "machine": at_start, "load_average_at_end": os.getloadavg(),
        "wall_s": time.time() - started, "context_length": CONTEXT, "weights": DESIGN_WEIGHTS,
        "loader": loader, "consumption": use,
        "loader_over_tiny_cpu_consumption": best / use["tiny_cpu_tokens_per_s"],
        "loader_over_1b_h100_consumption": best / use["one_b_h100_tokens_per_s"],
        # Every tensor-parallel rank of a data-parallel rank reads the same samples (from the page
        # cache after the first): the share of a step's time one such read costs, without workers.
        "read_share_of_1b_h100_step": use["one_b_h100_tokens_per_s"] / loader["tokens_per_s"]["loader_0w"],
        "startup": startup, "tokenize": tokenize,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "loader", "startup", "tokenize")}, indent=1))
    print(f"loader tokens/s: {', '.join(f'{k} {v:,.0f}' for k, v in loader['tokens_per_s'].items())}")
    print(f"start-up s: {startup['startup_s']}; state bytes {startup['state_json_bytes']}; "
          f"entries {startup['state_entries']}; peak python bytes {startup['peak_python_bytes']}")
    for p in ("1p", "2p"):
        t = tokenize[p]
        print(f"tokenize {p}: build_shards {t['build_mb_per_s']:.2f} MB/s, encode_batch {t['encode_batch_mb_per_s']:.2f} "
              f"MB/s, ratio {t['ratio']['median']:.3f}")
    print(f"projected: 5 TB on 1,000 cores in {tokenize['projected_5tb_on_1000_cores_hours']:.1f} h")
    print(f"RESULT loader_vs_direct_read {min(loader[f'loader_{w}w_vs_direct']['median'] for w in (1, 2)):.3f}")
    print(f"RESULT startup_ratio_120k_vs_100_shards {startup['ratio']['median']:.3f}")
    print(f"RESULT tokenize_vs_encode_batch {min(tokenize['1p']['ratio']['median'], tokenize['2p']['ratio']['median']):.3f}")


if __name__ == "__main__":
    main()
