"""Vision side of the mPLUG-DocOwl 1.5 stand-in: the ViT (``MplugOwlVisionModel``) and the H-Reducer.

Same module tree, parameter names and tensor layouts as the public code (``visual_encoder.py``):
``embeddings.{cls_token, patch_embed, position_embedding, pre_layernorm}``, ``encoder.layers[i].{self_attn.
{query_key_value, dense}, input_layernorm, mlp.{fc1, fc2}, post_attention_layernorm}``, ``post_layernorm``;
the fused qkv is split per head as ``[heads, 3, head_dim]``. The H-Reducer drops [CLS], reshapes each
crop's ``32 x 32`` patch grid, runs ``reducer_before`` (conv ``1x4`` to ``4D`` channels + GELU), folds the 4
channel groups back into the width, reduces with the ``1x4`` conv ``reducer`` to ``32 x 8`` tokens, maps them
with ``visual_fc`` to the LLM width and appends the learned ``vit_eos`` token: 257 tokens per crop.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_mplug_docowl import MplugDocOwlHReducerConfig, MplugOwlVisionConfig


class MplugOwlVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.patch_embed = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
                                     bias=False)
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, config.hidden_size))
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values):
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)
        x = x + self.position_embedding[:, : x.shape[1]].to(x.dtype)
        return self.pre_layernorm(x)


class MplugOwlVisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = nn.Dropout(config.attention_dropout)
        self.query_key_value = nn.Linear(self.hidden_size, 3 * self.hidden_size)
        self.dense = nn.Linear(self.hidden_size, self.hidden_size)

    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        b, n, d = hidden_states.shape
        mixed = self.query_key_value(hidden_states).reshape(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = mixed.permute(3, 0, 2, 1, 4).unbind(0)
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        probs = self.dropout(probs)
        if head_mask is not None:
            probs = probs * head_mask
        context = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.dense(context), (probs if output_attentions else None)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MplugOwlMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation_fn = QuickGELU()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MplugOwlVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = MplugOwlVisionAttention(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MplugOwlMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attn, weights = self.self_attn(hidden_states=self.input_layernorm(hidden_states), head_mask=attention_mask,
                                       output_attentions=output_attentions)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states, weights) if output_attentions else (hidden_states,)


class MplugOwlVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([MplugOwlVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, inputs_embeds, attention_mask=None, output_attentions=False, output_hidden_states=False):
        hidden, states, attentions = inputs_embeds, [], []
        for layer in self.layers:
            if output_hidden_states:
                states.append(hidden)
            out = layer(hidden, attention_mask, output_attentions=output_attentions)
            hidden = out[0]
            if output_attentions:
                attentions.append(out[1])
        if output_hidden_states:
            states.append(hidden)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states) or None,
                               attentions=tuple(attentions) or None)


class MplugOwlVisionModel(PreTrainedModel):
    config_class = MplugOwlVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = MplugOwlVisionEmbeddings(config)
        self.encoder = MplugOwlVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values=None, output_attentions=False, output_hidden_states=False, return_dict=True):
        out = self.encoder(self.embeddings(pixel_values), output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states)
        last = self.post_layernorm(out.last_hidden_state)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0]),
                                          hidden_states=out.hidden_states, attentions=out.attentions)


class MplugDocOwlHReducerModel(PreTrainedModel):
    config_class = MplugDocOwlHReducerConfig

    def __init__(self, config, language_hidden_size):
        super().__init__(config)
        d = config.hidden_size
        self.ln_q = nn.LayerNorm(d, eps=1e-6)  # present in the checkpoint, unused by forward (as upstream)
        self.conv_shape = tuple(int(v) for v in config.conv_shape.split("x"))
        self.conv_patch = self.conv_shape[0] * self.conv_shape[1]
        self.reducer_before = nn.Sequential(
            nn.Conv2d(d, self.conv_patch * d, kernel_size=self.conv_shape, stride=self.conv_shape, bias=True), nn.GELU()
        )
        self.reducer = nn.Conv2d(d, d, kernel_size=self.conv_shape, stride=self.conv_shape, bias=True)
        self.visual_fc = nn.Linear(d, language_hidden_size)
        self.vit_eos = nn.Parameter(torch.randn(1, 1, language_hidden_size))
        self.post_init()

    def forward(self, encoder_hidden_states=None):
        x = encoder_hidden_states[:, 1:]
        b, length, d = x.shape
        side = int(math.sqrt(length))
        grid = x.transpose(1, 2).reshape(b, d, side, side)
        mixed = self.reducer_before(grid)  # [B, X*D, H, W/X]
        h, w = mixed.shape[-2:]
        mixed = mixed.view(b, self.conv_patch, d, h, w).permute(0, 2, 3, 4, 1).reshape(b, d, h, w * self.conv_patch)
        tokens = self.reducer(mixed).flatten(2).transpose(1, 2)  # [B, L/X, D]
        tokens = self.visual_fc(tokens)
        return torch.cat([tokens, self.vit_eos.expand(b, -1, -1).to(tokens.dtype)], dim=1)
