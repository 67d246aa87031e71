"""The thesis' Listing 3.1 workflow as one chainable object:

    from segscale.imgmed import Pipeline
    store = (
        Pipeline("../shared/data/brats2013_flair_t1gd")
        .channels("T1gd")                 # 4D → 3D: one modality, by dataset.json name or index
        .slices(axis=2, count=70)         # 3D → 2D: 70 evenly spaced slices per scan
        .resize(256)
        .normalize("zscore", clip=(0.5, 99.5), nonzero=True)
        .split(val=0.1, test=0.2, seed=0)
        .prepare("prepared/brats_t1", jobs=2)
    )

Each step returns a new Pipeline (nothing runs until `prepare`), so partial pipelines can be shared
and varied. `prepare` is `segscale.imgmed.prepare` with the collected settings and returns the
opened Store; `augment_store` then grows its training split offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from segscale.imgmed.sources import channel_indices
from segscale.imgmed.store import Store
from segscale.imgmed.transforms import Preprocessing


@dataclass(frozen=True)
class Pipeline:
    source: Path
    prep: Preprocessing = field(default_factory=Preprocessing)
    channel_spec: tuple[int | str, ...] | None = None
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    label_map: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))

    def _with(self, **changes: object) -> Pipeline:
        return replace(self, **changes)  # type: ignore[arg-type]

    def channels(self, *names_or_indices: int | str) -> Pipeline:
        """Keep these channels of 4D images (names from dataset.json 'modality', or indices)."""
        return self._with(channel_spec=names_or_indices)

    def slices(
        self, axis: int = 2, count: int | None = None, foreground_margin: int | None = None
    ) -> Pipeline:
        """3D → 2D along `axis`: all slices, `count` evenly spaced, and/or only those within
        `foreground_margin` of one with foreground."""
        return self._with(
            prep=replace(self.prep, axis=axis, slices=count, foreground_margin=foreground_margin)
        )

    def resize(self, size: int, spacing: float | None = None) -> Pipeline:
        """Slices to size × size: stretched, or resampled to `spacing` mm and centred."""
        return self._with(prep=replace(self.prep, size=size, spacing=spacing))

    def normalize(
        self,
        method: str = "zscore",
        clip: tuple[float, float] | None = None,
        nonzero: bool = False,
    ) -> Pipeline:
        return self._with(prep=replace(self.prep, normalize=method, clip=clip, nonzero=nonzero))

    def split(self, val: float = 0.1, test: float = 0.2, seed: int = 0) -> Pipeline:
        return self._with(val=val, test=test, seed=seed)

    def labels(self, mapping: dict[int, int]) -> Pipeline:
        """2D mask folders: raw mask value → class."""
        return self._with(label_map=tuple(sorted(mapping.items())))

    def preprocessing(self) -> Preprocessing:
        """The settings as `prepare` takes them, channel names resolved against the dataset."""
        if self.channel_spec is None:
            return self.prep
        return replace(self.prep, channels=channel_indices(self.source, self.channel_spec))

    def prepare(self, output: str | Path, jobs: int = 1, progress: bool = True) -> Store:
        from segscale.imgmed.prepare import prepare

        path, _ = prepare(
            self.source,
            output,
            self.preprocessing(),
            val_fraction=self.val,
            test_fraction=self.test,
            seed=self.seed,
            label_map=dict(self.label_map) if self.label_map else None,
            progress=progress,
            jobs=jobs,
        )
        return Store.open(path)
