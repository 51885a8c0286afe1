"""The Slicer glue without Slicer: .ui names and bindings, resource lookup, layering, dependencies.

DADRNLesion.py imports qt/ctk/slicer GUI and cannot be imported here, so it is read as source:
every ``.ui.<name>`` it uses must exist in the .ui; every ``SlicerParameterName`` must be a field of
the parameter node with a type the widget can hold; the resource lookup runs on both layouts.
"""

from __future__ import annotations

import ast
import sys
import importlib.util
import re
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from DADRNLesionLib import dependencies as D

ROOT = Path(__file__).resolve().parents[1]
MODULE_PY = ROOT / "DADRNLesion" / "DADRNLesion.py"
UI_FILE = ROOT / "Resources" / "UI" / "DADRNLesion.ui"
LIB = ROOT / "DADRNLesion" / "DADRNLesionLib"


def _source() -> str:
    return MODULE_PY.read_text(encoding="utf-8")


def _tree() -> ast.Module:
    return ast.parse(_source(), filename=str(MODULE_PY))


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _prop(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = list(prop)[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


# -- the .ui ------------------------------------------------------------------------------------
def test_every_ui_name_the_module_uses_exists():
    widgets = _ui_widgets()
    used = set()
    for node in ast.walk(_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            used.add(node.attr)
        # hasattr(widget.ui, "name") in the in-Slicer test
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) == 2:
            target, name = node.args
            if isinstance(target, ast.Attribute) and target.attr == "ui" and isinstance(name, ast.Constant):
                used.add(name.value)
    for loop in ast.walk(_tree()):  # names listed in a tuple that a loop passes to hasattr(..ui..)
        if isinstance(loop, ast.For) and isinstance(loop.iter, ast.Tuple) and "hasattr" in ast.unparse(loop.body[0]) and ".ui" in ast.unparse(loop.body[0]):
            used |= {elt.value for elt in loop.iter.elts if isinstance(elt, ast.Constant)}
    assert used, "found no .ui.<name> uses: the test is reading the wrong file"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in DADRNLesion.py but not in the .ui: {missing}"


def test_ui_is_well_formed_and_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widgets: {sorted(custom - declared)}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    # Every MRML widget gets the scene.
    connected = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    assert mrml <= connected, f"no scene for {sorted(mrml - connected)}"


def test_the_arterial_phase_and_demo_model_note_is_visible():
    widgets = _ui_widgets()
    text = _prop(widgets["noteLabel"], "text")
    assert "arterial" in text.lower() and "not for diagnosis" in text.lower()
    assert _prop(widgets["noteLabel"], "visible") is None  # not hidden
    assert "not for diagnosis" in _source()  # the module's help says it too


def test_panel_has_every_control_the_issue_names():
    widgets = _ui_widgets()
    for name, cls in {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "useExistingLiverCheckBox": "QCheckBox",
        "liverSegmentSelector": "qMRMLSegmentSelectorWidget",
        "useDemoModelCheckBox": "QCheckBox",
        "modelPathLineEdit": "ctkPathLineEdit",
        "deviceComboBox": "QComboBox",
        "deviceInfoLabel": "QLabel",
        "batchSizeSpinBox": "QSpinBox",
        "camThresholdSlider": "ctkSliderWidget",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "heatmapOpacitySlider": "ctkSliderWidget",
        "heatmapThresholdSlider": "ctkSliderWidget",
        "slicesTableView": "qMRMLTableView",
        "previousLesionButton": "QPushButton",
        "nextLesionButton": "QPushButton",
        "editSegmentsButton": "QPushButton",
        "exportButton": "QPushButton",
        "exportDicomSegCheckBox": "QCheckBox",
    }.items():
        assert name in widgets, name
        assert widgets[name].get("class") == cls, (name, widgets[name].get("class"))
    assert _prop(widgets["applyButton"], "text") == "Classify lesions"


# -- parameter node bindings --------------------------------------------------------------------
def _parameter_fields() -> dict[str, ast.AnnAssign]:
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ClassDef) and node.name == "DADRNLesionParameterNode":
            assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {stmt.target.id: stmt for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("no DADRNLesionParameterNode class")


_WIDGET_TYPES = {"QCheckBox": "bool", "QSpinBox": "int", "ctkSliderWidget": "float", "QComboBox": "str", "QLineEdit": "str"}


def _base_type(annotation: ast.expr) -> str:
    text = ast.unparse(annotation)
    match = re.match(r"Annotated\[(\w+),", text)
    return match.group(1) if match else text


def test_every_bound_widget_matches_a_typed_parameter():
    fields = _parameter_fields()
    bound = {name: w for name, w in _ui_widgets().items() if _prop(w, "SlicerParameterName")}
    assert len(bound) >= 10
    seen = set()
    for widget_name, widget in bound.items():
        parameter = _prop(widget, "SlicerParameterName")
        assert parameter in fields, f"{widget_name} is bound to unknown parameter {parameter!r}"
        assert parameter not in seen, f"two widgets bound to {parameter}"
        seen.add(parameter)
        cls = widget.get("class")
        field = fields[parameter]
        base = _base_type(field.annotation)
        if cls == "qMRMLNodeComboBox":
            assert base in _prop(widget, "nodeTypes"), f"{widget_name}: {base} not in nodeTypes"
            continue
        assert _WIDGET_TYPES[cls] == base, f"{widget_name} ({cls}) bound to a {base} parameter"
        text = ast.unparse(field.annotation)
        if cls == "QComboBox":
            choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", text).group(1))
            items = [i.find("property/string").text for i in widget.findall("item")]
            assert items == choices
        bounds = re.search(r"WithinRange\(([-\d.]+), ([-\d.]+)\)", text)
        if bounds and cls in ("QSpinBox", "ctkSliderWidget"):
            lo, hi = float(bounds.group(1)), float(bounds.group(2))
            assert float(_prop(widget, "minimum")) == lo and float(_prop(widget, "maximum")) == hi, widget_name
            default = float(ast.literal_eval(field.value))
            assert lo <= default <= hi


def test_hand_bound_parameters_are_written_by_the_widget():
    """Fields without a connector (segment selector, checkpoint path) are set in code."""
    source = _source()
    for field in ("liverSegmentation", "liverSegmentID", "modelPath", "resultSegmentation", "resultHeatmap", "resultTable", "resultChart"):
        assert re.search(rf"\.{field} = ", source), field


# -- structure and layering ---------------------------------------------------------------------
def test_module_defines_the_scripted_module_classes():
    names = {n.name for n in _tree().body if isinstance(n, ast.ClassDef)}
    assert {"DADRNLesion", "DADRNLesionWidget", "DADRNLesionLogic", "DADRNLesionTest", "DADRNLesionParameterNode"} <= names
    compile(_source(), str(MODULE_PY), "exec")


def test_engine_has_no_gui_imports_and_scene_code_no_application_state():
    for path in LIB.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in ("qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule"), f"{path.name} imports {name}"
    for name in ("scene.py", "export.py", "runner.py", "panel.py", "dependencies.py"):
        tree = ast.parse((LIB / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("app", "mrmlScene", "util", "modules"), f"{name} uses slicer.{node.attr}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("slicer.") for n in names), f"{name} imports {names}"


def test_engine_runs_in_a_separate_process_polled_by_a_timer():
    source = _source()
    assert "qt.QTimer()" in source and "_pollTimer" in source
    assert "DADRNLesionLib.cli" in (LIB / "runner.py").read_text(encoding="utf-8")
    tree = _tree()
    # No blocking waits in the widget: its methods never call wait()/communicate() on the process.
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "DADRNLesionWidget":
            body = ast.unparse(node)
            assert ".communicate(" not in body and ".wait(" not in body and "time.sleep" not in body


def _resource_dir_function(module_dir: Path, loaded_module_path: str | None = None):
    """DADRNLesion.resourceDir, compiled from the source with a stand-in `slicer` namespace."""
    tree = _tree()
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "resourceDir")
    code = compile(ast.Module(body=[func], type_ignores=[]), str(MODULE_PY), "exec")
    modules = types.SimpleNamespace(dadrnlesion=types.SimpleNamespace(path=loaded_module_path)) if loaded_module_path else None
    namespace = {"os": __import__("os"), "MODULE_DIR": str(module_dir), "slicer": types.SimpleNamespace(modules=modules)}
    exec(code, namespace)  # noqa: S102  (our own file)
    return namespace["resourceDir"]


def test_resources_are_found_in_the_source_tree_and_in_the_built_layout(tmp_path):
    # Source tree: "Additional module paths" points at DADRNLesion/, Resources/ is one level up.
    assert Path(_resource_dir_function(ROOT / "DADRNLesion")()) == ROOT / "Resources"
    # Built extension: qt-scripted-modules/{DADRNLesion.py, DADRNLesionLib/, Resources/}.
    built = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    (built / "Resources" / "UI").mkdir(parents=True)
    (built / "Resources" / "UI" / "DADRNLesion.ui").write_text("<ui/>")
    assert Path(_resource_dir_function(built)()) == built / "Resources"
    # A copy imported from elsewhere (ctest's build folder) finds the loaded module's resources.
    elsewhere = tmp_path / "build"
    elsewhere.mkdir()
    assert Path(_resource_dir_function(elsewhere, str(built / "DADRNLesion.py"))()) == built / "Resources"


def test_module_puts_its_own_folder_on_sys_path_before_importing_the_engine():
    source = _source()
    insert = source.index("sys.path.insert(0, MODULE_DIR)")
    first_engine_import = source.index("from DADRNLesionLib import")
    assert insert < first_engine_import
    assert "os.path.dirname(os.path.abspath(__file__))" in source


def test_module_test_is_documented():
    doc = (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8")
    assert "--no-main-window" in doc and ("DADRNLesionTest" in doc or "runUnitTest" in doc)


# -- dependencies -------------------------------------------------------------------------------
class Recorder:
    """Stands in for slicer.util.pip_install (no network here) and records what it was asked."""

    def __init__(self, after=None):
        self.calls = []
        self.after = after

    def __call__(self, specs, constraints_path):
        self.calls.append((list(specs), Path(constraints_path).read_text()))
        if self.after:
            self.after()


def test_installed_packages_are_found_with_real_metadata():
    checker = D.DependencyChecker()
    result = checker.check()
    assert not result.missing  # scipy and safetensors are installed in the test environment
    assert result.torch_version is not None


def test_missing_package_is_installed_with_slicers_packages_pinned():
    requirement = D.Requirement("dadrn-no-such-package", "1.0", module="dadrn_no_such_package")
    questions = []
    pip = Recorder()
    checker = D.DependencyChecker(pip_install=pip, confirm=lambda q: questions.append(q) or True,
                                  required=[requirement, D.Requirement("scipy", "1.10")], optional=[])
    with pytest.raises(RuntimeError, match="still missing"):  # the recorder installs nothing
        checker.ensure()
    assert len(questions) == 1 and "dadrn-no-such-package>=1.0" in questions[0] and "numpy, SimpleITK and VTK" in questions[0]
    specs, constraints = pip.calls[0]
    assert specs == ["dadrn-no-such-package>=1.0"]  # scipy is already there
    import numpy
    import SimpleITK

    assert f"numpy=={D.installed_version('numpy')}" in constraints and D.installed_version("numpy") == numpy.__version__
    assert f"SimpleITK=={D.installed_version('SimpleITK')}" in constraints and SimpleITK.Version_VersionString()
    # Asked once: a second attempt installs again without asking.
    with pytest.raises(RuntimeError):
        checker.ensure()
    assert len(questions) == 1 and len(pip.calls) == 2


def test_declining_explains_offline_installation_and_is_remembered():
    requirement = D.Requirement("dadrn-no-such-package", "1.0", module="dadrn_no_such_package")
    asked = []
    checker = D.DependencyChecker(pip_install=Recorder(), confirm=lambda q: asked.append(q) and False, required=[requirement], optional=[])
    for _ in range(2):
        with pytest.raises(RuntimeError) as info:
            checker.ensure()
        assert "--no-index --find-links" in str(info.value) and "dadrn-no-such-package" in str(info.value)
    assert len(asked) == 1


def test_pip_failure_says_what_to_do_offline():
    def offline(specs, path):
        raise OSError("Could not connect to pypi.org")

    requirement = D.Requirement("dadrn-no-such-package", module="dadrn_no_such_package")
    checker = D.DependencyChecker(pip_install=offline, confirm=lambda q: True, required=[requirement], optional=[])
    with pytest.raises(RuntimeError) as info:
        checker.ensure()
    assert "Could not connect" in str(info.value) and "pip download" in str(info.value)


def test_a_replaced_slicer_package_is_reported():
    versions = {"numpy": "1.26.4", "SimpleITK": "2.3.1", "vtk": None, "scipy": None}

    def version_of(name):
        return versions.get(name)

    def pip(specs, path):
        assert "numpy==1.26.4" in Path(path).read_text() and "vtk" not in Path(path).read_text()
        versions["numpy"] = "2.1.0"  # what a careless install would do
        versions["scipy"] = "1.14.0"

    checker = D.DependencyChecker(pip_install=pip, confirm=lambda q: True, version_of=version_of,
                                  find_spec=lambda name: object() if name == "torch" or versions.get(name) else None,
                                  required=[D.Requirement("scipy", "1.10")], optional=[])
    versions["torch"] = "2.4.0"
    with pytest.raises(RuntimeError, match=r"numpy 1.26.4 -> 2.1.0"):
        checker.ensure()


def test_torch_comes_from_the_pytorch_extension():
    state = {"torch": None}

    class Logic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            assert askConfirmation is False and torchVersionRequirement == D.TORCH_REQUIREMENT
            state["torch"] = "2.5.1"
            return object()

    pytorch_utils = types.SimpleNamespace(PyTorchUtilsLogic=Logic)
    checker = D.DependencyChecker(
        pip_install=Recorder(), confirm=lambda q: "PyTorch" in q,
        pytorch_utils=lambda: pytorch_utils,
        find_spec=lambda name: object() if name != "torch" or state["torch"] else None,
        version_of=lambda name: state["torch"] if name == "torch" else "1.0",
        required=[], optional=[],
    )
    result = checker.ensure()
    assert result.ok and result.torch_version == "2.5.1"


def test_missing_pytorch_extension_is_explained():
    def no_extension():
        raise ImportError("No module named PyTorchUtils")

    checker = D.DependencyChecker(pip_install=Recorder(), confirm=lambda q: True, pytorch_utils=no_extension,
                                  find_spec=lambda name: None if name == "torch" else object(),
                                  version_of=lambda name: "9.9", required=[], optional=[])
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        checker.ensure()


def test_old_torch_is_too_old():
    checker = D.DependencyChecker(find_spec=lambda name: object(), version_of=lambda name: "1.13.1")
    version, reason = checker.torch_version()
    assert version is None and "too old" in reason


def test_engine_requirements_never_pull_unpinnable_slicer_packages():
    from importlib import metadata

    for requirement in (*D.REQUIRED, *D.OPTIONAL):
        try:
            requires = metadata.requires(requirement.distribution) or []
        except metadata.PackageNotFoundError:
            pytest.skip(f"{requirement.distribution} is not installed here")
        hard = [r for r in requires if "extra ==" not in r]
        names = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in hard}
        assert not names & {"vtk", "simpleitk"}, f"{requirement.distribution} depends on {names}"


def test_version_comparison():
    assert D.version_satisfies("2.3.1+cu121", "2.1")
    assert not D.version_satisfies("2.0.9", "2.1")
    assert D.version_satisfies("1.10.0", "1.10") and D.version_satisfies("anything", "")
    assert not D.version_satisfies(None, "1.0")


def test_pip_arguments_for_older_slicer():
    assert D.pip_arguments(["scipy>=1.10"], "/tmp/c.txt") == ["scipy>=1.10", "--constraint", "/tmp/c.txt"]


def test_the_glue_installs_through_the_checker_with_constraints():
    source = _source()
    assert "constraints=constraintsPath" in source and "PyTorchUtils" in source
    assert importlib.util.find_spec("DADRNLesionLib.dependencies") is not None


# -- the Logic class, run for real with stand-ins for the GUI layer -----------------------------
# DADRNLesion.py imports qt, ctk and Slicer's scripted-module base classes, which exist only inside
# the application. Replacing just those (and slicer.app / slicer.mrmlScene) with minimal stand-ins
# lets the module's Logic run here for real: it writes the input, starts the engine process, polls
# it, loads the results into a real MRML scene, exports, and cancels. The Widget needs Qt widgets
# and is exercised by the in-Slicer test only.
def _gui_stand_ins():
    qt = types.ModuleType("qt")
    qt.QIcon = lambda *args: None
    ctk = types.ModuleType("ctk")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    return {"qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw}


@pytest.fixture()
def glue(monkeypatch):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    for name, module in _gui_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("DADRNLesion_glue_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)
    yield module, scene
    colors.SetMRMLScene(None)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    from DADRNLesionLib.preprocess import InputSpec
    from DADRNLesionLib.weights import ModelCard, random_model, save_checkpoint

    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=5)
    card = ModelCard("glue-test", loaded.model.config, InputSpec(size=64), intended_use="tests")
    return str(save_checkpoint(loaded.model, tmp_path_factory.mktemp("w") / "tiny.safetensors", card))


def _phantom_ct():
    import numpy as np

    from DADRNLesionLib.volume import Volume

    rng = np.random.default_rng(1)
    shape = (6, 56, 60)
    k, j, i = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    body = ((i - 30) / 28.0) ** 2 + ((j - 28) / 24.0) ** 2 <= 1.0
    liver = (((i - 24) / 16.0) ** 2 + ((j - 26) / 13.0) ** 2 <= 1.0) & (k >= 1) & (k <= 4)
    hu = np.where(liver, 95, np.where(body, 30, -1000)) + rng.normal(0, 5, shape)
    a = -0.3
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    ct = Volume(hu.astype(np.int16), (1.1, 1.25, 2.5), (-20.0, 14.0, 300.0), direction)
    return ct, ct.with_array(liver.astype(np.uint8))


@pytest.mark.slow
def test_logic_runs_the_engine_loads_results_and_exports(glue, tiny_checkpoint, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from DADRNLesionLib import export as E
    from DADRNLesionLib import scene as S

    module, scene = glue
    import slicer

    ct, liver = _phantom_ct()
    ct_node = S.volume_to_node(ct, scene, "Glue CT")
    liver_seg = S.build_segmentation(scene, liver, "my liver", reference_node=ct_node, liver=liver)
    logic = module.DADRNLesionLogic()
    before = scene.GetNumberOfNodes()

    nodes = logic.process(ct_node, liver_seg, "liver", weights=tiny_checkpoint, device="cpu", batchSize=2)
    assert nodes.segmentation.GetName() == "Glue CT lesions"
    assert scene.GetNumberOfNodes() > before
    assert np.array_equal(S.segment_to_volume(nodes.segmentation, "liver", ct_node).array, liver.array)
    assert S.volume_from_node(nodes.heatmap).same_geometry(ct, tol=1e-4)
    assert nodes.table.GetNumberOfRows() == int(liver.array.any(axis=(1, 2)).sum())
    assert module.DADRNLesionLogic.referenceVolume(nodes.segmentation) is ct_node

    # Export through the glue, DICOM SEG included (the CT "came from DICOM").
    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import write_ct_series

    files = write_ct_series(ct, tmp_path / "dicom")
    import pydicom

    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    ct_node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    by_uid = dict(zip(uids, map(str, files)))
    slicer.dicomDatabase = types.SimpleNamespace(fileForInstance=by_uid.get)
    try:
        assert module.DADRNLesionLogic.dicomSourceFiles(ct_node) == [str(f) for f in files]
        paths = logic.exportSegmentation(nodes.segmentation, ct_node, str(tmp_path / "export"))
    finally:
        del slicer.dicomDatabase
    names = sorted(Path(p).name for p in paths)
    assert names == ["Glue_CT_lesions.csv", "Glue_CT_lesions.dcm", "Glue_CT_lesions.nii.gz", "Glue_CT_lesions.seg.nrrd"]
    expected, _ = E.labelmap_from_segmentation(nodes.segmentation, ct_node)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "export" / "Glue_CT_lesions.nii.gz")))
    assert np.array_equal(nifti, expected.array)
    assert np.array_equal(E.read_dicom_seg(tmp_path / "export" / "Glue_CT_lesions.dcm", ct, files).array, expected.array)


def test_logic_runs_the_engine_in_bfloat16_for_the_cpu_bf16_device(glue, tiny_checkpoint):
    import json

    from DADRNLesionLib import scene as S
    from DADRNLesionLib.precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")

    module, scene = glue
    ct, liver = _phantom_ct()
    ct_node = S.volume_to_node(ct, scene, "Glue CT")
    liver_seg = S.build_segmentation(scene, liver, "my liver", reference_node=ct_node, liver=liver)
    logic = module.DADRNLesionLogic()
    job = logic.prepareJob(ct_node, liver_seg, "liver", weights=tiny_checkpoint, device="cpu-bf16", batchSize=2)
    try:
        process = logic.startJob(job)
        assert "--cpu-bf16" in process.command and process.command[process.command.index("--device") + 1] == "cpu"
        process.wait(timeout=300)
        assert logic.decide(job).action == "load", process.stderr_tail()
        report = json.loads((Path(job.outDir) / "report.json").read_text())
        assert report["device"]["name"] == "cpu" and report["device"]["amp"] == "bfloat16"
    finally:
        logic.cleanupJob(job)


def test_logic_cancel_leaves_the_scene_and_removes_its_files(glue):
    module, scene = glue
    from DADRNLesionLib import scene as S

    ct, _ = _phantom_ct()
    ct_node = S.volume_to_node(ct, scene, "Glue CT")
    logic = module.DADRNLesionLogic()
    before = scene.GetNumberOfNodes()
    job = logic.prepareJob(ct_node, device="cpu", batchSize=1)
    assert Path(job.inputPath).is_file() and job.liverPath is None
    process = logic.startJob(job)
    assert process.command[1:5] == ["-u", "-m", "DADRNLesionLib.cli", "classify"] and "--device" in process.command
    logic.cancel(job)
    process.wait(timeout=60)
    assert logic.decide(job).action == "cancelled"
    assert scene.GetNumberOfNodes() == before
    work = job.workDir
    logic.cleanupJob(job)
    assert not Path(work).exists()


def test_logic_refuses_an_empty_liver_segment(glue):
    import numpy as np

    module, scene = glue
    from DADRNLesionLib import scene as S

    ct, liver = _phantom_ct()
    ct_node = S.volume_to_node(ct, scene, "Glue CT")
    seg = S.build_segmentation(scene, liver, "liver", reference_node=ct_node, liver=liver)
    empty = S.build_segmentation(scene, liver.with_array(np.zeros_like(liver.array)), "nothing")
    seg.GetSegmentation().AddEmptySegment("empty")
    with pytest.raises(ValueError, match="empty"):
        module.DADRNLesionLogic().prepareJob(ct_node, seg, "empty")
    assert empty.GetSegmentation().GetNumberOfSegments() == 0
