"""Which studies a `classify` call names, and reading the next one while the current one runs.

INPUT may be an image file, a folder holding one DICOM series, a folder of image files or of
DICOM series folders, or a CSV list with a ``path`` column (optional ``liver_mask`` and ``id``).
"""

from __future__ import annotations

import csv
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

from .errors import UserInputError
from .io import VOLUME_SUFFIXES, read_mask, read_volume
from .volume import Volume

__all__ = ["Study", "LoadedStudy", "expand_inputs", "prefetch"]


@dataclass(frozen=True)
class Study:
    study_id: str
    path: Path
    liver_mask: Optional[Path] = None


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def _looks_like_dicom_folder(path: Path) -> bool:
    for child in list(path.iterdir())[:50]:
        if child.is_file():
            try:
                with open(child, "rb") as fh:
                    head = fh.read(132)
                if head[128:132] == b"DICM":
                    return True
            except OSError:
                continue
    return False


def _study_id(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^\w.-]+", "_", name) or "study"


def _from_csv(path: Path) -> list[Study]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise UserInputError(f"{path} has no 'path' column: a study list needs a header with path (and optional liver_mask, id)")
    base = path.parent
    studies = []
    for row in rows:
        p = (base / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"])
        mask = row.get("liver_mask") or None
        mask_path = ((base / mask).resolve() if not Path(mask).is_absolute() else Path(mask)) if mask else None
        studies.append(Study(row.get("id") or _study_id(p), p, mask_path))
    return studies


def expand_inputs(inputs: Iterable[str], liver_mask: Optional[str] = None) -> list[Study]:
    studies: list[Study] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".csv":
            studies.extend(_from_csv(path))
        elif path.is_dir() and not _looks_like_dicom_folder(path):
            children = sorted(path.iterdir())
            found = [Study(_study_id(c), c) for c in children if _is_volume_file(c)]
            found += [Study(_study_id(c), c) for c in children if c.is_dir() and _looks_like_dicom_folder(c)]
            if not found:
                raise UserInputError(f"{path} holds no DICOM files, image files or DICOM series folders: check the path")
            studies.extend(found)
        else:
            studies.append(Study(_study_id(path), path))  # missing paths fail at read time, per study
    if liver_mask is not None:
        if len(studies) != 1:
            raise UserInputError("--liver-mask goes with a single study; for several, give a CSV list with a liver_mask column")
        studies = [Study(studies[0].study_id, studies[0].path, Path(liver_mask))]
    seen: dict[str, int] = {}
    unique = []
    for s in studies:  # two inputs called ct.nii.gz in different folders must not share an output folder
        n = seen.get(s.study_id, 0)
        seen[s.study_id] = n + 1
        unique.append(s if n == 0 else Study(f"{s.study_id}_{n + 1}", s.path, s.liver_mask))
    return unique


class LoadedStudy(NamedTuple):
    ct: Volume
    liver_mask: Optional[Volume]
    notes: list[str]  # what reading left out or doubted (e.g. a localizer image), for the user and the report


def _load(study: Study, series_uid: Optional[str]) -> LoadedStudy:
    notes: list[str] = []
    # Refused up front, before any voxel is read, when classifying it would not fit in memory.
    ct = read_volume(study.path, series_uid=series_uid, notes=notes, memory_for="pipeline")
    mask = read_mask(study.liver_mask, like=ct, require_binary=True) if study.liver_mask is not None else None
    return LoadedStudy(ct, mask, notes)


def prefetch(studies: list[Study], series_uid: Optional[str] = None) -> Iterator[tuple[Study, "Future[LoadedStudy]"]]:
    """Yield (study, future of its volumes); the next study is read in the background."""
    if not studies:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dadrn-read") as pool:
        pending = pool.submit(_load, studies[0], series_uid)
        for idx, study in enumerate(studies):
            current = pending
            if idx + 1 < len(studies):
                pending = pool.submit(_load, studies[idx + 1], series_uid)
            yield study, current
