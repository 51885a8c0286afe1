"""Exports of an edited segmentation re-read voxel-exact: .seg.nrrd, NIfTI + colour CSV, DICOM SEG.

Segmentations are built on a real vtkMRMLScene (slicer-core) on an oblique grid; DICOM series are
written here with pydicom (an oblique one) or read from the shared real cases.
"""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in Python) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

from DADRNLesionLib import export as E  # noqa: E402
from DADRNLesionLib import scene as S  # noqa: E402
from DADRNLesionLib.classes import LABEL_BY_KEY, LABELS  # noqa: E402
from DADRNLesionLib.errors import UserInputError  # noqa: E402
from DADRNLesionLib.volume import Volume  # noqa: E402


def oblique_ct(shape=(8, 20, 24)) -> Volume:
    a, b = -0.4, 0.15
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rng = np.random.default_rng(3)
    return Volume(rng.integers(-150, 250, shape).astype(np.int16), (0.78, 0.9, 3.0), (-101.5, 77.25, -310.0), rz @ ry)


@pytest.fixture()
def scene():
    sc = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(sc)
    yield sc
    colors.SetMRMLScene(None)


@pytest.fixture()
def case(scene):
    """(ct Volume, ct node, segmentation node, liver mask, labelmap) with overlapping segments."""
    ct = oblique_ct()
    lab = np.zeros(ct.shape, np.uint8)
    lab[1:7, 3:17, 4:20] = 1
    lab[2:5, 5:9, 6:11] = 4  # HCC inside the liver
    lab[5, 12:15, 14:18] = 5  # hemangioma
    liver = ct.with_array((lab > 0).astype(np.uint8))
    ct_node = S.volume_to_node(ct, scene, "CT")
    seg = S.build_segmentation(scene, ct.with_array(lab), "CT lesions", reference_node=ct_node, liver=liver)
    return ct, ct_node, seg, liver, ct.with_array(lab)


# -- labelmap with the engine's values ------------------------------------------------------------
def test_labelmap_uses_engine_values_and_lesions_win_over_liver(case):
    ct, ct_node, seg, liver, lab = case
    out, labels = E.labelmap_from_segmentation(seg, ct_node)
    assert out.same_geometry(ct, tol=1e-6)
    # The Liver segment covers the lesions too (overlap); the labelmap gives those voxels to the lesion.
    assert np.array_equal(S.segment_to_volume(seg, "liver", ct_node).array, liver.array)
    assert np.array_equal(out.array, lab.array)
    assert [(lab_.value, lab_.name) for lab_ in labels] == [(1, "Liver"), (4, "HCC"), (5, "Hemangioma")]


def test_edited_segmentation_keeps_values_renamed_and_added_segments(scene, case):
    ct, ct_node, seg, _, lab = case
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment("hcc").SetName("HCC (confirmed)")  # renamed: the tag keeps value 4
    # A segment the user added by hand, overlapping the liver.
    added = slicer.vtkSegment()
    added.SetName("Portal vein")
    added.SetColor(0.1, 0.2, 0.9)
    mask = np.zeros(ct.shape, np.uint8)
    mask[3, 10:12, 4:8] = 1
    added.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                            S._oriented_mask(mask, ct.ijk_to_ras_matrix()))
    segmentation.AddSegment(added, "vein")
    # A segment named after a class but without the tag (e.g. made in the Segment Editor).
    cyst = slicer.vtkSegment()
    cyst.SetName("Cyst")
    cmask = np.zeros(ct.shape, np.uint8)
    cmask[6, 4:6, 15:19] = 1
    cyst.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                           S._oriented_mask(cmask, ct.ijk_to_ras_matrix()))
    segmentation.AddSegment(cyst, "mycyst")

    out, labels = E.labelmap_from_segmentation(seg, ct_node)
    by_name = {lab_.name: lab_ for lab_ in labels}
    assert by_name["HCC (confirmed)"].value == 4
    assert by_name["Cyst"].value == LABEL_BY_KEY["cyst"].value
    assert by_name["Portal vein"].value == 6 and by_name["Portal vein"].rgb == (26, 51, 230)
    expected = lab.array.copy()
    expected[mask > 0] = 6
    expected[cmask > 0] = 2
    assert np.array_equal(out.array, expected)


def test_terminology_only_liver_segment_maps_to_liver(scene):
    ct = oblique_ct()
    ct_node = S.volume_to_node(ct, scene, "CT")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    segment = slicer.vtkSegment()
    segment.SetName("Segment_1")
    segment.SetTerminology(S.terminology_entry(LABEL_BY_KEY["liver"]))
    m = np.zeros(ct.shape, np.uint8)
    m[2:4, 2:5, 2:6] = 1
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), S._oriented_mask(m, ct.ijk_to_ras_matrix()))
    seg.GetSegmentation().AddSegment(segment, "s1")
    out, labels = E.labelmap_from_segmentation(seg, ct_node)
    assert [lab.value for lab in labels] == [1] and np.array_equal(out.array, m)


def test_export_needs_the_reference_volume(case):
    _, _, seg, _, _ = case
    with pytest.raises(UserInputError, match="CT volume"):
        E.labelmap_from_segmentation(seg, None)


# -- .seg.nrrd ------------------------------------------------------------------------------------
def test_seg_nrrd_round_trip_by_slicerio_and_by_mrml(scene, case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    ct, ct_node, seg, liver, lab = case
    path = E.write_seg_nrrd(seg, tmp_path / "edited.seg.nrrd")

    data = slicerio.read_segmentation(str(path))
    assert np.allclose(np.asarray(data["ijkToLPS"]), ct.ijk_to_lps_matrix(), atol=1e-6)
    names = [s["name"] for s in data["segments"]]
    assert names == ["Liver", "HCC", "Hemangioma"]
    hcc = next(s for s in data["segments"] if s["name"] == "HCC")
    assert hcc["terminology"]["type"] == ["SCT", "52988006", "Lesion"]
    assert hcc["terminology"]["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    assert hcc["color"] == pytest.approx(np.array(LABEL_BY_KEY["hcc"].rgb) / 255.0, abs=1e-6)
    # slicerio's voxels are [i, j, k] (layers first when segments overlap): compare each segment.
    for name, expected in (("Liver", liver.array > 0), ("HCC", lab.array == 4), ("Hemangioma", lab.array == 5)):
        extracted = slicerio.extract_segments(data, [(name, 1)])
        voxels = np.asarray(extracted["voxels"])
        assert np.array_equal(voxels.transpose(2, 1, 0) == 1, expected), name

    # Read back with MRML's own storage node: the same labelmap comes out.
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    again, labels = E.labelmap_from_segmentation(loaded, ct_node)
    assert np.array_equal(again.array, lab.array)
    assert [lab_.value for lab_ in labels] == [1, 4, 5]


def test_seg_nrrd_name_must_end_in_seg_nrrd(case, tmp_path):
    with pytest.raises(UserInputError, match=".seg.nrrd"):
        E.write_seg_nrrd(case[2], tmp_path / "x.nrrd")


# -- NIfTI + colour CSV ---------------------------------------------------------------------------
def test_nifti_and_colour_csv_round_trip(case, tmp_path):
    import SimpleITK as sitk

    ct, ct_node, seg, _, lab = case
    labelmap, labels = E.labelmap_from_segmentation(seg, ct_node)
    nii, csv_path = E.write_nifti_labelmap(labelmap, labels, tmp_path / "CT_lesions.nii.gz")
    assert csv_path.name == "CT_lesions.csv"
    image = sitk.ReadImage(str(nii))
    assert np.array_equal(sitk.GetArrayFromImage(image), lab.array)
    assert np.allclose(image.GetSpacing(), ct.spacing) and np.allclose(image.GetOrigin(), ct.origin, atol=1e-4)
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), ct.direction, atol=1e-5)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["value", "name", "R", "G", "B"]
    assert rows[1] == ["0", "Background", "0", "0", "0"]
    assert rows[2:] == [[str(v), n, *map(str, LABEL_BY_KEY[k].rgb)] for v, n, k in ((1, "Liver", "liver"), (4, "HCC", "hcc"), (5, "Hemangioma", "hem"))]
    assert E.read_color_csv(csv_path)[4] == ("HCC", LABEL_BY_KEY["hcc"].rgb)


def test_nifti_refuses_values_without_a_colour(tmp_path):
    ct = oblique_ct()
    lab = np.zeros(ct.shape, np.uint8)
    lab[0, 0, 0] = 9
    with pytest.raises(ValueError, match="9"):
        E.write_nifti_labelmap(ct.with_array(lab), E.ENGINE_LABELS, tmp_path / "x.nii.gz")


# -- DICOM SEG ------------------------------------------------------------------------------------
def write_ct_series(volume: Volume, folder) -> list:
    """One CT image per k slice of `volume` (its LPS geometry), int16 HU, as a scanner would."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nk, nj, ni = volume.shape
    files = []
    for k in range(nk):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer = "CT", "test"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Liver", "PH001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ipp = np.asarray(volume.origin) + k * volume.spacing[2] * volume.direction[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([volume.direction[:, 0], volume.direction[:, 1]])]
        ds.PixelSpacing = [f"{volume.spacing[1]:.6f}", f"{volume.spacing[0]:.6f}"]  # row (j), column (i)
        ds.SliceThickness = f"{volume.spacing[2]:.6f}"
        ds.Rows, ds.Columns = nj, ni
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(volume.array[k].astype(np.int16)).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_dicom_seg_round_trip_on_an_oblique_series(case, tmp_path):
    pytest.importorskip("highdicom")
    import pydicom

    from DADRNLesionLib.io import read_volume

    ct, ct_node, seg, _, lab = case
    files = write_ct_series(ct, tmp_path / "ct")
    loaded = read_volume(tmp_path / "ct")  # what Slicer/SimpleITK would load from that series
    assert loaded.same_geometry(ct, tol=1e-4)
    labelmap, labels = E.labelmap_from_segmentation(seg, ct_node)
    shuffled = list(files)
    random.Random(1).shuffle(shuffled)  # file order must not matter
    path = E.write_dicom_seg(labelmap, labels, shuffled, tmp_path / "seg.dcm")

    back = E.read_dicom_seg(path, ct, files)
    assert np.array_equal(back.array, lab.array)

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    described = {s.SegmentLabel: s for s in ds.SegmentSequence}
    assert sorted(described) == ["HCC", "Hemangioma", "Liver"]
    hcc = described["HCC"]
    assert hcc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert hcc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert hcc.AnatomicRegionSequence[0].CodeValue == "10200004"
    assert described["Liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    # Every frame sits exactly on a source slice's position and references that slice.
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ipp = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = pydicom.dcmread(by_uid[src_uid], stop_before_pixels=True)
        assert np.allclose(ipp, np.array(src.ImagePositionPatient, float), atol=1e-3)
    assert ds.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID


def test_dicom_seg_refuses_another_series(case, tmp_path):
    pytest.importorskip("highdicom")
    ct, ct_node, seg, _, _ = case
    labelmap, labels = E.labelmap_from_segmentation(seg, ct_node)
    shorter = write_ct_series(oblique_ct(shape=(6, 20, 24)), tmp_path / "other")
    with pytest.raises(UserInputError, match="6 images but the volume has 8"):
        E.write_dicom_seg(labelmap, labels, shorter, tmp_path / "x.dcm")
    shifted = Volume(ct.array, ct.spacing, tuple(np.asarray(ct.origin) + 5.0), ct.direction)
    moved = write_ct_series(shifted, tmp_path / "moved")
    with pytest.raises(UserInputError, match="does not fall on a slice"):
        E.write_dicom_seg(labelmap, labels, moved, tmp_path / "x.dcm")


def test_dicom_seg_on_real_ct_with_its_liver_mask(real_data, tmp_path, scene):
    """dcmqi's real 3-slice CT: the liver mask exported as DICOM SEG and read back."""
    pytest.importorskip("highdicom")
    from DADRNLesionLib.io import read_mask, read_volume

    folder = real_data / "dcmqi_ct3slice" / "dicom"
    ct = read_volume(folder)
    liver = read_mask(real_data / "dcmqi_ct3slice" / "liver_seg.nrrd", like=ct)
    lab = liver.array.copy()
    ys, xs = np.nonzero(lab[1])
    lab[1, ys[:40], xs[:40]] = 4  # a few HCC voxels on the middle slice
    labelmap = ct.with_array(lab)
    files = sorted(folder.glob("*.dcm"))
    path = E.write_dicom_seg(labelmap, E.ENGINE_LABELS, files, tmp_path / "real.dcm")
    assert np.array_equal(E.read_dicom_seg(path, ct, files).array, lab)
    # The same labelmap through MRML: node on the real geometry -> segmentation -> labelmap.
    ct_node = S.volume_to_node(ct, scene, "real CT")
    seg = S.build_segmentation(scene, labelmap, "real lesions", reference_node=ct_node, liver=liver)
    again, _ = E.labelmap_from_segmentation(seg, ct_node)
    assert np.array_equal(again.array, lab)


def test_engine_labels_follow_classes():
    assert [lab.value for lab in E.ENGINE_LABELS] == [lab.value for lab in LABELS] == [1, 2, 3, 4, 5]
    assert E.ENGINE_LABELS[0].region is None and all(lab.region == ("SCT", "10200004", "Liver") for lab in E.ENGINE_LABELS[1:])
