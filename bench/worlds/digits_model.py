"""The digits world's policy: a class-conditional rectified-flow MLP and its deterministic pretraining."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from bench.core.families import FLOW, ModelFamily
from bench.core.policy import Policy

NULL_CLASS = 10  # the label used for the unconditional branch of classifier-free guidance


class DigitsFlowMLP(Policy):
    """v_theta(x, t, y) for 8x8 digits flattened to 64 dims; y in 0..9 or NULL_CLASS.

    With a VP `family` the same network predicts that family's output (eps or v) instead of a flow velocity.
    """

    def __init__(self, hidden: int = 256, depth: int = 3, time_features: int = 16, label_dim: int = 32,
                 family: ModelFamily = FLOW):
        super().__init__()
        self.family = family
        self.time_features = time_features
        self.label = nn.Embedding(NULL_CLASS + 1, label_dim)
        layers: list[nn.Module] = [nn.Linear(64 + 2 * time_features + label_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 64))
        self.net = nn.Sequential(*layers)
        freqs = torch.exp(torch.linspace(0, math.log(200.0), time_features))
        self.register_buffer("freqs", freqs, persistent=False)

    def velocity(self, x, t, cond):
        phase = t.float().unsqueeze(1) * self.freqs
        h = torch.cat([x, torch.sin(phase), torch.cos(phase), self.label(cond)], 1)
        return self.net(h)

    def null_cond(self, cond):
        return torch.full_like(cond, NULL_CLASS)


def pretrain(data: torch.Tensor, labels: torch.Tensor, cfg: Mapping[str, Any], family: ModelFamily = FLOW
             ) -> DigitsFlowMLP:
    """Denoising pretraining with label dropout for CFG: rectified flow (v = eps - x0), or the DDPM loss
    |eps_theta - eps|^2 for a VP family, t uniform in [0, 1]; fully determined by cfg (seeded, CPU)."""
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    torch.manual_seed(int(cfg.get("seed", 0)))  # parameter init
    model = DigitsFlowMLP(int(cfg.get("hidden", 256)), int(cfg.get("depth", 3)), family=family)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 1e-3)))
    labels = labels.clone()
    noise = float(cfg.get("label_noise", 0.0))
    if noise > 0:
        # A "misaligned" base model: fluent digits whose labels are partly random.
        flip = torch.rand(len(labels), generator=g) < noise
        labels[flip] = torch.randint(10, (int(flip.sum()),), generator=g)
    batch, drop = int(cfg.get("batch", 256)), float(cfg.get("label_dropout", 0.1))
    for _ in range(int(cfg.get("steps", 300))):
        idx = torch.randint(len(data), (batch,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < drop] = NULL_CLASS
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(batch, generator=g)
        x_t = family.noise(x0, eps, t[:, None])
        loss = ((model.velocity(x_t, t, y) - family.target(x0, eps, t[:, None])) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
