"""Engine results -> MRML nodes, written against MRML classes only.

Everything here takes a ``vtkMRMLScene`` argument and uses no ``slicer.app``, ``slicer.mrmlScene``
or ``slicer.util``, so the same code runs inside Slicer and on a plain ``vtkMRMLScene`` from PyPI's
``slicer-core`` (which is how the tests exercise it).

Coordinates: `Volume` is LPS (ITK/DICOM/NIfTI), MRML is RAS. The two differ by the sign of x and y,
so ``IJKToRAS = diag(-1, -1, 1, 1) @ IJKToLPS`` (see `Volume.ijk_to_ras_matrix`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .classes import ANATOMIC_REGION, CLASS_NAMES, LABEL_BY_KEY, LABELS, LIVER_VALUE, Label
from .results import PipelineResult, SliceResult
from .volume import Volume

__all__ = [
    "LABEL_VALUE_TAG",
    "ResultNodes",
    "add_results_to_scene",
    "build_heatmap_node",
    "build_probability_plot",
    "build_segmentation",
    "build_slice_table",
    "heatmap_color_node",
    "jump_slice_to",
    "load_result_dir",
    "place_under_input_study",
    "show_in_slice_views",
    "slice_ras",
    "segment_tag",
    "segment_to_volume",
    "slice_index_at",
    "slice_view_centre",
    "slices_from_table",
    "terminology_entry",
    "unique_node_name",
    "volume_from_node",
    "volume_to_node",
]

# Segment tag that records which engine label value a segment stands for; the exporter reads it
# so that renamed segments keep their value. Tags are saved in .seg.nrrd files.
LABEL_VALUE_TAG = "DADRNLesion.LabelValue"
# Node attribute marking every node this module creates (lets the glue find a run's nodes).
RUN_ATTRIBUTE = "DADRNLesion.Run"

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Display names of the five classes, in CLASS_NAMES order (table "class" column, plot legend).
CLASS_DISPLAY_NAMES: tuple[str, ...] = tuple(
    "Normal" if name == "normal" else LABEL_BY_KEY[name].name for name in CLASS_NAMES
)
_CLASS_COLOURS: tuple[tuple[int, int, int], ...] = tuple(
    (150, 150, 150) if name == "normal" else LABEL_BY_KEY[name].rgb for name in CLASS_NAMES
)

# Inferno, sampled at 17 evenly spaced points (values of the perceptually uniform map published
# by van der Walt and Smith); interpolated linearly to 256 entries when Slicer has no "Inferno".
_INFERNO_ANCHORS = np.array(
    [
        (0.0015, 0.0005, 0.0139), (0.0423, 0.0281, 0.1411), (0.1293, 0.0473, 0.2908),
        (0.2383, 0.0366, 0.3964), (0.3415, 0.0623, 0.4294), (0.4412, 0.0993, 0.4316),
        (0.5409, 0.1347, 0.4151), (0.6401, 0.1714, 0.3811), (0.7357, 0.2159, 0.3302),
        (0.8224, 0.2752, 0.2661), (0.8943, 0.3534, 0.1936), (0.9470, 0.4492, 0.1153),
        (0.9784, 0.5579, 0.0349), (0.9879, 0.6753, 0.0653), (0.9746, 0.7977, 0.2063),
        (0.9476, 0.9174, 0.4107), (0.9884, 0.9984, 0.6449),
    ]
)
FALLBACK_COLOR_NODE_NAME = "DADRN Inferno"


def _slicer():
    import slicer  # noqa: PLC0415  (MRML classes: the real Slicer, or slicer-core from PyPI)

    return slicer


def _vtk():
    import vtk  # noqa: PLC0415

    return vtk


# -- volumes ------------------------------------------------------------------------------------
def _matrix_to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(a: np.ndarray):
    m = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def volume_from_node(node) -> Volume:
    """The voxels and geometry of a scalar or labelmap volume node, as an LPS `Volume`.

    Parent transforms are not applied: the engine works on the voxel grid as stored, and every
    output goes back onto that same grid (and under the same transform) in the scene.
    """
    from vtk.util import numpy_support  # noqa: PLC0415

    image = node.GetImageData() if node is not None else None
    if image is None:
        raise ValueError("the volume node has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"{node.GetName()} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a single-component CT volume is needed"
        )
    i, j, k = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()
    ijk_to_ras = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = _LPS_TO_RAS @ _matrix_to_numpy(ijk_to_ras)[:3, :]  # RAS -> LPS (the sign flip is its own inverse)
    spacing = np.asarray(node.GetSpacing(), dtype=np.float64)
    direction = m[:, :3] / spacing[None, :]
    return Volume(array, tuple(spacing), tuple(m[:, 3]), direction)


def _image_data_from_array(array: np.ndarray, extent_start=(0, 0, 0)):
    """vtkImageData holding `array` [k, j, i] (deep copy), with unit spacing and zero origin."""
    from vtk.util import numpy_support  # noqa: PLC0415

    vtk = _vtk()
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    k, j, i = array.shape
    image = vtk.vtkImageData()
    i0, j0, k0 = (int(v) for v in extent_start)
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    return image


def volume_to_node(volume: Volume, scene, name: str, labelmap: bool = False, node=None):
    """A new scalar (or labelmap) volume node in `scene` holding `volume` on its exact geometry.

    Pass `node` to fill an existing node instead of creating one.
    """
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(cls, name)
    node.SetAndObserveImageData(_image_data_from_array(volume.array))
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras_matrix()))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# -- terminology ----------------------------------------------------------------------------------
def _code(triple: Sequence[str]) -> str:
    scheme, value, meaning = triple
    return f"{scheme}^{value}^{meaning}"


def terminology_entry(label: Label) -> str:
    """The segment's "TerminologyEntry" tag value for `label`, as Slicer serialises it.

    Slicer's format (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry):
    ``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``
    with each code written ``scheme^value^meaning``. Lesions are placed in the liver; the liver
    itself has no anatomic region. When the MRML library offers the serialiser it is used, so the
    string follows whatever the running Slicer version writes; the hand-built string is identical
    for the versions checked (Slicer 5.x, slicer-core 5.13).
    """
    region = ANATOMIC_REGION if label.key != "liver" else ("", "", "")
    try:
        logic = _slicer().vtkSlicerTerminologiesModuleLogic
        return logic.SerializeTerminologyEntry(
            CATEGORY_CONTEXT,
            label.category[1], label.category[0], label.category[2],
            label.type[1], label.type[0], label.type[2],
            "", "", "",
            ANATOMIC_CONTEXT,
            region[1], region[0], region[2],
            "", "", "",
        )
    except (ImportError, AttributeError, TypeError):
        return "~".join(
            [CATEGORY_CONTEXT, _code(label.category), _code(label.type), "^^", ANATOMIC_CONTEXT, _code(region), "^^"]
        )


def segment_tag(segment, name: str) -> Optional[str]:
    """A segment tag's value, or None when the segment has no such tag."""
    value = _vtk().reference("")
    if not segment.GetTag(name, value):
        return None
    return str(value.get() if hasattr(value, "get") else value)


# -- naming and hierarchy -------------------------------------------------------------------------
def unique_node_name(scene, base: str) -> str:
    """`base` if no node has that name yet, else "base 2", "base 3", ... (never reuses a name)."""
    taken = set()
    for n in range(scene.GetNumberOfNodes()):
        taken.add(scene.GetNthNode(n).GetName())
    if base not in taken:
        return base
    n = 2
    while f"{base} {n}" in taken:
        n += 1
    return f"{base} {n}"


def place_under_input_study(scene, input_node, nodes: Iterable) -> None:
    """Put `nodes` next to the input volume in the subject hierarchy (under its study, if any)."""
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    parent = sh.GetSceneItemID()
    if input_node is not None:
        input_item = sh.GetItemByDataNode(input_node)
        if input_item:
            parent = sh.GetItemParent(input_item) or sh.GetSceneItemID()
    for node in nodes:
        if node is None:
            continue
        item = sh.GetItemByDataNode(node)
        if not item:
            # Inside Slicer the subject hierarchy plugins add items for new nodes; a bare scene does not.
            item = sh.CreateItem(parent, node)
        else:
            sh.SetItemParent(item, parent)


# -- segmentation ---------------------------------------------------------------------------------
def _oriented_mask(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """vtkOrientedImageData of the mask's bounding box, on the volume's IJK-to-RAS geometry."""
    slicer = _slicer()
    nz = np.nonzero(mask)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) for a in nz]
    sub = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1].astype(np.uint8)
    image = _image_data_from_array(sub, extent_start=(lo[2], lo[1], lo[0]))
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(image)
    oriented.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return oriented


def build_segmentation(
    scene,
    labelmap: Volume,
    name: str,
    reference_node=None,
    liver: Optional[Volume] = None,
    segmentation_node=None,
):
    """Segmentation node with a Liver segment and one segment per lesion class in `labelmap`.

    The Liver segment is `liver` (the whole organ, lesions included) when given, else every
    non-zero voxel of `labelmap`; lesion segments are the voxels with that class's label value, so
    they overlap the liver as in the organ itself. Colours and terminology come from
    ``classes.LABELS``. Pass `segmentation_node` to refill a node the user picked on purpose
    (its segments are replaced); otherwise a new node is created.
    """
    slicer = _slicer()
    if liver is not None:
        labelmap.require_same_geometry(liver, "liver mask")
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    if reference_node is None:
        # Keep the input geometry as the segmentation's reference, as the volume node would.
        geometry = _oriented_mask(np.ones((1, 1, 1), np.uint8), labelmap.ijk_to_ras_matrix())
        geometry.SetExtent(0, labelmap.shape[2] - 1, 0, labelmap.shape[1] - 1, 0, labelmap.shape[0] - 1)
        serialized = slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
        segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), serialized)

    ijk_to_ras = labelmap.ijk_to_ras_matrix()
    binary_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(binary_name)
    else:  # Slicer before 5.4 called it the master representation
        segmentation.SetMasterRepresentationName(binary_name)
    values = labelmap.array
    for label in LABELS:
        if label.value == LIVER_VALUE:
            mask = (liver.array > 0) if liver is not None else (values > 0)
        else:
            mask = values == label.value
        if not mask.any():
            continue
        segment = slicer.vtkSegment()
        segment.SetName(label.name)
        segment.SetColor(*(c / 255.0 for c in label.rgb))
        segment.SetTerminology(terminology_entry(label))
        segment.SetTag(LABEL_VALUE_TAG, str(label.value))
        segment.AddRepresentation(binary_name, _oriented_mask(mask, ijk_to_ras))
        segmentation.AddSegment(segment, label.key)

    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2DOutline(True)
        display.SetVisibility2DFill(False)
        display.SetOpacity2DOutline(1.0)
    segmentation_node.SetAttribute(RUN_ATTRIBUTE, "segmentation")
    return segmentation_node


def segment_to_volume(segmentation_node, segment_id: str, reference_node) -> Volume:
    """One segment rasterised on the reference volume's voxel grid, as a 0/1 uint8 `Volume`."""
    slicer = _slicer()
    vtk = _vtk()
    scene = segmentation_node.GetScene()
    temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DADRNLesion_temp")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, temp, reference_node):
            raise ValueError(f"segment {segment_id!r} could not be exported on the volume's grid")
        mask = volume_from_node(temp)
    finally:
        display = temp.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(temp)
    return mask.with_array((mask.array > 0).astype(np.uint8))


# -- heatmap --------------------------------------------------------------------------------------
def heatmap_color_node(scene):
    """A perceptual colour map: Slicer's "Inferno" (or "Viridis") if loaded, else an Inferno table."""
    for wanted in ("Inferno", "Viridis"):
        nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", wanted)
        if nodes.GetNumberOfItems() > 0:
            return nodes.GetItemAsObject(0)
    existing = scene.GetNodesByClassByName("vtkMRMLColorTableNode", FALLBACK_COLOR_NODE_NAME)
    if existing.GetNumberOfItems() > 0:
        return existing.GetItemAsObject(0)
    slicer = _slicer()
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(FALLBACK_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    anchors_t = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    for index in range(256):
        t = index / 255.0
        rgb = [float(np.interp(t, anchors_t, _INFERNO_ANCHORS[:, c])) for c in range(3)]
        node.SetColor(index, f"{index}", rgb[0], rgb[1], rgb[2], 1.0)
    node.SetAttribute("Category", "DADRNLesion")
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def build_heatmap_node(scene, heatmap: Volume, name: str, display_threshold: float = 0.0, node=None):
    """Scalar volume of the CAM heatmap (0..1) shown with a perceptual colour map.

    Voxels below `display_threshold` are hidden (transparent in the foreground layer).
    """
    node = volume_to_node(heatmap.with_array(heatmap.array.astype(np.float32, copy=False)), scene, name, node=node)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatmap_color_node(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    set_heatmap_threshold(node, display_threshold)
    node.SetAttribute(RUN_ATTRIBUTE, "heatmap")
    return node


def set_heatmap_threshold(heatmap_node, threshold: float) -> None:
    """Hide heatmap voxels below `threshold` (0 shows everything)."""
    display = heatmap_node.GetDisplayNode()
    if display is None:
        return
    display.SetAutoThreshold(False)
    if threshold > 0.0:
        display.SetApplyThreshold(True)
        display.SetThreshold(float(threshold), 1.0e6)
    else:
        display.SetApplyThreshold(False)


def show_in_slice_views(scene, background_node, foreground_node=None, foreground_opacity: float = 0.5) -> int:
    """Show the input as background and the heatmap as foreground in every slice view.

    Returns how many slice views were set (a bare scene has none until views exist).
    """
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    count = 0
    for n in range(nodes.GetNumberOfItems()):
        composite = nodes.GetItemAsObject(n)
        if background_node is not None:
            composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(foreground_node.GetID() if foreground_node is not None else None)
        composite.SetForegroundOpacity(float(foreground_opacity))
        count += 1
    return count


def set_foreground_opacity(scene, opacity: float) -> None:
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(nodes.GetNumberOfItems()):
        nodes.GetItemAsObject(n).SetForegroundOpacity(float(opacity))


# -- table and plot -------------------------------------------------------------------------------
TABLE_COLUMNS: tuple[str, ...] = ("slice", "z_mm", "class", *(f"p_{name}" for name in CLASS_NAMES))


def build_slice_table(scene, slices: Sequence[SliceResult], name: str, node=None):
    """Table node with one row per classified slice: slice, z (mm), class, five probabilities."""
    vtk = _vtk()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = vtk.vtkTable()
    slice_col = vtk.vtkIntArray()
    slice_col.SetName("slice")
    z_col = vtk.vtkDoubleArray()
    z_col.SetName("z_mm")
    class_col = vtk.vtkStringArray()
    class_col.SetName("class")
    prob_cols = []
    for cname in CLASS_NAMES:
        col = vtk.vtkDoubleArray()
        col.SetName(f"p_{cname}")
        prob_cols.append(col)
    for s in sorted(slices, key=lambda s: s.slice_index):
        slice_col.InsertNextValue(int(s.slice_index))
        z_col.InsertNextValue(float(s.z_mm))
        class_col.InsertNextValue(CLASS_DISPLAY_NAMES[CLASS_NAMES.index(s.predicted_class)])
        for col, p in zip(prob_cols, np.asarray(s.probabilities, dtype=np.float64)):
            col.InsertNextValue(float(p))
    for col in (slice_col, z_col, class_col, *prob_cols):
        table.AddColumn(col)
    node.SetAndObserveTable(table)
    if hasattr(node, "SetUseColumnTitleAsColumnHeader"):
        node.SetUseColumnTitleAsColumnHeader(True)
    titles = {"slice": "Slice", "z_mm": "z (mm)", "class": "Class"}
    titles.update({f"p_{c}": f"P({d})" for c, d in zip(CLASS_NAMES, CLASS_DISPLAY_NAMES)})
    for column, title in titles.items():
        node.SetColumnTitle(column, title)
    node.SetLocked(True)  # results, not a spreadsheet: editing would desynchronise the plot
    node.SetAttribute(RUN_ATTRIBUTE, "table")
    return node


def slices_from_table(table_node) -> list[tuple[int, float, str]]:
    """(slice, z_mm, class display name) per row, in row order: what navigation needs."""
    table = table_node.GetTable()
    rows = []
    slice_col = table.GetColumnByName("slice")
    z_col = table.GetColumnByName("z_mm")
    class_col = table.GetColumnByName("class")
    for r in range(table.GetNumberOfRows()):
        rows.append((int(slice_col.GetValue(r)), float(z_col.GetValue(r)), str(class_col.GetValue(r))))
    return rows


def build_probability_plot(scene, table_node, name: str):
    """Chart of the five class probabilities along z, one series per class, from `table_node`."""
    slicer = _slicer()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("Class probability along z")
    chart.SetXAxisTitle("z (mm)")
    chart.SetYAxisTitle("probability")
    if hasattr(chart, "SetYAxisRangeAuto"):
        chart.SetYAxisRangeAuto(False)
        chart.SetYAxisRange(0.0, 1.0)
    for cname, display, rgb in zip(CLASS_NAMES, CLASS_DISPLAY_NAMES, _CLASS_COLOURS):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {display}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("z_mm")
        series.SetYColumnName(f"p_{cname}")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*(c / 255.0 for c in rgb))
        series.SetAttribute(RUN_ATTRIBUTE, "plot series")
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetAttribute(RUN_ATTRIBUTE, "plot")
    return chart


# -- navigation -----------------------------------------------------------------------------------
def slice_ras(volume_node, k: int, ij: Optional[tuple[int, int]] = None) -> tuple[float, float, float]:
    """RAS position of slice `k` of `volume_node`, at in-plane voxel `ij` (column, row) or the centre."""
    dims = volume_node.GetImageData().GetDimensions()
    i, j = ij if ij is not None else ((dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0)
    m = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ras = _matrix_to_numpy(m) @ np.array([float(i), float(j), float(k), 1.0])
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def slice_index_at(volume_node, ras: Sequence[float]) -> float:
    """The (fractional) k index of `volume_node` at RAS point `ras`."""
    m = _vtk().vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(m)
    ijk = _matrix_to_numpy(m) @ np.array([float(ras[0]), float(ras[1]), float(ras[2]), 1.0])
    return float(ijk[2])


def slice_view_centre(slice_node) -> tuple[float, float, float]:
    """RAS point at the centre of a slice view's plane."""
    m = slice_node.GetSliceToRAS()
    return (m.GetElement(0, 3), m.GetElement(1, 3), m.GetElement(2, 3))


def jump_slice_to(slice_node, ras: Sequence[float], centred: bool = False, align_to=None) -> None:
    """Move a slice view so that its plane passes through `ras` (optionally centring it there).

    With `align_to` (a volume node) the view is first rotated to that volume's slice planes, so
    an oblique volume's k slices are shown exactly rather than resliced.
    """
    if align_to is not None:
        slice_node.RotateToVolumePlane(align_to)
    if centred:
        slice_node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))
    else:
        slice_node.JumpSliceByOffsetting(float(ras[0]), float(ras[1]), float(ras[2]))


# -- loading engine output ----------------------------------------------------------------------
def load_result_dir(out_dir) -> PipelineResult:
    """A `PipelineResult` from the folder written by ``dadrn-lesion classify --out DIR``.

    The liver mask is not a separate file: it is every labelled voxel (lesion regions lie inside
    the liver by construction).
    """
    from .io import read_volume  # noqa: PLC0415  (SimpleITK, imported only when loading files)

    out_dir = Path(out_dir)
    labelmap = read_volume(out_dir / "labelmap.nii.gz")
    labelmap = labelmap.with_array(labelmap.array.astype(np.uint8))
    heatmap = read_volume(out_dir / "heatmap.nii.gz")
    labelmap.require_same_geometry(heatmap, "heatmap")
    heatmap = heatmap.with_array(heatmap.array.astype(np.float32))
    liver = labelmap.with_array((labelmap.array > 0).astype(np.uint8))
    slices: list[SliceResult] = []
    slices_csv = out_dir / "slices.csv"
    if slices_csv.exists():
        with open(slices_csv, newline="", encoding="utf-8") as f:
            slices = [SliceResult.from_row(row) for row in csv.DictReader(f)]
    report: dict = {}
    report_path = out_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text(encoding="utf-8"))
    return PipelineResult(liver=liver, heatmap=heatmap, labelmap=labelmap, slices=slices, report=report)


def liver_check_warnings(report: dict) -> list[str]:
    """The liver-mask plausibility warnings of a run's report (shown in the panel)."""
    check = report.get("liver_check") or {}
    warnings = check.get("warnings") or []
    return [str(w) for w in warnings]


# -- everything at once ---------------------------------------------------------------------------
@dataclass
class ResultNodes:
    segmentation: object
    heatmap: object
    table: object
    chart: object
    warnings: list[str] = field(default_factory=list)

    def all_nodes(self) -> list:
        return [n for n in (self.segmentation, self.heatmap, self.table, self.chart) if n is not None]


def add_results_to_scene(
    scene,
    result: PipelineResult,
    input_node=None,
    base_name: Optional[str] = None,
    segmentation_node=None,
    heatmap_display_threshold: float = 0.0,
    heatmap_opacity: float = 0.5,
) -> ResultNodes:
    """All nodes of one run: segmentation, heatmap, table and plot, placed next to the input.

    Each call creates new, numbered nodes ("CT lesions", "CT lesions 2", ...) so an earlier run,
    perhaps edited since, is never overwritten; only a `segmentation_node` the caller passes on
    purpose is refilled.
    """
    if base_name is None:
        base_name = input_node.GetName() if input_node is not None else "Volume"
    if input_node is not None:
        if input_node.GetImageData() is not None:
            dims = input_node.GetImageData().GetDimensions()
            if tuple(dims) != tuple(result.labelmap.size_ijk):
                raise ValueError(
                    f"the results ({result.labelmap.size_ijk}) do not match the input volume ({tuple(dims)})"
                )
    seg_name = unique_node_name(scene, f"{base_name} lesions") if segmentation_node is None else segmentation_node.GetName()
    segmentation = build_segmentation(
        scene, result.labelmap, seg_name, reference_node=input_node, liver=result.liver, segmentation_node=segmentation_node
    )
    heatmap = build_heatmap_node(scene, result.heatmap, unique_node_name(scene, f"{base_name} heatmap"), heatmap_display_threshold)
    table = build_slice_table(scene, result.slices, unique_node_name(scene, f"{base_name} slices"))
    chart = build_probability_plot(scene, table, unique_node_name(scene, f"{base_name} probabilities"))
    nodes = ResultNodes(segmentation, heatmap, table, chart, liver_check_warnings(result.report))
    if input_node is not None:
        # Outputs follow the input if it sits under a transform.
        transform_id = input_node.GetTransformNodeID()
        for node in (segmentation, heatmap):
            node.SetAndObserveTransformNodeID(transform_id)
    place_under_input_study(scene, input_node, nodes.all_nodes())
    show_in_slice_views(scene, input_node, heatmap, heatmap_opacity)
    return nodes
