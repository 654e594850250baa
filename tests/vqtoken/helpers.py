"""Controlled video features for the VQToken tests: a static scene, or one with many moving objects."""

from __future__ import annotations

import torch


def scene_grid(moving: int, frames: int = 8, side: int = 8) -> torch.Tensor:
    """``[frames, side, side]`` look ids: background 0, two static 1x2 objects (1, 2), and ``moving`` 2x2
    objects, each moving one cell per frame along its own row band and changing its look halfway (so every
    look but the background covers 16 tokens of 8 frames)."""
    grid = torch.zeros(frames, side, side, dtype=torch.long)
    grid[:, 0, 0:2] = 1
    grid[:, side - 1, side - 2 :] = 2
    for j in range(moving):
        row = (2 * j) % (side - 1)
        for t in range(frames):
            col = (3 * j + t) % (side - 1)
            grid[t, row : row + 2, col : col + 2] = 3 + 2 * j + int(t >= frames // 2)
    return grid


def scene_features(
    moving: int, frames: int = 8, side: int = 8, dim: int = 32, noise: float = 0.02, seed: int = 0
) -> torch.Tensor:
    """``[frames * side * side, dim]`` tokens of :func:`scene_grid`: every look has its own random direction
    and every token independent noise, as a real tower's tokens would, so no two tokens coincide."""
    g = torch.Generator().manual_seed(seed)
    grid = scene_grid(moving, frames, side)
    looks = torch.nn.functional.normalize(torch.randn(3 + 2 * moving, dim, generator=g), dim=-1)
    x = looks[grid.flatten()] + noise * torch.randn(grid.numel(), dim, generator=g)
    return 3.0 * x
