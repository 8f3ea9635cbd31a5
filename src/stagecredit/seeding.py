"""Seeded blocks that leave the caller's random number generators as they were."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)``, then restore the caller's generator states.

    Building the model and replaying a stage must draw the same numbers as the
    recorded run did, but a library call should not reset the caller's stream:
    ``torch.rand`` after ``sc.attribute`` gives what it would have without it.
    CUDA's generators are forked too once CUDA is initialised.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
