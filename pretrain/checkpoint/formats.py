"""The export formats, each written one tensor at a time (nothing holds the model):

- cpp: the design's C++-loadable layout (docs/design.md, Checkpoints and conversion): `<name>.bin`, raw float32
  little-endian in C order, and `metadata.json` {name: {path, shape, dtype}}; read by tools/cpp/.
- safetensors: the whole model in one `model.safetensors`. Its header (names, shapes, offsets) is
  known before any tensor is read, so the file is written front to back; the format is a length,
  a JSON header and the raw bytes (https://github.com/huggingface/safetensors#format).
- hf: the language path as a Hugging Face Llama (`config.json`, `model.safetensors`, tokenizer) that
  `transformers.LlamaForCausalLM.from_pretrained` loads: the language encoder and autoregressive
  head are a Llama (RMSNorm, rotary positions, SwiGLU, untied head). Both rotate the two halves of
  each head (HF's rotate_half), so q and k need no permutation.
- gguf: the same language path for llama.cpp, written by the `gguf` package (llama.cpp's own
  writer). llama.cpp's Llama rotates adjacent pairs, so q and k rows are permuted per head as its
  own convert_hf_to_gguf.py does; the vocabulary is the tokenizer's byte-level BPE (GPT-2's
  pre-tokenizer), padded with unused entries up to the embedding's rows.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from cromwell.data.tokenizer import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, SPECIAL_TOKENS

FORMATS = ("cpp", "safetensors", "hf", "gguf")


class CppWriter:
    def __init__(self, out: Path, entries: list[tuple[str, tuple]]):
        self.out = out
        self.out.mkdir(parents=True)
        self.metadata = {}

    def write(self, name: str, t: torch.Tensor) -> None:
        self.send(name, tuple(t.shape), _from_memory(t))

    def send(self, name: str, shape: tuple, fill) -> None:
        """A tensor whose float32 bytes fill(fd) writes to the open file fd."""
        path = self.out / f"{name}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fill(fd)
        finally:
            os.close(fd)
        self.metadata[name] = {"path": path.name, "shape": list(shape), "dtype": "float32"}

    def close(self, config: dict, extra: dict) -> None:
        (self.out / "metadata.json").write_text(json.dumps(self.metadata, indent=2))
        _write_side_files(self.out, config, extra)


class SafetensorsWriter:
    """Streams float32 tensors into one safetensors file, in the order of `entries`."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple]], metadata: dict[str, str] | None = None):
        header, offset = {}, 0
        for name, shape in entries:
            nbytes = 4 * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.order, self.next = path, [name for name, _ in entries], 0
        self.shapes = dict(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self.fd, struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        self.send(name, tuple(t.shape), _from_memory(t))

    def send(self, name: str, shape: tuple, fill) -> None:
        """The next tensor, whose float32 bytes fill(fd) appends to the file."""
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected or tuple(shape) != tuple(self.shapes[name]):
            raise RuntimeError(f"{self.path}: got {name} {list(shape)}, expected {expected} {self.shapes.get(expected)}")
        fill(self.fd)
        self.next += 1

    def close(self, *_):
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self.next} tensors were never written")
        os.close(self.fd)


def _from_memory(t: torch.Tensor):
    """A writer's fill(fd) for a tensor in memory: its float32 little-endian bytes."""
    return lambda fd: _write_all(fd, t.numpy().astype("<f4", copy=False))


def _write_all(fd: int, data) -> None:
    """All of data's bytes, no copy."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class WholeModelWriter(SafetensorsWriter):
    def __init__(self, out: Path, entries: list[tuple[str, tuple]]):
        out.mkdir(parents=True)
        self.out = out
        super().__init__(out / "model.safetensors", entries, {"format": "pt", "producer": "cromwell convert_ckpt"})

    def close(self, config: dict, extra: dict) -> None:
        super().close()
        _write_side_files(self.out, config, extra)


def _write_side_files(out: Path, config: dict, extra: dict, config_name: str = "config.json") -> None:
    (out / config_name).write_text(json.dumps(config, indent=1))
    for name, text in extra.items():
        (out / name).write_text(text)


# -- the language path as a Llama ----------------------------------------------------------------------

_LAYER = re.compile(r"language_encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER = {"attn_norm.weight": "input_layernorm.weight", "attn.q.weight": "self_attn.q_proj.weight",
             "attn.k.weight": "self_attn.k_proj.weight", "attn.v.weight": "self_attn.v_proj.weight",
             "attn.out.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
             "mlp.down.weight": "mlp.down_proj.weight"}
_HF_TOP = {"language_encoder.embedding.weight": "model.embed_tokens.weight",
           "language_encoder.norm.weight": "model.norm.weight", "autoregressive_head.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm.weight": "attn_norm.weight", "attn.q.weight": "attn_q.weight", "attn.k.weight": "attn_k.weight",
               "attn.v.weight": "attn_v.weight", "attn.out.weight": "attn_output.weight",
               "mlp_norm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate.weight",
               "mlp.up.weight": "ffn_up.weight", "mlp.down.weight": "ffn_down.weight"}
_GGUF_TOP = {"language_encoder.embedding.weight": "token_embd.weight",
             "language_encoder.norm.weight": "output_norm.weight", "autoregressive_head.weight": "output.weight"}


def _renamer(layer: dict, top: dict, layer_prefix: str):
    """export name -> the format's name (None: not on the language path)."""
    def rename(name: str) -> str | None:
        m = _LAYER.fullmatch(name)
        if m:
            leaf = layer.get(m.group(2))
            return leaf and f"{layer_prefix}.{m.group(1)}.{leaf}"
        return top.get(name)
    return rename


hf_name = _renamer(_HF_LAYER, _HF_TOP, "model.layers")
gguf_name = _renamer(_GGUF_LAYER, _GGUF_TOP, "blk")


def language(config: dict) -> dict:
    return config["language"]


class HFWriter(SafetensorsWriter):
    """A Hugging Face LlamaForCausalLM folder."""

    def __init__(self, out: Path, entries: list[tuple[str, tuple]]):
        out.mkdir(parents=True)
        self.out = out
        super().__init__(out / "model.safetensors", entries, {"format": "pt"})

    def close(self, config: dict, extra: dict) -> None:
        from transformers import LlamaConfig, PreTrainedTokenizerFast

        super().close()
        lm = language(config)
        LlamaConfig(
            vocab_size=lm["vocab_size"], hidden_size=lm["hidden_size"], intermediate_size=lm["ffn_size"],
            num_hidden_layers=lm["num_layers"], num_attention_heads=lm["num_heads"], num_key_value_heads=lm["num_heads"],
            head_dim=lm["hidden_size"] // lm["num_heads"], rms_norm_eps=lm["norm_eps"], rope_theta=lm["rope_theta"],
            max_position_embeddings=lm["context_length"], tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, hidden_act="silu", bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            architectures=["LlamaForCausalLM"], torch_dtype="float32",
        ).save_pretrained(self.out)
        # Ours as cromwell_config.json: config.json is the Llama's.
        _write_side_files(self.out, config, extra, config_name="cromwell_config.json")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(self.out / "tokenizer.json"), bos_token=BOS,
                                            eos_token=EOS, pad_token=PAD, model_max_length=lm["context_length"])
        tokenizer.save_pretrained(self.out)


def permute_for_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from halves-rotated to pairs-rotated order, per head (llama.cpp's Llama)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFWriter:
    def __init__(self, out: Path, entries: list[tuple[str, tuple]], config: dict, tokenizer_json: str, dtype: str):
        import gguf

        out.mkdir(parents=True)
        lm = language(config)
        self.heads, self.f16 = lm["num_heads"], dtype == "f16"
        self.path = out / "model.gguf"
        w = self.writer = gguf.GGUFWriter(self.path, arch="llama")
        w.add_name(config.get("name", "cromwell"))
        w.add_context_length(lm["context_length"])
        w.add_embedding_length(lm["hidden_size"])
        w.add_block_count(lm["num_layers"])
        w.add_feed_forward_length(lm["ffn_size"])
        w.add_head_count(lm["num_heads"])
        w.add_head_count_kv(lm["num_heads"])
        w.add_rope_dimension_count(lm["hidden_size"] // lm["num_heads"])
        w.add_rope_freq_base(lm["rope_theta"])
        w.add_layer_norm_rms_eps(lm["norm_eps"])
        w.add_vocab_size(lm["vocab_size"])
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if self.f16 else gguf.LlamaFileType.ALL_F32)
        _add_vocab(w, json.loads(tokenizer_json), lm["vocab_size"])
        self.types = {}
        for name, shape in entries:
            half = self.f16 and len(shape) == 2  # llama.cpp keeps norms in f32
            self.types[name] = np.float16 if half else np.float32
            w.add_tensor_info(name, shape, np.dtype(self.types[name]), int(np.prod(shape)) * (2 if half else 4))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

    def write(self, name: str, t: torch.Tensor) -> None:
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_for_gguf(t, self.heads)
        self.writer.write_tensor_data(t.numpy().astype(self.types[name]))

    def close(self, config: dict, extra: dict) -> None:
        self.writer.close()
        _write_side_files(self.path.parent, config, extra)


def _add_vocab(w, tokenizer: dict, rows: int) -> None:
    import gguf

    model = tokenizer["model"]
    if model["type"] != "BPE" or (tokenizer.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError("the GGUF export writes byte-level BPE vocabularies; this tokenizer is "
                         f"{model['type']} with pre-tokenizer {tokenizer.get('pre_tokenizer')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    if max(by_id) >= rows:
        raise ValueError(f"the tokenizer has token ids up to {max(by_id)}, the model's vocabulary {rows} rows")
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else
                     gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
