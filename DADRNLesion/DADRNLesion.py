"""3D Slicer module: liver lesion classification and localisation on arterial-phase CT (DADRN).

Slicer glue only. The engine (DADRNLesionLib) runs in a separate PythonSlicer process so the
application never freezes; scene building, exports, progress parsing, panel behaviour and the
dependency rules live in plain-Python modules of DADRNLesionLib that are tested without Slicer.

Works both when built as an extension (Resources/ next to this file) and when this folder is
simply added to Slicer's "Additional module paths" (Resources/ one level up, in the source tree).
"""

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:
    # Slicer adds a scripted module's folder to sys.path, but be explicit: the engine package
    # must be importable from here whatever the loader did.
    sys.path.insert(0, MODULE_DIR)

from DADRNLesionLib import dependencies as lesionDependencies  # noqa: E402
from DADRNLesionLib import export as lesionExport  # noqa: E402
from DADRNLesionLib import panel as lesionPanel  # noqa: E402
from DADRNLesionLib import runner as lesionRunner  # noqa: E402
from DADRNLesionLib import scene as lesionScene  # noqa: E402


def resourceDir():
    """Resources/ next to this file (built extension) or one level up (source tree).

    Also looks next to the module Slicer loaded, for copies of this file imported elsewhere
    (ctest imports it from the build folder).
    """
    candidates = [os.path.join(MODULE_DIR, "Resources"), os.path.join(os.path.dirname(MODULE_DIR), "Resources")]
    loaded = getattr(getattr(slicer, "modules", None), "dadrnlesion", None)
    if loaded is not None and getattr(loaded, "path", ""):
        loadedDir = os.path.dirname(loaded.path)
        candidates += [os.path.join(loadedDir, "Resources"), os.path.join(os.path.dirname(loadedDir), "Resources")]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "UI", "DADRNLesion.ui")):
            return candidate
    return candidates[0]


def resourcePath(*parts):
    return os.path.join(resourceDir(), *parts)


def demoWeightsPath():
    """The shipped demo checkpoint, or "" if this installation has none."""
    models = resourcePath("Models")
    preferred = os.path.join(models, "dadrn_demo.safetensors")
    if os.path.isfile(preferred):
        return preferred
    if os.path.isdir(models):
        for name in sorted(os.listdir(models)):
            if name.endswith(".safetensors"):
                return os.path.join(models, name)
    return ""


#
# Module
#


class DADRNLesion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Liver Lesion Classification (DADRN)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DADRNLesion developers"]
        self.parent.helpText = (
            "Classifies every liver slice of an <b>arterial-phase</b> abdominal CT as normal, cyst, FNH, HCC or "
            "hemangioma with a dual-attention dilated residual network (DADRN, ICIP 2019), shows a Grad-CAM heatmap, "
            "and turns the heatmap regions into an editable lesion segmentation.<br><br>"
            "<b>The shipped demo model was trained on synthetic phantoms: it is for demonstration, not for diagnosis.</b>"
            "<br><br>See docs/slicer.md in the extension's source for a walkthrough and troubleshooting."
        )
        self.parent.acknowledgementText = (
            "Method: X. Chen, L. Lin, Y.-W. Chen et al., 'A dual attention dilated residual network for liver lesion "
            "classification and localization on CT images', ICIP 2019."
        )
        iconPath = resourcePath("Icons", "DADRNLesion.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


#
# Parameter node
#


@parameterNodeWrapper
class DADRNLesionParameterNode:
    """Everything the panel edits; saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    useExistingLiver: bool = False
    liverSegmentation: vtkMRMLSegmentationNode
    liverSegmentID: str = ""
    useDemoModel: bool = True
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu", "cpu-bf16"])] = "auto"
    batchSize: Annotated[int, WithinRange(0, 256)] = 0  # 0: automatic (engine sizes it from free memory)
    camThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    outputSegmentation: vtkMRMLSegmentationNode
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    heatmapThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    # Nodes of the latest run.
    resultSegmentation: vtkMRMLSegmentationNode
    resultHeatmap: vtkMRMLScalarVolumeNode
    resultTable: vtkMRMLTableNode
    resultChart: vtkMRMLPlotChartNode


#
# Widget
#


class DADRNLesionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.panel = lesionPanel.ClassifyPanel()
        self.navigator = None
        self.job = None
        self.deviceInfo = None
        self._deviceProcess = None
        self._runWarnings = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI", "DADRNLesion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DADRNLesionLogic()

        self.ui.progressBar.setVisible(False)
        self.ui.warningsLabel.setVisible(False)
        self.ui.exportDirectoryButton.directory = qt.QDir.homePath()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(self.POLL_INTERVAL_MS)
        self._deviceTimer.connect("timeout()", self._onDevicePoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.useExistingLiverCheckBox.connect("toggled(bool)", lambda checked: self._updateLiverWidgets())
        self.ui.liverSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onLiverSelectionChanged)
        self.ui.liverSegmentSelector.connect("currentSegmentChanged(QString)", self.onLiverSelectionChanged)
        self.ui.useDemoModelCheckBox.connect("toggled(bool)", lambda checked: self._updateModelWidgets())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacityChanged)
        self.ui.heatmapThresholdSlider.connect("valueChanged(double)", self.onHeatmapThresholdChanged)
        self.ui.previousLesionButton.connect("clicked()", self.onPreviousLesion)
        self.ui.nextLesionButton.connect("clicked()", self.onNextLesion)
        self.ui.slicesTableView.connect("clicked(QModelIndex)", self.onTableRowClicked)
        self.ui.showPlotButton.connect("clicked()", self.onShowPlot)
        self.ui.editSegmentsButton.connect("clicked()", self.onEditSegments)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.exportSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self._updateExportWidgets())

        self.initializeParameterNode()
        self._updateModelWidgets()
        self._startDeviceDetection()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self._pollTimer.stop()
        self._deviceTimer.stop()
        if self.job is not None:
            self.logic.cancel(self.job)
            self.logic.cleanupJob(self.job)
            self.job = None
        if self._deviceProcess is not None:
            self._deviceProcess.close()
            self._deviceProcess = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.logic.cancel(self.job)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.navigator = None
        self.panel.set_has_results(False)
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._restoreManualWidgets()
            self._restoreResults()
        self._onParameterNodeModified()

    def _restoreManualWidgets(self):
        """Widgets bound by hand (no parameter-node connector): segment selector and checkpoint path."""
        p = self._parameterNode
        wasBlocked = self.ui.liverSegmentSelector.blockSignals(True)
        self.ui.liverSegmentSelector.setCurrentNode(p.liverSegmentation)
        if p.liverSegmentID:
            self.ui.liverSegmentSelector.setCurrentSegmentID(p.liverSegmentID)
        self.ui.liverSegmentSelector.blockSignals(wasBlocked)
        wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
        self.ui.modelPathLineEdit.currentPath = p.modelPath
        self.ui.modelPathLineEdit.blockSignals(wasBlocked)

    def _onParameterNodeModified(self, caller=None, event=None):
        self._updateLiverWidgets()
        self._updateModelWidgets()
        self._updateInputState()
        self._updateExportWidgets()

    # -- input state --------------------------------------------------------------------------
    def _inputProblem(self):
        """Why Classify cannot run yet ("" when it can)."""
        p = self._parameterNode
        if p is None or p.inputVolume is None:
            return "Select a CT volume first."
        if p.inputVolume.GetImageData() is None:
            return "The selected volume has no voxels."
        if p.useExistingLiver and (p.liverSegmentation is None or not p.liverSegmentID):
            return "Select the liver segment, or untick 'Use an existing liver segment' for automatic segmentation."
        if not p.useDemoModel and not (p.modelPath and os.path.isfile(p.modelPath)):
            return "Select a checkpoint file, or tick 'Shipped demo model'."
        return ""

    def _updateInputState(self):
        problem = self._inputProblem()
        self._applyView(self.panel.set_input(not problem, problem))

    def _updateLiverWidgets(self):
        enabled = bool(self._parameterNode and self._parameterNode.useExistingLiver) and not self.panel.running
        self.ui.liverSegmentSelector.enabled = enabled

    def _updateModelWidgets(self):
        p = self._parameterNode
        useDemo = p is None or p.useDemoModel
        self.ui.modelPathLineEdit.enabled = (not useDemo) and not self.panel.running
        if useDemo:
            weights = demoWeightsPath()
            self.ui.modelInfoLabel.text = (
                "Demo model (synthetic training data, not for diagnosis)." if weights else
                "The demo model file is missing from Resources/Models: the engine's default checkpoint is used."
            )
        else:
            self.ui.modelInfoLabel.text = "Your checkpoint; its model card (.json) must sit next to it."

    def onLiverSelectionChanged(self, *args):
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.liverSegmentation = self.ui.liverSegmentSelector.currentNode()
            self._parameterNode.liverSegmentID = self.ui.liverSegmentSelector.currentSegmentID() or ""

    def onModelPathChanged(self, path):
        if self._parameterNode is not None:
            self._parameterNode.modelPath = path or ""

    # -- the view -----------------------------------------------------------------------------
    def _applyView(self, view):
        """Copy a panel.ViewState onto the widgets."""
        self.ui.applyButton.text = view.apply_text
        self.ui.applyButton.enabled = view.apply_enabled
        self.ui.applyButton.toolTip = view.apply_tooltip
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton):
            widget.enabled = view.parameters_enabled
        self.ui.progressBar.setVisible(view.progress_visible)
        self.ui.progressBar.maximum = view.progress_maximum
        self.ui.progressBar.value = view.progress_value
        self.ui.progressBar.format = view.progress_text or "%p%"
        self.ui.statusLabel.text = view.status
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if view.status_is_error else "")
        hasLesions = bool(self.navigator and self.navigator.has_lesions)
        self.ui.previousLesionButton.enabled = view.results_enabled and hasLesions
        self.ui.nextLesionButton.enabled = view.results_enabled and hasLesions
        self.ui.showPlotButton.enabled = view.results_enabled
        self.ui.editSegmentsButton.enabled = view.results_enabled

    def _showWarnings(self, warnings):
        unique = []
        for w in warnings:
            # The engine reports liver-mask warnings live ("liver mask: ...") and again in its report.
            if w and not any(w == u or u.endswith(w) for u in unique):
                unique.append(w)
        self.ui.warningsLabel.text = "\n".join(f"Warning: {w}" for w in unique)
        self.ui.warningsLabel.setStyleSheet("color: #b9770e;")
        self.ui.warningsLabel.setVisible(bool(unique))

    # -- running ------------------------------------------------------------------------------
    def onApplyButton(self, checked=False):
        action = self.panel.on_apply_clicked()
        if action == "cancel":
            self._applyView(self.panel.request_cancel())
            self.logic.cancel(self.job)
            return
        if action != "start":
            return
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                self.logic.ensureDependencies(confirm=self._confirm)
        except RuntimeError as exc:
            slicer.util.errorDisplay("The classification cannot start yet.", detailedText=str(exc), windowTitle="DADRN Lesion")
            return
        if self.deviceInfo is None:
            self._startDeviceDetection()
        device, warning = lesionPanel.resolve_device(p.device, self.deviceInfo)
        try:
            with slicer.util.WaitCursor():
                self.job = self.logic.prepareJob(
                    p.inputVolume,
                    liverSegmentation=p.liverSegmentation if p.useExistingLiver else None,
                    liverSegmentID=p.liverSegmentID if p.useExistingLiver else None,
                    weights=None if p.useDemoModel else p.modelPath,
                    device=device,
                    batchSize=p.batchSize,
                    camThreshold=p.camThreshold,
                )
        except Exception as exc:  # noqa: BLE001  (show any preparation failure, keep the panel usable)
            logging.exception("DADRNLesion: preparing the inputs failed")
            slicer.util.errorDisplay(f"Could not prepare the inputs: {exc}", windowTitle="DADRN Lesion")
            return
        self._runWarnings = [warning] if warning else []
        self._showWarnings(self._runWarnings)
        self._startJob()

    def _startJob(self):
        try:
            self.logic.startJob(self.job)
        except OSError as exc:
            self.logic.cleanupJob(self.job)
            self.job = None
            slicer.util.errorDisplay(f"Could not start the engine ({exc}).", windowTitle="DADRN Lesion")
            return
        self._applyView(self.panel.start(self.job.batchSize, self.job.device))
        self._updateLiverWidgets()
        self._updateModelWidgets()
        self._pollTimer.start()

    def _onPoll(self):
        job = self.job
        if job is None or job.process is None:
            self._pollTimer.stop()
            return
        for event in job.process.poll():
            if event.kind == "log":
                logging.info(f"DADRNLesion engine: {event.message}")
            elif event.kind == "warning":
                self._runWarnings.append(event.message)
                self._showWarnings(self._runWarnings)
            elif event.kind == "exit":
                self._pollTimer.stop()
                self._onJobFinished()
                return
            else:
                self._applyView(self.panel.handle(event))

    def _onJobFinished(self):
        job = self.job
        decision = self.logic.decide(job)
        self._applyView(self.panel.finish(decision))
        self._updateLiverWidgets()
        self._updateModelWidgets()
        if decision.action == "retry":
            job.batchSize = decision.batch_size
            self._startJob()
            return
        if decision.action == "offer_cpu":
            if slicer.util.confirmYesNoDisplay(decision.message, windowTitle="DADRN Lesion"):
                job.device = "cpu"
                job.batchSize = 0
                self._startJob()
                return
            self._applyView(self.panel.show_status("The GPU ran out of memory. Choose the CPU, or close other programs that use the GPU.", error=True))
        elif decision.action == "load":
            try:
                with slicer.util.WaitCursor():
                    nodes = self.logic.loadResults(
                        job,
                        outputSegmentation=self._parameterNode.outputSegmentation,
                        heatmapThreshold=self._parameterNode.heatmapThreshold,
                        heatmapOpacity=self._parameterNode.heatmapOpacity,
                    )
                self._showResults(nodes)
                self._showWarnings(self._runWarnings + nodes.warnings)
            except Exception as exc:  # noqa: BLE001
                logging.exception("DADRNLesion: loading results failed")
                self._applyView(self.panel.show_status(f"Could not load the results: {exc}", error=True))
        elif decision.action == "fail":
            slicer.util.errorDisplay(decision.message, detailedText=job.process.stderr_tail(40), windowTitle="DADRN Lesion")
        self.logic.cleanupJob(job)
        self.job = None

    def _confirm(self, question):
        return slicer.util.confirmOkCancelDisplay(question, windowTitle="DADRN Lesion")

    # -- devices ------------------------------------------------------------------------------
    def _startDeviceDetection(self):
        if self._deviceProcess is not None:
            return  # already detecting
        if not self.logic.torchInstalled():
            self.ui.deviceInfoLabel.text = lesionPanel.device_summary(self.deviceInfo)
            return
        self.ui.deviceInfoLabel.text = "Detecting..."
        try:
            self._deviceProcess = self.logic.startDeviceDetection()
        except OSError as exc:
            self.ui.deviceInfoLabel.text = f"Could not run the engine: {exc}"
            return
        self._deviceTimer.start()

    def _onDevicePoll(self):
        process = self._deviceProcess
        if process is None:
            self._deviceTimer.stop()
            return
        for event in process.poll():
            if event.kind == "data" and "cuda" in event.data:
                self.deviceInfo = event.data
            elif event.kind == "exit":
                self._deviceTimer.stop()
                if self.deviceInfo is None:
                    tail = process.stderr_tail(3).splitlines()
                    self.ui.deviceInfoLabel.text = "Could not detect devices" + (f": {tail[-1]}" if tail else ".")
                else:
                    self.ui.deviceInfoLabel.text = lesionPanel.device_summary(self.deviceInfo)
                process.close()
                self._deviceProcess = None
                return

    # -- results ------------------------------------------------------------------------------
    def _showResults(self, nodes):
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.resultSegmentation = nodes.segmentation
            p.resultHeatmap = nodes.heatmap
            p.resultTable = nodes.table
            p.resultChart = nodes.chart
        self._restoreResults()
        if self.navigator and self.navigator.has_lesions:
            self.onNextLesion()

    def _restoreResults(self):
        p = self._parameterNode
        table = p.resultTable if p else None
        if table is None:
            self.navigator = None
            self.ui.slicesTableView.setMRMLTableNode(None)
            self.ui.summaryLabel.text = "No results yet."
            self._applyView(self.panel.set_has_results(False))
            return
        self.navigator = lesionPanel.LesionNavigator(lesionScene.slices_from_table(table))
        self.ui.slicesTableView.setMRMLTableNode(table)
        self.ui.summaryLabel.text = self.navigator.summary()
        self._applyView(self.panel.set_has_results(True))

    def _redSliceNode(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.sliceWidget("Red") is not None:
            return layoutManager.sliceWidget("Red").mrmlSliceNode()
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def _currentSlice(self):
        sliceNode = self._redSliceNode()
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if sliceNode is None or volume is None:
            return None
        return lesionScene.slice_index_at(volume, lesionScene.slice_view_centre(sliceNode))

    def jumpToSlice(self, k):
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        sliceNode = self._redSliceNode()
        if volume is None or sliceNode is None or k is None:
            return
        lesionScene.jump_slice_to(sliceNode, lesionScene.slice_ras(volume, k), align_to=volume)
        row = self.navigator.row_for_slice(k) if self.navigator else None
        if row is not None:
            self.ui.slicesTableView.selectRow(row)

    def onPreviousLesion(self):
        if self.navigator:
            self.jumpToSlice(self.navigator.previous_lesion(self._currentSlice()))

    def onNextLesion(self):
        if self.navigator:
            self.jumpToSlice(self.navigator.next_lesion(self._currentSlice()))

    def onTableRowClicked(self, index):
        k = None
        try:
            k = int(float(index.sibling(index.row(), 0).data()))  # column 0 is "slice", whatever the sort order
        except (TypeError, ValueError):
            k = self.navigator.slice_for_row(index.row()) if self.navigator else None
        if k is not None:
            volume = self._parameterNode.inputVolume
            sliceNode = self._redSliceNode()
            if volume is not None and sliceNode is not None:
                lesionScene.jump_slice_to(sliceNode, lesionScene.slice_ras(volume, k), align_to=volume)

    def onHeatmapOpacityChanged(self, value):
        lesionScene.set_foreground_opacity(slicer.mrmlScene, value)

    def onHeatmapThresholdChanged(self, value):
        heatmap = self._parameterNode.resultHeatmap if self._parameterNode else None
        if heatmap is not None:
            lesionScene.set_heatmap_threshold(heatmap, value)

    def onShowPlot(self):
        chart = self._parameterNode.resultChart if self._parameterNode else None
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onEditSegments(self):
        p = self._parameterNode
        if p is None or p.resultSegmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.resultSegmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(p.inputVolume)
        else:  # Slicer before 5.4
            editor.setMasterVolumeNode(p.inputVolume)

    # -- export -------------------------------------------------------------------------------
    def _updateExportWidgets(self):
        segmentation = self.ui.exportSegmentationSelector.currentNode()
        reference = self.logic.referenceVolume(segmentation, self._parameterNode.inputVolume if self._parameterNode else None) if segmentation else None
        fromDicom = self.logic.isFromDicom(reference)  # cheap: runs on every parameter change
        self.ui.exportDicomSegCheckBox.enabled = fromDicom
        if not fromDicom:
            self.ui.exportDicomSegCheckBox.checked = False
        self.ui.exportButton.enabled = segmentation is not None and reference is not None

    def onExport(self):
        segmentation = self.ui.exportSegmentationSelector.currentNode()
        reference = self.logic.referenceVolume(segmentation, self._parameterNode.inputVolume)
        formats = []
        if self.ui.exportSegNrrdCheckBox.checked:
            formats.append("seg.nrrd")
        if self.ui.exportNiftiCheckBox.checked:
            formats.append("nifti")
        if self.ui.exportDicomSegCheckBox.checked:
            formats.append("dicomseg")
        if not formats:
            slicer.util.warningDisplay("Tick at least one format.", windowTitle="DADRN Lesion")
            return
        folder = self.ui.exportDirectoryButton.directory
        try:
            with slicer.util.WaitCursor():
                paths = self.logic.exportSegmentation(segmentation, reference, folder, formats)
        except Exception as exc:  # noqa: BLE001
            logging.exception("DADRNLesion: export failed")
            slicer.util.errorDisplay(f"Export failed: {exc}", windowTitle="DADRN Lesion")
            return
        self._applyView(self.panel.show_status("Exported: " + ", ".join(os.path.basename(str(p)) for p in paths) + f" in {folder}"))


#
# Logic
#


class ClassificationJob:
    """One classification request: its temporary folder, inputs, engine settings and process."""

    def __init__(self, inputVolume, workDir, inputPath, liverPath, weights, device, batchSize, camThreshold):
        self.inputVolume = inputVolume
        self.workDir = workDir
        self.inputPath = inputPath
        self.liverPath = liverPath
        self.weights = weights
        self.device = device
        self.batchSize = int(batchSize or 0)
        self.camThreshold = camThreshold
        self.outDir = os.path.join(workDir, "out")
        self.process = None
        self.attempts = 0

    def command(self, python):
        return lesionRunner.classify_command(
            python,
            self.inputPath,
            self.outDir,
            liver_mask=self.liverPath,
            weights=self.weights,
            device=self.device,
            batch_size=self.batchSize or None,
            cam_threshold=self.camThreshold,
            overwrite=True,
        )


class DADRNLesionLogic(ScriptedLoadableModuleLogic):
    """Runs the engine and puts its results in the scene; usable without the widget:

        logic = DADRNLesionLogic()
        nodes = logic.process(volumeNode, device="cpu")
    """

    # One checker per Slicer session, so the user is asked at most once.
    _dependencyChecker = None

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DADRNLesionParameterNode(super().getParameterNode())

    # -- environment --------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable():
        return lesionRunner.python_executable()

    @staticmethod
    def engineEnvironment():
        try:
            base = slicer.util.startupEnvironment()
        except Exception:  # noqa: BLE001  (older Slicer)
            base = None
        return lesionRunner.engine_environment(MODULE_DIR, base)

    @staticmethod
    def torchInstalled():
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def dependencyChecker(self):
        if DADRNLesionLogic._dependencyChecker is None:
            DADRNLesionLogic._dependencyChecker = lesionDependencies.DependencyChecker(
                pip_install=_pipInstallWithConstraints,
                confirm=None,
                pytorch_utils=_importPyTorchUtils,
            )
        return DADRNLesionLogic._dependencyChecker

    def ensureDependencies(self, confirm=None):
        """Check torch and the engine's packages; ask (once) and install what is missing."""
        checker = self.dependencyChecker()
        checker.confirm = confirm
        return checker.ensure()

    def startDeviceDetection(self):
        return lesionRunner.EngineProcess(
            lesionRunner.devices_command(self.pythonExecutable()), env=self.engineEnvironment(), cwd=MODULE_DIR
        ).start()

    # -- a run --------------------------------------------------------------------------------
    def prepareJob(self, inputVolume, liverSegmentation=None, liverSegmentID=None, weights=None, device="auto", batchSize=0, camThreshold=0.5):
        """Save the input (and liver segment) to a temporary folder for the engine."""
        from DADRNLesionLib.io import write_volume

        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("select a CT volume with voxels")
        workDir = tempfile.mkdtemp(prefix="DADRNLesion-")
        try:
            volume = lesionScene.volume_from_node(inputVolume)
            inputPath = os.path.join(workDir, "input.nrrd")
            write_volume(volume, inputPath, compress=False)
            liverPath = None
            if liverSegmentation is not None and liverSegmentID:
                mask = lesionScene.segment_to_volume(liverSegmentation, liverSegmentID, inputVolume)
                if not mask.array.any():
                    raise ValueError("the liver segment is empty on this volume")
                liverPath = os.path.join(workDir, "liver.nrrd")
                write_volume(mask, liverPath)
            if not weights:
                weights = demoWeightsPath() or None
            return ClassificationJob(inputVolume, workDir, inputPath, liverPath, weights, device, batchSize, camThreshold)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def startJob(self, job):
        if job.process is not None:
            job.process.close()
        job.attempts += 1
        job.process = lesionRunner.EngineProcess(
            job.command(self.pythonExecutable()),
            env=self.engineEnvironment(),
            cwd=MODULE_DIR,
            stderr_path=os.path.join(job.workDir, f"engine-{job.attempts}.log"),
        )
        logging.info("DADRNLesion: " + " ".join(job.process.command))
        job.process.start()
        return job.process

    def decide(self, job):
        return lesionRunner.decide_after_exit(job.process.events, job.batchSize, job.device, job.process.stderr_tail())

    def cancel(self, job):
        """Stop the engine and everything it started; nothing is added to the scene."""
        if job is not None and job.process is not None:
            job.process.cancel()

    def cleanupJob(self, job):
        if job is None:
            return
        if job.process is not None:
            job.process.close()
        shutil.rmtree(job.workDir, ignore_errors=True)

    def loadResults(self, job, outputSegmentation=None, heatmapThreshold=0.2, heatmapOpacity=0.5):
        result = lesionScene.load_result_dir(job.outDir)
        nodes = lesionScene.add_results_to_scene(
            slicer.mrmlScene,
            result,
            job.inputVolume,
            segmentation_node=outputSegmentation,
            heatmap_display_threshold=heatmapThreshold,
            heatmap_opacity=heatmapOpacity,
        )
        return nodes

    def process(
        self,
        inputVolume,
        liverSegmentation=None,
        liverSegmentID=None,
        weights=None,
        device="auto",
        batchSize=0,
        camThreshold=0.5,
        outputSegmentation=None,
        allowCpuFallback=True,
        timeoutSeconds=None,
    ):
        """Classify `inputVolume` and add the result nodes to the scene (blocks, keeps the GUI alive)."""
        job = self.prepareJob(inputVolume, liverSegmentation, liverSegmentID, weights, device, batchSize, camThreshold)
        started = time.time()
        try:
            while True:
                self.startJob(job)
                while job.process.running:
                    job.process.poll()
                    slicer.app.processEvents()
                    if timeoutSeconds is not None and time.time() - started > timeoutSeconds:
                        job.process.cancel()
                    time.sleep(0.05)
                decision = self.decide(job)
                if decision.action == "retry":
                    job.batchSize = decision.batch_size
                    continue
                if decision.action == "offer_cpu" and allowCpuFallback:
                    job.device, job.batchSize = "cpu", 0
                    continue
                if decision.action == "load":
                    return self.loadResults(job, outputSegmentation)
                raise RuntimeError(decision.message + "\n" + job.process.stderr_tail(20))
        finally:
            self.cleanupJob(job)

    # -- export -------------------------------------------------------------------------------
    @staticmethod
    def referenceVolume(segmentationNode, fallback=None):
        """The volume a segmentation was made on (its reference geometry node), else `fallback`."""
        if segmentationNode is None:
            return fallback
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role)
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            return node
        return fallback

    @staticmethod
    def isFromDicom(volumeNode):
        return volumeNode is not None and bool((volumeNode.GetAttribute("DICOM.instanceUIDs") or "").strip())

    @staticmethod
    def dicomSourceFiles(volumeNode):
        """Files of the DICOM series `volumeNode` was loaded from ([] when it was not)."""
        if volumeNode is None:
            return []
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return []
        files = [database.fileForInstance(uid) for uid in uids]
        return [f for f in files if f and os.path.isfile(f)]

    def exportSegmentation(self, segmentationNode, referenceVolume, folder, formats=("seg.nrrd", "nifti", "dicomseg")):
        """Write the segmentation in the requested formats into `folder`; returns the paths."""
        os.makedirs(folder, exist_ok=True)
        base = _safeFileName(segmentationNode.GetName())
        paths = []
        if "seg.nrrd" in formats:
            paths.append(lesionExport.write_seg_nrrd(segmentationNode, os.path.join(folder, base + ".seg.nrrd")))
        labelmap = labels = None
        if "nifti" in formats or "dicomseg" in formats:
            labelmap, labels = lesionExport.labelmap_from_segmentation(segmentationNode, referenceVolume)
        if "nifti" in formats:
            paths.extend(lesionExport.write_nifti_labelmap(labelmap, labels, os.path.join(folder, base + ".nii.gz")))
        if "dicomseg" in formats:
            files = self.dicomSourceFiles(referenceVolume)
            if not files:
                raise ValueError("the CT volume was not loaded from DICOM, so a DICOM SEG cannot reference it")
            written = self._exportDicomSegWithSlicer(segmentationNode, folder)
            if not written:
                paths.append(lesionExport.write_dicom_seg(labelmap, labels, files, os.path.join(folder, base + ".dcm")))
            else:
                paths.extend(written)
        return paths

    @staticmethod
    def _exportDicomSegWithSlicer(segmentationNode, folder):
        """Slicer's own DICOM SEG exporter (QuantitativeReporting), if installed; [] otherwise."""
        try:
            import DICOMSegmentationPlugin
        except ImportError:
            return []
        try:
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
            exportables = exporter.examineForExport(shNode.GetItemByDataNode(segmentationNode))
            if not exportables:
                return []
            before = set(os.listdir(folder))
            for exportable in exportables:
                exportable.directory = folder
            error = exporter.export(exportables)
            if error:
                logging.warning(f"DADRNLesion: Slicer's DICOM SEG export failed ({error}); using highdicom")
                return []
            return [os.path.join(folder, name) for name in sorted(set(os.listdir(folder)) - before)]
        except Exception as exc:  # noqa: BLE001  (plugin API differences between versions)
            logging.warning(f"DADRNLesion: Slicer's DICOM SEG export failed ({exc}); using highdicom")
            return []


def _safeFileName(name):
    keep = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip()
    return keep.replace(" ", "_") or "lesions"


def _importPyTorchUtils():
    import PyTorchUtils

    return PyTorchUtils


def _pipInstallWithConstraints(specs, constraintsPath):
    """slicer.util.pip_install with a constraints file, on old and new Slicer versions."""
    try:
        slicer.util.pip_install(list(specs), constraints=constraintsPath)  # Slicer 5.11+
    except TypeError:
        slicer.util.pip_install(lesionDependencies.pip_arguments(specs, constraintsPath))


#
# Test (runs inside Slicer: Slicer --no-main-window --python-code "...", see docs/slicer.md)
#


class DADRNLesionTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleLoadsAndUiMatches()
        self.setUp()
        self.test_FullPathOnObliquePhantom()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    # -- helpers ------------------------------------------------------------------------------
    def _phantom(self):
        """Oblique synthetic arterial-phase CT: body, liver, an enhancing lesion; returns (volume node, liver Volume)."""
        import numpy as np

        from DADRNLesionLib.volume import Volume

        nk, nj, ni = 24, 96, 96
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        body = ((i - 48) / 44.0) ** 2 + ((j - 48) / 36.0) ** 2 <= 1.0
        liver = (((i - 34) / 22.0) ** 2 + ((j - 44) / 18.0) ** 2 + ((k - 12) / 10.0) ** 2) <= 1.0
        lesion = (((i - 30) / 5.0) ** 2 + ((j - 42) / 5.0) ** 2 + ((k - 12) / 3.0) ** 2) <= 1.0
        rng = np.random.default_rng(7)
        hu = np.full((nk, nj, ni), -1000.0)
        hu[body] = 40.0
        hu[liver] = 90.0
        hu[lesion] = 190.0
        hu += rng.normal(0.0, 8.0, hu.shape)
        angle = 0.25
        direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        ct = Volume(hu.astype(np.int16), (0.8, 0.9, 2.5), (-40.0, 25.0, -60.0), direction)
        node = lesionScene.volume_to_node(ct, slicer.mrmlScene, "Phantom CT")
        return node, ct.with_array(liver.astype(np.uint8))

    def _liverSegment(self, volumeNode, liverVolume):
        labelNode = lesionScene.volume_to_node(liverVolume, slicer.mrmlScene, "phantom liver", labelmap=True)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Phantom liver")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentation)
        slicer.mrmlScene.RemoveNode(labelNode)
        return segmentation, segmentation.GetSegmentation().GetNthSegmentID(0)

    # -- tests --------------------------------------------------------------------------------
    def test_ModuleLoadsAndUiMatches(self):
        self.delayDisplay("Module widget and .ui")
        widget = slicer.modules.dadrnlesion.widgetRepresentation().self()  # works without a main window
        for name in ("inputVolumeSelector", "applyButton", "progressBar", "statusLabel", "noteLabel", "slicesTableView"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.assertIn("not for diagnosis", widget.ui.noteLabel.text)
        self.assertEqual(widget.ui.applyButton.text, lesionPanel.APPLY_TEXT)

    def test_FullPathOnObliquePhantom(self):
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Classifying an oblique phantom (CPU)")
        logic = DADRNLesionLogic()
        logic.ensureDependencies(confirm=lambda question: True)
        volumeNode, liver = self._phantom()
        segmentation, segmentId = self._liverSegment(volumeNode, liver)
        nodes = logic.process(volumeNode, segmentation, segmentId, device="cpu", batchSize=4, timeoutSeconds=900)

        seg = nodes.segmentation
        self.assertEqual(seg.GetName(), "Phantom CT lesions")
        names = [seg.GetSegmentation().GetNthSegment(n).GetName() for n in range(seg.GetSegmentation().GetNumberOfSegments())]
        self.assertIn("Liver", names)
        liverSegment = seg.GetSegmentation().GetSegment("liver")
        self.assertIn("SCT^10200004^Liver", lesionScene.segment_tag(liverSegment, "TerminologyEntry"))
        reference = lesionScene.volume_from_node(volumeNode)
        heat = lesionScene.volume_from_node(nodes.heatmap)
        self.assertTrue(heat.same_geometry(reference))
        self.assertTrue(0.0 <= float(heat.array.min()) and float(heat.array.max()) <= 1.0)
        self.assertGreater(nodes.table.GetNumberOfRows(), 0)

        labelmap, labels = lesionExport.labelmap_from_segmentation(seg, volumeNode)
        self.assertTrue(labelmap.same_geometry(reference))
        folder = tempfile.mkdtemp(prefix="DADRNLesionTest-")
        try:
            paths = logic.exportSegmentation(seg, volumeNode, folder, ("seg.nrrd", "nifti"))
            nifti = [p for p in paths if str(p).endswith(".nii.gz")][0]
            image = sitk.ReadImage(str(nifti))
            self.assertTrue(np.array_equal(sitk.GetArrayFromImage(image), labelmap.array))
            loaded = slicer.util.loadSegmentation(str([p for p in paths if str(p).endswith(".seg.nrrd")][0]))
            again, _ = lesionExport.labelmap_from_segmentation(loaded, volumeNode)
            self.assertTrue(np.array_equal(again.array, labelmap.array))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

        # A second run makes new, numbered nodes and leaves the first segmentation alone.
        nodes2 = logic.process(volumeNode, segmentation, segmentId, device="cpu", batchSize=4, timeoutSeconds=900)
        self.assertEqual(nodes2.segmentation.GetName(), "Phantom CT lesions 2")
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(seg.GetID()))
        self.delayDisplay("Full path passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancel")
        logic = DADRNLesionLogic()
        volumeNode, liver = self._phantom()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.prepareJob(volumeNode, device="cpu", batchSize=1)
        process = logic.startJob(job)
        started = time.time()
        while process.running and time.time() - started < 1.0:
            process.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        pid = process.pid
        logic.cancel(job)
        process.wait(timeout=30)
        decision = logic.decide(job)
        self.assertIn(decision.action, ("cancelled", "load"))  # a very fast machine may finish first
        if decision.action == "cancelled":
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
            if os.name != "nt":
                with self.assertRaises(ProcessLookupError):
                    os.kill(pid, 0)
        workDir = job.workDir
        logic.cleanupJob(job)
        self.assertFalse(os.path.exists(workDir))
        self.delayDisplay("Cancel passed")
