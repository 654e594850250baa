"""VQ-attention: the code tokens attend with a learned embedding of the token hash (the paper's block).

Paper (its formula, as rendered by a notes site; the PDF's formula was lost in conversion)::

    M~ = MLP(Flatten(M))
    B' = MHA(Q = B W_Q, K = B W_K, V = M~ W_V)        B: [K, D] codebook, B' goes to the LLM

The values are the hash, not the codewords: each code token gathers *where and when* the codes like it
occur. The released code does something else. Its queries are the per-frame rows of the index map, with
the cluster ids cast to floats, through ``Linear(729 -> 896)``. One ``nn.TransformerDecoderLayer``
cross-attends those queries to the codebook. It emits ``max(T, K)`` tokens, tiling the shorter side, and
its inference path skips the block altogether (codebook only).

This module follows the paper. Where the paper says nothing, the choices are ours:

* ``Flatten(M)`` must give one row per code for ``V`` to line up with the ``K`` keys. So each code's row
  is its occupancy map (the one-hot index map). The map is pooled onto a fixed ``t x h x w`` grid (see
  :func:`~tokenreduce.plugins.vqtoken.hashing.occupancy`), so one module serves any frame count and
  resolution. A two-layer MLP embeds it into the LLM width ``D``.
* Pre-norm queries/keys, multi-head, and a residual ``B' = B + W_O MHA(...)`` with ``W_O`` initialised at
  zero: an untrained module is exactly the codebook-only ablation, and training starts from it.
* An optional FFN (``ffn=True``), a second residual block, again zero-initialised at its output.

Saved as ``vq_attention.safetensors`` + ``vq_attention.json``. Loaded from a local directory or a hub
repo id (:meth:`VQAttention.from_pretrained`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "vq_attention.safetensors"
CONFIG = "vq_attention.json"


@dataclass
class VQAttentionConfig:
    """Shape of a VQ-attention module.

    Attributes:
        dim: width of the code tokens (the LLM's hidden size).
        heads: attention heads (``dim`` must divide by it).
        bins: ``(t, h, w)`` grid the per-code occupancy map is pooled onto.
        hidden: hidden width of the hash MLP.
        ffn: add a zero-initialised feed-forward residual block after the attention.
        dropout: attention-probability dropout in training.
    """

    dim: int
    heads: int = 4
    bins: tuple[int, int, int] = (8, 4, 4)
    hidden: int = 256
    ffn: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.bins = tuple(int(b) for b in self.bins)
        for name in ("dim", "heads", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads})")
        if len(self.bins) != 3 or any(b < 1 for b in self.bins):
            raise ValueError(f"`bins` must be three ints >= 1 (time, height, width), got {self.bins!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")

    @property
    def hash_size(self) -> int:
        return math.prod(self.bins)


class VQAttention(nn.Module):
    """``B' = B + W_O MHA(Q = LN(B) W_Q, K = LN(B) W_K, V = MLP(occupancy) W_V)`` (+ optional FFN)."""

    def __init__(self, config: VQAttentionConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.hash_mlp = nn.Sequential(
            nn.Linear(config.hash_size, config.hidden), nn.GELU(), nn.Linear(config.hidden, d)
        )
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if config.ffn:
            self.ffn_norm = nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            nn.init.zeros_(self.ffn[-1].weight)
            nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, codebook: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
        """``codebook: [K, D]`` code tokens, ``occupancy: [K, t*h*w]`` their pooled hash -> ``[K, D]``."""
        cfg = self.config
        if codebook.dim() != 2 or codebook.shape[1] != cfg.dim:
            raise ValueError(f"VQAttention expects a codebook [K, {cfg.dim}], got {tuple(codebook.shape)}")
        if occupancy.shape != (codebook.shape[0], cfg.hash_size):
            raise ValueError(
                f"VQAttention expects occupancy [{codebook.shape[0]}, {cfg.hash_size}], "
                f"got {tuple(occupancy.shape)}"
            )
        dtype = self.q.weight.dtype
        b = codebook.to(dtype)
        k_codes, heads = b.shape[0], cfg.heads
        hashed = self.hash_mlp(occupancy.to(dtype))
        h = self.norm(b)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(k_codes, heads, -1).transpose(0, 1)  # [heads, K, d]

        attended = F.scaled_dot_product_attention(
            split(self.q(h)),
            split(self.k(h)),
            split(self.v(hashed)),
            dropout_p=cfg.dropout if self.training else 0.0,
        )
        out = b + self.out(attended.transpose(0, 1).reshape(k_codes, -1))
        if cfg.ffn:
            out = out + self.ffn(self.ffn_norm(out))
        return out.to(codebook.dtype)

    # ----- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, **metadata) -> Path:
        """Write ``vq_attention.safetensors`` and ``vq_attention.json`` (config plus ``metadata``)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS)
        )
        meta = {**asdict(self.config), "bins": list(self.config.bins), "metadata": metadata}
        (path / CONFIG).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> VQAttention:
        """Load from a local directory or a hub repo id holding ``vq_attention.safetensors`` + ``.json``."""
        from safetensors.torch import load_file

        path = Path(source)
        if path.is_dir():
            if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
                raise ValueError(
                    f"`attention`={str(source)!r}: that directory holds no {WEIGHTS} and {CONFIG}"
                )
            weights, config = path / WEIGHTS, path / CONFIG
        else:
            from huggingface_hub import hf_hub_download

            try:
                weights = Path(hf_hub_download(str(source), WEIGHTS, revision=revision))
                config = Path(hf_hub_download(str(source), CONFIG, revision=revision))
            except Exception as error:  # unknown repo, no network, missing file
                raise ValueError(
                    f"`attention`={str(source)!r} is neither a local directory nor a reachable hub repo "
                    f"holding "
                    f"{WEIGHTS} and {CONFIG}: {error}"
                ) from error
        meta = json.loads(config.read_text())
        meta.pop("metadata", None)
        module = cls(VQAttentionConfig(**meta))
        module.load_state_dict(load_file(str(weights)))
        return module.eval()

    @staticmethod
    def metadata(source: str | os.PathLike) -> dict:
        """The ``metadata`` saved with a local module (training options, data, log)."""
        return json.loads((Path(source) / CONFIG).read_text()).get("metadata", {})
