"""`dadrn-lesion demo`: the whole pipeline on the bundled phantom study with the bundled model."""

from __future__ import annotations

import time
from pathlib import Path

from ..cli import add_common_options

RESOURCES = Path(__file__).resolve().parents[3] / "Resources"
DEMO_VOLUME = RESOURCES / "Demo" / "demo_ct.nii.gz"
DEMO_LIVER = RESOURCES / "Demo" / "demo_liver.nii.gz"
DEMO_LESION = RESOURCES / "Demo" / "demo_lesion.nii.gz"
DEMO_SEED = 20190923
DEMO_CASE = dict(lesion_class="hcc", hard=False, n_slices=60, spacing=(1.5, 1.5, 3.0))  # three HCC nodules
DEFAULT_OUT = Path("dadrn-demo-output")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="classify the bundled phantom study with the bundled demo model")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (the default folder is always refreshed)")
    add_common_options(p)
    p.set_defaults(run=run)


def demo_volume(cache: Path) -> Path:
    """The bundled study, or (in a checkout without it) the same phantom generated into `cache`."""
    if DEMO_VOLUME.is_file():
        return DEMO_VOLUME
    from ..io import write_volume
    from ..phantom import generate_case

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "demo_ct.nii.gz"
    if not path.is_file():
        write_volume(generate_case(DEMO_SEED, **DEMO_CASE).ct, path)
    return path


def against_truth(slices, lesion, liver, spacing_ij) -> str:
    """The demo's slices against its ground truth, class by class ("15 HCC slices called FNH 10,
    HCC 4, normal 1; ..."): the bundled model is a demonstration, and what it gets wrong is part of it."""
    from collections import Counter

    from ..classes import CLASS_NAMES, LABEL_BY_KEY
    from ..data import IGNORE, slice_labels

    def name(key: str) -> str:  # the study summary's wording
        return "normal" if key == "normal" else LABEL_BY_KEY[key].name

    truth = slice_labels(lesion, liver, spacing_ij)
    called: dict[int, Counter] = {}
    for s in slices:
        t = int(truth[s.slice_index]) if 0 <= s.slice_index < truth.size else IGNORE
        if t != IGNORE:
            called.setdefault(t, Counter())[s.predicted_class] += 1
    parts = []
    for t in sorted(called, key=lambda c: (c == 0, c)):  # lesion classes first
        counts = sorted(called[t].items(), key=lambda kv: (-kv[1], CLASS_NAMES.index(kv[0])))
        parts.append(f"{called[t].total()} {name(CLASS_NAMES[t])} slices called " + ", ".join(f"{name(k)} {v}" for k, v in counts))
    return "; ".join(parts)


def run(args) -> int:
    from ..io import read_volume
    from ..outputs import write_results
    from ..pipeline import UNTRAINED_WARNING, PipelineOptions, load_model, run_pipeline

    reporter = args.reporter
    t0 = time.perf_counter()
    model = load_model(None)
    if not model.trained:
        reporter.warning("the demo model is missing from Resources/Models: running an UNTRAINED model, results are meaningless")
    else:
        reporter.info(f"model: {model.card.model_id} ({model.card.config.display_name}) — for demonstration, not diagnosis")
    source = demo_volume(Path(".dadrn-cache"))
    reporter.info(f"study: {source}")
    ct = read_volume(source)
    result = run_pipeline(ct, model=model, options=PipelineOptions(device=args.device), progress=reporter,
                          input_description={"path": str(source), "study_id": "demo phantom (synthetic, arterial phase)"})
    for message in result.report.get("warnings", []):  # e.g. the automatic liver mask and this model
        if message != UNTRAINED_WARNING:
            reporter.warning(f"model: {message}")
    overwrite = args.overwrite or args.out == DEFAULT_OUT
    write_results(result, args.out, ct=ct, overwrite=overwrite)
    summary = result.report["summary"]["finding"]
    reporter.info(f"{summary}; {len(result.slices)} liver slices in {time.perf_counter() - t0:.1f} s")
    if source == DEMO_VOLUME and DEMO_LESION.is_file() and DEMO_LIVER.is_file():
        truth = against_truth(result.slices, read_volume(DEMO_LESION).array, read_volume(DEMO_LIVER).array, ct.spacing[:2])
        reporter.info(f"against the study's ground truth ({DEMO_LESION.name}): {truth}")
    print(f"results: {args.out.resolve()} (overview.png, labelmap.nii.gz, heatmap.nii.gz, lesions.seg.nrrd, slices.csv, report.json)")
    reporter.done(out=str(args.out))
    return 0
