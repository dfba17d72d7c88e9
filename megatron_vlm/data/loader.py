"""Deterministic, resumable, data-parallel loading of packed rows.

``PackedRowSampler`` fixes the global order of rows: epoch ``e`` is a permutation seeded by
``(seed, e)``; global position ``p`` of an epoch goes to data-parallel rank ``p % dp_size``. Its
only state is the number of rows all ranks have consumed together, so resuming is "skip that many
positions" (nothing is replayed or lost) and the count stays valid when the DP size changes
between runs as long as it divides the count.

``PackedDataLoader`` runs a torch ``DataLoader`` whose worker processes read, decode and patchify
images and build the rows; the main process only receives finished ``PackedBatch``es. It counts a
row as consumed when it hands it out, not when a worker prefetches it, so ``state_dict()`` taken
after a training step resumes right after that step.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_vlm.data.batch import PackedBatch


class PackedRowSampler(torch.utils.data.Sampler):
    """Row indices for one DP rank. ``num_epochs=None`` repeats forever (new order each epoch).
    Each epoch uses ``num_rows - num_rows % dp_size`` rows (a different few left out each epoch),
    so all ranks take the same number of steps."""

    def __init__(self, num_rows: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = 1, consumed_rows: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        if num_rows < dp_size:
            raise ValueError(f"{num_rows} rows cannot feed {dp_size} data-parallel ranks")
        self.num_rows, self.dp_rank, self.dp_size = int(num_rows), int(dp_rank), int(dp_size)
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.rows_per_epoch = self.num_rows - self.num_rows % self.dp_size
        self.consumed_rows = 0
        self.set_consumed(consumed_rows)
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)

    def set_consumed(self, consumed_rows: int) -> None:
        if consumed_rows % self.dp_size:
            raise ValueError(f"{consumed_rows} consumed rows is not a multiple of the DP size {self.dp_size}")
        self.consumed_rows = int(consumed_rows)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows) if self.shuffle
                     else np.arange(self.num_rows))
            self._order = (epoch, order)
        return self._order[1]

    def global_row(self, position: int) -> int:
        """The row at global position ``position`` (all ranks, all epochs)."""
        epoch, offset = divmod(position, self.rows_per_epoch)
        return int(self.epoch_order(epoch)[offset])

    def _iterate(self, start: int) -> Iterator[int]:
        position = start + self.dp_rank
        while self.num_epochs is None or position < self.num_epochs * self.rows_per_epoch:
            yield self.global_row(position)
            position += self.dp_size

    def __iter__(self) -> Iterator[int]:
        return self._iterate(self.consumed_rows)  # the start is fixed now, not at the first next()

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless sampler (num_epochs=None) has no length")
        return max(0, self.num_epochs * self.rows_per_epoch - self.consumed_rows) // self.dp_size

    def state_dict(self) -> dict:
        return {"consumed_rows": self.consumed_rows, "num_rows": self.num_rows, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the saved loader state has {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}: resuming would not continue the same order")
        self.set_consumed(int(state["consumed_rows"]))


def _identity(batch):
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: image decoding is the work, not BLAS
    _keep_big_allocations_on_the_heap()
    # Ctrl-C and scancel signal the whole process group. The trainer answers by finishing its step
    # and saving; a worker that died of the same signal would fail that step (torch's SIGCHLD check
    # raises when a worker is killed by a signal). So SIGINT/SIGUSR1 are ignored, and SIGTERM (also
    # what the DataLoader's own shutdown sends as a last resort) ends the worker cleanly, exit 0,
    # after a grace that lets it deliver the rows of the step in flight.
    import signal

    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


WORKER_SIGTERM_GRACE_S = 10.0


def _exit_after_grace(signum, frame) -> None:
    import threading

    timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, (0,))
    timer.daemon = True
    timer.start()


def _keep_big_allocations_on_the_heap() -> None:
    """Every page's patches are a fresh ~47 MB array; glibc serves such sizes with mmap and returns
    them on free, so each page costs ~12K page faults (half the decode time here). Raising the mmap
    and trim thresholds lets the worker reuse that memory (its peak stays that of one row)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


class PackedDataLoader:
    """Iterates ``PackedBatch``es of one DP rank; workers decode images off the main process."""

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: PackedRowSampler, num_workers: int = 2,
                 prefetch_factor: int = 2, pin_memory: bool = False, persistent_workers: bool = False,
                 multiprocessing_context: Optional[str] = None, timeout: float = 0):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers = num_workers
        self._kwargs = dict(batch_size=None, collate_fn=_identity, num_workers=num_workers,
                            pin_memory=pin_memory, timeout=timeout)
        if num_workers > 0:
            self._kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                                worker_init_fn=_worker_init, multiprocessing_context=multiprocessing_context)
        self._iterator: Optional[Iterator[PackedBatch]] = None

    def __iter__(self) -> Iterator[PackedBatch]:
        loader = torch.utils.data.DataLoader(self.dataset, sampler=self.sampler, **self._kwargs)
        batches = iter(loader)
        try:
            for batch in batches:
                self.sampler.consumed_rows += self.sampler.dp_size  # every rank takes one row per step
                yield batch
        finally:  # close(), or the end: workers get their stop message and exit on their own
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        """Stop the worker processes now (the trainer calls it when it is done)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __len__(self) -> int:
        return len(self.sampler)

    def next_rows(self, count: int) -> list[PackedBatch]:
        """This rank's next ``count`` rows (the trainer's interface); raises StopIteration at the end."""
        if self._iterator is None:
            self._iterator = iter(self)
        return [next(self._iterator) for _ in range(count)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.sampler.load_state_dict(state)
        self._iterator = None  # the next rows start from the loaded position


def build_loader(dataset: torch.utils.data.Dataset, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 num_workers: int = 2, num_epochs: Optional[int] = 1, shuffle: bool = True,
                 consumed_rows: int = 0, **kwargs) -> PackedDataLoader:
    sampler = PackedRowSampler(len(dataset), dp_rank, dp_size, seed, shuffle, num_epochs, consumed_rows)
    return PackedDataLoader(dataset, sampler, num_workers=num_workers, **kwargs)


__all__ = ["PackedDataLoader", "PackedRowSampler", "build_loader"]
