"""Class names, label values, colours and terminology: one table that every output reads.

The order of `CLASS_NAMES` is the order of the model's logits and of every probability column.
Label values are those of ``labelmap.nii.gz``; 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASS_NAMES: tuple[str, ...] = ("normal", "cyst", "fnh", "hcc", "hem")
NUM_CLASSES = len(CLASS_NAMES)
LESION_CLASSES: tuple[str, ...] = CLASS_NAMES[1:]


@dataclass(frozen=True)
class Label:
    value: int
    key: str  # machine name: "liver" or a class name
    name: str  # segment / display name
    rgb: tuple[int, int, int]
    # Terminology as (coding scheme, code value, code meaning) triples.
    category: tuple[str, str, str]
    type: tuple[str, str, str]


_TISSUE = ("SCT", "85756007", "Tissue")
_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
_LIVER = ("SCT", "10200004", "Liver")
# Every lesion class is typed "Lesion" (SCT 52988006), the most specific standard code that a
# weakly supervised slice classifier can claim; the class itself is in the segment name.
_LESION = ("SCT", "52988006", "Lesion")

LABELS: tuple[Label, ...] = (
    Label(1, "liver", "Liver", (221, 130, 101), _TISSUE, _LIVER),
    Label(2, "cyst", "Cyst", (80, 170, 255), _ALTERED, _LESION),
    Label(3, "fnh", "FNH", (120, 220, 100), _ALTERED, _LESION),
    Label(4, "hcc", "HCC", (230, 40, 40), _ALTERED, _LESION),
    Label(5, "hem", "Hemangioma", (250, 200, 40), _ALTERED, _LESION),
)

LABEL_BY_KEY = {lab.key: lab for lab in LABELS}
LABEL_BY_VALUE = {lab.value: lab for lab in LABELS}
BACKGROUND_VALUE = 0
LIVER_VALUE = LABEL_BY_KEY["liver"].value
ANATOMIC_REGION = _LIVER


def label_value_of_class(class_name: str) -> int:
    """Label value of a lesion class; the normal class maps to the liver label."""
    if class_name == "normal":
        return LIVER_VALUE
    return LABEL_BY_KEY[class_name].value


def class_index(class_name: str) -> int:
    try:
        return CLASS_NAMES.index(class_name)
    except ValueError:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}") from None
