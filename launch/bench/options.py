"""The options of one `loom bench` run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loom.launch.bench.shapes import SHAPES, Shape


@dataclass
class BenchOptions:
    shape: Shape = SHAPES["default"]
    rounds: int = 8
    steps: int = 1
    warmup: int = 2
    threads: int = 2
    sections: tuple = ("peers", "techniques", "layouts", "zero", "sequence", "data")
    corpus: str = "linuxdoc"
    quick: bool = False
    data_docs: int | None = None
    loader_batches: int = 400
    quiet_wait: float = 0.0
    device: str = "cpu"
    """cpu: the CPU sections; cuda: the `gpu` section (section_gpu) on the GPU."""
    dry_run: bool = False
    """With device cuda: the gpu section's wiring on the CPU at a tiny shape."""
    time_limit: float = 0.0
    """Seconds the gpu section may take (configurations that would not fit are skipped); 0: no limit."""

    @classmethod
    def make(cls, quick: bool = False, large: bool = False, **overrides) -> "BenchOptions":
        if quick:
            base = cls(
                shape=SHAPES["quick"],
                rounds=2,
                steps=1,
                warmup=1,
                quick=True,
                corpus="shakespeare",
                data_docs=8,
                loader_batches=50,
            )
        else:
            base = cls(shape=SHAPES["large"] if large else SHAPES["default"])
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
