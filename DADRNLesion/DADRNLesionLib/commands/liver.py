"""`dadrn-lesion liver INPUT --out MASK`: the automatic liver mask on the input's geometry.

Writes a uint8 0/1 label map (NIfTI or NRRD, by the file name) and prints one line with the mask's
plausibility check (volume, parts, side, mean HU, warnings), so a failed mask is noticed before the
classifier uses it; a user can then pass their own mask to `classify --liver-mask`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import add_common_options
from ..errors import OutputExistsError, UserInputError

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "liver",
        help="segment the liver of a CT volume (automatic, offline, a few seconds) and check the mask",
        description="Automatic liver mask for contrast (any phase) or non-contrast abdominal CT, on the input's "
        "exact voxel grid, followed by a plausibility check (volume, connected parts, side, mean HU).",
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="CT volume: NIfTI/NRRD/MHA file or a DICOM series folder")
    p.add_argument("--out", required=True, type=Path, metavar="MASK", help="output mask file (.nii.gz or .nrrd)")
    p.add_argument("--overwrite", action="store_true", help="replace MASK if it exists")
    add_common_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..io import read_volume, write_volume
    from ..liver import check_liver_mask, segment_liver, summary_line

    out: Path = args.out
    if not str(out).lower().endswith(_SUFFIXES):
        raise UserInputError(f"--out {out}: give a mask file name ending in .nii.gz, .nii or .nrrd")
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out, or add --overwrite to replace it")
    if not args.input.exists():
        raise UserInputError(f"{args.input} does not exist: give a CT file or a DICOM series folder")
    reporter = getattr(args, "reporter", None)
    quiet = getattr(args, "quiet", False)

    def progress(message: str) -> None:
        if reporter is not None and not quiet:
            reporter.info(message)

    ct = read_volume(args.input)
    mask = segment_liver(ct, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_volume(mask, out)
    info = check_liver_mask(mask, ct)
    print(summary_line(info))
    if not quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0
