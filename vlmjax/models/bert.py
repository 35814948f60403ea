"""BERT text tower for two-tower models (`TwoTowers(text_arch="bert")`): ALIGN's text encoder.

BERT as HF's BertModel / AlignTextModel compute it: word + absolute position embeddings, a
LayerNorm, post-norm layers (x = LN(x + Attn(x)); x = LN(x + MLP(x))), GELU. It is BLIP's text
transformer (`blip.BlipText`) with its encoder self-attention only and no cross-attention, so
there is one BERT in vlmjax and one weight table (convert.hf_blip.text_entries). BERT's token
type embeddings are not a parameter: a model fed no token types adds row 0 to every token, which
the converters fold into the position embeddings (as convert.hf_bert does for BLIP).
Pooling is the first token ([CLS]); the pooler's dense + tanh is not applied (ALIGN reads the
[CLS] hidden state and projects it with TwoTowers' text projection).
`scan_layers=True` runs the layers under nn.scan (params `bert/layer_scan`, leading [depth]
axis; BlipText); the converters read and write `bert/layer_{i}`, and
`vlmjax.models.scan_layout` converts (model_init and the ALIGN export do it for you).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ENCODER = "encoder"  # the BlipText part (self-attention) this tower uses


class BertTextTower(nn.Module):
    """Token ids [B, L] (+ bool mask [B, L], True = real token) -> [CLS] state [B, width].
    Padded tokens are masked as keys (HF's attention mask); params live under `bert`."""
    vocab_size: int = 30522
    max_len: int = 512
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None   # default 4 * width
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_scheme: str = "bert"    # blip.INITS
    remat: str = "none"          # layers.REMAT_POLICIES: recompute each layer in the backward
    scan_layers: bool = False    # nn.scan over the layers (BlipText: `layer_scan`)
    dtype: Any = jnp.float32

    def setup(self):
        # Imported here: blip.py imports two_towers, which registers this tower.
        from vlmjax.models.blip import BlipText

        self.bert = BlipText(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width,
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            activation=self.activation, norm_eps=self.norm_eps, dropout=self.dropout,
            attention_dropout=self.attention_dropout, parts=(ENCODER,),
            init_scheme=self.init_scheme, remat=self.remat,
            scan_layers=self.scan_layers, dtype=self.dtype)

    def __call__(self, tokens, text_mask=None, *, train: bool = False):
        if text_mask is None:
            text_mask = jnp.ones(tokens.shape, bool)
        key_mask = text_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]
        return self.bert(tokens, key_mask, ENCODER, train=train)[:, 0]
