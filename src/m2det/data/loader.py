"""Batching and reproducible loading: `collate_fn`, `build_loader`.

Reproducibility: all augmentation draws from torch's generator. In the main process
(`num_workers=0`) `torch.manual_seed(seed)` fixes every sample. With workers, DataLoader seeds
worker k's torch generator with `base_seed + k`, where `base_seed` is drawn from the loader's
`generator` each time an epoch's iterator starts; `build_loader` passes a generator seeded with
`seed`, so epochs differ from each other and a rerun with the same seed, batch size and number
of workers repeats every sample. DataLoader also seeds each worker's `random` and numpy from the
same base seed, for any user transform that draws from them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def collate_fn(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """`[(image, target), ...]` -> (images uint8 [N, 3, S, S], list of targets)."""
    images, targets = zip(*batch)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_fn needs images of one size, got {sorted(shapes)}; "
            "use build_train_transform or build_eval_transform to resize them"
        )
    return torch.stack([image.as_subclass(Tensor) for image in images]), list(targets)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Optional[Sampler] = None,
    generator: Optional[torch.Generator] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with `collate_fn` whose order and augmentation repeat under `seed`.

    The one loader of training and benchmarks alike. `sampler` (e.g. a `DistributedSampler`) decides
    the order instead of `shuffle`; `generator` replaces the one seeded with `seed`, for a caller
    that reseeds it itself (the trainer, every epoch).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator if generator is not None else torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
