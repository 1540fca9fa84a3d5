"""The modules OpenVLA-OFT adds beside the OpenVLA weights, under upstream's module names.

ProprioProjector (prismatic/models/projectors.py): fc1 (P -> E), GELU (exact), fc2 (E -> E); the
normalised proprio state becomes one extra token after the image patches.

L1 regression head (prismatic/models/action_heads.py, `L1RegressionActionHead.model`): an MLP ResNet
on each action's 7 placeholder states concatenated (7E): layer_norm1, fc1 (7E -> H), ReLU, two
pre-norm residual blocks `mlp_resnet_blocks.i.ffn` = (LayerNorm, Linear H -> H, ReLU), layer_norm2,
fc2 (H -> 7). Upstream wraps it as `.model`, and its files hold DDP state dicts (keys `module.model.*`).
"""

from __future__ import annotations

import torch
from torch import nn


class ProprioProjector(nn.Module):
    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(proprio_dim, llm_dim), nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        """proprio  # (B, P) normalised -> (B, E)"""
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_blocks: int = 2):
        super().__init__()
        self.layer_norm1, self.fc1 = nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2, self.fc2 = nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1Head(nn.Module):
    """Placeholder states (B, chunk * D, E) -> normalised actions (B, chunk, D)."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int = 7, num_blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(llm_dim * action_dim, hidden_dim, action_dim, num_blocks)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        b, n, e = states.shape
        return self.model(states.reshape(b, n // self.action_dim, self.action_dim * e))
