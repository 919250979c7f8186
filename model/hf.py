"""Hugging Face causal LMs as trainable models: local loading, optional LoRA (peft), and the same
interface as the project's GPT (forward -> final hidden states, lm_loss), with custom 4D masks.

Only local directories are loaded (there is no model hub here).
"""
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from cromwell.model.config import HFConfig


class HFCausalLM(nn.Module):
    """A (possibly peft-wrapped) causal LM. A bool mask becomes an additive float mask:
    transformers passes a 4D mask through untouched, the eager kernel adds it to the scores (a
    bool would be added as 0/1) and SDPA accepts it as-is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        kwargs = {}
        if attention_mask is not None:
            dtype = self.lm.get_output_embeddings().weight.dtype
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            kwargs["attention_mask"] = additive.masked_fill(~attention_mask, torch.finfo(dtype).min)
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(hidden).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)


def load_model(path: str, vocab_size: int, cfg: HFConfig | None = None, trainable_token_ids: list[int] = (),
               dtype=torch.float32, checkpoint_activations: bool = False) -> HFCausalLM:
    """The model in a local directory, a full checkpoint or a LoRA adapter saved by `save` (its
    base is read from adapter_config.json), with the embeddings resized to `vocab_size` (the
    tokenizer's, with the project's special tokens added). With cfg.lora only the adapters and
    the `trainable_token_ids` rows of the input embeddings train (the rest stays frozen).
    checkpoint_activations: each decoder layer recomputes its activations in backward."""
    from transformers import AutoModelForCausalLM

    cfg = cfg or HFConfig(path=path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.hf.path {path!r} is not a local directory (no model hub here)")
    adapter_cfg = os.path.join(path, "adapter_config.json")
    base = json.load(open(adapter_cfg))["base_model_name_or_path"] if os.path.exists(adapter_cfg) else path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if checkpoint_activations:
        # Non-reentrant, as for the project's GPT: frozen (LoRA) inputs need no grad for it to work.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if base != path:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path)
    elif cfg.lora:
        from peft import LoraConfig, get_peft_model
        # the new special-token rows start random and only training can give them meaning
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                          target_modules=list(cfg.lora_targets), trainable_token_indices=list(trainable_token_ids),
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return HFCausalLM(model)


def save(model: HFCausalLM, tokenizer, out_dir: str):
    """Full model, or for peft the adapters plus the resized embeddings (the new special-token rows
    exist only in this run, so the base checkpoint cannot supply them)."""
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(model.lm, "peft_config"):
        model.lm.save_pretrained(out_dir, save_embedding_layers=True)
    else:
        model.lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
