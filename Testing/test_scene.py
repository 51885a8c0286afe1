"""scene.py on a real vtkMRMLScene (PyPI slicer-core): nodes, geometry, terminology, table, plot.

Every geometry check uses an oblique volume (rotated axes, unequal spacing, non-zero origin), the
case where LPS/RAS and (k, j, i) mistakes show.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in Python) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

from DADRNLesionLib import scene as S  # noqa: E402
from DADRNLesionLib.classes import CLASS_NAMES, LABEL_BY_KEY  # noqa: E402
from DADRNLesionLib.results import PipelineResult, SliceResult  # noqa: E402
from DADRNLesionLib.volume import Volume  # noqa: E402


def oblique_direction() -> np.ndarray:
    a, b = 0.35, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def oblique_ct(shape=(10, 24, 28), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(-200, 300, shape).astype(np.int16), (0.7, 0.85, 2.5), (12.5, -30.25, 41.0), oblique_direction())


def lesion_labelmap(ct: Volume) -> tuple[Volume, Volume]:
    """(labelmap, liver): a liver block with an HCC and a cyst inside it."""
    lab = np.zeros(ct.shape, np.uint8)
    lab[2:8, 4:20, 5:22] = 1
    lab[3:6, 6:11, 7:12] = LABEL_BY_KEY["hcc"].value
    lab[6, 14:17, 15:19] = LABEL_BY_KEY["cyst"].value
    return ct.with_array(lab), ct.with_array((lab > 0).astype(np.uint8))


def slice_rows(ct: Volume) -> list[SliceResult]:
    rows = []
    z = ct.slice_positions_mm()
    for k in range(2, 8):
        cls = "hcc" if k in (3, 4, 5) else ("cyst" if k == 6 else "normal")
        p = np.full(5, 0.05, np.float32)
        p[CLASS_NAMES.index(cls)] = 0.8
        rows.append(SliceResult(k, float(z[k]), cls, p, (9, 8) if cls != "normal" else None))
    return rows


@pytest.fixture()
def scene():
    sc = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(sc)  # default colour tables, as in Slicer (labelmap display needs them)
    yield sc
    colors.SetMRMLScene(None)


@pytest.fixture()
def result() -> tuple[Volume, PipelineResult]:
    ct = oblique_ct()
    labelmap, liver = lesion_labelmap(ct)
    heat = np.zeros(ct.shape, np.float32)
    heat[3:6, 6:11, 7:12] = np.linspace(0.3, 1.0, 5 * 5)[None, :].reshape(1, 5, 5)
    pr = PipelineResult(liver=liver, heatmap=ct.with_array(heat), labelmap=labelmap, slices=slice_rows(ct),
                        report={"liver_check": {"warnings": ["liver volume is small (120 ml)"]}})
    return ct, pr


def add_slice_views(scene):
    for name in ("Red", "Yellow", "Green"):
        comp = slicer.vtkMRMLSliceCompositeNode()
        comp.SetLayoutName(name)
        scene.AddNode(comp)
        sl = slicer.vtkMRMLSliceNode()
        sl.SetLayoutName(name)
        scene.AddNode(sl)


# -- volumes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_volume_round_trip_keeps_voxels_and_oblique_geometry(scene, dtype):
    ct = oblique_ct()
    ct = ct.with_array(ct.array.astype(dtype))
    node = S.volume_to_node(ct, scene, "CT", labelmap=dtype == np.uint8)
    import vtk

    mat = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(mat)
    ijk_to_ras = np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(ijk_to_ras, ct.ijk_to_ras_matrix(), atol=1e-9)
    # RAS is LPS with x and y negated: the origin's first two components flip sign.
    assert np.allclose(node.GetOrigin(), (-12.5, 30.25, 41.0))
    back = S.volume_from_node(node)
    assert back.array.dtype == np.dtype(dtype)
    assert np.array_equal(back.array, ct.array)
    assert back.same_geometry(ct, tol=1e-9)
    assert np.allclose(back.direction, ct.direction, atol=1e-12)


def test_volume_from_node_refuses_vector_volumes(scene):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 2)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(ValueError, match="components"):
        S.volume_from_node(node)


# -- segmentation --------------------------------------------------------------------------------
def test_segmentation_segments_colours_terminology_and_tags(scene, result):
    ct, pr = result
    ct_node = S.volume_to_node(ct, scene, "CT")
    seg_node = S.build_segmentation(scene, pr.labelmap, "CT lesions", reference_node=ct_node, liver=pr.liver)
    seg = seg_node.GetSegmentation()
    ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
    # Liver first, then only the lesion classes present, in label order.
    assert ids == ["liver", "cyst", "hcc"]
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for segment_id in ids:
        label = LABEL_BY_KEY[segment_id]
        segment = seg.GetSegment(segment_id)
        assert segment.GetName() == label.name
        assert np.allclose(segment.GetColor(), np.array(label.rgb) / 255.0)
        assert S.segment_tag(segment, S.LABEL_VALUE_TAG) == str(label.value)
        entry_text = S.segment_tag(segment, segment.GetTerminologyEntryTagName())
        assert segment.GetTerminologyEntryTagName() == "TerminologyEntry"
        assert entry_text == segment.GetTerminology() == S.terminology_entry(label)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(entry_text, entry)
        assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
        cat, typ = entry.GetCategoryObject(), entry.GetTypeObject()
        assert (cat.GetCodingSchemeDesignator(), cat.GetCodeValue(), cat.GetCodeMeaning()) == label.category
        assert (typ.GetCodingSchemeDesignator(), typ.GetCodeValue(), typ.GetCodeMeaning()) == label.type
        region = entry.GetAnatomicRegionObject()
        if segment_id == "liver":
            assert (cat.GetCodeValue(), typ.GetCodeValue()) == ("85756007", "10200004")
            assert not region.GetCodeValue()
        else:
            assert (cat.GetCodeValue(), cat.GetCodeMeaning()) == ("49755003", "Morphologically Altered Structure")
            assert (typ.GetCodeValue(), typ.GetCodeMeaning()) == ("52988006", "Lesion")
            assert (region.GetCodingSchemeDesignator(), region.GetCodeValue(), region.GetCodeMeaning()) == ("SCT", "10200004", "Liver")
    display = seg_node.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()


def test_terminology_string_matches_slicer_format():
    hcc = S.terminology_entry(LABEL_BY_KEY["hcc"])
    assert hcc == (
        "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
        "~SCT^52988006^Lesion~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^"
    )
    assert S.terminology_entry(LABEL_BY_KEY["liver"]) == (
        "Segmentation category and type - DICOM master list~SCT^85756007^Tissue~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )


def test_segments_lie_on_the_oblique_input_voxels(scene, result):
    ct, pr = result
    ct_node = S.volume_to_node(ct, scene, "CT")
    seg_node = S.build_segmentation(scene, pr.labelmap, "CT lesions", reference_node=ct_node, liver=pr.liver)
    # The reference geometry is the input's.
    geometry = seg_node.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    oriented = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, oriented)
    import vtk

    m = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(m)
    assert np.allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], ct.ijk_to_ras_matrix(), atol=1e-6)
    assert oriented.GetExtent() == (0, ct.shape[2] - 1, 0, ct.shape[1] - 1, 0, ct.shape[0] - 1)
    for key, expected in (("liver", pr.liver.array > 0), ("hcc", pr.labelmap.array == 4), ("cyst", pr.labelmap.array == 2)):
        mask = S.segment_to_volume(seg_node, key, ct_node)
        assert mask.same_geometry(ct, tol=1e-6)
        assert np.array_equal(mask.array > 0, expected), key


def test_segmentation_without_reference_node_keeps_the_labelmap_grid(scene, result):
    ct, pr = result
    seg_node = S.build_segmentation(scene, pr.labelmap, "free", reference_node=None)
    ct_node = S.volume_to_node(ct, scene, "CT")
    # Liver defaults to every labelled voxel when no liver mask is given.
    assert np.array_equal(S.segment_to_volume(seg_node, "liver", ct_node).array > 0, pr.labelmap.array > 0)


def test_empty_labelmap_gives_an_empty_segmentation(scene):
    ct = oblique_ct()
    seg_node = S.build_segmentation(scene, ct.with_array(np.zeros(ct.shape, np.uint8)), "none")
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0


# -- heatmap ------------------------------------------------------------------------------------
def _lightness(rgb) -> float:
    """CIE L* (0..100) of an sRGB colour."""
    c = np.asarray(rgb[:3], float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    return float(116 * np.cbrt(y) - 16 if y > 0.008856 else 903.3 * y)


def test_heatmap_node_geometry_values_and_perceptual_colours(scene, result):
    ct, pr = result
    node = S.build_heatmap_node(scene, pr.heatmap, "CT heatmap", display_threshold=0.25)
    back = S.volume_from_node(node)
    assert back.array.dtype == np.float32 and np.array_equal(back.array, pr.heatmap.array)
    assert back.same_geometry(ct, tol=1e-9)
    display = node.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.25)
    colors = display.GetColorNode()
    assert colors.GetName() == S.FALLBACK_COLOR_NODE_NAME  # no "Inferno" in a bare scene
    assert colors.GetNumberOfColors() == 256
    lum = []
    for index in range(256):
        rgba = [0.0] * 4
        colors.GetColor(index, rgba)
        lum.append(_lightness(rgba))
    # Perceptual maps rise monotonically in lightness, dark to light (tolerance: 8-bit storage).
    assert lum[0] < 5 and lum[-1] > 95 and all(b >= a - 0.5 for a, b in zip(lum, lum[1:]))
    # A second heatmap reuses the colour table instead of adding another.
    node2 = S.build_heatmap_node(scene, pr.heatmap, "again")
    assert node2.GetDisplayNode().GetColorNodeID() == colors.GetID()
    assert not node2.GetDisplayNode().GetApplyThreshold()


def test_slicers_own_inferno_is_preferred(scene, result):
    _, pr = result
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetName("Inferno")
    inferno.SetTypeToGrey()
    scene.AddNode(inferno)
    node = S.build_heatmap_node(scene, pr.heatmap, "h")
    assert node.GetDisplayNode().GetColorNodeID() == inferno.GetID()


def test_heatmap_is_foreground_in_every_slice_view(scene, result):
    ct, pr = result
    add_slice_views(scene)
    ct_node = S.volume_to_node(ct, scene, "CT")
    heat = S.build_heatmap_node(scene, pr.heatmap, "h")
    assert S.show_in_slice_views(scene, ct_node, heat, 0.4) == 3
    S.set_foreground_opacity(scene, 0.7)
    comps = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(comps.GetNumberOfItems()):
        comp = comps.GetItemAsObject(n)
        assert comp.GetBackgroundVolumeID() == ct_node.GetID()
        assert comp.GetForegroundVolumeID() == heat.GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.7)


# -- table and plot ------------------------------------------------------------------------------
def test_table_contents(scene, result):
    ct, pr = result
    rows = list(reversed(pr.slices))  # the table sorts by slice
    table_node = S.build_slice_table(scene, rows, "CT slices")
    table = table_node.GetTable()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(S.TABLE_COLUMNS)
    assert table.GetNumberOfRows() == len(pr.slices)
    for r, s in enumerate(pr.slices):
        assert table.GetValueByName(r, "slice").ToInt() == s.slice_index
        assert table.GetValueByName(r, "z_mm").ToDouble() == pytest.approx(s.z_mm)
        expected_class = "Normal" if s.predicted_class == "normal" else LABEL_BY_KEY[s.predicted_class].name
        assert table.GetValueByName(r, "class").ToString() == expected_class
        for name, p in zip(CLASS_NAMES, s.probabilities):
            assert table.GetValueByName(r, f"p_{name}").ToDouble() == pytest.approx(float(p))
    assert table_node.GetColumnTitle("p_hem") == "P(Hemangioma)"
    assert S.slices_from_table(table_node) == [
        (s.slice_index, pytest.approx(s.z_mm), "Normal" if s.predicted_class == "normal" else LABEL_BY_KEY[s.predicted_class].name)
        for s in pr.slices
    ]


def test_probability_plot_has_one_series_per_class(scene, result):
    _, pr = result
    table_node = S.build_slice_table(scene, pr.slices, "t")
    chart = S.build_probability_plot(scene, table_node, "CT probabilities")
    assert chart.GetNumberOfPlotSeriesNodes() == 5
    assert chart.GetYAxisRange()[0] == 0.0 and chart.GetYAxisRange()[1] == 1.0
    for n, name in enumerate(CLASS_NAMES):
        series = chart.GetNthPlotSeriesNode(n)
        assert series.GetTableNodeID() == table_node.GetID()
        assert series.GetXColumnName() == "z_mm" and series.GetYColumnName() == f"p_{name}"
        if name != "normal":
            assert np.allclose(series.GetColor(), np.array(LABEL_BY_KEY[name].rgb) / 255.0)


# -- whole run ----------------------------------------------------------------------------------
def test_add_results_numbers_new_nodes_and_never_overwrites_an_edited_segmentation(scene, result):
    ct, pr = result
    add_slice_views(scene)
    ct_node = S.volume_to_node(ct, scene, "CT")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, ct_node)

    first = S.add_results_to_scene(scene, pr, ct_node, heatmap_display_threshold=0.1, heatmap_opacity=0.6)
    assert [n.GetName() for n in first.all_nodes()] == ["CT lesions", "CT heatmap", "CT slices", "CT probabilities"]
    assert first.warnings == ["liver volume is small (120 ml)"]
    for node in first.all_nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    # The user edits the first result: removes the cyst segment.
    first.segmentation.GetSegmentation().RemoveSegment("cyst")

    second = S.add_results_to_scene(scene, pr, ct_node)
    assert [n.GetName() for n in second.all_nodes()] == ["CT lesions 2", "CT heatmap 2", "CT slices 2", "CT probabilities 2"]
    assert second.segmentation.GetID() != first.segmentation.GetID()
    assert first.segmentation.GetSegmentation().GetSegment("cyst") is None  # the edit survives
    assert second.segmentation.GetSegmentation().GetSegment("cyst") is not None

    # Picking an output segmentation on purpose refills that node.
    third = S.add_results_to_scene(scene, pr, ct_node, segmentation_node=first.segmentation)
    assert third.segmentation.GetID() == first.segmentation.GetID()
    assert first.segmentation.GetSegmentation().GetSegment("cyst") is not None
    assert first.segmentation.GetName() == "CT lesions"


def test_add_results_refuses_results_of_another_volume(scene, result):
    _, pr = result
    other = S.volume_to_node(oblique_ct(shape=(9, 24, 28)), scene, "other")
    with pytest.raises(ValueError, match="do not match"):
        S.add_results_to_scene(scene, pr, other)


def test_outputs_follow_the_inputs_transform(scene, result):
    ct, pr = result
    ct_node = S.volume_to_node(ct, scene, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    nodes = S.add_results_to_scene(scene, pr, ct_node)
    assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
    assert nodes.heatmap.GetTransformNodeID() == transform.GetID()


# -- navigation ---------------------------------------------------------------------------------
def test_slice_position_and_jump_on_an_oblique_volume(scene):
    ct = oblique_ct()
    ct_node = S.volume_to_node(ct, scene, "CT")
    k = 6
    ras = S.slice_ras(ct_node, k, (3, 4))
    expected = ct.ijk_to_ras_matrix() @ np.array([3, 4, k, 1.0])
    assert np.allclose(ras, expected[:3])
    assert S.slice_index_at(ct_node, ras) == pytest.approx(k)
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    scene.AddNode(red)
    S.jump_slice_to(red, S.slice_ras(ct_node, k), align_to=ct_node)
    # After aligning to the volume, the view's plane is slice k: its centre maps to k.
    assert S.slice_index_at(ct_node, S.slice_view_centre(red)) == pytest.approx(k, abs=1e-6)
    S.jump_slice_to(red, S.slice_ras(ct_node, 2))
    assert S.slice_index_at(ct_node, S.slice_view_centre(red)) == pytest.approx(2, abs=1e-6)


# -- loading the engine's output folder -------------------------------------------------------
def test_load_result_dir_reads_what_the_engine_writes(scene, result, tmp_path):
    outputs = pytest.importorskip("DADRNLesionLib.outputs")
    ct, pr = result
    pr.report.setdefault("timings_s", {})
    try:
        outputs.write_results(pr, tmp_path / "out", ct=ct)
    except (KeyError, TypeError) as exc:  # the writer wants report fields only the pipeline fills
        pytest.skip(f"outputs.write_results needs a full pipeline report here ({exc})")
    loaded = S.load_result_dir(tmp_path / "out")
    assert loaded.labelmap.same_geometry(ct) and np.array_equal(loaded.labelmap.array, pr.labelmap.array)
    # the file keeps the heatmap to 1/HEATMAP_STEPS: within half a step of what the pipeline computed
    step = 1.0 / outputs.HEATMAP_STEPS
    assert loaded.heatmap.array.dtype == np.float32
    assert np.abs(loaded.heatmap.array - pr.heatmap.array).max() <= 0.5 * step + 1e-6
    assert loaded.heatmap.array.max() > 0.5, "a lesion slice's heatmap reaches 1 after per-slice normalisation"
    assert np.array_equal(loaded.liver.array, (pr.labelmap.array > 0).astype(np.uint8))
    assert [s.slice_index for s in loaded.slices] == [s.slice_index for s in pr.slices]
    assert [s.predicted_class for s in loaded.slices] == [s.predicted_class for s in pr.slices]
    assert S.liver_check_warnings(loaded.report) == ["liver volume is small (120 ml)"]
    ct_node = S.volume_to_node(ct, scene, "CT")
    nodes = S.add_results_to_scene(scene, loaded, ct_node)
    assert np.array_equal(S.segment_to_volume(nodes.segmentation, "hcc", ct_node).array > 0, pr.labelmap.array == 4)


def test_load_result_dir_from_plain_files(tmp_path, result):
    """The loader needs only the contract's files, written here with SimpleITK and csv."""
    import csv
    import json

    from DADRNLesionLib.io import write_volume
    from DADRNLesionLib.results import SLICE_CSV_COLUMNS

    ct, pr = result
    write_volume(pr.labelmap, tmp_path / "labelmap.nii.gz")
    write_volume(pr.heatmap, tmp_path / "heatmap.nii.gz")
    with open(tmp_path / "slices.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SLICE_CSV_COLUMNS))
        writer.writeheader()
        for s in pr.slices:
            writer.writerow(s.as_row())
    (tmp_path / "report.json").write_text(json.dumps({"liver_check": {"warnings": ["w1", "w2"]}}))
    loaded = S.load_result_dir(tmp_path)
    assert loaded.labelmap.same_geometry(ct, tol=1e-5)
    assert np.array_equal(loaded.labelmap.array, pr.labelmap.array)
    assert loaded.slices[1].cam_peak_ij == (9, 8) and loaded.slices[0].cam_peak_ij is None
    assert np.allclose(loaded.slices[1].probabilities, pr.slices[1].probabilities)
    assert S.liver_check_warnings(loaded.report) == ["w1", "w2"]
