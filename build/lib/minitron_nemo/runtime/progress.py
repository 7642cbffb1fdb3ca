"""A progress bar with throughput and ETA, printed by rank 0 only."""

from __future__ import annotations

import os

from tqdm import tqdm


class Progress:
    """tqdm on rank 0 (units per second and ETA); silent elsewhere or when disabled. A caller that
    picks its own printing rank (the last pipeline stage) passes rank0_only=False."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        rank0_only: bool = True,
    ) -> None:
        rank0 = int(os.environ.get("RANK", "0")) == 0
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
            if enabled and (rank0 or not rank0_only)
            else None
        )

    def update(self, n: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def postfix(self, **values: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
