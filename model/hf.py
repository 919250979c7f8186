"""Hugging Face causal LMs for the Step-JEPA objective: local loading, the predictor special
tokens, optional LoRA (peft), and the Backbone adapter that feeds custom 4D masks.

Only local directories are loaded (there is no model hub here); `build_tiny_llama` writes a
random-init Llama and a byte-level BPE tokenizer for tests and CPU benchmarks.
"""
import json
import os

import torch
import torch.nn.functional as F

from data.tokenizer import NUM_PREDICTOR_TOKENS
from model.step_jepa import ChatEncoder, predictor_names

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HFBackbone:
    """Backbone over a (possibly peft-wrapped) causal LM. The bool mask becomes an additive
    float mask: transformers passes a 4D mask through untouched, the eager kernel adds it
    to the scores (a bool would be added as 0/1) and SDPA accepts it as-is."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()

    def hidden(self, input_ids, position_ids, attention_mask):
        kwargs = {}
        if attention_mask is not None:
            dtype = self.head.weight.dtype
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            kwargs["attention_mask"] = additive.masked_fill(~attention_mask, torch.finfo(dtype).min)
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state

    def lm_loss(self, hidden, target):
        return F.cross_entropy(self.head(hidden).float(), target)


def plain_prompt(messages: list[dict]) -> str:
    """Prompt text for tokenizers without a chat template (the tiny test tokenizers)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant: "


def chat_encoder(tokenizer, separator: str = "\n\n", max_len: int = 1024) -> ChatEncoder:
    if tokenizer.chat_template:
        render = lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        bos = tokenizer.bos_token or ""
        render = lambda msgs: bos + plain_prompt(msgs)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    return ChatEncoder(encode, render, tokenizer.eos_token_id, separator, max_len)


def add_predictor_tokens(tokenizer) -> None:
    """All eight are added whatever --predictors is, so checkpoints stay interchangeable."""
    tokenizer.add_tokens(predictor_names(NUM_PREDICTOR_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_causal_lm(path: str, lora: bool = False, lora_rank: int = 16, lora_alpha: int | None = None,
                   lora_targets=DEFAULT_LORA_TARGETS, attn_implementation: str = "sdpa",
                   dtype=torch.float32):
    """(model, tokenizer) from a local directory: a full checkpoint, or a LoRA adapter saved
    by `save` (its base is read from adapter_config.json). Predictor tokens are added and the
    embeddings resized; with `lora` only the adapters and the predictor rows of the input
    embeddings are trainable (the rest of the embedding matrix stays frozen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model_name {path!r} is not a local directory (no model hub here)")
    adapter_cfg = os.path.join(path, "adapter_config.json")
    base = json.load(open(adapter_cfg))["base_model_name_or_path"] if os.path.exists(adapter_cfg) else path
    tokenizer = AutoTokenizer.from_pretrained(path)
    add_predictor_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if base != path:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path)
    elif lora:
        from peft import LoraConfig, get_peft_model
        # the predictor rows start random and only training can give them meaning
        predictors = tokenizer.convert_tokens_to_ids(predictor_names(NUM_PREDICTOR_TOKENS))
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
                         target_modules=list(lora_targets), trainable_token_indices=predictors,
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    return model, tokenizer


def save(model, tokenizer, out_dir: str):
    """Full model, or for peft the adapters plus the resized embeddings (the predictor rows
    exist only in this run, so the base checkpoint cannot supply them)."""
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(out_dir, save_embedding_layers=True)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_llama(out_dir: str, texts: list[str], hidden: int = 64, layers: int = 2, heads: int = 4,
                     vocab: int = 512, max_positions: int = 2048, seed: int = 0) -> str:
    """Random-init Llama + byte-level BPE tokenizer trained on `texts`, saved to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
