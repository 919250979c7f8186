"""Generation (model/generate.py): the KV cache gives what running the whole sequence again gives (token
for token, logits to 1e-5) for text and with an image, on one process and with TP=2; a batch gives what each
prompt alone gives; sampling, stop strings and the end of sequence behave; a Hugging Face model decodes
through the same loop, as transformers' own generate does."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, TINY_MODEL, launch, run
from cromwell.model.generate import HFDecoder, ModelDecoder, Sampling, attention_mask, generate

GPT_SETS = [s for s in TINY_MODEL if s.startswith("model.")] + ["model.vocab_size=300"]
VL_SETS = ["model.type=vljepa", "training.objective=hybrid", "model.hidden_size=64", "model.num_layers=2",
           "model.num_heads=4", "model.ffn_hidden_size=128", "model.vision.image_size=64", "model.vision.hidden_size=64",
           "model.vision.num_layers=2", "model.vision.num_heads=4", "model.vision.ffn_hidden_size=128",
           "model.fusion.every=1", "model.predictor.embedding_dim=64", "model.vocab_size=300"]


def worker(tmp_path, name, sets, nproc=1, *flags):
    out = tmp_path / f"{name}.json"
    launch("tests/dist/generate_worker.py", ["--config", "pretrain/configs/tiny.yaml", *[a for s in sets for a in ("--set", s)],
                                             *flags, "--out", str(out)], nproc)
    return json.loads(out.read_text())


def assert_same(a, b, atol=1e-5):
    assert [g["tokens"] for g in a] == [g["tokens"] for g in b]
    for ga, gb in zip(a, b):
        assert torch.allclose(torch.tensor(ga["logits"]), torch.tensor(gb["logits"]), atol=atol, rtol=0)


@pytest.mark.parametrize("kind, sets, flags", [
    ("text", GPT_SETS, []),
    ("text_sampled", GPT_SETS, ["--temperature", "0.8"]),
    ("image", VL_SETS, ["--image"]),
])
def test_the_cache_gives_what_the_whole_sequence_gives_on_one_process_and_tp2(tmp_path, kind, sets, flags):
    one = worker(tmp_path, f"{kind}_tp1", sets, 1, *flags)
    assert_same(one["cache"], one["no_cache"])
    assert sum(len(g["tokens"]) for g in one["cache"]) > 30  # it generated, not stopped at once
    tp2 = worker(tmp_path, f"{kind}_tp2", sets + ["parallel.tensor=2"], 2, *flags)
    assert_same(tp2["cache"], tp2["no_cache"])
    assert_same(tp2["cache"], one["cache"])  # the ranks decode together what one process decodes


@pytest.fixture(scope="module")
def models():
    from megatron.core import parallel_state

    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.distributed import init_distributed
    from dist.generate_worker import initialised

    init_distributed(load_config(REPO / "pretrain/configs/tiny.yaml", GPT_SETS))
    yield {name: initialised(load_config(REPO / "pretrain/configs/tiny.yaml", sets), 1)
           for name, sets in (("gpt", GPT_SETS), ("vl", VL_SETS))}
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_a_row_of_a_batch_is_what_its_prompt_gives_alone(models):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17]]
    batch = generate(ModelDecoder(models["gpt"], 300), prompts, Sampling(max_new_tokens=16), eos_id=-1, pad_id=0,
                     keep_logits=True)
    for prompt, row in zip(prompts, batch):
        [alone] = generate(ModelDecoder(models["gpt"], 300), [prompt], Sampling(max_new_tokens=16), eos_id=-1, pad_id=0,
                           keep_logits=True)
        assert alone.tokens == row.tokens and len(row.tokens) == 16 and row.finish == "length"
        assert torch.allclose(torch.stack(alone.logits), torch.stack(row.logits), atol=1e-5, rtol=0)


def test_the_image_is_read_and_text_rows_ignore_it(models):
    from dist.generate_worker import PROMPTS

    vl = models["vl"]
    patches = torch.randn(1, 16, 3 * 16 * 16, generator=torch.Generator().manual_seed(0))
    sampling = Sampling(max_new_tokens=12)
    with_image = generate(ModelDecoder(vl, 300, (patches, torch.tensor([0]))), PROMPTS, sampling, -1, 0, keep_logits=True)
    without = generate(ModelDecoder(vl, 300), PROMPTS, sampling, -1, 0, keep_logits=True)
    assert not torch.allclose(torch.stack(with_image[0].logits), torch.stack(without[0].logits), atol=1e-3)
    for a, b in zip(with_image[1:], without[1:]):  # rows without the image compute the language model alone
        assert a.tokens == b.tokens and torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)


def test_end_of_sequence_stop_strings_and_sampling(models):
    decoder = ModelDecoder(models["gpt"], 300)
    [greedy] = generate(decoder, [[5, 6, 7]], Sampling(max_new_tokens=10), -1, 0)
    # The first greedy token as end of sequence: nothing is generated, and it is not returned.
    [ended] = generate(decoder, [[5, 6, 7]], Sampling(max_new_tokens=10), eos_id=greedy.tokens[0], pad_id=0)
    assert ended.tokens == [] and ended.finish == "eos"
    # A stop string made of the third token's text: the text is cut before it.
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    [stopped] = generate(decoder, [[5, 6, 7]], Sampling(max_new_tokens=10, stop=(f"<{greedy.tokens[2]}>",)), -1, 0,
                         decode=decode)
    assert stopped.finish == "stop" and stopped.text == decode(greedy.tokens[:greedy.tokens.index(greedy.tokens[2])])
    # Sampling: the same seed draws the same tokens, another seed other ones; top_p near 0 is greedy.
    draw = lambda **kw: generate(decoder, [[5, 6, 7]] * 4, Sampling(max_new_tokens=10, temperature=1.0, **kw), -1, 0)  # noqa: E731
    assert [g.tokens for g in draw(seed=1)] == [g.tokens for g in draw(seed=1)]
    assert [g.tokens for g in draw(seed=1)] != [g.tokens for g in draw(seed=2)]
    assert all(g.tokens == greedy.tokens for g in draw(seed=3, top_p=1e-6))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_padding_columns_see_themselves_only():
    keys = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = attention_mask(keys, 2)[:, 0]
    assert mask[0].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert mask[1].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert attention_mask(keys, 4)[0, 0, 0].tolist() == [True, False, False, False]  # a padding query: itself


def test_a_hugging_face_model_decodes_through_the_same_loop(tmp_path):
    from cromwell.model import hf
    from cromwell.tools.tiny_hf_model import build_tiny_llama

    path = build_tiny_llama(str(tmp_path / "llama"), ["def f(x):\n    return x + 1\n" * 50], hidden=64, layers=2)
    model = hf.load_model(path, vocab_size=_vocab(path)).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    decoder = HFDecoder(model, _vocab(path))
    cached = generate(decoder, prompts, Sampling(max_new_tokens=12), eos_id=-1, pad_id=0, keep_logits=True)
    whole = generate(decoder, prompts, Sampling(max_new_tokens=12), eos_id=-1, pad_id=0, use_cache=False,
                     keep_logits=True)
    for a, b in zip(cached, whole):
        assert a.tokens == b.tokens
        assert torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)
    for prompt, row in zip(prompts, cached):  # transformers' own greedy decoding, one prompt at a time
        ids = torch.tensor([prompt])
        theirs = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        assert theirs[0, len(prompt):].tolist() == row.tokens


def _vocab(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def test_the_command_line_reads_a_checkpoint_and_its_export_alike(vl_layouts, vl_data, tmp_path):
    """tools/generate.py on the VL-JEPA's one-process checkpoint, its TP=2 checkpoint read by one process, and
    the safetensors export of the first, with an image and without: the same text every time."""
    from cromwell.tools import convert_ckpt

    single = vl_layouts["single"]["checkpoint"]
    convert_ckpt.main(["--checkpoint", str(single), "--out", str(tmp_path / "export"), "--format", "safetensors"])
    pairs = sorted((Path(vl_data["shards"]).parent / "pairs").glob("*.tar"))
    image = tmp_path / "image.png"
    with tarfile.open(pairs[0]) as tar:
        image.write_bytes(tar.extractfile(next(m for m in tar if m.name.endswith(".png"))).read())

    def text(checkpoint, *more):
        out = run([PYTHON, "tools/generate.py", "--checkpoint", str(checkpoint), "--prompt", "def main(", "--prompt",
                   "import os", "--max-new-tokens", "12", *more]).stdout
        *generated, stats = out.rstrip().split("\n")
        assert "tokens/s" in stats
        return "\n".join(generated).split("### generated")[1:]

    plain, with_image = text(single), text(single, "--image", str(image))
    assert plain == text(tmp_path / "export") == text(vl_layouts["tp2"]["checkpoint"])
    assert with_image == text(tmp_path / "export", "--image", str(image))
    proc = run([PYTHON, "tools/generate.py", "--checkpoint", str(single), "--prompt", "x", "--image",
                str(tmp_path / "missing.png")], check=False)
    assert proc.returncode != 0 and "missing.png" in proc.stderr
