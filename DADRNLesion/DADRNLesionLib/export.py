"""Exports of an (edited) lesion segmentation: .seg.nrrd, NIfTI labelmap + colour CSV, DICOM SEG.

The labelmap exports use the engine's label values (``classes.LABELS``: 1 liver, 2 cyst, 3 FNH,
4 HCC, 5 hemangioma). A segment's value comes from its ``DADRNLesion.LabelValue`` tag (set when
the module creates it, kept in .seg.nrrd), else from its name, else from a Liver terminology code;
segments the user added get 6, 7, ... in segment order. Where segments overlap, the higher value
wins, so every lesion wins over the liver.

MRML functions take nodes (and their scene) and use MRML classes only, like `scene.py`; the file
writers take `Volume` objects and need no MRML at all.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .classes import LABEL_BY_KEY, LABELS, LIVER_VALUE, Label
from .errors import UserInputError
from .volume import Volume

__all__ = [
    "ExportLabel",
    "COLOR_CSV_HEADER",
    "labelmap_from_segmentation",
    "segment_labels",
    "write_seg_nrrd",
    "write_nifti_labelmap",
    "write_color_csv",
    "read_color_csv",
    "write_dicom_seg",
    "read_dicom_seg",
    "order_dicom_files",
]

PathLike = Union[str, os.PathLike]
COLOR_CSV_HEADER = ("value", "name", "R", "G", "B")
LABEL_VALUE_TAG = "DADRNLesion.LabelValue"  # same as scene.LABEL_VALUE_TAG (no MRML import here)
_TISSUE = ("SCT", "85756007", "Tissue")
_LIVER_TYPE_CODE = LABEL_BY_KEY["liver"].type[1]


@dataclass(frozen=True)
class ExportLabel:
    """One value of an exported labelmap, with what a DICOM SEG needs to describe it."""

    value: int
    name: str
    rgb: tuple[int, int, int]
    category: tuple[str, str, str] = _TISSUE
    type: tuple[str, str, str] = _TISSUE
    region: Optional[tuple[str, str, str]] = None

    @classmethod
    def from_label(cls, label: Label) -> "ExportLabel":
        from .classes import ANATOMIC_REGION  # noqa: PLC0415

        region = None if label.value == LIVER_VALUE else ANATOMIC_REGION
        return cls(label.value, label.name, label.rgb, label.category, label.type, region)


ENGINE_LABELS: tuple[ExportLabel, ...] = tuple(ExportLabel.from_label(lab) for lab in LABELS)


def _parse_terminology(entry: str) -> dict[str, Optional[tuple[str, str, str]]]:
    """Category, type and region triples of a serialised Slicer terminology entry ("" -> None)."""
    out: dict[str, Optional[tuple[str, str, str]]] = {"category": None, "type": None, "region": None}
    parts = (entry or "").split("~")
    if len(parts) < 3:
        return out

    def triple(text: str) -> Optional[tuple[str, str, str]]:
        bits = text.split("^")
        if len(bits) != 3 or not bits[1]:
            return None
        return (bits[0], bits[1], bits[2])

    out["category"] = triple(parts[1])
    out["type"] = triple(parts[2])
    if len(parts) >= 6:
        out["region"] = triple(parts[5])
    return out


def segment_labels(segmentation_node) -> list[tuple[str, ExportLabel]]:
    """(segment ID, label) for every segment, in segment order, with engine values where known."""
    from .scene import segment_tag  # noqa: PLC0415

    segmentation = segmentation_node.GetSegmentation()
    by_name = {lab.name.lower(): lab for lab in ENGINE_LABELS}
    by_name.update({lab.key.lower(): ENGINE_LABELS[i] for i, lab in enumerate(LABELS)})
    by_value = {lab.value: lab for lab in ENGINE_LABELS}
    assigned: list[tuple[str, Optional[int], object]] = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        value: Optional[int] = None
        tag_value = segment_tag(segment, LABEL_VALUE_TAG)
        if isinstance(tag_value, str) and tag_value.strip().isdigit() and int(tag_value) in by_value:
            value = int(tag_value)
        elif segment.GetName().strip().lower() in by_name:
            value = by_name[segment.GetName().strip().lower()].value
        else:
            terms = _parse_terminology(segment.GetTerminology())
            if terms["type"] is not None and terms["type"][1] == _LIVER_TYPE_CODE:
                value = LIVER_VALUE
        assigned.append((segment_id, value, segment))

    used = {v for _, v, _ in assigned if v is not None}
    next_value = max([lab.value for lab in ENGINE_LABELS] + list(used)) + 1
    out: list[tuple[str, ExportLabel]] = []
    for segment_id, value, segment in assigned:
        if value is not None and value in by_value:
            engine = by_value[value]
            out.append((segment_id, ExportLabel(value, segment.GetName(), engine.rgb, engine.category, engine.type, engine.region)))
            continue
        terms = _parse_terminology(segment.GetTerminology())
        rgb = tuple(int(round(255 * c)) for c in segment.GetColor())
        out.append(
            (
                segment_id,
                ExportLabel(next_value, segment.GetName(), rgb, terms["category"] or _TISSUE, terms["type"] or _TISSUE, terms["region"]),
            )
        )
        next_value += 1
    return out


def labelmap_from_segmentation(segmentation_node, reference_volume_node) -> tuple[Volume, list[ExportLabel]]:
    """The segmentation as one labelmap `Volume` on the reference volume's voxel grid.

    Each segment is rasterised on its own (so overlaps are seen), then painted in ascending label
    value: lesions (2..5) and user segments (6+) overwrite the liver (1).
    """
    from .scene import segment_to_volume, volume_from_node  # noqa: PLC0415

    if reference_volume_node is None:
        raise UserInputError("pick the CT volume the segmentation was made on: it defines the exported voxel grid")
    labels = sorted(segment_labels(segmentation_node), key=lambda item: item[1].value)
    reference = volume_from_node(reference_volume_node)
    top = max((lab.value for _, lab in labels), default=0)
    out = np.zeros(reference.shape, dtype=np.uint8 if top < 256 else np.uint16)
    for segment_id, label in labels:
        mask = segment_to_volume(segmentation_node, segment_id, reference_volume_node)
        if mask.shape != out.shape:
            raise RuntimeError(f"segment {label.name!r} came out as {mask.shape}, expected {out.shape}")
        out[mask.array > 0] = label.value
    return reference.with_array(out), [lab for _, lab in labels]


# -- files ----------------------------------------------------------------------------------------
def write_seg_nrrd(segmentation_node, path: PathLike) -> Path:
    """Write the segmentation node as Slicer's .seg.nrrd (segments, colours, terminology, tags)."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise UserInputError(f"{path.name}: a segmentation file name must end with .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    ok = storage.WriteData(segmentation_node)
    if not ok:
        raise OSError(f"could not write {path}")
    return path


def write_color_csv(labels: Sequence[ExportLabel], path: PathLike) -> Path:
    """Colour table as ``value,name,R,G,B`` with a Background row, like the engine's labelmap.csv."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLOR_CSV_HEADER)
        writer.writerow([0, "Background", 0, 0, 0])
        for lab in sorted(labels, key=lambda lab: lab.value):
            writer.writerow([lab.value, lab.name, *lab.rgb])
    return path


def read_color_csv(path: PathLike) -> dict[int, tuple[str, tuple[int, int, int]]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {int(r["value"]): (r["name"], (int(r["R"]), int(r["G"]), int(r["B"]))) for r in csv.DictReader(f)}


def _csv_path_for(nifti_path: Path) -> Path:
    name = nifti_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return nifti_path.with_name(name[: -len(suffix)] + ".csv")
    return nifti_path.with_suffix(".csv")


def write_nifti_labelmap(labelmap: Volume, labels: Sequence[ExportLabel], path: PathLike) -> tuple[Path, Path]:
    """NIfTI labelmap (exact geometry) plus its colour CSV next to it (``name.nii.gz`` -> ``name.csv``)."""
    from .io import write_volume  # noqa: PLC0415

    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise UserInputError(f"{path.name}: a NIfTI file name must end with .nii.gz or .nii")
    path.parent.mkdir(parents=True, exist_ok=True)
    present = set(np.unique(labelmap.array).tolist()) - {0}
    missing = present - {lab.value for lab in labels}
    if missing:
        raise ValueError(f"label values {sorted(missing)} have no name/colour")
    write_volume(labelmap, path)
    csv_path = write_color_csv(labels, _csv_path_for(path))
    return path, csv_path


# -- DICOM SEG ------------------------------------------------------------------------------------
def _read_datasets(files: Sequence[PathLike]):
    import pydicom  # noqa: PLC0415

    datasets = []
    for name in files:
        try:
            ds = pydicom.dcmread(str(name))
        except Exception as exc:  # noqa: BLE001  (pydicom raises many types for unreadable files)
            raise UserInputError(f"cannot read {name} as DICOM ({exc}); pick the files of the CT series the segmentation was made on") from None
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            # Present but empty (seen in real scanner files): means the default repertoire.
            del ds.SpecificCharacterSet
        datasets.append(ds)
    return datasets


def order_dicom_files(volume: Volume, files: Sequence[PathLike]) -> list:
    """The source datasets, one per k slice of `volume`, in k order; checks they share its grid.

    Each file's ImagePositionPatient must be the LPS centre of a slice's first voxel and its
    ImageOrientationPatient the volume's i and j axes; otherwise the SEG would be misplaced.
    """
    datasets = _read_datasets(files)
    nk, nj, ni = volume.shape
    if len(datasets) != nk:
        raise UserInputError(
            f"the DICOM series has {len(datasets)} images but the volume has {nk} slices; pick the series the volume was loaded from"
        )
    origin = np.asarray(volume.origin)
    k_axis = volume.direction[:, 2] * volume.spacing[2]
    by_k: dict[int, object] = {}
    for ds in datasets:
        if int(ds.Rows) != nj or int(ds.Columns) != ni:
            raise UserInputError(f"a DICOM image is {ds.Columns}x{ds.Rows} but the volume slices are {ni}x{nj}")
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not (np.allclose(iop[:3], volume.direction[:, 0], atol=1e-3) and np.allclose(iop[3:], volume.direction[:, 1], atol=1e-3)):
            raise UserInputError("the DICOM images are not oriented like the volume (ImageOrientationPatient differs)")
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        k_float = float(np.dot(ipp - origin, k_axis) / np.dot(k_axis, k_axis))
        k = int(round(k_float))
        expected = origin + k * k_axis
        if not (0 <= k < nk) or not np.allclose(ipp, expected, atol=max(1e-2, 0.01 * volume.spacing[2])) or k in by_k:
            raise UserInputError(
                f"DICOM image {getattr(ds, 'InstanceNumber', '?')} at {tuple(np.round(ipp, 3))} does not fall on a slice of the volume"
            )
        by_k[k] = ds
    return [by_k[k] for k in range(nk)]


def _coded(triple):
    from highdicom.sr import CodedConcept  # noqa: PLC0415

    scheme, value, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


TRACKING_PREFIX = "DADRNLesion label "


def _display_color(rgb):
    """Recommended display colour (CIELab), when this highdicom version can express it."""
    try:
        from highdicom.color import CIELabColor  # noqa: PLC0415

        return CIELabColor.from_rgb(*rgb)
    except (ImportError, AttributeError):
        return None


def write_dicom_seg(
    labelmap: Volume,
    labels: Sequence[ExportLabel],
    source_files: Sequence[PathLike],
    path: PathLike,
    *,
    series_description: str = "DADRN liver lesions",
    series_number: int = 901,
    software_version: Optional[str] = None,
) -> Path:
    """DICOM SEG (binary, one segment per label present) referencing the source CT images.

    `labelmap` must lie on the source series' grid (it does when it was made on the volume loaded
    from that series). Segment numbers run 1..n over the labels present; each segment's tracking
    ID records its label value so `read_dicom_seg` restores the exact labelmap.
    """
    import highdicom as hd  # noqa: PLC0415
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    path = Path(path)
    ordered = order_dicom_files(labelmap, source_files)
    present = sorted(set(np.unique(labelmap.array).tolist()) - {0})
    if not present:
        raise UserInputError("the segmentation is empty: there is nothing to export")
    by_value = {lab.value: lab for lab in labels}
    missing = [v for v in present if v not in by_value]
    if missing:
        raise ValueError(f"label values {missing} have no description")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="DADRN liver lesion classifier",
        version=software_version or __version__,
        family=codes.cid7162.ArtificialIntelligence,
    )
    descriptions = []
    frames = np.zeros(labelmap.shape, dtype=np.uint8)
    for number, value in enumerate(present, start=1):
        lab = by_value[value]
        frames[labelmap.array == value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=lab.name,
                segmented_property_category=_coded(lab.category),
                segmented_property_type=_coded(lab.type),
                # The model proposes, the user may have edited: semi-automatic is the honest type.
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"{TRACKING_PREFIX}{value}",
                anatomic_regions=[_coded(lab.region)] if lab.region else None,
                display_color=_display_color(lab.rgb),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="DADRNLesion",
        manufacturer_model_name="DADRN",
        software_versions=software_version or __version__,
        device_serial_number="none",
        series_description=series_description,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(path))
    return path


def read_dicom_seg(path: PathLike, like: Volume, source_files: Sequence[PathLike]) -> Volume:
    """A DICOM SEG written by `write_dicom_seg` back as a labelmap on `like`'s grid."""
    import highdicom as hd  # noqa: PLC0415

    seg = hd.seg.segread(str(path))
    ordered = order_dicom_files(like, source_files)
    uids = [str(ds.SOPInstanceUID) for ds in ordered]
    numbers = list(seg.get_segment_numbers())
    values = {}
    for number in numbers:
        description = seg.get_segment_description(number)
        tracking = str(getattr(description, "tracking_id", "") or "")
        if tracking.startswith(TRACKING_PREFIX):
            values[number] = int(tracking[len(TRACKING_PREFIX) :])
        else:
            match = [lab.value for lab in ENGINE_LABELS if lab.name.lower() == str(description.segment_label).lower()]
            values[number] = match[0] if match else number
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )  # (k, rows, cols, segments)
    out = np.zeros(like.shape, dtype=np.uint8 if max(values.values(), default=0) < 256 else np.uint16)
    for index, number in sorted(enumerate(numbers), key=lambda item: values[item[1]]):
        out[pixels[..., index] > 0] = values[number]
    return like.with_array(out)
