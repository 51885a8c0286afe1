"""The extension's CMakeLists.txt lists exactly the module files that exist, and configures.

Engine files come and go; the CMake lists are written out explicitly (as Slicer extensions do),
and this test says exactly what is missing or extra. ``python Testing/test_cmake.py --update``
rewrites the two lists from the tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = ROOT / "CMakeLists.txt"
MODULE = ROOT / "DADRNLesion"
RESOURCES = ROOT / "Resources"
# Resource folders that ship inside the module; plus any terminology file anywhere in Resources/.
SHIPPED_RESOURCE_DIRS = ("UI", "Icons", "Models", "Terminology", "Terminologies")
SKIP_NAMES = {".gitignore", ".gitkeep", ".DS_Store", "Thumbs.db"}


def _tracked_or_untracked(paths: list[Path]) -> set[str] | None:
    """Files git would commit under `paths` (not ignored), relative to ROOT; None without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *[str(p.relative_to(ROOT)) for p in paths]],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode("utf-8")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {name for name in out.split("\0") if name}


def _keep(rel: str) -> bool:
    parts = Path(rel).parts
    return not (
        any(p == "__pycache__" or p.startswith(".") for p in parts)
        or parts[-1] in SKIP_NAMES
        or rel.endswith((".pyc", ".pyo", "~"))
    )


def expected_scripts() -> list[str]:
    """DADRNLesion.py and every .py of the engine, relative to DADRNLesion/."""
    found = {p.relative_to(MODULE).as_posix() for p in (MODULE / "DADRNLesionLib").rglob("*.py")}
    found.add("DADRNLesion.py")
    listed = _tracked_or_untracked([MODULE])
    if listed is not None:
        listed_rel = {Path(name).relative_to("DADRNLesion").as_posix() for name in listed if name.startswith("DADRNLesion/")}
        found &= listed_rel | {"DADRNLesion.py"}
    return sorted((s for s in found if _keep(s) and (MODULE / s).is_file()), key=_sort_key)


def expected_resources() -> list[str]:
    """Every shipped file under Resources/, relative to the top folder."""
    found = set()
    for sub in SHIPPED_RESOURCE_DIRS:
        folder = RESOURCES / sub
        if folder.is_dir():
            found |= {p.relative_to(ROOT).as_posix() for p in folder.rglob("*") if p.is_file()}
    found |= {p.relative_to(ROOT).as_posix() for p in RESOURCES.rglob("*.term.json") if p.is_file()}
    listed = _tracked_or_untracked([RESOURCES]) if RESOURCES.is_dir() else set()
    if listed is not None:
        found &= listed
    return sorted((r for r in found if _keep(r)), key=_sort_key)


def _sort_key(path: str):
    return (path.count("/"), path.lower())


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert match, f"CMakeLists.txt has no set({variable} ...)"
    body = re.sub(r"#[^\n]*", "", match.group(1))
    return body.split()


def _replace_list(text: str, variable: str, items: list[str]) -> str:
    block = f"set({variable}\n" + "".join(f"  {item}\n" for item in items) + "  )"
    new, n = re.subn(r"set\(\s*" + re.escape(variable) + r"\s+.*?\)", lambda m: block, text, count=1, flags=re.S)
    assert n == 1
    return new


def _diff(listed: list[str], expected: list[str]) -> str:
    missing = sorted(set(expected) - set(listed))
    extra = sorted(set(listed) - set(expected))
    duplicated = sorted({x for x in listed if listed.count(x) > 1})
    lines = []
    if missing:
        lines.append("missing from CMakeLists.txt: " + ", ".join(missing))
    if extra:
        lines.append("listed but not in the tree: " + ", ".join(extra))
    if duplicated:
        lines.append("listed twice: " + ", ".join(duplicated))
    if lines:
        lines.append("fix: python Testing/test_cmake.py --update")
    return "\n".join(lines)


def test_scripts_list_matches_tree():
    listed = _cmake_list(CMAKE.read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS")
    problem = _diff(listed, expected_scripts())
    assert not problem, problem


def test_resources_list_matches_tree():
    listed = _cmake_list(CMAKE.read_text(encoding="utf-8"), "MODULE_PYTHON_RESOURCES")
    problem = _diff(listed, expected_resources())
    assert not problem, problem
    assert "Resources/UI/DADRNLesion.ui" in listed
    assert "Resources/Icons/DADRNLesion.png" in listed


def test_extension_metadata():
    text = CMAKE.read_text(encoding="utf-8")
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        match = re.search(r"set\(\s*" + variable + r'\s+"([^"]+)"', text)
        assert match and match.group(1).strip(), f"{variable} is not set"
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"?PyTorch"?\s*\)', text)
    assert "EXTENSION_ICONURL" in text and "DADRNLesion.png" in re.search(r"EXTENSION_ICONURL\s+\"([^\"]+)\"", text).group(1)
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    assert "WITH_GENERIC_TESTS" in build and "NAME ${MODULE_NAME}" in build
    assert re.search(r"set\(\s*MODULE_NAME\s+DADRNLesion\s*\)", text)


def test_icons_are_128_pixel_images():
    from PIL import Image

    for path in (ROOT / "DADRNLesion.png", RESOURCES / "Icons" / "DADRNLesion.png"):
        with Image.open(path) as image:
            assert image.size == (128, 128), f"{path} is {image.size}"
            assert image.mode in ("RGBA", "RGB", "P")
            colours = image.convert("RGBA").getcolors(1 << 16)
            assert colours is None or len(colours) > 50, f"{path} looks blank"


# -- configure with a stand-in Slicer ----------------------------------------------------------
# Slicer itself is not here, so CMake runs against a tiny stand-in package that defines the
# macros the extension calls. The stand-in places files the way Slicer's macro does (scripts with
# absolute paths by their path relative to the binary folder, resources by their relative path)
# and checks every source exists, so the test proves the built layout the module expects.
_STUB_CONFIG = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
"""
_STUB_USE = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  set(_dest ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  foreach(_f ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${_f})
      set(_src ${_f})
      file(RELATIVE_PATH _rel ${CMAKE_CURRENT_BINARY_DIR} ${_f})
    else()
      set(_src ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
      set(_rel ${_f})
    endif()
    if(NOT EXISTS ${_src})
      message(FATAL_ERROR "nonexistent script ${_f}")
    endif()
    configure_file(${_src} ${_dest}/${_rel} COPYONLY)
  endforeach()
  foreach(_f ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
      message(FATAL_ERROR "nonexistent resource ${_f}")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${_f} ${_dest}/${_f} COPYONLY)
  endforeach()
  message(STATUS "module ${MY_NAME} generic-tests=${MY_WITH_GENERIC_TESTS}")
endmacro()
macro(slicer_add_python_unittest)
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_configures_into_the_layout_the_module_expects():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stub = tmp / "SlicerStub"
        stub.mkdir()
        (stub / "SlicerConfig.cmake").write_text(_STUB_CONFIG)
        (stub / "UseSlicer.cmake").write_text(_STUB_USE)
        (stub / "Empty.cmake").write_text("")
        build = tmp / "build"
        proc = subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "generic-tests=TRUE" in proc.stdout
        built = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
        assert (built / "DADRNLesion.py").is_file()
        assert (built / "DADRNLesionLib" / "__init__.py").is_file()
        assert (built / "Resources" / "UI" / "DADRNLesion.ui").is_file()
        assert (built / "Resources" / "Icons" / "DADRNLesion.png").is_file()
        for script in expected_scripts():
            assert (built / script).is_file(), script
        for resource in expected_resources():
            assert (built / resource).is_file(), resource


def update() -> None:
    text = CMAKE.read_text(encoding="utf-8")
    text = _replace_list(text, "MODULE_PYTHON_SCRIPTS", expected_scripts())
    text = _replace_list(text, "MODULE_PYTHON_RESOURCES", expected_resources())
    CMAKE.write_text(text, encoding="utf-8")
    print(f"updated {CMAKE}")


if __name__ == "__main__":
    if "--update" in sys.argv[1:]:
        update()
    else:
        print("MODULE_PYTHON_SCRIPTS:\n  " + "\n  ".join(expected_scripts()))
        print("MODULE_PYTHON_RESOURCES:\n  " + "\n  ".join(expected_resources()))
