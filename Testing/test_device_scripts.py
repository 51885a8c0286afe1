"""The scripts that prepare a lent GPU machine: packing the packages it lacks and unpacking them there.

Run on a scratch copy of the repository layout with a small wheel of our own, so the test needs
neither the real wheels nor a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("git") is None or shutil.which("xz") is None,
    reason="needs bash, git and xz",
)


def _scratch_repo(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    for name in ("pack_device_carry.sh", "device_site.sh"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    (root / "tracked.txt").write_text("part of the tree\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "tracked.txt", "scripts"], cwd=root, check=True)
    wheels = root / ".whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("probe_pkg/__init__.py", "VALUE = 7\n")
        z.writestr("probe_pkg-1.0.dist-info/METADATA", "Name: probe_pkg\nVersion: 1.0\n")
    return root


def test_packed_packages_and_real_cases_travel_and_import(tmp_path):
    repo = _scratch_repo(tmp_path / "repo")
    real = tmp_path / "real"
    (real / "case_a").mkdir(parents=True)
    (real / "case_a" / "ct.nii.gz").write_bytes(b"not really a scan")
    (real / "case_a" / "ct.nii.gz").chmod(0o444)  # the shared data is read-only

    env = {"PATH": "/usr/bin:/bin", "REAL": str(real), "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "scripts/pack_device_carry.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "of 64 MiB" in out.stdout
    with tarfile.open(repo / ".device-carry" / "site.tar.xz") as tar:
        assert "./probe_pkg/__init__.py" in tar.getnames()
    assert (repo / ".device-carry" / "real" / "case_a" / "ct.nii.gz").read_bytes() == b"not really a scan"

    # packing again replaces the read-only copy instead of failing on it
    again = subprocess.run(["bash", "scripts/pack_device_carry.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr

    # on the machine: the archive is unpacked into SITE and importable, the engine is on the path too
    site = tmp_path / "site"
    probe = (
        f"source scripts/device_site.sh && {sys.executable} -c "
        "'import os, probe_pkg; print(probe_pkg.VALUE, os.environ[\"PYTHONPATH\"])'"
    )
    run = subprocess.run(["bash", "-c", probe], cwd=repo, env={**env, "SITE": str(site)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    value, path = run.stdout.split()
    assert value == "7"
    assert path.split(":")[0] == str(repo / "DADRNLesion") and str(site) in path.split(":")


def test_packing_refuses_without_wheels(tmp_path):
    repo = _scratch_repo(tmp_path / "repo")
    shutil.rmtree(repo / ".whl")
    out = subprocess.run(["bash", "scripts/pack_device_carry.sh"], cwd=repo, env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "no wheels in .whl/" in out.stderr and "pip download" in out.stderr


@pytest.mark.slow
def test_gpu_session_runs_end_to_end_on_a_cpu_in_miniature(tmp_path):
    """The script a lent GPU's scarce minutes depend on, run whole here: time-boxed phantom sets,
    merge, training against its deadline, test evaluation, what it sends back, and a second session
    that continues from those weights and compares them with its own."""
    import json

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "DEVICE": "cpu", "BENCH": "0", "SIZE": "32", "WIDTH": "0.125", "BATCH": "8", "PROCS": "2",
           "DATA_S": "1", "CHUNK": "5", "REAL": "", "BUDGET_S": "60", "SEED0": "9001", "LIVER_SOURCE": "mixed", "UNENHANCED": "0.5",
           "WORK": str(work), "OUT": str(out), "SITE": str(tmp_path / "site")}
    run = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "phantom seeds used: 9001-9002 (2 sets)" in run.stdout  # one set per generator: the deadline had passed
    assert "training exit 0" in run.stdout and "accuracy" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.json", "best.safetensors", "results.tgz", "session.txt"]
    assert "training exit 0" in (out / "session.txt").read_text()  # written as it went, not at the end
    card = json.loads((out / "best.json").read_text())
    assert [d["phantom_seed"] for d in card["training"]["data"]["merged"]] == [9001, 9002]
    # Mixed liver masks: the second generator's slices were masked with the automatic liver mask.
    assert [(d.get("liver") or {}).get("source") for d in card["training"]["data"]["merged"]] == [None, "automatic"]
    # UNENHANCED: half of each set's normal and cyst phantoms were made without contrast.
    assert [d.get("phantom_unenhanced") for d in card["training"]["data"]["merged"]] == [0.5, 0.5]
    assert card["metrics"]["test"]["all"]["slices"] > 0
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert "logs/session.txt" in names and "train/split.csv" in names
    # A second session continues from those weights on new seeds, its generators going on while it
    # trains (GROW), and ends with the two compared on the same test split, slice by slice. Its
    # budget leaves the generators time for a second set even on a loaded machine (at 150 s, sets
    # of 21 s under load ended after the deadline, and none joined the training).
    out2 = tmp_path / "out2"
    env2 = {**env, "SEED0": "9101", "INIT": str(out / "best.safetensors"), "BUDGET_S": "210", "LIVER_SOURCE": "reference",
            "GROW": "1", "START_S": "1", "CHUNK": "5", "GROW_CLASSES": "hcc", "WORK": str(tmp_path / "work2"),
            "OUT": str(out2), "LOCALISATION_LOSS": "0.5"}
    env2.pop("DATA_S")
    run2 = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env2, capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, run2.stdout[-3000:] + run2.stderr[-3000:]
    assert "starting weights on the same test split" in run2.stdout and "A = start" in run2.stdout
    with tarfile.open(out2 / "results.tgz") as tar:
        assert "train/compare/comparison.csv" in tar.getnames()
    card2 = json.loads((out2 / "best.json").read_text())
    assert card2["training"]["initialised_from"]
    assert card2["training"]["config"]["localisation_loss"] == 0.5 and card["training"]["config"]["localisation_loss"] == 0
    # Sets finished while it trained joined its training split; the log names every set made.
    assert "its training split growing from" in run2.stdout and "new caches" in run2.stdout
    made = re.search(r"phantom seeds used: 9101-(\d+) \((\d+) sets\)", run2.stdout)
    assert made and int(made.group(2)) > 2, run2.stdout[-3000:]
    trained_on = [d["phantom_seed"] for d in card2["training"]["data"]["merged"] if "phantom_seed" in d]
    assert len(trained_on) >= 2 and set(trained_on) <= set(range(9101, 9102 + int(made.group(2)) * 2))
    # GROW_CLASSES: each generator's first set (the start, hence validation and test) has all five
    # classes; every later set, left in the folder training grew from, is of HCC only.
    merged = card2["training"]["data"]["merged"]
    assert [(d["phantom_seed"], d.get("phantom_classes")) for d in merged[:2]] == [(9101, None), (9102, None)]
    later = sorted((tmp_path / "work2" / "stream").iterdir())
    assert later and all(d.name.startswith("c") for d in later), [d.name for d in later]
    assert {tuple(json.loads((d / "cache.json").read_text())["source"]["phantom_classes"])
            for d in later if (d / "cache.json").is_file()} == {("hcc",)}
