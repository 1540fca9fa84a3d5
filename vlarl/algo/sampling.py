"""Random draws for a batch of observations, one CPU generator per row.

The rollout worker gives every environment its own generator and passes the engine the generators of
the rows it asks about. A row's draws then depend only on its own generator, never on which other
environments share the call, so splitting a worker's environments into pipeline stages (or an
episode ending beside it) leaves every sample unchanged. A single generator is still accepted (tests,
benchmarks): then the batch draws from it in one go. Draws happen on the CPU, so one seed gives the
same samples on any device.
"""

from __future__ import annotations

import torch

Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per row


def multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """probs (B, K) on any device -> one sampled index per row (B,) long, on the CPU."""
    probs = probs.float().cpu()
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def request_seeds(generator: Generators, n: int) -> list[int]:
    """One seed per request (engines that sample in their own process, e.g. vLLM)."""
    if isinstance(generator, list):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} requests.")
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in generator]
    return torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()


def randn(generator: Generators, rows: int, width: int) -> torch.Tensor:
    """Standard normal draws (rows, width) on the CPU, row i from generator i when given a list."""
    if isinstance(generator, list):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows.")
        return torch.stack([torch.randn(width, generator=g) for g in generator])
    return torch.randn(rows, width, generator=generator)


def randint(generator: Generators, high: int, rows: int) -> torch.Tensor:
    """One integer in [0, high) per row (rows,) long on the CPU, row i from generator i when given a list."""
    if isinstance(generator, list):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows.")
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generator])
    return torch.randint(0, high, (rows,), generator=generator)
