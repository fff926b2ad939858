"""What a slide's run did: :class:`SlideResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m2ort_fast.outputs import SlideOutputs


@dataclass
class SlideResult:
    """One slide's run. ``seconds``: per stage (they overlap when streamed); ``wall_seconds``:
    open + predict + write, end to end. ``skipped``: its outputs existed, made from the same run
    record; ``added``: the formats written from its stored predictions without running the model
    (the outputs existed without them). ``engine``: the streamed engine's read plan statistics."""

    slide: Path
    n_spots: int = 0
    outputs: SlideOutputs | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False
    added: tuple[str, ...] = ()
    engine: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None
