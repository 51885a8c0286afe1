"""Training data that grows while a run trains: slice caches that appear in a folder join the
training split between epochs.

On a lent GPU machine the phantom generators, not the GPU, set the pace (docs/training.md,
"Data, not steps"): waiting for every case before training leaves the GPU idle for most of the
session and then shows it a fixed set many times over. With a growing set the generators keep
writing caches (`dataset cache --phantoms N --cache DIR/NAME`, one folder per set) while the model
trains on what has arrived, so later epochs see cases no earlier epoch saw.

Only training grows. Validation and test stay those of the starting cache, so that every epoch is
judged on the same cases and the early-stopping monitor stays comparable. A grown case is never
in validation or test, so it cannot leak into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .classes import CLASS_NAMES
from .data import SliceCache
from .errors import UserInputError

__all__ = ["GrowSource", "TrainingPool", "ready_caches", "load_grown", "grown_record"]


@dataclass(frozen=True)
class GrowSource:
    """A folder whose sub-folders are slice caches to add to the training split as they appear."""

    folder: Path
    normal_per_case: Optional[int] = None  # thin each grown case's normal slices as the starting cache's


class TrainingPool:
    """The training slices: the starting cache's training split, then every grown cache whole.

    Indices into the pool are positions in `labels`. The caches stay separate (no copy of the
    starting cache each time one joins); a batch is read from each part with `read_images`.
    """

    def __init__(self, cache: SliceCache, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        self._parts: list[tuple[SliceCache, np.ndarray]] = [(cache, indices)]
        self._starts = [0]
        self.labels = cache.labels[indices]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def parts(self) -> int:
        return len(self._parts)

    def add(self, cache: SliceCache) -> None:
        indices = np.arange(len(cache), dtype=np.int64)
        self._starts.append(len(self))
        self._parts.append((cache, indices))
        self.labels = np.concatenate([self.labels, cache.labels])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(CLASS_NAMES))

    def _by_part(self, idx: np.ndarray) -> Iterator[tuple[SliceCache, np.ndarray, np.ndarray]]:
        """For each part that pool positions `idx` reach: its cache, where in `idx` they are and
        their indices in that cache."""
        part_of = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        for p in np.unique(part_of):
            cache, local = self._parts[int(p)]
            where = np.flatnonzero(part_of == p)
            yield cache, where, local[idx[where] - self._starts[int(p)]]

    def read_images(self, idx: np.ndarray) -> np.ndarray:
        """The uint8 images (n, 3, S, S) of pool positions `idx`, in the order given (as
        `SliceCache.read_images`)."""
        idx = np.asarray(idx, dtype=np.int64)
        first = self._parts[0][0]
        out = np.empty((idx.size,) + tuple(first.images.shape[1:]), dtype=np.uint8)
        for cache, where, local in self._by_part(idx):
            out[where] = cache.read_images(local)
        return out

    def outline_masks(self, idx: np.ndarray) -> list[Optional[np.ndarray]]:
        """`SliceCache.outline_masks` of pool positions `idx`, in the order given."""
        idx = np.asarray(idx, dtype=np.int64)
        out: list[Optional[np.ndarray]] = [None] * idx.size
        for cache, where, local in self._by_part(idx):
            for n, masks in zip(where, cache.outline_masks(local)):
                out[n] = masks
        return out


def ready_caches(source: GrowSource, seen: Iterable[str]) -> list[str]:
    """Names of the sub-folders of `source.folder` that hold a finished cache not in `seen`, sorted.

    A cache is finished once its cache.json exists: `SliceCache.save` writes it last, atomically."""
    folder = Path(source.folder)
    if not folder.is_dir():
        return []
    seen = set(seen)
    return sorted(p.name for p in folder.iterdir() if p.name not in seen and (p / "cache.json").is_file())


def load_grown(
    source: GrowSource,
    names: Iterable[str],
    like: SliceCache,
    known_case_ids: set[str],
    say: Callable[[str], None],
    *,
    strict: bool = False,
) -> tuple[list[tuple[str, SliceCache]], list[str]]:
    """Load the caches `names` of `source` for training: (accepted, refused).

    A cache of another input spec or slice rule, or one that repeats a case id already in the run,
    is refused with a message that says why; the run goes on without it (a generator's mistake
    should not end hours of training). With `strict` (a resumed run re-reading the caches it had
    trained on) a cache that cannot be read is an error instead. `known_case_ids` grows with
    every accepted cache."""
    accepted: list[tuple[str, SliceCache]] = []
    refused: list[str] = []
    for name in names:
        path = Path(source.folder) / name
        try:
            cache = SliceCache.load(path)
        except (UserInputError, OSError, ValueError, KeyError) as exc:  # a JSON error is a ValueError
            if strict:
                raise UserInputError(f"cannot resume: the grown cache {path} it trained on cannot be read ({exc}); "
                                     "restore it or start again without --resume") from None
            say(f"grown cache {path} left out: it cannot be read ({exc})")
            refused.append(name)
            continue
        why = _mismatch(cache, like, known_case_ids)
        if why:
            if strict:
                raise UserInputError(f"cannot resume: the grown cache {path} has changed ({why}); restore it or start again")
            say(f"grown cache {path} left out: {why}")
            refused.append(name)
            continue
        if source.normal_per_case is not None:
            cache = cache.thin_normal_slices(source.normal_per_case)
        known_case_ids.update(c["case_id"] for c in cache.cases)
        accepted.append((name, cache))
    return accepted, refused


def _mismatch(cache: SliceCache, like: SliceCache, known_case_ids: set[str]) -> str:
    if cache.spec != like.spec:
        return f"its input spec ({cache.spec.to_dict()}) is not the run's ({like.spec.to_dict()}); build it with the same input options"
    if cache.rule != like.rule:
        return "its slice rule is not the run's; build it with the same slice-rule options"
    repeated = sorted({c["case_id"] for c in cache.cases} & known_case_ids)
    if repeated:
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        return f"its cases {', '.join(repeated[:3])}{more} are already in the run (give each set its own seed)"
    if len(cache) == 0:
        return "it holds no labelled slices"
    return ""


def grown_record(source: GrowSource, names: list[str], caches: list[SliceCache]) -> dict[str, Any]:
    """What the card says of the grown data (their sources travel in `training.data`)."""
    counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    for c in caches:
        counts += np.bincount(c.labels, minlength=len(CLASS_NAMES))
    return {
        "folder": str(source.folder),
        "caches": len(names),
        "cases": sum(len(c.cases) for c in caches),
        "slices_by_class": dict(zip(CLASS_NAMES, (int(v) for v in counts))),
        "normal_per_case": source.normal_per_case,
    }
