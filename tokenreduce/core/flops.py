"""Analytic FLOPs of an LLM prefill, from the model geometry and the tokens each layer sees.

Counts multiply-adds as 2 FLOPs: q/k/v/o projections (grouped KV heads), causal attention scores and
weighted sums, and the gated MLP. Embeddings, norms and the LM head are left out (the same with and
without reduction for the prompt's last token).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """What FLOPs depend on: hidden size, heads, KV heads, head dim, MLP width, layer count."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int

    @staticmethod
    def from_config(config) -> Geometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Geometry(
            hidden=config.hidden_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
        )

    def layer_flops(self, tokens: int) -> float:
        """One decoder layer over a causal prefill of ``tokens`` tokens."""
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * tokens * self.hidden * (2 * q_dim + 2 * kv_dim)
        pairs = tokens * (tokens + 1) / 2
        attention = 2 * 2 * pairs * q_dim
        mlp = 2 * 3 * tokens * self.hidden * self.intermediate
        return projections + attention + mlp

    def prefill_flops(self, tokens_per_layer: list[int]) -> float:
        return sum(self.layer_flops(n) for n in tokens_per_layer)
