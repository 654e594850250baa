"""Trained threshold heads: per ATP layer, a small MLP predicting the instance's pruning thresholds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

WEIGHTS = "atp_heads.safetensors"
CONFIG = "atp_heads.json"


class ThresholdHeads(nn.Module):
    """One head per pruning layer: ``[mean log self, mean log cross]`` -> ``(theta_redundancy, theta_spatial)``.

    Thresholds live in the space of the redundancy scores (log importance relative to uniform) and of the
    spatial score; initialised to keep about half the tokens by redundancy and the spatial set.
    ``spatial_rates`` and ``spatial_score_scale``, when given, record the SAP settings the heads were trained
    with, ``cross``, ``self_weight`` and ``score_layer`` the redundancy score's (saved in ``atp_heads.json``):
    the thresholds only mean something with those.
    """

    def __init__(self, layers: list[int], hidden: int = 16, spatial_rates: tuple[float, ...] | None = None,
                 spatial_score_scale: float | None = None, cross: str | None = None,
                 self_weight: float | None = None, score_layer: str | None = None):
        super().__init__()
        self.layers = list(layers)
        self.hidden = hidden
        if spatial_rates is not None and len(spatial_rates) != len(self.layers):
            raise ValueError(f"`spatial_rates` needs one value per layer ({len(self.layers)}), got {spatial_rates}")
        # what the heads were trained with (saved with them; ATP uses the SAP settings when its `layers` are
        # not set, the scoring ones always)
        self.spatial_rates = None if spatial_rates is None else tuple(float(r) for r in spatial_rates)
        self.spatial_score_scale = spatial_score_scale
        self.cross = cross
        self.self_weight = self_weight
        self.score_layer = score_layer
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 2)) for _ in self.layers
        )
        with torch.no_grad():
            for mlp in self.mlps:
                mlp[-1].weight.zero_()
                mlp[-1].bias.copy_(torch.tensor([0.0, 0.0]))

    def forward(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlps[self.layers.index(layer)](features.float())
        return out[:, 0], out[:, 1]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return path

    def _meta(self) -> dict:
        meta = {"layers": self.layers, "hidden": self.hidden}
        if self.spatial_rates is not None:
            meta["spatial_rates"] = list(self.spatial_rates)
        for name in ("spatial_score_scale", "cross", "self_weight", "score_layer"):
            if getattr(self, name) is not None:
                meta[name] = getattr(self, name)
        return meta

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> ThresholdHeads:
        """Load heads from a local directory or a hub repo id (``atp_heads.safetensors`` + ``atp_heads.json``)."""
        from safetensors.torch import load_file

        path = Path(source)
        if not path.is_dir():
            from huggingface_hub import hf_hub_download

            try:
                weights = hf_hub_download(str(source), WEIGHTS, revision=revision)
                config = hf_hub_download(str(source), CONFIG, revision=revision)
            except Exception as error:  # network errors, unknown repo
                raise ValueError(
                    f"`heads`={str(source)!r} is neither a local directory nor a reachable hub repo holding "
                    f"{WEIGHTS} and {CONFIG}: {error}"
                ) from error
            path = Path(weights).parent
            meta = json.loads(Path(config).read_text())
        else:
            if not (path / WEIGHTS).is_file():
                raise ValueError(f"`heads`={str(source)!r}: no {WEIGHTS} in that directory")
            meta = json.loads((path / CONFIG).read_text())
        heads = cls(meta["layers"], meta.get("hidden", 16), meta.get("spatial_rates"), meta.get("spatial_score_scale"),
                    meta.get("cross"), meta.get("self_weight"), meta.get("score_layer"))
        heads.load_state_dict(load_file(str(path / WEIGHTS)))
        return heads
