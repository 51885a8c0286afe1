"""Which Python packages the engine still needs inside Slicer, and how to install them safely.

Plain Python: the Slicer widget supplies the three things that need the application (a yes/no
question, ``slicer.util.pip_install`` and the PyTorch extension's ``PyTorchUtils``), so the rules
here are testable anywhere.

Rules: ask once per session; install with a constraints file that pins Slicer's own numpy,
SimpleITK and vtk, so pip can never replace them; check afterwards that they were not replaced;
when the package index cannot be reached, say exactly what to do offline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

__all__ = [
    "Requirement",
    "REQUIRED",
    "OPTIONAL",
    "PROTECTED",
    "TORCH_REQUIREMENT",
    "DependencyChecker",
    "installed_version",
    "version_satisfies",
    "constraints_text",
    "offline_instructions",
]


@dataclass(frozen=True)
class Requirement:
    distribution: str  # name on PyPI
    minimum: str = ""  # lowest version that works, "" for any
    module: str = ""  # import name, if it differs from the distribution name

    @property
    def import_name(self) -> str:
        return self.module or self.distribution

    @property
    def spec(self) -> str:
        return f"{self.distribution}>={self.minimum}" if self.minimum else self.distribution


# What the engine imports beyond what Slicer ships (numpy and SimpleITK come with Slicer; scipy
# does too in recent releases, but is checked because the engine needs it).
REQUIRED: tuple[Requirement, ...] = (
    Requirement("safetensors", "0.4"),
    Requirement("scipy", "1.10"),
)
OPTIONAL: tuple[Requirement, ...] = (Requirement("tqdm", "4.60"),)
# Slicer's own builds: pip must never upgrade, downgrade or reinstall these.
PROTECTED: tuple[str, ...] = ("numpy", "SimpleITK", "vtk")
TORCH_REQUIREMENT = ">=2.1"


def installed_version(distribution: str) -> Optional[str]:
    try:
        from importlib import metadata  # noqa: PLC0415

        return metadata.version(distribution)
    except Exception:  # noqa: BLE001  (PackageNotFoundError, broken metadata)
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+-]", version):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def version_satisfies(version: Optional[str], minimum: str) -> bool:
    """True when `version` is at least `minimum` (numeric release parts only; "" accepts anything)."""
    if not minimum:
        return True
    if version is None:
        return False
    try:
        from packaging.version import Version  # noqa: PLC0415

        return Version(version) >= Version(minimum)
    except Exception:  # noqa: BLE001  (packaging absent or a non-PEP 440 version string)
        have, want = _version_tuple(version), _version_tuple(minimum)
        width = max(len(have), len(want))
        return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


def constraints_text(version_of: Callable[[str], Optional[str]] = installed_version, protected: Sequence[str] = PROTECTED) -> str:
    """A pip constraints file pinning every protected package that pip can see to its version.

    With numpy pinned, pip picks a scipy that works with Slicer's numpy (or fails) instead of
    replacing numpy. A package Slicer built without pip metadata (VTK, sometimes SimpleITK)
    cannot be pinned; none of the engine's requirements depends on those (checked in the tests).
    """
    lines = ["# Slicer's own packages: never let pip replace them."]
    for name in protected:
        version = version_of(name)
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def offline_instructions(specs: Sequence[str], need_torch: bool = False) -> str:
    """What to do when Slicer cannot reach the package index."""
    pkgs = " ".join(specs) if specs else "safetensors scipy"
    text = [
        "Slicer could not download the Python packages this module needs.",
        "If this computer is offline or behind a proxy:",
        f"  1. On a computer with internet access and the same operating system, run: "
        f"python -m pip download {pkgs} --only-binary=:all: --python-version <Slicer's Python version, e.g. 3.12> -d dadrn-wheels",
        "  2. Copy the dadrn-wheels folder to this computer.",
        f"  3. In Slicer's Python console run: slicer.util.pip_install('--no-index --find-links /path/to/dadrn-wheels {pkgs}')",
        "  4. Restart Slicer.",
        "Behind a proxy, setting the HTTPS_PROXY environment variable before starting Slicer is usually enough.",
    ]
    if need_torch:
        text.append(
            "PyTorch: install the 'PyTorch' extension from the Extensions Manager; offline, download a torch wheel "
            "for Slicer's Python version the same way and install it with the command of step 3."
        )
    return "\n".join(text)


@dataclass
class CheckResult:
    missing: list[Requirement] = field(default_factory=list)
    missing_optional: list[Requirement] = field(default_factory=list)
    torch_version: Optional[str] = None
    torch_error: str = ""  # why torch is unavailable, "" when it is

    @property
    def ok(self) -> bool:
        return not self.missing and self.torch_version is not None


class DependencyChecker:
    """Checks and (after one question) installs what the engine needs.

    Parameters are the application's services:
      find_spec(name) -> spec or None; version_of(distribution) -> str or None;
      pip_install(requirements: list[str], constraints_path: str) -> None (raises on failure);
      confirm(question: str) -> bool; pytorch_utils() -> the PyTorchUtils module, or raises ImportError.
    """

    def __init__(
        self,
        pip_install: Optional[Callable[[list[str], str], None]] = None,
        confirm: Optional[Callable[[str], bool]] = None,
        pytorch_utils: Optional[Callable[[], object]] = None,
        find_spec: Callable[[str], object] = importlib.util.find_spec,
        version_of: Callable[[str], Optional[str]] = installed_version,
        required: Sequence[Requirement] = REQUIRED,
        optional: Sequence[Requirement] = OPTIONAL,
    ):
        self.pip_install = pip_install
        self.confirm = confirm
        self.pytorch_utils = pytorch_utils
        self.find_spec = find_spec
        self.version_of = version_of
        self.required = tuple(required)
        self.optional = tuple(optional)
        self.asked = False
        self.declined = False

    # -- checks --------------------------------------------------------------------------------
    def _missing(self, requirements: Sequence[Requirement]) -> list[Requirement]:
        out = []
        for req in requirements:
            try:
                found = self.find_spec(req.import_name) is not None
            except (ImportError, ValueError):
                found = False
            if not found or not version_satisfies(self.version_of(req.distribution), req.minimum):
                out.append(req)
        return out

    def torch_version(self) -> tuple[Optional[str], str]:
        """(installed torch version or None, reason when None). Does not import torch."""
        try:
            found = self.find_spec("torch") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return None, "PyTorch is not installed."
        version = self.version_of("torch")
        if version is None:
            return None, "PyTorch is installed but its package metadata is missing (a broken install?)."
        wanted = TORCH_REQUIREMENT.lstrip(">=")
        if not version_satisfies(version, wanted):
            return None, f"PyTorch {version} is too old; {TORCH_REQUIREMENT} is needed."
        return version, ""

    def check(self) -> CheckResult:
        torch_version, reason = self.torch_version()
        return CheckResult(self._missing(self.required), self._missing(self.optional), torch_version, reason)

    def protected_versions(self) -> dict[str, Optional[str]]:
        return {name: self.version_of(name) for name in PROTECTED}

    # -- installing ----------------------------------------------------------------------------
    def question(self, result: CheckResult) -> str:
        parts = []
        if result.torch_version is None:
            parts.append(f"PyTorch ({result.torch_error.rstrip('.')}; installed through the PyTorch extension)")
        if result.missing:
            parts.append("Python packages: " + ", ".join(r.spec for r in result.missing))
        if result.missing_optional:
            parts.append("optional: " + ", ".join(r.spec for r in result.missing_optional))
        return (
            "Liver lesion classification needs to install:\n  - "
            + "\n  - ".join(parts)
            + "\n\nThis downloads packages from the internet and may take a few minutes (PyTorch is large). "
            "Slicer's own numpy, SimpleITK and VTK are kept as they are. Install now?"
        )

    def ensure(self) -> CheckResult:
        """Check; if something is missing ask once, then install. Returns the final check.

        Raises RuntimeError with a readable message (including offline instructions) on failure
        or when the user declined.
        """
        result = self.check()
        if result.ok and not result.missing_optional:
            return result
        if result.ok and self.asked:
            return result  # only optional packages missing and the user was already asked
        if self.declined:
            raise RuntimeError(self._declined_message(result))
        if not self.asked:
            self.asked = True
            if self.confirm is not None and not self.confirm(self.question(result)):
                self.declined = True
                if result.ok:
                    return result
                raise RuntimeError(self._declined_message(result))
        if result.torch_version is None:
            self._install_torch()
        to_install = [r.spec for r in (*result.missing, *result.missing_optional)]
        if to_install:
            self._pip(to_install)
        final = self.check()
        if not final.ok:
            raise RuntimeError(
                "Some packages are still missing after installation: "
                + ", ".join([r.spec for r in final.missing] + (["torch"] if final.torch_version is None else []))
                + ". Restart Slicer and try again.\n\n"
                + offline_instructions([r.spec for r in final.missing], final.torch_version is None)
            )
        return final

    def _declined_message(self, result: CheckResult) -> str:
        specs = [r.spec for r in result.missing]
        return (
            "The classification cannot run until these are installed: "
            + ", ".join(specs + (["PyTorch"] if result.torch_version is None else []))
            + ". Click Classify lesions again after restarting Slicer to be asked again, or install them yourself:\n\n"
            + offline_instructions(specs, result.torch_version is None)
        )

    def _install_torch(self) -> None:
        if self.pytorch_utils is None:
            raise RuntimeError("PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, and try again.")
        try:
            module = self.pytorch_utils()
        except ImportError:
            raise RuntimeError(
                "PyTorch is not installed and the 'PyTorch' extension (PyTorchUtils) is missing. Install the PyTorch "
                "extension from the Extensions Manager, restart Slicer, and try again."
            ) from None
        logic = module.PyTorchUtilsLogic()
        try:
            torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        except TypeError:  # older PyTorchUtils without the version argument
            torch = logic.installTorch(askConfirmation=False)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"Installing PyTorch failed: {exc}\n\n" + offline_instructions([], True)) from None
        if torch is None:
            raise RuntimeError("PyTorch was not installed.\n\n" + offline_instructions([], True))

    def _pip(self, specs: list[str]) -> None:
        if self.pip_install is None:
            raise RuntimeError("Cannot install packages here; install them yourself: " + " ".join(specs))
        before = self.protected_versions()
        fd, constraints_path = tempfile.mkstemp(prefix="dadrn-constraints-", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(constraints_text(self.version_of))
            try:
                self.pip_install(specs, constraints_path)
            except Exception as exc:  # noqa: BLE001  (pip failures surface as CalledProcessError etc.)
                raise RuntimeError(f"Installing {' '.join(specs)} failed: {exc}\n\n" + offline_instructions(specs)) from None
        finally:
            try:
                os.unlink(constraints_path)
            except OSError:
                pass
        after = self.protected_versions()
        changed = [f"{name} {before[name]} -> {after[name]}" for name in PROTECTED if before[name] != after[name]]
        if changed:
            raise RuntimeError(
                "Installing packages changed Slicer's own packages (" + "; ".join(changed) + "). "
                "Restart Slicer; if it misbehaves, reinstall Slicer. Please report this."
            )


def pip_arguments(specs: Sequence[str], constraints_path: str) -> list[str]:
    """Arguments after ``pip install`` for Slicer versions whose pip_install has no constraints option."""
    return [*specs, "--constraint", constraints_path]
