"""Slice data sets for training and evaluation: cases in, labelled model inputs out, split by case.

A *case* is one CT volume with its liver mask and either a lesion label map (values 2-5 as in
`classes.LABELS`) or a table of slice labels. Every case, synthetic or a site's own, enters
through `read_cases` (a CSV list or a folder); phantoms are written in that form by
`write_dataset(synthetic_cases(...))` or prepared in memory.

Slice labels from a lesion map (`slice_labels`). Slice k of the liver is
* a lesion slice of class c when some lesion of class c has an in-slice area of at least
  ``max(min_area_mm2, min_fraction x that lesion's largest cross-section)`` (defaults 20 mm² and
  25 %) and no other lesion class is present on the slice;
* normal when no lesion voxel lies on it;
* EXCLUDED (label -1) otherwise: a lesion remnant below the threshold (the lesion's pole, a
  partial-volume sliver) is neither clearly visible nor absent, and calling it normal would teach
  the model to ignore small lesions; slices holding two lesion classes have no single label.
A "lesion" is a 26-connected component of one label value.

Model inputs are made by `preprocess.prepare_batch`, the very code inference uses, after the same
reorientation to the axial frame (`orientation.to_axial_frame`). They are stored once as uint8 in a
`SliceCache` (N, 3, S, S) so that epochs cost no volume reading. For evaluation of localisation
the cache also keeps, for each lesion slice, the liver and the lesion (core and 2-voxel in-plane
dilation) inside the case's crop box, at the CT's own in-plane resolution, so the pointing game
is scored where the product places its heatmap peak.

Splits are by patient (`patient_id`, default the case id), never by slice, stratified by the
case's lesion class so that every split sees every class.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .classes import CLASS_NAMES, LABEL_BY_VALUE
from .errors import UserInputError
from .preprocess import CropBox, InputSpec, liver_crop_box, liver_slice_indices, prepare_batch
from .volume import Volume

__all__ = [
    "IGNORE",
    "SliceRule",
    "CaseRecord",
    "CaseVolumes",
    "SliceCache",
    "slice_labels",
    "read_slice_label_table",
    "read_cases",
    "load_case",
    "SyntheticCase",
    "synthetic_cases",
    "prepare_synthetic",
    "write_dataset",
    "build_cache",
    "merge_caches",
    "split_cases",
    "read_split",
    "write_split",
    "SPLITS",
    "LIVER_SOURCES",
    "liver_sources",
]

PathLike = Union[str, os.PathLike]
IGNORE = -1
SPLITS = ("train", "val", "test")
LIVER_SOURCES = ("reference", "automatic")  # the data's liver masks, or the one `classify` makes
CACHE_FORMAT = 1
POINTING_DILATION_VOXELS = 2

# Label value of the lesion map -> class index (the order of the model's logits).
LESION_VALUE_TO_CLASS = {lab.value: CLASS_NAMES.index(lab.key) for lab in LABEL_BY_VALUE.values() if lab.key in CLASS_NAMES}


# --------------------------------------------------------------------------------------------
# slice labels


@dataclass(frozen=True)
class SliceRule:
    """When a slice counts as a lesion slice (see the module docstring)."""

    min_area_mm2: float = 20.0
    min_fraction: float = 0.25

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def slice_labels(lesion: np.ndarray, liver: np.ndarray, spacing_ij: tuple[float, float], rule: SliceRule = SliceRule()) -> np.ndarray:
    """(n_slices,) class index per slice; IGNORE for excluded slices and slices without liver."""
    lesion = np.asarray(lesion)
    n_k = lesion.shape[0]
    pixel_mm2 = float(spacing_ij[0]) * float(spacing_ij[1])
    labels = np.full(n_k, IGNORE, dtype=np.int64)
    has_liver = np.zeros(n_k, dtype=bool)
    has_liver[liver_slice_indices(liver)] = True
    unknown = sorted(set(np.unique(lesion).tolist()) - {0} - set(LESION_VALUE_TO_CLASS))
    if unknown:
        raise UserInputError(
            f"the lesion map holds label values {unknown}; expected 0 and lesion values "
            f"{', '.join(f'{v} {LABEL_BY_VALUE[v].key}' for v in sorted(LESION_VALUE_TO_CLASS))}"
        )
    qualifying = np.zeros((n_k, len(CLASS_NAMES)), dtype=bool)  # a lesion of class c is clearly on slice k
    present = np.zeros((n_k, len(CLASS_NAMES)), dtype=bool)  # any voxel of class c on slice k
    for value, cls in LESION_VALUE_TO_CLASS.items():
        mask = lesion == value
        if not mask.any():
            continue
        comps, n_comp = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        kk = np.nonzero(comps)[0]
        ids = comps[comps > 0]
        area = np.bincount(ids * n_k + kk, minlength=(n_comp + 1) * n_k).reshape(n_comp + 1, n_k)[1:] * pixel_mm2
        threshold = np.maximum(rule.min_area_mm2, rule.min_fraction * area.max(axis=1, keepdims=True))
        qualifying[:, cls] = ((area >= threshold) & (area > 0)).any(axis=0)
        present[:, cls] = (area > 0).any(axis=0)
    for k in np.flatnonzero(has_liver):
        q = np.flatnonzero(qualifying[k])
        p = np.flatnonzero(present[k])
        if p.size == 0:
            labels[k] = 0
        elif q.size == 1 and set(p.tolist()) == {int(q[0])}:
            labels[k] = int(q[0])
    return labels


def _parse_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in ("", "ignore", "exclude", "excluded", "-1"):
        return IGNORE
    aliases = {"hemangioma": "hem", "haemangioma": "hem", "focal nodular hyperplasia": "fnh", "none": "normal"}
    v = aliases.get(v, v)
    if v in CLASS_NAMES:
        return CLASS_NAMES.index(v)
    if v.isdigit() and int(v) < len(CLASS_NAMES):
        return int(v)
    raise UserInputError(f"{where}: unknown slice label {value!r}; use one of {', '.join(CLASS_NAMES)} (or 0-4, or 'exclude')")


def read_slice_label_table(path: PathLike, n_slices: int) -> np.ndarray:
    """A CSV of ``slice_index,label`` -> (n_slices,) labels; slices not listed are IGNORE."""
    path = Path(path)
    labels = np.full(n_slices, IGNORE, dtype=np.int64)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slice_index", "label"} <= set(rows[0]):
        raise UserInputError(f"{path} needs a header with columns slice_index,label")
    for n, row in enumerate(rows, start=2):
        try:
            k = int(row["slice_index"])
        except ValueError:
            raise UserInputError(f"{path} line {n}: slice_index {row['slice_index']!r} is not an integer") from None
        if not 0 <= k < n_slices:
            raise UserInputError(f"{path} line {n}: slice_index {k} is outside the volume's 0..{n_slices - 1}")
        labels[k] = _parse_label(row["label"], f"{path} line {n}")
    return labels


# --------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    ct: Path
    liver: Path
    lesion: Optional[Path] = None
    slice_labels: Optional[Path] = None
    patient_id: str = ""  # cases of one patient always share a split; default: the case id
    group: str = ""  # reported separately by `evaluate`, e.g. "phantom" or "real"
    split: str = ""  # a fixed split (train/val/test), overriding the seeded one
    subgroup: str = ""  # reported separately within its group, e.g. a phantom's "hard" / "regular"


@dataclass
class CaseVolumes:
    """One case in memory, already in the axial frame the pipeline uses."""

    case_id: str
    ct: Volume
    liver: Volume  # uint8 0/1, lesions included
    lesion: Optional[Volume]  # uint8 label values, or None when labels come from a table
    labels: np.ndarray  # (n_slices,) class index or IGNORE
    input_k: Optional[np.ndarray] = None  # axial-frame k -> the stored volume's k (None: stored axis not axial)
    patient_id: str = ""
    group: str = ""
    split: str = ""
    subgroup: str = ""


_VOLUME_NAMES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _resolve(base: Path, value: Optional[str]) -> Optional[Path]:
    if value is None or not str(value).strip():
        return None
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else (base / p)


def _find_volume(folder: Path, stem: str) -> Optional[Path]:
    for suffix in _VOLUME_NAMES:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    if stem == "ct" and (folder / "dicom").is_dir():
        return folder / "dicom"
    return None


def read_cases(path: PathLike) -> list[CaseRecord]:
    """Cases from a CSV list or a folder.

    CSV columns: ``case_id, ct, liver`` and optional ``lesion`` (label map, values 2-5),
    ``slice_labels`` (CSV of slice_index,label), ``patient_id``, ``group``, ``split``, ``subgroup``; paths are
    relative to the CSV's folder. The phantom writer's ``cases.csv`` (a ``path`` column naming a
    folder with ct/liver/lesion.nii.gz) is read too. A folder is read through its ``cases.csv``,
    else every sub-folder holding ``ct.*`` (or ``dicom/``) and ``liver.*`` is a case.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist: give a cases CSV or a folder of case folders")
    if path.is_dir():
        if (path / "cases.csv").is_file():
            return read_cases(path / "cases.csv")
        records = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            ct, liver = _find_volume(sub, "ct"), _find_volume(sub, "liver")
            if ct is None or liver is None:
                continue
            labels = sub / "slice_labels.csv"
            records.append(CaseRecord(sub.name, ct, liver, _find_volume(sub, "lesion"), labels if labels.is_file() else None))
        if not records:
            raise UserInputError(f"{path} holds no case folders (each needs ct.nii.gz or dicom/, and liver.nii.gz)")
        return records
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UserInputError(f"{path} lists no cases")
    cols = set(rows[0])
    base = path.parent
    records = []
    for n, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        if not case_id:
            raise UserInputError(f"{path} line {n}: empty case_id (columns: case_id, ct, liver, lesion, slice_labels)")
        if "ct" in cols:
            ct, liver = _resolve(base, row.get("ct")), _resolve(base, row.get("liver"))
            if ct is None or liver is None:
                raise UserInputError(f"{path} line {n}: case {case_id} needs both ct and liver paths")
            lesion, table = _resolve(base, row.get("lesion")), _resolve(base, row.get("slice_labels"))
        elif "path" in cols:  # the phantom writer's list
            folder = _resolve(base, row["path"])
            ct, liver, lesion = _find_volume(folder, "ct"), _find_volume(folder, "liver"), _find_volume(folder, "lesion")
            if ct is None or liver is None:
                raise UserInputError(f"{path} line {n}: {folder} holds no ct/liver volumes")
            table = None
        else:
            raise UserInputError(f"{path} needs columns case_id, ct, liver (optional lesion, slice_labels, patient_id, group, split)")
        split = (row.get("split") or "").strip().lower()
        if split and split not in SPLITS:
            raise UserInputError(f"{path} line {n}: split {split!r} must be one of {', '.join(SPLITS)}")
        group = (row.get("group") or row.get("source") or "").strip()
        subgroup = (row.get("subgroup") or "").strip()
        if not subgroup and "hard" in cols and (row.get("hard") or "").strip() in ("0", "1"):  # the phantom writer's list
            subgroup = "hard" if row["hard"].strip() == "1" else "regular"
        records.append(CaseRecord(case_id, ct, liver, lesion, table, (row.get("patient_id") or "").strip(), group, split, subgroup))
    ids = [r.case_id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UserInputError(f"{path}: case ids must be unique; repeated: {', '.join(dup[:5])}")
    return records


def prepare_case(
    case_id: str,
    ct: Volume,
    liver: Volume,
    lesion: Optional[Volume] = None,
    table_labels: Optional[np.ndarray] = None,
    rule: SliceRule = SliceRule(),
    *,
    patient_id: str = "",
    group: str = "",
    split: str = "",
    subgroup: str = "",
    liver_source: str = "reference",
) -> CaseVolumes:
    """Reorient to the pipeline's axial frame, merge lesions into the liver, label the slices.

    `liver_source` "automatic" masks the slices with the liver mask `classify` makes itself
    (`liver.segment_liver`, as the pipeline calls it) instead of the reference `liver`, and does not
    merge the lesions into it: the model then sees what it sees in use, and a lesion that mask
    leaves out stays out. Slices the automatic mask does not reach are not in the case."""
    from .orientation import to_axial_frame

    if liver_source not in LIVER_SOURCES:
        raise UserInputError(f"liver source {liver_source!r}: choose one of {', '.join(LIVER_SOURCES)}")
    ct.require_same_geometry(liver, f"liver mask of case {case_id}")
    axial, frame = to_axial_frame(ct)
    if liver_source == "automatic":
        from .liver import segment_liver

        try:
            liv = np.ascontiguousarray(segment_liver(axial).array > 0)
        except UserInputError as exc:  # no liver found, not CT: say which case
            raise type(exc)(f"case {case_id}: the automatic liver mask failed: {exc}") from None
    else:
        liv = np.ascontiguousarray(frame.to_canonical(np.asarray(liver.array) > 0))
    les = None
    if lesion is not None:
        ct.require_same_geometry(lesion, f"lesion map of case {case_id}")
        les = np.ascontiguousarray(frame.to_canonical(np.asarray(lesion.array)).astype(np.uint8))
        if liver_source == "reference":
            # The input is the liver-masked slice: a lesion the liver mask leaves out would be invisible.
            liv = liv | (les > 0)
    liv = liv.astype(np.uint8)
    if not liv.any():
        raise UserInputError(f"case {case_id}: the liver mask is empty")
    if les is not None:
        labels = slice_labels(les, liv, (axial.spacing[0], axial.spacing[1]), rule)
    else:
        labels = np.full(liv.shape[0], IGNORE, dtype=np.int64)
        labels[liver_slice_indices(liv)] = 0  # a case with neither lesions nor a table is normal
    if table_labels is not None:
        # Table rows name slices of the volume as stored; the axial frame may only reverse k.
        if not frame.slice_axis_is_axial:
            raise UserInputError(f"case {case_id}: a slice label table needs a volume stored as axial slices")
        t = np.asarray(table_labels, dtype=np.int64).reshape(-1)
        if frame.flip[0]:
            t = t[::-1]
        # With a lesion map the table corrects the listed slices; alone, it is the whole truth.
        labels = np.where(t != IGNORE, t, labels) if les is not None else t.copy()
        labels[~liv.reshape(liv.shape[0], -1).any(axis=1)] = IGNORE
    lesion_vol = None if les is None else axial.with_array(les)
    n_k = liv.shape[0]
    input_k = None
    if frame.slice_axis_is_axial:
        input_k = np.arange(n_k)[::-1].copy() if frame.flip[0] else np.arange(n_k)
    return CaseVolumes(case_id, axial, axial.with_array(liv), lesion_vol, labels, input_k, patient_id or case_id, group, split, subgroup)


def _data_sources(record: Any) -> Iterator[dict]:
    """Each data source's fingerprint inside a record (a cache's `source`, a model card's training data)."""
    if isinstance(record, dict):
        if "phantoms" in record or isinstance(record.get("data"), list):
            yield record
            return
        for value in record.values():
            yield from _data_sources(value)
    elif isinstance(record, list):
        for value in record:
            yield from _data_sources(value)


def liver_sources(record: Any) -> set[str]:
    """Which liver masks the data sources in a fingerprint record (a cache's `source`, a model
    card's training data) were masked with: "reference" and/or "automatic"; empty without a record."""
    return {str(node["liver"].get("source", "reference")) if isinstance(node.get("liver"), dict) else "reference"
            for node in _data_sources(record)}


def liver_methods(record: Any) -> list[dict]:
    """The automatic liver methods (sha256 of their source) a fingerprint record's masks came from:
    figures measured on automatic masks hold for that method only."""
    found: list[dict] = []
    for node in _data_sources(record):
        liver = node.get("liver")
        if isinstance(liver, dict) and liver.get("source") == "automatic" and isinstance(liver.get("method"), dict):
            if liver["method"] not in found:
                found.append(liver["method"])
    return found


def load_case(record: CaseRecord, rule: SliceRule = SliceRule(), liver_source: str = "reference") -> CaseVolumes:
    from . import io as dio

    ct = dio.read_volume(record.ct)
    liver = dio.read_mask(record.liver, like=ct, what=f"liver mask of case {record.case_id}")
    lesion = None
    if record.lesion is not None:
        lesion = dio.align_to_grid(dio.read_volume(record.lesion), ct, f"lesion map of case {record.case_id}")
        arr = np.asarray(lesion.array)
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.rint(arr)
        lesion = lesion.with_array(arr.astype(np.uint8))
    table = read_slice_label_table(record.slice_labels, ct.shape[0]) if record.slice_labels is not None else None
    return prepare_case(record.case_id, ct, liver, lesion, table, rule, patient_id=record.patient_id,
                        group=record.group, split=record.split, subgroup=record.subgroup, liver_source=liver_source)


@dataclass
class SyntheticCase:
    """A generated case before preparation: volumes plus where it belongs."""

    case_id: str
    ct: Volume
    liver: Volume
    lesion: Volume
    patient_id: str
    group: str
    split: str = ""
    meta: dict = field(default_factory=dict)


def synthetic_cases(
    n: int,
    seed: int,
    *,
    real_dir: Optional[PathLike] = None,
    real_rounds: int = 0,
    real_holdout: Sequence[str] = (),
    **phantom_kw: Any,
) -> Iterator[SyntheticCase]:
    """`n` phantoms (`phantom.generate_cases(n, seed)`, group ``phantom``) and, with `real_dir`,
    `real_rounds` rounds of every real scan there once per class with lesions painted in
    (`phantom.real_cases`, a fresh lesion draw each round; group ``real:<scan>``).

    Each real-background case is its own patient for the split: only its lesions are new, the
    scan's anatomy is shared with the other draws, which the evaluation report must say. Scans
    named in `real_holdout` go to the test split only, as scans never seen in training. The case id
    names the seed and the round, so that draws made with other seeds can join the same cache.
    """
    from . import phantom

    for case in phantom.generate_cases(n, seed, **phantom_kw):
        yield SyntheticCase(case.case_id, case.ct, case.liver, case.lesion, case.case_id, "phantom", "", case.meta)
    if real_dir is None:
        return
    for r in range(int(real_rounds)):
        round_seed = int(np.random.SeedSequence([int(seed), 0x4EA1, r]).generate_state(1)[0])
        for case in phantom.real_cases(real_dir, round_seed):
            name = case.meta.get("real_case", case.case_id)
            cid = f"{case.case_id}_s{int(seed)}_r{r}"
            yield SyntheticCase(cid, case.ct, case.liver, case.lesion, cid, f"real:{name}",
                                "test" if name in real_holdout else "", case.meta)


def synthetic_subgroup(case: SyntheticCase) -> str:
    """The generator's record, so that the deliberately hard cases are reported apart: "hard" when
    it drew the case or any of its lesions hard (small, faint, at the edge, a look-alike), else
    "regular"; "" for a case without that record."""
    if "hard" not in case.meta:
        return ""
    return "hard" if case.meta["hard"] else "regular"


def prepare_synthetic(case: SyntheticCase, rule: SliceRule = SliceRule(), liver_source: str = "reference") -> CaseVolumes:
    return prepare_case(case.case_id, case.ct, case.liver, case.lesion, None, rule,
                        patient_id=case.patient_id, group=case.group, split=case.split, subgroup=synthetic_subgroup(case),
                        liver_source=liver_source)


CSV_COLUMNS = ("case_id", "ct", "liver", "lesion", "slice_labels", "patient_id", "group", "split", "subgroup")


def _source_sha256(*names: str) -> dict[str, str]:
    here = Path(__file__).resolve().parent
    return {name: hashlib.sha256((here / name).read_bytes()).hexdigest()[:16] for name in names}


def generator_fingerprint() -> dict[str, str]:
    """sha256 of the phantom generator's source files: which phantom recipe made a data set."""
    return _source_sha256("phantom.py", "lesion_models.py")


def liver_method_fingerprint() -> dict[str, str]:
    """sha256 of the automatic liver segmentation's source: which method made a cache's masks."""
    return _source_sha256("liver.py")


def write_dataset(out_dir: PathLike, cases: Iterable[SyntheticCase], *, overwrite: bool = False,
                  progress: Optional[Callable[[int, str], None]] = None, description: Optional[dict[str, Any]] = None) -> Path:
    """Write cases as ``<out>/<case_id>/{ct,liver,lesion}.nii.gz`` (+ meta.json) and list them in
    ``<out>/cases.csv`` in the format `read_cases` reads (the format a site's own data uses);
    ``<out>/dataset.json`` records how the set was made (`description` and the generator's sha256)."""
    from .errors import OutputExistsError
    from .io import write_volume

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already holds files: choose an empty --out folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, case in enumerate(cases, start=1):
        folder = out / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        write_volume(case.ct, folder / "ct.nii.gz")
        write_volume(case.liver, folder / "liver.nii.gz")
        write_volume(case.lesion, folder / "lesion.nii.gz")
        (folder / "meta.json").write_text(json.dumps(case.meta, indent=1, default=_json_default))
        rows.append({
            "case_id": case.case_id, "ct": f"{case.case_id}/ct.nii.gz", "liver": f"{case.case_id}/liver.nii.gz",
            "lesion": f"{case.case_id}/lesion.nii.gz", "slice_labels": "", "patient_id": case.patient_id,
            "group": case.group, "split": case.split, "subgroup": synthetic_subgroup(case),
        })
        if progress is not None:
            progress(n, case.case_id)
    tmp = out / "cases.csv.partial"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "cases.csv")
    info = {"generator": generator_fingerprint(), "cases": len(rows), **(description or {})}
    (out / "dataset.json").write_text(json.dumps(info, indent=1, default=_json_default))
    return out / "cases.csv"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------------------------
# the cache


def _dilate_in_plane(mask: np.ndarray, voxels: int) -> np.ndarray:
    if voxels <= 0:
        return mask
    st = np.zeros((1, 3, 3), dtype=bool)
    st[0] = True
    return ndimage.binary_dilation(mask, structure=st, iterations=voxels)


@dataclass
class SliceCache:
    """Prepared slices of a set of cases, with what training and evaluation need to know of each.

    images: (N, 3, S, S) uint8 (prepare_batch's [0, 1] times 255); labels: (N,) class index;
    case: (N,) index into `cases`; slice_index: (N,) k in the axial frame; input_slice_index: (N,) k in
    the volume as stored (-1 where its slice axis is not axial). For slices whose label
    is a lesion class, `masks[n]` holds (liver, lesion core, lesion dilated) in the case's crop box.
    """

    spec: InputSpec
    rule: SliceRule
    images: np.ndarray
    labels: np.ndarray
    case: np.ndarray
    slice_index: np.ndarray
    input_slice_index: np.ndarray
    cases: list[dict[str, Any]]  # case_id, patient_id, group, split, subgroup, case_class, box, n_excluded, spacing
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # sample -> (3, bh, bw) uint8
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    # -- selection ---------------------------------------------------------------------------
    def indices_of_cases(self, case_ids: Iterable[str]) -> np.ndarray:
        wanted = set(case_ids)
        keep = np.array([c["case_id"] in wanted for c in self.cases], dtype=bool)
        return np.flatnonzero(keep[self.case]) if len(self.cases) else np.zeros(0, np.int64)

    def read_images(self, idx: np.ndarray) -> np.ndarray:
        """The uint8 images of samples `idx`, in the order given, read in sorted order (which a
        memory-mapped cache reads fastest)."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        out = np.empty((idx.size,) + tuple(self.images.shape[1:]), dtype=np.uint8)
        out[order] = np.asarray(self.images[idx[order]])
        return out

    def outline_masks(self, idx: np.ndarray) -> list[Optional[np.ndarray]]:
        """Each sample's (liver, core, dilated) masks in its crop box, None where it has none."""
        return [self.masks.get(int(n)) for n in np.asarray(idx, dtype=np.int64)]

    def z_mm(self, idx: np.ndarray) -> np.ndarray:
        """Positions (mm) of samples `idx` along their case's axial slice axis: what the decision
        rule's slice context measures distances in (`decision.context_probabilities`)."""
        idx = np.asarray(idx, dtype=np.int64)
        spacing_k = np.array([float(c["spacing"][2]) for c in self.cases]) if self.cases else np.zeros(0)
        return self.slice_index[idx] * spacing_k[self.case[idx]] if idx.size else np.zeros(0)

    def class_counts(self, indices: Optional[np.ndarray] = None) -> np.ndarray:
        labels = self.labels if indices is None else self.labels[indices]
        return np.bincount(labels, minlength=len(CLASS_NAMES))

    def subset(self, indices: np.ndarray) -> "SliceCache":
        """The samples at `indices` (sorted), with their outlines; the case table is kept whole."""
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        where = {int(old): new for new, old in enumerate(idx)}
        return SliceCache(
            spec=self.spec, rule=self.rule, images=np.asarray(self.images[idx]), labels=self.labels[idx],
            case=self.case[idx], slice_index=self.slice_index[idx], input_slice_index=self.input_slice_index[idx],
            cases=self.cases, masks={where[k]: v for k, v in self.masks.items() if k in where}, source=self.source,
        )

    def thin_normal_slices(self, per_case: int) -> "SliceCache":
        """At most `per_case` evenly spaced normal slices per case; every lesion slice is kept."""
        keep = [np.flatnonzero(self.labels > 0)]
        for c in range(len(self.cases)):
            normal = np.flatnonzero((self.case == c) & (self.labels == 0))
            if normal.size > per_case:
                normal = normal[np.round(np.linspace(0, normal.size - 1, per_case)).astype(int)] if per_case > 0 else normal[:0]
            keep.append(normal)
        return self.subset(np.concatenate(keep))

    # -- files -------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "images.npy.partial"
        with open(tmp, "wb") as fh:
            np.save(fh, self.images)
        os.replace(tmp, folder / "images.npy")
        np.savez(folder / "index.npz", labels=self.labels, case=self.case, slice_index=self.slice_index,
                 input_slice_index=self.input_slice_index)
        keys = sorted(self.masks)
        np.savez_compressed(folder / "masks.npz", **{f"m{k}": self.masks[k] for k in keys})
        meta = {
            "format": CACHE_FORMAT,
            "spec": self.spec.to_dict(),
            "rule": self.rule.to_dict(),
            "cases": self.cases,
            "source": self.source,
            "n": len(self),
        }
        # Last and atomic: a finished cache is one with a cache.json (a run growing its training
        # data from a folder of caches reads them while generators are still writing others).
        tmp_meta = folder / "cache.json.partial"
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, folder / "cache.json")
        return folder

    @classmethod
    def load(cls, folder: PathLike, *, mmap: bool = False) -> "SliceCache":
        folder = Path(folder)
        meta_path = folder / "cache.json"
        if not meta_path.is_file():
            raise UserInputError(f"{folder} is not a slice cache (no cache.json); build one with `dadrn-lesion dataset cache`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise UserInputError(f"{folder}: cache format {meta.get('format')} is not {CACHE_FORMAT}; rebuild the cache")
        index = np.load(folder / "index.npz")
        images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None)
        masks = {}
        with np.load(folder / "masks.npz") as z:
            for key in z.files:
                masks[int(key[1:])] = z[key]
        return cls(
            spec=InputSpec.from_dict(meta["spec"]),
            rule=SliceRule(**meta["rule"]),
            images=images,
            labels=index["labels"].astype(np.int64),
            case=index["case"].astype(np.int64),
            slice_index=index["slice_index"].astype(np.int64),
            input_slice_index=index["input_slice_index"].astype(np.int64),
            cases=meta["cases"],
            masks=masks,
            source=meta.get("source", {}),
        )

    @staticmethod
    def matches(folder: PathLike, spec: InputSpec, rule: SliceRule, source: dict[str, Any]) -> bool:
        meta_path = Path(folder) / "cache.json"
        if not meta_path.is_file() or not (Path(folder) / "images.npy").is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return False
        return (
            meta.get("format") == CACHE_FORMAT
            and meta.get("spec") == spec.to_dict()
            and meta.get("rule") == rule.to_dict()
            and meta.get("source") == json.loads(json.dumps(source))
        )


def _case_class(labels: np.ndarray) -> str:
    lesion = labels[labels > 0]
    if lesion.size == 0:
        return "normal"
    return CLASS_NAMES[int(np.bincount(lesion, minlength=len(CLASS_NAMES)).argmax())]


def build_cache(
    cases: Iterable[CaseVolumes],
    spec: InputSpec,
    rule: SliceRule = SliceRule(),
    *,
    normal_per_case: Optional[int] = None,
    source: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[int, str], None]] = None,
    batch: int = 32,
) -> SliceCache:
    """Prepare every labelled slice of every case with `prepare_batch` and keep it as uint8.

    normal_per_case: keep at most this many normal slices per case, evenly spaced along z (the
    normal slices of one case are near-duplicates; lesion slices are always all kept).
    """
    images, labels, case_idx, slice_idx, input_idx = [], [], [], [], []
    masks: dict[int, np.ndarray] = {}
    table: list[dict[str, Any]] = []
    n_total = 0
    for ci, cv in enumerate(cases):
        lab = np.asarray(cv.labels)
        keep = np.flatnonzero(lab != IGNORE)
        if normal_per_case is not None:
            normal = keep[lab[keep] == 0]
            if normal.size > normal_per_case:
                pick = normal[np.round(np.linspace(0, normal.size - 1, normal_per_case)).astype(int)] if normal_per_case > 0 else normal[:0]
                keep = np.sort(np.concatenate([keep[lab[keep] > 0], pick]))
        liver = np.asarray(cv.liver.array)
        ct = np.asarray(cv.ct.array)
        box = liver_crop_box(liver, (cv.ct.spacing[0], cv.ct.spacing[1]), spec.margin_mm)
        for start in range(0, keep.size, batch):
            ks = keep[start : start + batch]
            x = prepare_batch(ct, liver, ks, box, spec)
            images.append(np.rint(x.numpy() * 255.0).astype(np.uint8))
        if cv.lesion is not None:
            les = np.asarray(cv.lesion.array)
            sub = (slice(None), slice(box.j0, box.j1), slice(box.i0, box.i1))
            for pos, k in enumerate(keep):
                if lab[k] > 0:
                    core = les[k][sub[1:]] > 0
                    dil = _dilate_in_plane(core[None], POINTING_DILATION_VOXELS)[0]
                    masks[n_total + pos] = np.stack([liver[k][sub[1:]] > 0, core, dil]).astype(np.uint8)
        labels.append(lab[keep])
        case_idx.append(np.full(keep.size, ci, dtype=np.int64))
        slice_idx.append(keep.astype(np.int64))
        input_idx.append(cv.input_k[keep].astype(np.int64) if cv.input_k is not None else np.full(keep.size, -1, np.int64))
        n_total += keep.size
        table.append({
            "case_id": cv.case_id,
            "patient_id": cv.patient_id or cv.case_id,
            "group": cv.group,
            "split": cv.split,
            "subgroup": cv.subgroup,
            "case_class": _case_class(lab),
            "box": [box.j0, box.j1, box.i0, box.i1],
            "n_slices": int(keep.size),
            "n_excluded": int(((lab == IGNORE) & np.asarray(liver).reshape(liver.shape[0], -1).any(axis=1)).sum()),
            "spacing": [float(s) for s in cv.ct.spacing],
        })
        if progress is not None:
            progress(ci + 1, cv.case_id)
    size = spec.size
    return SliceCache(
        spec=spec,
        rule=rule,
        images=np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        case=np.concatenate(case_idx) if case_idx else np.zeros(0, np.int64),
        slice_index=np.concatenate(slice_idx) if slice_idx else np.zeros(0, np.int64),
        input_slice_index=np.concatenate(input_idx) if input_idx else np.zeros(0, np.int64),
        cases=table,
        masks=masks,
        source=dict(source or {}),
    )


def merge_caches(caches: Sequence[SliceCache]) -> SliceCache:
    """One cache from several built with the same input spec and rule (e.g. built in parallel)."""
    if not caches:
        raise ValueError("nothing to merge")
    spec, rule = caches[0].spec, caches[0].rule
    for c in caches[1:]:
        if c.spec != spec or c.rule != rule:
            raise UserInputError("caches built with different input specs or slice rules cannot be merged")
    ids = [e["case_id"] for c in caches for e in c.cases]
    if len(set(ids)) != len(ids):
        raise UserInputError("the caches share case ids; merged caches need unique case ids")
    offset_case, offset_n, masks = 0, 0, {}
    case_parts = []
    for c in caches:
        case_parts.append(c.case + offset_case)
        masks.update({k + offset_n: v for k, v in c.masks.items()})
        offset_case += len(c.cases)
        offset_n += len(c)
    return SliceCache(
        spec=spec, rule=rule,
        images=np.concatenate([np.asarray(c.images) for c in caches]),
        labels=np.concatenate([c.labels for c in caches]),
        case=np.concatenate(case_parts),
        slice_index=np.concatenate([c.slice_index for c in caches]),
        input_slice_index=np.concatenate([c.input_slice_index for c in caches]),
        cases=[e for c in caches for e in c.cases],
        masks=masks,
        source={"merged": [c.source for c in caches]},
    )


def crop_box_of(case_entry: dict[str, Any]) -> CropBox:
    return CropBox(*case_entry["box"])


# --------------------------------------------------------------------------------------------
# splits


def split_cases(
    cases: Sequence[dict[str, Any]],
    seed: int,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, str]:
    """case_id -> train/val/test, by patient, stratified by the patient's case class.

    Patients are shuffled with `seed` inside each stratum and dealt out so that each split's
    share of every stratum is as close to `fractions` as whole patients allow. Cases with a
    fixed ``split`` keep it (and pull their patient's other cases with them).
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise UserInputError(f"split fractions must be three non-negative numbers, not {fractions}")
    f = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    patients: dict[str, dict[str, Any]] = {}
    for c in cases:
        pid = c.get("patient_id") or c["case_id"]
        p = patients.setdefault(pid, {"cases": [], "classes": [], "fixed": ""})
        p["cases"].append(c["case_id"])
        p["classes"].append(c.get("case_class", "normal"))
        if c.get("split"):
            if p["fixed"] and p["fixed"] != c["split"]:
                raise UserInputError(f"patient {pid} has cases fixed to both {p['fixed']} and {c['split']}")
            p["fixed"] = c["split"]
    strata: dict[str, list[str]] = {}
    for pid, p in sorted(patients.items()):
        if p["fixed"]:
            continue
        lesion = [c for c in p["classes"] if c != "normal"]
        key = max(set(lesion), key=lesion.count) if lesion else "normal"
        strata.setdefault(key, []).append(pid)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5711]))
    assignment: dict[str, str] = {pid: p["fixed"] for pid, p in patients.items() if p["fixed"]}
    totals = np.zeros(3)
    for key in sorted(strata):
        pids = list(strata[key])
        rng.shuffle(pids)
        n = len(pids)
        # Largest remainder within the stratum; ties broken towards the splits that are behind overall.
        want = f * n
        counts = np.floor(want).astype(int)
        rest = n - counts.sum()
        order = np.lexsort((totals - f * totals.sum(), -(want - counts)))
        for idx in order[:rest]:
            counts[idx] += 1
        start = 0
        for s, cnt in zip(SPLITS, counts):
            for pid in pids[start : start + cnt]:
                assignment[pid] = s
            start += cnt
        totals += counts
    return {cid: assignment[pid] for pid, p in patients.items() for cid in p["cases"]}


def write_split(path: PathLike, split: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "split"])
        for cid in sorted(split):
            w.writerow([cid, split[cid]])
    return path


def read_split(path: PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"split file {path} does not exist")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"case_id", "split"} <= set(rows[0]):
        raise UserInputError(f"{path} needs columns case_id,split")
    out = {}
    for row in rows:
        s = row["split"].strip().lower()
        if s not in SPLITS:
            raise UserInputError(f"{path}: split {s!r} of case {row['case_id']} must be one of {', '.join(SPLITS)}")
        out[row["case_id"].strip()] = s
    return out


def source_fingerprint(**items: Any) -> dict[str, Any]:
    """What a cache was built from, so a stale cache is rebuilt rather than silently reused."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
            p = Path(value)
            out[key] = {"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16]}
            made = p.parent / "dataset.json"  # a data set written by `dataset phantoms` says how it was made
            if made.is_file():
                out[key]["dataset"] = json.loads(made.read_text())
        else:
            out[key] = value if not isinstance(value, Path) else str(value)
    return out
