"""Attention masks and positions built in the data path, next to the batches they describe."""

import torch


def document_positions_and_mask(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention for packed sequences whose documents end with eos.

    A document's eos belongs to it; the token after it starts the next document, at position 0,
    and no token attends across a document boundary (Megatron's reset_position_ids plus
    reset_attention_mask). Returns position_ids [b, s] and a bool mask [b, 1, s, s] (True = may
    attend). The label at an eos (the next document's first token) is still trained, as Megatron
    does unless eod_mask_loss is set: it teaches what documents start with.
    """
    b, s = input_ids.shape
    is_eos = input_ids == eos_id
    doc = is_eos.long().cumsum(1) - is_eos.long()  # eos counts towards the document it ends
    index = torch.arange(s).expand(b, s)
    after_eos = torch.zeros_like(is_eos)
    after_eos[:, 1:] = is_eos[:, :-1]
    start = torch.where(after_eos, index, 0).cummax(1).values
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return index - start, (same_doc & causal)[:, None]
