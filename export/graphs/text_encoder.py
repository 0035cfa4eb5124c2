"""The text encoder as an exportable module: token ids + mask -> FLUX.2 prompt embeddings.

The definition is diffusers' `_get_mistral_3_small_prompt_embeds`: transformers' `hidden_states`
tuple (index 0 is the embedding output, index k the output of layer k-1) at the configured
indices, stacked on a new axis, then [B, C, L, H] -> [B, L, C*H]. Only the language model is
exported; see `checkpoint.load_language_model` for why it is cut after the deepest layer read.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderGraph(nn.Module):
    def __init__(self, language_model: nn.Module, out_layers: tuple[int, ...]):
        super().__init__()
        self.language_model = language_model
        self.out_layers = tuple(out_layers)

    def forward(self, input_ids, attention_mask):
        output = self.language_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        stacked = torch.stack([output.hidden_states[k] for k in self.out_layers], dim=1)  # [B, C, L, H]
        batch, channels, length, hidden = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, length, channels * hidden).float()
