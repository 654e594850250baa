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
* An optional direct path (``own_hash=True``): each code token also adds its own hash embedding,
  ``W_H MLP(occupancy_k)`` (zero-initialised). In the paper's block a code token only receives hash
  embeddings mixed by codebook similarity, so where and when *this* code occurs reaches it only as far as
  its attention is peaked on itself.
* Optional moments (``moments=True``): the MLP also reads each code's mass and centroid per time bin,
  where and how far a code moves being then linear in its input rather than a ratio to be learnt.
* Optional trajectories (``trajectory=t``): the MLP also reads what each code's members look like per
  time bin, their mean minus the codeword, in units of the codeword's RMS, through a shared
  ``Linear(D -> trajectory_dim)``. When an object changes colour, appears or leaves, the codes it moves
  between change membership at that time, and the difference of their time-bin means is that object's
  features: what, not only where, a code gains or loses.
* Optional changes (``changes=True``, with ``trajectory``): per time bin, what each code's members differ
  by from the same cell in the frame before, averaged with weights by the difference's norm (see
  :func:`~tokenreduce.plugins.vqtoken.hashing.changes`), through a second ``Linear(D -> trajectory_dim)``.
  Trajectories say what a code holds over time; changes say what arrived where it now is: when a shape
  turns blue it joins the blue code, and that code's change at that time is the shape's new look minus
  its old one.
* Optional further blocks (``blocks=n``): pre-norm self-attention among the code tokens, with the tokens
  as values, and an FFN, zero-initialised at their outputs. The paper's block mixes hash embeddings only;
  these let a code read what the others hold (the code a shape left and the one it joined).
* Optional low-rank adapters on the LLM's linear layers (``llm_rank > 0``), trained with the block. The
  paper tunes the whole LLM so that it learns to read code tokens; here the tuning travels with the module
  as LoRA deltas ``x A^T B^T * alpha / rank`` (``B`` zero-initialised), added by forward hooks that
  ``wrap`` installs and ``unwrap`` removes, so the unwrapped model is untouched.

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

from tokenreduce.core.lowrank import LowRankAdapters, check_adapters

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
        own_hash: also add each code's own hash embedding to its token (zero-initialised projection).
        rms_residual: scale the residual updates by each code token's RMS, so that the module learns at
            the scale of the tokens it edits whatever the projector's output norm.
        moments: also feed the hash MLP each code's mass and centroid per time bin
            (:func:`occupancy_moments`), so that where a code moves is a linear feature of its input.
        trajectory: time bins of each code's member means fed to the hash MLP (0: none); see
            :func:`~tokenreduce.plugins.vqtoken.hashing.trajectories`.
        trajectory_dim: width each time bin's member mean (and change) is projected to.
        changes: also feed the hash MLP each code's change per trajectory time bin (needs ``trajectory``).
        blocks: further self-attention + FFN blocks among the code tokens after the hash attention.
        dropout: attention-probability dropout in training.
        llm_rank: rank of the LLM adapters (0: none, the LLM reads the code tokens as it is).
        llm_alpha: adapter scale numerator (the delta is multiplied by ``llm_alpha / llm_rank``).
        llm_modules: ``(name, in_features, out_features)`` of every adapted linear layer, names relative
            to the language model (see :func:`tokenreduce.core.lowrank.llm_linear_layers`).
    """

    dim: int
    heads: int = 4
    bins: tuple[int, int, int] = (8, 4, 4)
    hidden: int = 256
    ffn: bool = True
    own_hash: bool = False
    rms_residual: bool = False
    moments: bool = False
    trajectory: int = 0
    trajectory_dim: int = 16
    changes: bool = False
    blocks: int = 0
    dropout: float = 0.0
    llm_rank: int = 0
    llm_alpha: float = 16.0
    llm_modules: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        self.bins = tuple(int(b) for b in self.bins)
        self.llm_modules = check_adapters("llm", self.llm_rank, self.llm_modules)
        for name, low in (
            ("dim", 1),
            ("heads", 1),
            ("hidden", 1),
            ("trajectory", 0),
            ("trajectory_dim", 1),
            ("blocks", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads})")
        if self.changes and not self.trajectory:
            raise ValueError(
                "`changes`=True needs `trajectory` > 0 (changes are read per trajectory time bin)"
            )
        if len(self.bins) != 3 or any(b < 1 for b in self.bins):
            raise ValueError(f"`bins` must be three ints >= 1 (time, height, width), got {self.bins!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")

    @property
    def hash_size(self) -> int:
        """Length of a code's pooled occupancy map (what :meth:`VQAttention.forward` takes)."""
        return math.prod(self.bins)

    @property
    def hash_features(self) -> int:
        """Width of the hash MLP's input: the map, plus 3 moments per time bin with ``moments``, plus
        ``trajectory_dim`` per trajectory time bin (twice with ``changes``)."""
        moments = 3 * self.bins[0] if self.moments else 0
        return self.hash_size + moments + self.trajectory * self.trajectory_dim * (2 if self.changes else 1)


def occupancy_moments(occupancy: torch.Tensor, bins: tuple[int, int, int]) -> torch.Tensor:
    """``[K, 3 t]``: per time bin, each code's mass (its share of the bin's cells) and the row and column of
    its centroid in ``[-1, 1]`` (0 where the code is absent).

    From the flattened map an MLP must learn a ratio to find where a code sits, and a difference of two
    such ratios to find where it moves; here both are linear in the input.
    """
    bt, bh, bw = bins
    occ = occupancy.reshape(-1, bt, bh, bw)
    mass = occ.sum((2, 3))
    rows = torch.linspace(-1.0, 1.0, bh, device=occ.device, dtype=occ.dtype) if bh > 1 else occ.new_zeros(1)
    cols = torch.linspace(-1.0, 1.0, bw, device=occ.device, dtype=occ.dtype) if bw > 1 else occ.new_zeros(1)
    row = (occ.sum(3) * rows).sum(2) / mass.clamp_min(1e-6)
    col = (occ.sum(2) * cols).sum(2) / mass.clamp_min(1e-6)
    return torch.cat([mass / (bh * bw), row, col], dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dropout: float) -> torch.Tensor:
    """Multi-head attention among ``K`` code tokens: ``[K, D]`` queries, keys and values -> ``[K, D]``."""
    n = q.shape[0]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, heads, -1).transpose(0, 1)  # [heads, K, d]

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=dropout)
    return out.transpose(0, 1).reshape(n, -1)


class _Block(nn.Module):
    """Pre-norm self-attention among the code tokens (the tokens are the values) and an FFN, both
    zero-initialised at their outputs, so a new block leaves the tokens as they are."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        for layer in (self.out, self.ffn[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, unit: torch.Tensor | float, heads: int, dropout: float
    ) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + unit * self.out(_attend(q, k, v, heads, dropout))
        return x + unit * self.ffn(self.ffn_norm(x))


class VQAttention(nn.Module):
    """``B' = B + W_O MHA(Q = LN(B) W_Q, K = LN(B) W_K, V = MLP(occupancy) W_V)``, optionally plus each
    code's own hash embedding, an FFN and further self-attention blocks among the codes."""

    def __init__(self, config: VQAttentionConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.hash_mlp = nn.Sequential(
            nn.Linear(config.hash_features, config.hidden), nn.GELU(), nn.Linear(config.hidden, d)
        )
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if config.trajectory:
            self.trajectory = nn.Linear(d, config.trajectory_dim)
        if config.changes:
            self.change = nn.Linear(d, config.trajectory_dim)
        if config.own_hash:
            self.own = nn.Linear(d, d)
            nn.init.zeros_(self.own.weight)
            nn.init.zeros_(self.own.bias)
        if config.ffn:
            self.ffn_norm = nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            nn.init.zeros_(self.ffn[-1].weight)
            nn.init.zeros_(self.ffn[-1].bias)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(config.blocks))
        self.llm = LowRankAdapters(
            config.llm_modules, config.llm_rank, config.llm_alpha, owner="VQ-attention"
        )

    def adapt_llm(self, language_model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Add the LLM adapters to ``language_model``'s linear layers as forward hooks; returns the hooks
        (removing them restores the model exactly). Nothing when ``llm_rank`` is 0."""
        return self.llm.install(language_model)

    def forward(
        self,
        codebook: torch.Tensor,
        occupancy: torch.Tensor,
        trajectory: torch.Tensor | None = None,
        changes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``codebook: [K, D]`` code tokens, ``occupancy: [K, t*h*w]`` their pooled hash -> ``[K, D]``.

        ``trajectory: [K, config.trajectory, D]``, each code's member mean per time bin (zeros where the code
        is absent), is required when ``config.trajectory`` > 0 and refused otherwise; ``changes`` (same
        shape, :func:`~tokenreduce.plugins.vqtoken.hashing.changes`) likewise with ``config.changes``.
        """
        cfg = self.config
        if codebook.dim() != 2 or codebook.shape[1] != cfg.dim:
            raise ValueError(f"VQAttention expects a codebook [K, {cfg.dim}], got {tuple(codebook.shape)}")
        if occupancy.shape != (codebook.shape[0], cfg.hash_size):
            raise ValueError(
                f"VQAttention expects occupancy [{codebook.shape[0]}, {cfg.hash_size}], "
                f"got {tuple(occupancy.shape)}"
            )
        expected = (codebook.shape[0], cfg.trajectory, cfg.dim)
        for name, value, wanted in (
            ("trajectory", trajectory, cfg.trajectory > 0),
            ("changes", changes, cfg.changes),
        ):
            if (value is None) == wanted or (value is not None and value.shape != expected):
                want = f"[{expected[0]}, {expected[1]}, {expected[2]}]" if wanted else "none"
                got = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"VQAttention with trajectory={cfg.trajectory}, changes={cfg.changes} expects {name} "
                    f"{want}, got {got}"
                )
        dtype = self.q.weight.dtype
        b = codebook.to(dtype)
        features = occupancy.to(dtype)
        if cfg.moments:
            features = torch.cat([features, occupancy_moments(features, cfg.bins)], dim=1)
        rms = b.pow(2).mean(-1, keepdim=True).sqrt()
        per_bin = rms.clamp_min(1e-6)[:, None]  # [K, 1, 1]: time-bin features in units of the code's RMS
        if trajectory is not None:
            traj = trajectory.to(dtype)
            present = traj.abs().sum(-1, keepdim=True) > 0
            offsets = torch.where(present, (traj - b[:, None]) / per_bin, 0.0)
            features = torch.cat([features, self.trajectory(offsets).flatten(1)], dim=1)
        if changes is not None:
            change = self.change(changes.to(dtype) / per_bin)
            features = torch.cat([features, change.flatten(1)], dim=1)
        hashed = self.hash_mlp(features)
        h = self.norm(b)
        dropout = cfg.dropout if self.training else 0.0
        # residual updates in units of each code token's RMS (projected visual tokens can sit at ~100x
        # the norm of text embeddings; a zero-initialised update at unit scale would take long to matter)
        unit = rms if cfg.rms_residual else 1.0
        update = self.out(_attend(self.q(h), self.k(h), self.v(hashed), cfg.heads, dropout))
        if cfg.own_hash:
            update = update + self.own(hashed)
        out = b + unit * update
        if cfg.ffn:
            out = out + unit * self.ffn(self.ffn_norm(out))
        for block in self.blocks:
            out = block(out, unit, cfg.heads, dropout)
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
        meta = {
            **asdict(self.config),
            "bins": list(self.config.bins),
            "llm_modules": [list(m) for m in self.config.llm_modules],
            "metadata": metadata,
        }
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
