"""tools/convert_ckpt.py on real checkpoints: the VL-JEPA trained 3 steps on one process and with ZeRO-3,
TP=2, PP=2 and TP=2 x PP=2 (conftest's vl_layouts, the same init and batches) converts to the same full
tensors; each export is loaded by a program that did not write it (our C++ reader, transformers'
LlamaForCausalLM, the gguf package's reader, llama.cpp when installed) and gives the model's logits;
an export resharded to TP=2 gives the original loss and training resumes from it (PP=2, and a full
checkpoint's optimizer state carried over: tests/test_relayout.py); bad input is a clear error that leaves
no output behind.

Tolerances: the layouts' weights differ by their float reduction orders over 3 Adam steps (measured
max 6e-6 absolute): 5e-5 absolute. Conversion of the one-process checkpoint is bit-exact (it only
cuts and copies). Logits from another program's fp32 arithmetic: 1e-4 absolute; from llama.cpp's
kernels 1e-3 (f32) and 3e-3 (f16 matrices).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file

from conftest import PYTHON, REPO, launch, run, vl_sets
from cromwell.pretrain.checkpoint import _sha256, safe_load
from cromwell.pretrain.config import Config
from cromwell.tools import convert_ckpt
from cromwell.model.tensors import cut, join, plan

CPP = REPO / "tools" / "cpp" / "build" / "cromwell_infer"
TOKENS = [5, 17, 300, 42, 42, 9, 511, 120, 64, 3]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    from cromwell.pretrain.distributed import init_distributed

    from cromwell.pretrain.config import load_config

    init_distributed(load_config("pretrain/configs/tiny.yaml"))
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def exports(vl_layouts, tmp_path_factory):
    """Every layout's checkpoint converted to every format (in this process)."""
    root = tmp_path_factory.mktemp("exports")
    for name, layout in vl_layouts.items():
        convert_ckpt.main(["--checkpoint", str(layout["checkpoint"].parent), "--out", str(root / name), "--format", "all"])
    return root


@pytest.fixture(scope="module")
def cpp_reader():
    run(["make", "-s", "-C", "tools/cpp"])
    return CPP


def _model_from(cfg: Config, weights: dict):
    """The project's VL-JEPA at TP=1 holding `weights` ({parameter name: full tensor})."""
    from cromwell.model.build import build
    from cromwell.model.gpt import megatron_config

    model = build(cfg.model, megatron_config(1))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    return model.eval()


def checkpoint_model(tag_dir: Path):
    """The one-process checkpoint's model, read with torch alone (not through the converter)."""
    states = safe_load(tag_dir / "mp_rank_00_model_states.pt")
    cfg = Config.model_validate(states["config"])
    weights = {k.removeprefix("model."): v for k, v in states["module"].items() if v is not None}
    return cfg, _model_from(cfg, weights)


def export_model(export: Path):
    """The model rebuilt from a safetensors export's tensors."""
    cfg = Config.model_validate(json.loads((export / "config.json").read_text())["run_config"])
    tensors = load_file(export / "model.safetensors")
    params = plan(cfg.model)
    return cfg, _model_from(cfg, {p.source: join(p, tensors) for p in params})


@torch.no_grad()
def text_logits(cfg: Config, model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] logits of the text path (no image), padding rows left out."""
    v = cfg.model.vision
    patches = torch.zeros(0, v.grid**2, 3 * v.patch_size**2)
    _, hidden = model(torch.tensor([tokens]), patches, torch.zeros(0, dtype=torch.long))
    from cromwell.model.vljepa import OutputHead

    return (hidden[0] @ model._of(OutputHead).proj.weight.T)[:, : cfg.model.vocab_size]


def greedy(cfg, model, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(text_logits(cfg, model, out)[-1].argmax()))
    return out[len(tokens):]


# -- the tensors ---------------------------------------------------------------------------------------


def test_one_process_conversion_cuts_the_fused_weights_exactly(vl_layouts, exports):
    tag_dir = vl_layouts["single"]["checkpoint"]
    module = safe_load(tag_dir / "mp_rank_00_model_states.pt")["module"]
    got = load_file(exports / "single" / "safetensors" / "model.safetensors")
    heads, hd = 4, 16
    # Language block 0 is layer 6 (patch embed, 2 ViT blocks, ViT norm, projector, embedding before it).
    qkv = module["model.6.attn.qkv.weight"].view(heads, 3, hd, 64)
    for i, part in enumerate("qkv"):
        assert torch.equal(got[f"language_encoder.layers.0.attn.{part}.weight"], qkv[:, i].reshape(64, 64))
    gate_up = module["model.6.mlp.gate_up.weight"].view(128, 2, 64)
    assert torch.equal(got["language_encoder.layers.0.mlp.gate.weight"], gate_up[:, 0])
    assert torch.equal(got["language_encoder.layers.0.mlp.up.weight"], gate_up[:, 1])
    kv = module["model.7.attn.kv.weight"].view(heads, 2, hd, 64)
    assert torch.equal(got["cross_modal_fusion.layers.0.attn.v.weight"], kv[:, 1].reshape(64, 64))
    word = module["model.5.word.weight"]  # 600 tokens padded to 640 rows
    assert got["language_encoder.embedding.weight"].shape == (600, 64)
    assert torch.equal(torch.cat([got["language_encoder.embedding.weight"],
                                  got["language_encoder.embedding.weight.vocab_padding"]]), word)
    target = safe_load(tag_dir / "objective_state_tp00_pp00.pt")["ema_target"]
    assert torch.equal(got["target.vision_encoder.norm.weight"], target["3.norm.weight"])
    assert not torch.equal(target["3.norm.weight"], module["model.3.norm.weight"])  # the EMA is its own copy
    # The design's five modules, and the same tensors in every whole-model format.
    assert {k.split(".")[0] for k in got if not k.startswith("target.")} == {
        "vision_encoder", "cross_modal_fusion", "language_encoder", "autoregressive_head", "jepa_head"}
    meta = json.loads((exports / "single" / "cpp" / "metadata.json").read_text())
    assert meta.keys() == got.keys()
    for name in ("language_encoder.layers.1.attn.k.weight", "jepa_head.text_predictor.step"):
        entry = meta[name]
        raw = np.fromfile(exports / "single" / "cpp" / entry["path"], dtype="<f4").reshape(entry["shape"])
        assert entry["dtype"] == "float32" and np.array_equal(raw, got[name].numpy())
    state = json.loads((exports / "single" / "cpp" / "training_state.json").read_text())
    assert state["step"] == 3 and state["objective"] == "hybrid"


@pytest.mark.parametrize("layout", ["tp2", "zero3", "pp2", "tp2pp2"])
def test_every_layout_converts_to_the_one_process_weights(exports, layout):
    want = load_file(exports / "single" / "safetensors" / "model.safetensors")
    got = load_file(exports / layout / "safetensors" / "model.safetensors")
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        assert torch.allclose(got[name], t, rtol=0, atol=5e-5), f"{name}: {(got[name] - t).abs().max()}"
    # Training moved the weights away from init, so agreement is not two copies of the init.
    moved = load_file(exports / "single" / "safetensors" / "model.safetensors")["language_encoder.layers.0.mlp_norm.weight"]
    assert (moved - 1).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["single", "tp2", "zero3", "tp2pp2"])
def test_the_kernel_copied_stretches_hold_the_tensors_bytes(vl_layouts, layout, tmp_path):
    """convert_ckpt copies a tensor file to file when its bytes are stretches of the checkpoint's files
    (DeepSpeedCheckpoint.runs); those bytes must be what reading and cutting the parameter gives."""
    from cromwell.pretrain.checkpoint.reader import DeepSpeedCheckpoint

    ckpt = DeepSpeedCheckpoint(vl_layouts[layout]["checkpoint"])
    cfg = ckpt.config
    copied, out = 0, tmp_path / "bytes"
    try:
        for param in plan(cfg.model):
            for piece in param.pieces:
                runs = ckpt.runs(param, piece)
                if runs is None:
                    continue
                with out.open("wb") as f:
                    ckpt.send(runs, f.fileno())
                want = cut(ckpt.read(param), piece).contiguous()
                assert out.read_bytes() == want.numpy().tobytes(), piece.name
                copied += 1
    finally:
        ckpt.close()
    # Every piece but the row-parallel joins (attention output and MLP down projections under TP).
    assert copied >= (60 if layout in ("single", "zero3") else 40)


# -- programs that load the exports ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "tp2pp2"])
def test_the_cpp_reader_gives_pytorchs_logits(vl_layouts, exports, cpp_reader, tmp_path, layout):
    cfg, model = (checkpoint_model(vl_layouts["single"]["checkpoint"]) if layout == "single"
                  else export_model(exports / layout / "safetensors"))
    want = text_logits(cfg, model, TOKENS)
    out = tmp_path / "logits.bin"
    proc = run([str(cpp_reader), str(exports / layout / "cpp"), "--tokens", ",".join(map(str, TOKENS)),
                "--generate", "6", "--logits-out", str(out)])
    got = torch.from_numpy(np.fromfile(out, dtype="<f4")).view(len(TOKENS), -1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("greedy"))
    assert [int(x) for x in line.split()[1:]] == greedy(cfg, model, TOKENS, 6)


def test_the_cpp_reader_refuses_a_truncated_tensor(exports, cpp_reader, tmp_path):
    broken = tmp_path / "cpp"
    shutil.copytree(exports / "single" / "cpp", broken)
    victim = broken / "language_encoder.layers.1.attn.q.weight.bin"
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = run([str(cpp_reader), str(broken), "--tokens", "1,2"], check=False)
    assert proc.returncode == 1
    assert "language_encoder.layers.1.attn.q.weight.bin has 1000 bytes, expected 16384" in proc.stderr


def test_transformers_llama_loads_the_hf_export_with_the_same_logits_and_greedy_tokens(vl_layouts, exports):
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg, model = checkpoint_model(vl_layouts["single"]["checkpoint"])
    hf = LlamaForCausalLM.from_pretrained(exports / "single" / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([TOKENS])).logits[0]
    want = text_logits(cfg, model, TOKENS)
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()
    generated = hf.generate(torch.tensor([TOKENS]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(TOKENS):].tolist()
    assert generated == greedy(cfg, model, TOKENS, 8)
    from cromwell.data.tokenizer import load_tokenizer

    text = "def add(a, b):\n    return a + b\n"
    ours = load_tokenizer(vl_layouts["single"]["checkpoint"] / "tokenizer.json").encode(text).ids
    assert AutoTokenizer.from_pretrained(exports / "single" / "hf")(text)["input_ids"] == ours


def test_a_gpt_checkpoint_converts_to_a_llama_with_its_logits(tiny_data, tmp_path):
    """The project's GPT (model.type gpt: no vision, fusion or JEPA head), its checkpoint written here
    as the trainer lays out ZeRO-0's, through the same conversion."""
    from cromwell.pretrain.config import load_config
    from cromwell.model.gpt import GPT, init_weights, megatron_config
    from transformers import LlamaForCausalLM

    from conftest import TINY_MODEL

    cfg = load_config("pretrain/configs/tiny.yaml", [*TINY_MODEL, "model.vocab_size=600", "parallel.zero_stage=0",
                                                     f"data.tokenizer={tiny_data['tokenizer']}"])
    model = GPT(cfg.model, megatron_config(1)).eval()
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, seed=3)
    tag_dir = tmp_path / "checkpoints" / "global_step0"
    tag_dir.mkdir(parents=True)
    torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}, "step": 0,
                "config": cfg.model_dump()}, tag_dir / "mp_rank_00_model_states.pt")
    shutil.copy(tiny_data["tokenizer"], tag_dir / "tokenizer.json")
    (tag_dir / "complete.json").write_text(json.dumps({"step": 0, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1},
                                                      "config": cfg.model_dump(mode="json"), "files": {}}))
    _reseal(tag_dir, tag_dir / "mp_rank_00_model_states.pt", tag_dir / "tokenizer.json")
    convert_ckpt.main(["--checkpoint", str(tag_dir), "--out", str(tmp_path / "hf"), "--format", "hf"])
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([TOKENS])).logits[0]
        want = (model(torch.tensor([TOKENS]))[0] @ model.output_weight.T)[:, :600]
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


@pytest.fixture(scope="module")
def gguf_f16(vl_layouts, exports):
    convert_ckpt.main(["--checkpoint", str(vl_layouts["single"]["checkpoint"]), "--out", str(exports / "gguf_f16"),
                       "--format", "gguf", "--gguf-type", "f16"])
    return exports / "gguf_f16" / "model.gguf"


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_the_gguf_export_reads_back_tensor_for_tensor(exports, gguf_f16, kind):
    import gguf

    from cromwell.pretrain.checkpoint.formats import gguf_name, permute_for_gguf

    reader = gguf.GGUFReader(exports / "single" / "gguf" / "model.gguf" if kind == "f32" else gguf_f16)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 600  # the tokenizer's 512, padded to the embedding
    want = load_file(exports / "single" / "safetensors" / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    expected = {gguf_name(n): n for n in want if gguf_name(n)}
    assert tensors.keys() == expected.keys() and len(expected) == 3 + 2 * 9
    for name, source in expected.items():
        t = want[source]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_for_gguf(t, 4)
        if kind == "f16" and t.dim() == 2:  # matrices in half precision, norms kept in f32
            t = t.half()
        got = torch.from_numpy(np.array(tensors[name].data)).reshape(t.shape)
        assert got.dtype == t.dtype and torch.equal(got, t), name


@pytest.mark.parametrize("kind,tolerance", [("f32", 1e-3), ("f16", 3e-3)])
def test_llama_cpp_runs_the_gguf_export_with_the_same_logits(vl_layouts, exports, gguf_f16, kind, tolerance):
    """llama.cpp's CPU kernels round activations their own way: measured 1.4e-4 (f32) and 4e-4 (f16 matrices)
    from the model's logits, whose scale here is about 0.7."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llama-cpp`)")
    cfg, model = checkpoint_model(vl_layouts["single"]["checkpoint"])
    path = exports / "single" / "gguf" / "model.gguf" if kind == "f32" else gguf_f16
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    got = torch.tensor(np.array(llm.scores[: len(TOKENS)]))
    want = text_logits(cfg, model, TOKENS)
    assert torch.allclose(got, want, rtol=0, atol=tolerance), (got - want).abs().max()


# -- back to DeepSpeed -------------------------------------------------------------------------------------


def to_deepspeed(export: Path, out: Path, *layout: str) -> subprocess.CompletedProcess:
    return run([PYTHON, "tools/convert_ckpt.py", "--to-deepspeed", "--checkpoint", str(export), "--out", str(out),
                *layout])


def test_a_run_resumes_from_its_checkpoint_resharded_to_tp2(vl_data, tmp_path):
    """Trained 3 steps on one process with a checkpoint at step 2; step 2's checkpoint converted and
    resharded to TP=2 resumes on 2 processes with the same step 3: its loss (the same weights,
    EMA target and samples), learning rate and data position. The resharded checkpoint converts back to
    the export it came from, bit for bit."""
    sets = vl_sets(vl_data, tmp_path / "run", "parallel.zero_stage=0", "training.train_steps=3",
                   "checkpoint.every_steps=2")
    launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml", *sets], 1)
    convert_ckpt.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--tag", "global_step2",
                       "--out", str(tmp_path / "export"), "--format", "safetensors"])
    to_deepspeed(tmp_path / "export", tmp_path / "resharded", "--tp", "2", "--zero", "1")
    launch("pretrain/train.py", ["--config", str(tmp_path / "resharded" / "run_config.yaml"), "--resume"], 2)
    original = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resharded" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]
    for key in ("tokens_seen", "data_fingerprint"):
        assert resumed[0][key] == original[2][key], key
    for key in ("loss", "lm", "jepa_text", "jepa_vision", "lr"):
        assert resumed[0][key] == pytest.approx(original[2][key], rel=1e-4), key
    _assert_converts_back(tmp_path / "resharded" / "checkpoints" / "global_step2", tmp_path / "export", tmp_path / "back")


@pytest.mark.parametrize("layout", [["--pp", "2", "--dp", "2", "--zero", "1"], ["--dp", "2", "--zero", "3"]],
                         ids=["pp2_dp2_zero1", "dp2_zero3"])
def test_an_export_resharded_to_other_layouts_holds_the_same_tensors(exports, tmp_path, layout):
    """Pipeline stages and ZeRO partitions over 2 data-parallel ranks, written by DeepSpeed itself and
    read back by the converter."""
    to_deepspeed(exports / "single" / "safetensors", tmp_path / "resharded", *layout)
    tag_dir = tmp_path / "resharded" / "checkpoints" / "global_step3"
    assert (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    _assert_converts_back(tag_dir, exports / "single" / "safetensors", tmp_path / "back")


def _assert_converts_back(tag_dir: Path, export: Path, out: Path) -> None:
    convert_ckpt.main(["--checkpoint", str(tag_dir), "--out", str(out), "--format", "safetensors"])
    want, got = load_file(export / "model.safetensors"), load_file(out / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    before, after = (json.loads((d / "training_state.json").read_text()) for d in (export, out))
    assert after["step"] == before["step"] and after["data"] == before["data"]


# -- bad input -----------------------------------------------------------------------------------------------


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        convert_ckpt.main(args)
    assert e.value.code not in (0, None)
    return str(e.value.code) + capsys.readouterr().out


def _copy(vl_layouts, layout: str, tmp_path) -> Path:
    dst = tmp_path / layout
    shutil.copytree(vl_layouts[layout]["checkpoint"].parent, dst)
    return dst / "global_step3"


def _reseal(tag_dir: Path, *changed: Path) -> None:
    """Update the completeness marker as whoever changed the files could."""
    marker = json.loads((tag_dir / "complete.json").read_text())
    for path in changed:
        marker["files"][path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (tag_dir / "complete.json").write_text(json.dumps(marker))


def test_bad_input_is_named_and_leaves_no_output(vl_layouts, tmp_path, capsys):
    out = tmp_path / "out"

    def fails(checkpoint: Path, *more: str) -> str:
        message = _fails(["--checkpoint", str(checkpoint), "--out", str(out), *more], capsys)
        assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
        return message

    assert f"--checkpoint {tmp_path / 'nowhere'}: no such folder" in fails(tmp_path / "nowhere")
    assert "--tag global_step7: not in" in fails(vl_layouts["tp2"]["checkpoint"].parent, "--tag", "global_step7")
    # A rank's file missing, and one cut short.
    missing = _copy(vl_layouts, "tp2", tmp_path / "missing")
    (missing / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    assert "zero_pp_rank_0_mp_rank_01_optim_states.pt is missing" in fails(missing)
    cut = _copy(vl_layouts, "pp2", tmp_path / "cut")
    partition = cut / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    size = partition.stat().st_size
    partition.write_bytes(partition.read_bytes()[:2000])
    assert f"{partition.name} has 2000 bytes, {size} were written" in fails(cut)
    # Cut short and resealed: the file itself is unreadable, and named.
    _reseal(cut, partition)
    assert f"{partition}: unreadable" in fails(cut)
    # TP ranks that disagree on a shape.
    odd = _copy(vl_layouts, "tp2", tmp_path / "odd")
    states_file = odd / "mp_rank_01_model_states.pt"
    states = safe_load(states_file)
    states["param_shapes"][0]["model.1.attn.qkv.weight"] = torch.Size([90, 64])
    torch.save(states, states_file)
    _reseal(odd, states_file)
    assert "parameter 1.attn.qkv.weight has different shapes on the tensor-parallel ranks" in fails(odd)
    # A pickle that would run code when loaded: refused, and it never runs.
    evil = _copy(vl_layouts, "single", tmp_path / "evil")
    planted, witness = evil / "mp_rank_00_model_states.pt", tmp_path / "pwned"
    run([PYTHON, "-c", f"""
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {witness}",))
torch.save({{"module": Evil()}}, "{planted}")
"""])
    _reseal(evil, planted)
    assert f"{planted}: refused to load, it holds pickled objects" in fails(evil)
    assert not witness.exists()
    # An existing --out is not replaced unless asked; --to-deepspeed wants a checkpoint or an export.
    out.mkdir()
    assert "exists; remove it or pass --overwrite" in _fails(["--checkpoint", str(missing), "--out", str(out)], capsys)
    out.rmdir()
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("not a checkpoint")
    assert "not a safetensors export" in fails(neither, "--to-deepspeed", "--tp", "2")
