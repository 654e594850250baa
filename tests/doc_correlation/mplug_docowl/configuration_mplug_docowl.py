"""Configs of the mPLUG-DocOwl 1.5 stand-in (same class names, model types and fields as the public code).

Written for tokenreduce's tests from the structure of X-PLUG/mPLUG-DocOwl ``DocOwl1.5/mplug_docowl/model``
(not copied): ``MPLUGDocOwlConfig`` is a LLaMA config plus ``visual_config = {"visual_model": ...,
"visual_hreducer": ...}``; defaults are the real sizes (ViT-L/14 at 448 px, 1x4 H-Reducer, LLaMA-7B).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MplugOwlVisionConfig(PretrainedConfig):
    model_type = "mplug_owl_vision_model"

    def __init__(self, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_channels=3, image_size=448, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-6,
                 attention_dropout=0.0, initializer_range=0.02, **kwargs):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class MplugDocOwlHReducerConfig(PretrainedConfig):
    model_type = "mplug_docowl_hreducer"

    def __init__(self, hidden_size=1024, initializer_range=0.02, layer_norm_eps=1e-6, conv_shape="1x4", **kwargs):
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.conv_shape = conv_shape
        super().__init__(**kwargs)


class MPLUGDocOwlConfig(PretrainedConfig):
    model_type = "mplug_docowl"

    def __init__(self, visual_config=None, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.02, use_cache=True, pad_token_id=None,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kwargs):
        self.visual_config = visual_config or {
            "visual_model": MplugOwlVisionConfig().to_dict(),
            "visual_hreducer": MplugDocOwlHReducerConfig().to_dict(),
        }
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
