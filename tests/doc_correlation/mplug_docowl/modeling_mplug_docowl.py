"""A small stand-in for mPLUG-DocOwl 1.5 (``MPLUGDocOwlLlamaForCausalLM``), ported to transformers 5.

Mirrors the public code's module tree and calling convention, which is what tokenreduce's ``docowl``
adapter relies on: ``model.model.vision_model`` (ViT), ``model.model.vision2text`` (H-Reducer),
``model.encode_images(images, patch_positions)`` giving 257 tokens per crop, one ``IMAGE_TOKEN_INDEX``
(-200) placeholder per crop in ``input_ids``, ``prepare_inputs_labels_for_multimodal`` building the
LLM's embeddings and ``modality_indicators`` (1 on visual tokens), and the modality-adaptive LLaMA whose
``k_proj`` / ``v_proj`` / layer norms are ``MultiwayNetwork`` s chosen per token by those indicators.

Differences from upstream, none visible to the adapter: the KV cache is a transformers 5 ``Cache``
passed as ``cache`` (upstream: legacy ``past_key_values`` tuples); a placeholder's attention-mask value is
repeated over its 257 tokens (upstream prepends ones, which misaligns left-padded rows); the LLM numbers
positions ``0..L-1`` like upstream (RoPE is relative, so left padding does not change the result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_mplug_docowl import MPLUGDocOwlConfig, MplugDocOwlHReducerConfig, MplugOwlVisionConfig
from .visual_encoder import MplugDocOwlHReducerModel, MplugOwlVisionModel

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


class MultiwayNetwork(nn.Module):
    """One copy of a module per modality; token ``t`` goes through ``multiway[indices[t]]``."""

    def __init__(self, module_provider, num_multiway=2):
        super().__init__()
        self.multiway = nn.ModuleList([module_provider() for _ in range(num_multiway)])

    def forward(self, hidden_states, multiway_indices):
        if len(self.multiway) == 1:
            return self.multiway[0](hidden_states)
        outputs = [way(hidden_states) for way in self.multiway]
        out = outputs[0]
        for idx in range(1, len(outputs)):
            out = torch.where((multiway_indices == idx)[..., None], outputs[idx], out)
        return out


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.rope_theta = config.rope_theta
        kv = self.num_key_value_heads * self.head_dim

        def linear(out):
            return lambda: nn.Linear(config.hidden_size, out, bias=False)

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = MultiwayNetwork(linear(kv))
        self.v_proj = MultiwayNetwork(linear(kv))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def rope(self, x, position_ids):
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=x.device).float() / self.head_dim))
        freqs = position_ids.float()[..., None] * inv  # [B, L, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(self, hidden_states, modality_indicators, attention_mask, position_ids, cache=None):
        b, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states, modality_indicators).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states, modality_indicators).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, position_ids), self.rope(k, position_ids)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5 + attention_mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, -1)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)

        def norm():
            return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        self.input_layernorm = MultiwayNetwork(norm)
        self.post_attention_layernorm = MultiwayNetwork(norm)

    def forward(self, hidden_states, modality_indicators, attention_mask, position_ids, cache=None):
        h = self.input_layernorm(hidden_states, modality_indicators)
        hidden_states = hidden_states + self.self_attn(h, modality_indicators, attention_mask, position_ids, cache)
        h = self.post_attention_layernorm(hidden_states, modality_indicators)
        return hidden_states + self.mlp(h)


class MPLUGDocOwlPreTrainedModel(PreTrainedModel):
    config_class = MPLUGDocOwlConfig
    base_model_prefix = "model"
    _no_split_modules = ("LlamaDecoderLayer",)


class MPLUGDocOwlLlamaModel(MPLUGDocOwlPreTrainedModel):
    """The LLaMA decoder with the vision modules attached (upstream: ``MPLUGDocOwlMetaModel`` mixin)."""

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = MplugOwlVisionModel(MplugOwlVisionConfig(**config.visual_config["visual_model"]))
        self.vision2text = MplugDocOwlHReducerModel(
            MplugDocOwlHReducerConfig(**config.visual_config["visual_hreducer"]), config.hidden_size
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_vision_tower(self):
        return self.vision_model

    def get_vision2text(self):
        return self.vision2text

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, modality_indicators=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, length, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None].expand(b, -1)
        if modality_indicators is None:
            modality_indicators = torch.zeros(b, length, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones(b, past + length, dtype=torch.long, device=inputs_embeds.device)
        keys = torch.arange(past + length, device=inputs_embeds.device)
        queries = past + torch.arange(length, device=inputs_embeds.device)
        allowed = (keys[None, :] <= queries[:, None])[None] & attention_mask[:, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)[:, None]
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, modality_indicators, bias, position_ids, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None)


class MPLUGDocOwlLlamaForCausalLM(MPLUGDocOwlPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MPLUGDocOwlLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def encode_images(self, images, patch_positions):
        features = self.get_model().vision_model(images).last_hidden_state
        return self.get_model().vision2text(encoder_hidden_states=features)

    def prepare_inputs_labels_for_multimodal(self, input_ids, attention_mask, cache, labels, images, patch_positions):
        if images is None or input_ids.shape[1] == 1:
            if cache is not None and images is not None and input_ids.shape[1] == 1:
                attention_mask = torch.ones(input_ids.shape[0], cache.get_seq_length() + 1, dtype=torch.long,
                                            device=input_ids.device)
            return input_ids, torch.zeros_like(input_ids), attention_mask, cache, None, labels
        if isinstance(images, list) or images.ndim == 5:
            images = torch.cat(list(images), dim=0)
        features = self.encode_images(images, patch_positions)  # [crops, 257, D]
        embed = self.get_model().embed_tokens
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows, crop = [], 0
        for r in range(input_ids.shape[0]):
            parts, modality, masks, labs = [], [], [], []
            ids = input_ids[r]
            start = 0
            for pos in [*(ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist(), ids.numel()]:
                if pos > start:
                    parts.append(embed(ids[start:pos]))
                    modality.append(torch.zeros(pos - start, dtype=torch.long))
                    masks.append(mask[r, start:pos])
                    labs.append(labels[r, start:pos] if labels is not None else None)
                if pos < ids.numel():
                    f = features[crop]
                    crop += 1
                    parts.append(f)
                    modality.append(torch.ones(f.shape[0], dtype=torch.long))
                    masks.append(mask[r, pos].expand(f.shape[0]))
                    labs.append(torch.full((f.shape[0],), IGNORE_INDEX, dtype=torch.long) if labels is not None else None)
                start = pos + 1
            rows.append((torch.cat(parts), torch.cat(modality), torch.cat(masks),
                         torch.cat(labs) if labels is not None else None))
        length = max(r[0].shape[0] for r in rows)
        device = input_ids.device

        def left_pad(t, value):
            return torch.cat([t.new_full((length - t.shape[0], *t.shape[1:]), value), t])

        embeds = torch.stack([left_pad(r[0], 0.0) for r in rows])
        modality = torch.stack([left_pad(r[1], 0) for r in rows]).to(device)
        new_mask = torch.stack([left_pad(r[2], 0) for r in rows]).to(device)
        new_labels = torch.stack([left_pad(r[3], IGNORE_INDEX) for r in rows]).to(device) if labels is not None else None
        return None, modality, new_mask, cache, embeds, new_labels

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, images=None,
                patch_positions=None, return_dict=None, **kwargs):
        input_ids, modality_indicators, attention_mask, cache, inputs_embeds, labels = \
            self.prepare_inputs_labels_for_multimodal(input_ids, attention_mask, cache, labels, images, patch_positions)
        outputs = self.model(input_ids=input_ids, modality_indicators=modality_indicators, attention_mask=attention_mask,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, **kwargs):
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": kwargs.get("use_cache"),
                "attention_mask": attention_mask, "images": kwargs.get("images"),
                "patch_positions": kwargs.get("patch_positions")}
