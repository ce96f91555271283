"""Reference activations: the input of every adapted linear layer on N reference texts.

Each text contributes one row of ``X`` (N x H) per layer, reduced over its token
positions as the ``activation_tokens`` metaparameter says: the mean over the prompt's
tokens, the mean over the user's text only, its last token, or one seeded random token.
The "user" mean leaves out BOS and the chat template (Llama-3.1's fixed system header
among them), whose few outlier dimensions otherwise dominate the mean of a wide layer.
"""

from __future__ import annotations

import torch
from torch import nn

from telelora.architectures import AdaptedLayer
from telelora.chat import pad_id, padded, prompt_ids, user_token_mask

TOKEN_MODES = ("mean", "user", "last", "random")


def _reduce(x: torch.Tensor, mask: torch.Tensor, mode: str, positions: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) activations -> (B, H) float32 rows."""
    x = x.float()
    if mode in ("mean", "user"):
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    if mode == "last":
        index = mask.sum(dim=1) - 1
    else:
        index = positions
    return x[torch.arange(x.shape[0], device=x.device), index]


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer,
    layers: list[AdaptedLayer],
    texts: list[str],
    token_mode: str = "mean",
    batch_size: int = 8,
    max_tokens: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Run the decoder on ``texts`` and return ``{layer name: X (N x H, float32)}``."""
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"activation_tokens must be one of {TOKEN_MODES}, got {token_mode!r}")
    device = next(model.parameters()).device
    sequences = [prompt_ids(tokenizer, t)[:max_tokens] for t in texts]
    user_masks = [user_token_mask(tokenizer, t)[:max_tokens] for t in texts] if token_mode == "user" else []
    rng = torch.Generator().manual_seed(seed)
    positions_all = torch.tensor([int(torch.randint(len(s), (1,), generator=rng)) for s in sequences])
    rows: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    state: dict[str, torch.Tensor | None] = {"mask": None, "positions": None}

    def make_hook(name: str):
        def hook(module, args):
            rows[name].append(_reduce(args[0], state["mask"], token_mode, state["positions"]))

        return hook

    handles = [layer.module.register_forward_pre_hook(make_hook(layer.name)) for layer in layers]
    decoder = model.get_decoder()  # the blocks alone: no need for the vocabulary-sized logits
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = padded(sequences[start : start + batch_size], pad_id(tokenizer), device)
            pooled = mask.clone()  # which positions a row averages; attention still sees them all
            if token_mode == "user":  # right padding: each text's user mask sits at its start
                for row, keep in enumerate(user_masks[start : start + batch_size]):
                    pooled[row, : len(keep)] *= torch.tensor(keep, dtype=mask.dtype, device=device)
            state["mask"] = pooled
            state["positions"] = positions_all[start : start + batch_size].to(device)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks, dim=0) for name, chunks in rows.items()}
