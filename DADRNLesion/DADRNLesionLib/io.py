"""Reading CT volumes and masks (NIfTI, NRRD, MHA, DICOM series) and writing volumes, with SimpleITK.

Every reader returns a `Volume` in LPS, the convention of ITK, DICOM and NIfTI readers, so geometry
passes through unchanged; every failure is a `UserInputError` that says what to do. SimpleITK is
trusted for parsing, not for completeness: it silently zero-fills a truncated or corrupt NIfTI and
silently writes a truncated one to a full disk, so file data are checked against the header here,
and DICOM slice positions are checked before the slices are stacked.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import UserInputError
from .volume import Volume

__all__ = [
    "read_volume", "read_mask", "write_volume", "align_to_grid", "volume_from_sitk", "volume_to_sitk",
    "VOLUME_SUFFIXES", "dicom_series_in", "ImageInfo", "WriteError",
]

PathLike = Union[str, os.PathLike]
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
_CHUNK = 1 << 22


class WriteError(UserInputError):
    """A volume could not be written completely (full disk, no permission)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def _sitk():
    import SimpleITK as sitk  # imported lazily: Slicer ships its own and tests may not need it

    return sitk


def volume_from_sitk(image) -> Volume:
    if image.GetDimension() != 3:
        raise UserInputError(f"the image is {image.GetDimension()}D; a 3D CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "a single-component CT volume in Hounsfield units is needed"
        )
    sitk = _sitk()
    array = sitk.GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise UserInputError("the image holds complex numbers (e.g. MR raw data); a CT volume in Hounsfield units is needed")
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()).reshape(3, 3))


def volume_to_sitk(volume: Volume):
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array), isVector=False)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction.flatten()))
    return image


# -- header information, before any voxel is read -----------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """What a header says: size (i, j, k[, t]), bytes per component, components per voxel."""

    size: tuple[int, ...]
    itemsize: int
    components: int = 1

    @property
    def dimension(self) -> int:
        return len(self.size)


def _itemsize(pixel_id) -> int:
    sitk = _sitk()
    try:
        return max(1, sitk.Image([1, 1], pixel_id).GetSizeOfPixelComponent())
    except RuntimeError:
        return 4


def _file_info(path: Path):
    """(ImageFileReader with the header read, ImageInfo) for an image file."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _cannot_read(path, exc) from None
    info = ImageInfo(tuple(int(s) for s in reader.GetSize()), _itemsize(reader.GetPixelID()), int(reader.GetNumberOfComponents()))
    return reader, info


def _cannot_read(path: Path, exc: BaseException) -> UserInputError:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    detail = next((line for line in lines if "ERROR" in line or "error" in line), lines[-1] if lines else "")
    detail = detail.split("ERROR:", 1)[-1].strip() if "ERROR:" in detail else detail
    return UserInputError(
        f"cannot read {path} as an image ({detail[:160]}): use a NIfTI (.nii/.nii.gz), NRRD, MHA file or a DICOM series folder"
    )


# -- completeness of file data -------------------------------------------------------------------
def _nifti_expected_bytes(head: bytes) -> Optional[int]:
    """vox_offset + voxel bytes from a NIfTI-1/-2 header, or None if it is not one."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = struct.unpack(endian + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    n = int(dims[0])
    if not 1 <= n <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : n + 1]):
        return None
    voxels = int(np.prod([max(1, int(d)) for d in dims[1 : n + 1]], dtype=np.int64))
    return int(offset) + voxels * bitpix // 8


def _inflated_length(source: Path, start: int = 0, wbits: int = 31) -> int:
    """Length of the (gzip: wbits 31, zlib: 15) stream from byte `start`, all members; raises
    ValueError when it is truncated or fails its checksum."""
    total, inflater = 0, zlib.decompressobj(wbits)
    with open(source, "rb") as fh:
        fh.seek(start)
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            while block:
                try:
                    total += len(inflater.decompress(block))
                except zlib.error as exc:
                    raise ValueError(f"its compressed data are corrupt ({exc})") from None
                block = inflater.unused_data if inflater.eof else b""
                if block:
                    if block.strip(b"\0") == b"":  # zero padding after the last member
                        block = b""
                    else:
                        inflater = zlib.decompressobj(wbits)
    if not inflater.eof:
        raise ValueError(f"its compressed data end early after {total} bytes (truncated)")
    return total


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(path: Path) -> Optional[str]:
    """Problem with a MetaImage file's data (too short, corrupt compressed stream), or None."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        header_end = 0
        for _ in range(200):
            line = fh.readline(4096)
            if not line:
                break
            header_end += len(line)
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        expected = int(np.prod(dims, dtype=np.int64)) * _MET_SIZES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
        data_file = fields["ElementDataFile"]
    except (KeyError, ValueError):
        return None  # a layout this check does not know: leave it to the reader
    if data_file == "LOCAL":
        source, start = path, header_end
    elif " " not in data_file and data_file not in ("LIST",) and "%" not in data_file:
        source, start = path.parent / data_file, 0
        if not source.is_file():
            return f"its data file {data_file} is missing"
    else:
        return None
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if not compressed:
        have = source.stat().st_size - start
        return None if have >= expected else f"the file holds {have} of {expected} data bytes (truncated)"
    try:
        total = _inflated_length(source, start, wbits=15)
    except ValueError as exc:
        return str(exc)
    return None if total >= expected else f"its compressed data hold {total} of {expected} bytes (truncated)"


def _nrrd_itemsize(type_name: str) -> Optional[int]:
    t = type_name.lower()
    for words, size in ((("long long", "longlong", "int64"), 8), (("double",), 8), (("float",), 4),
                        (("short", "int16"), 2), (("char", "int8"), 1), (("int", "int32"), 4)):
        if any(w in t for w in words):
            return size
    return None


def _check_nrrd(path: Path) -> Optional[str]:
    """Problem with a gzip-encoded NRRD's data, or None. teem checks raw data lengths itself but
    not a gzip stream's checksum, so a corrupt .nrrd would otherwise read as garbage voxels."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        if not fh.readline(64).startswith(b"NRRD"):
            return None
        while True:
            line = fh.readline(1 << 16)
            if line.strip() == b"":
                break  # blank line (attached data follow) or end of a detached header
            text = line.decode("latin-1").strip()
            if text.startswith("#") or ":=" in text:
                continue
            key, _, value = text.partition(":")
            fields[key.strip().lower()] = value.strip()
        start = fh.tell()
    if fields.get("encoding", "").lower() not in ("gzip", "gz") or "byte skip" in fields or "byteskip" in fields:
        return None
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file:
        if " " in data_file or data_file.upper().startswith("LIST"):
            return None  # several data files: leave it to the reader
        source, start = path.parent / data_file, 0
        if not source.is_file():
            return f"its data file {data_file} is missing"
    else:
        source = path
    try:
        total = _inflated_length(source, start, wbits=31)
    except ValueError as exc:
        return str(exc)
    try:
        voxels = int(np.prod([int(v) for v in fields["sizes"].split()], dtype=np.int64))
    except (KeyError, ValueError):
        return None
    size = _nrrd_itemsize(fields.get("type", ""))
    if size is not None and total < voxels * size:
        return f"its compressed data hold {total} of {voxels * size} bytes (truncated)"
    return None


def _data_problem(path: Path) -> Optional[str]:
    """Why `path`'s voxel data are incomplete or corrupt, or None when they look whole.

    SimpleITK's NIfTI and MetaImage readers zero-fill missing data, and no reader checks a gzip
    stream's checksum; reading the compressed stream once more costs about a second per 100 MB."""
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as fh:
                head = fh.read(544)
            expected = _nifti_expected_bytes(head)
            try:
                length = _inflated_length(path)
            except ValueError as exc:
                return str(exc)
            if expected is not None and length < expected:
                return f"it holds {length} of {expected} bytes (truncated)"
        elif name.endswith(".nii"):
            with open(path, "rb") as fh:
                expected = _nifti_expected_bytes(fh.read(544))
            size = path.stat().st_size
            if expected is not None and size < expected:
                return f"it holds {size} of {expected} bytes (truncated)"
        elif name.endswith((".mha", ".mhd")):
            return _check_metaimage(path)
        elif name.endswith((".nrrd", ".nhdr")):
            return _check_nrrd(path)
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        return f"it cannot be read completely ({str(exc)[:80]})"
    return None


# -- DICOM ---------------------------------------------------------------------------------------
def _uid_label(uid: str) -> str:
    return uid or "<no SeriesInstanceUID>"


def dicom_series_in(folder: PathLike) -> dict[str, list[str]]:
    """Series instance UID -> sorted file names, for every DICOM series directly in `folder`."""
    sitk = _sitk()
    folder = str(folder)
    series = {}
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
        series[uid] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
    return series


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


@dataclass(eq=False)  # compared by identity: one per file
class _Slice:
    file: str
    iop: Optional[np.ndarray]
    ipp: Optional[np.ndarray]
    image_type: str
    size: tuple[int, ...]


def _dicom_header(name: str) -> _Slice:
    sitk = _sitk()
    r = sitk.ImageFileReader()
    r.SetFileName(name)
    r.LoadPrivateTagsOff()
    try:
        r.ReadImageInformation()
    except RuntimeError as exc:
        raise _cannot_read(Path(name), exc) from None

    def floats(tag: str, n: int) -> Optional[np.ndarray]:
        try:
            values = np.array([float(v) for v in r.GetMetaData(tag).split("\\")], dtype=np.float64)
        except (RuntimeError, ValueError):
            return None
        return values if values.size == n and np.isfinite(values).all() else None

    image_type = r.GetMetaData("0008|0008") if r.HasMetaDataKey("0008|0008") else ""
    return _Slice(name, floats("0020|0037", 6), floats("0020|0032", 3), image_type.upper(), tuple(r.GetSize()))


def _dicom_stack(folder: Path, series_uid: Optional[str], notes: list[str]) -> tuple[list[str], Optional[float]]:
    """The files of one axial stack, sorted along the slice normal, and its slice step (mm).

    Localizer/scout images and a few images of another orientation or size within the series are
    left out with a note; missing, duplicate, unevenly spaced or sheared (gantry tilt) slices are
    refused, because stacking them would put voxels in the wrong place."""
    notes_before = len(notes)
    series = dicom_series_in(folder)
    if not series:
        raise UserInputError(f"no DICOM series found in folder {folder}: point INPUT at a folder of DICOM files, or at a NIfTI/NRRD/MHA file")
    if series_uid is not None:
        if series_uid not in series:
            raise UserInputError(f"series {series_uid} is not in {folder}; series there: {', '.join(_uid_label(u) for u in series)}")
        files = series[series_uid]
    elif len(series) > 1:
        listing = "; ".join(f"{_uid_label(uid)} ({len(f)} files)" for uid, f in series.items())
        raise UserInputError(
            f"{folder} holds {len(series)} DICOM series ({listing}): put one series per folder or choose one with --series UID"
        )
    else:
        files = next(iter(series.values()))
    listed = {os.path.normpath(f) for fs in series.values() for f in fs}
    unreadable = sorted(c.name for c in folder.iterdir()
                        if c.is_file() and c.name.upper() != "DICOMDIR" and os.path.normpath(str(c)) not in listed and _has_dicom_magic(c))
    if unreadable:
        notes.append(f"{len(unreadable)} DICOM file(s) in {folder.name} could not be read and were skipped "
                     f"(e.g. {unreadable[0]}: truncated or corrupt?)")
    if not files:
        raise UserInputError(f"the DICOM series in {folder} has no readable files")
    if len(files) == 1:
        return files, None

    slices = [_dicom_header(f) for f in files]
    if any(s.iop is None or s.ipp is None for s in slices):
        return files, None  # no geometry to check: trust the reader's
    localizers = [s for s in slices if "LOCALIZER" in s.image_type or "SCOUT" in s.image_type]
    rest = [s for s in slices if s not in localizers]
    if not rest:
        raise UserInputError(f"the DICOM series in {folder} holds only localizer/scout images: choose the axial CT series")
    keys = [(tuple(np.round(s.iop, 2)), s.size[:2]) for s in rest]
    main_key = max(set(keys), key=keys.count)
    ref_iop = np.asarray(main_key[0])
    stack = [s for s in rest if s.size[:2] == main_key[1] and np.abs(s.iop - ref_iop).max() < 0.02]
    odd = [s for s in rest if s not in stack]
    if len(odd) > max(2, 0.1 * len(stack)):
        raise UserInputError(
            f"the DICOM series in {folder} mixes images of different orientation or size ({len(stack)} + {len(odd)} images, "
            "e.g. axial slices and reformats): export the axial series alone"
        )
    if localizers or odd:
        dropped = localizers + odd
        kinds = (["localizer/scout"] if localizers else []) + (["another orientation or size"] if odd else [])
        notes.append(f"left out {len(dropped)} image(s) that are not part of the axial stack ({', '.join(kinds)}): "
                     f"{', '.join(Path(s.file).name for s in dropped[:3])}{' …' if len(dropped) > 3 else ''}")
    if len(stack) == 1:
        return [stack[0].file], None

    row, col = stack[0].iop[:3], stack[0].iop[3:]
    normal = np.cross(row, col)
    normal /= max(np.linalg.norm(normal), 1e-9)
    positions = np.array([s.ipp for s in stack])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    stack = [stack[i] for i in order]
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    median = float(np.median(steps))
    hint = "; export the complete axial series again (or convert it to NIfTI/NRRD with resampling)"
    if notes[notes_before:]:  # a skipped file is the likeliest cause of a gap: say so in the error
        hint += " (note: " + "; ".join(notes[notes_before:]) + ")"
    if steps.min() <= 1e-3:
        dup = int((steps <= 1e-3).sum())
        raise UserInputError(f"the DICOM series has {dup} duplicate slice position(s) (two acquisitions or copies in one series?){hint}")
    if steps.max() > 1.5 * median + 0.01:
        at = int(np.argmax(steps))
        missing = int(round(steps[at] / median)) - 1
        raise UserInputError(
            f"the DICOM series has a gap: about {max(missing, 1)} slice(s) missing between positions {along[at]:.1f} and "
            f"{along[at + 1]:.1f} mm (step {steps[at]:.3g} mm where the series steps {median:.3g} mm){hint}"
        )
    if steps.max() - steps.min() > 0.01 * median + 0.01:
        raise UserInputError(f"the DICOM series has uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm){hint}")
    drift = np.diff(positions, axis=0) - np.outer(steps, normal)
    if np.linalg.norm(drift, axis=1).max() > 0.01 * median + 0.01:
        raise UserInputError(
            "the DICOM slices are sheared (each slice is shifted in-plane, e.g. gantry tilt): resample the series to an "
            "orthogonal grid first (e.g. Slicer's DICOM acquisition-geometry regularization, or dcm2niix)"
        )
    return [s.file for s in stack], median


def _read_dicom_folder(folder: Path, series_uid: Optional[str], notes: list[str], memory_for: str):
    from .limits import check_fits

    sitk = _sitk()
    files, step = _dicom_stack(folder, series_uid, notes)
    _, first = _file_info(Path(files[0]))
    check_fits((first.size[0], first.size[1], len(files) * max(1, first.size[2] if first.dimension > 2 else 1)),
               first.itemsize, stage=memory_for, what=f"the DICOM series in {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _cannot_read(folder, exc) from None
    if step is not None and image.GetDimension() == 3 and abs(image.GetSpacing()[2] - step) > 0.01 * step + 0.01:
        raise UserInputError(
            f"the DICOM reader's slice spacing {image.GetSpacing()[2]:.4g} mm differs from the slice positions' step "
            f"{step:.4g} mm: convert the series to NIfTI/NRRD with a tool that resamples it"
        )
    return image


# -- reading -------------------------------------------------------------------------------------
def read_volume(path: PathLike, *, series_uid: Optional[str] = None, notes: Optional[list[str]] = None,
                memory_for: str = "read", what: str = "CT volume") -> Volume:
    """A 3D volume from a NIfTI/NRRD/MHA file or a folder holding one DICOM series.

    `notes` collects warnings about what was left out (e.g. a localizer image in the series);
    `memory_for` ("read" or "pipeline") sets how much memory must be free before voxels are read."""
    from .limits import check_fits

    notes = notes if notes is not None else []
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist: check the path")
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid, notes, memory_for)
    else:
        if path.stat().st_size == 0:
            raise UserInputError(f"{path} is empty (0 bytes): the file was not written completely; export it again")
        reader, info = _file_info(path)
        _check_shape(path, info, what)
        check_fits(info.size[:3], info.itemsize * info.components, stage=memory_for, what=str(path))
        # The integrity check inflates the file a second time: it runs beside the reader (both
        # release the GIL), and its verdict decides before the image is used.
        with ThreadPoolExecutor(max_workers=1) as pool:
            checked = pool.submit(_data_problem, path)
            try:
                image, failure = reader.Execute(), None
            except RuntimeError as exc:
                image, failure = None, exc
            problem = checked.result()
        if problem:
            raise UserInputError(f"{path} is incomplete or corrupt: {problem}; copy or export it again")
        if failure is not None:
            raise _cannot_read(path, failure) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    _check_shape(path, ImageInfo(tuple(image.GetSize()), 1, image.GetNumberOfComponentsPerPixel()), what)
    return volume_from_sitk(image)


def _check_shape(path: Path, info: ImageInfo, what: str) -> None:
    size = info.size
    if info.dimension == 4 and size[3] == 1:
        size = size[:3]
    if len(size) == 2:
        raise UserInputError(f"{path} is a 2D image; a 3D {what} (a series of axial slices) is needed")
    if len(size) > 3:
        raise UserInputError(f"{path} is a {len(size)}D image (e.g. a time series, size {size}); extract one 3D {what} first")
    if min(size) < 1:
        raise UserInputError(f"{path} has an empty dimension (size {size}); export the {what} again")
    if info.components != 1:
        raise UserInputError(
            f"{path} has {info.components} components per voxel (RGB or vector); a single-component {what} is needed"
            + (" in Hounsfield units" if what.startswith("CT") else "")
        )


def read_mask(path: PathLike, like: Optional[Volume] = None, *, what: str = "liver mask", require_binary: bool = False) -> Volume:
    """A 0/1 mask (any non-zero voxel is inside) checked to lie on `like`'s voxel grid.

    With `require_binary`, a file holding more than one non-zero value (a multi-label map, e.g. all
    organs) is refused rather than guessed from, since every labelled organ would become liver;
    0/1, 0/255 and False/True files are binary."""
    mask = read_volume(path, what=what)
    if like is not None:
        mask = align_to_grid(mask, like, what)
    a = mask.array
    if not np.issubdtype(a.dtype, np.integer) and not np.isfinite(a).all():
        raise UserInputError(f"the {what} {path} contains NaN or infinite values; save it as an integer label map")
    values = np.unique(a[a != 0]) if require_binary else np.zeros(0)
    if values.size > 1:
        shown = ", ".join(f"{v:g}" for v in values[:6].tolist()) + (" …" if values.size > 6 else "")
        raise UserInputError(
            f"the {what} {path} is not binary: it holds {values.size} non-zero values ({shown}); "
            "save the liver alone as a 0/1 mask (e.g. keep one label of a multi-organ segmentation)"
        )
    return mask.with_array((a != 0).astype(np.uint8))


def align_to_grid(mask: Volume, like: Volume, what: str = "mask") -> Volume:
    """`mask` on `like`'s index order when both cover the same voxels, e.g. a label file whose
    j axis is stored flipped; anything else is a geometry mismatch (never resampled silently)."""
    if like.same_geometry(mask):
        return mask
    from .orientation import to_axial_frame

    mask_c, _ = to_axial_frame(mask)
    like_c, like_frame = to_axial_frame(like)
    if like_c.same_geometry(mask_c):
        return like.with_array(like_frame.from_canonical(mask_c.array))
    like.require_same_geometry(mask, what)
    return mask


# -- writing -------------------------------------------------------------------------------------
def _written_problem(path: Path) -> Optional[str]:
    """`_data_problem` for a file this process has just written. A .nii.gz is checked in O(1) from
    its gzip trailer (the inflated length mod 2**32 must equal the header's), which catches the
    truncated file that a full disk leaves, without inflating it again."""
    if not path.name.lower().endswith(".nii.gz"):
        return _data_problem(path)
    try:
        with gzip.open(path, "rb") as fh:
            expected = _nifti_expected_bytes(fh.read(544))
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        return f"it cannot be read back ({str(exc)[:80]})"
    if expected is not None and isize != expected % 2**32:
        return "its compressed stream is incomplete (truncated)"
    return None


def write_volume(volume: Volume, path: PathLike, *, compress: bool = True, compression_level: int = -1) -> Path:
    """Write `volume`; raises WriteError (a UserInputError) when the file is not written completely.

    The NIfTI writer reports a full disk only on stderr and leaves a truncated file, so the written
    data are checked against the header afterwards."""
    sitk = _sitk()
    path = Path(path)
    try:
        sitk.WriteImage(volume_to_sitk(volume), str(path), compress, compression_level)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("Reason:")), "")
        detail = reason.replace("Reason:", "").strip() or (lines[-1] if lines else "write failed")
        raise WriteError(f"cannot write {path} ({detail[:160]}): free some disk space or choose a writable location", detail[:160]) from None
    problem = _written_problem(path) if path.is_file() else "the file was not created"
    if problem:
        raise WriteError(f"cannot write {path} completely ({problem}): free some disk space or choose a writable location",
                         f"{problem}; is the disk full?")
    return path
