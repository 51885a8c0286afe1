"""`dadrn-lesion classify INPUT... --out DIR`: classify liver slices and localise lesions."""

from __future__ import annotations

import time
from pathlib import Path

from ..cli import EXIT_INPUT, EXIT_PARTIAL, add_common_options, add_precision_options, amp_choice
from ..errors import OutputExistsError, UserInputError
from ..outputs import check_output_location, results_exist, write_results
from ..pipeline import UNTRAINED_WARNING, PipelineOptions, load_model, resolve_device, run_pipeline
from ..studies import expand_inputs, prefetch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify the liver slices of CT studies and write label map, heatmap, segmentation and report",
        description="INPUT: NIfTI, NRRD or MHA file, DICOM series folder, folder of studies, or CSV list (column 'path'). "
        "One INPUT writes into DIR; several write into DIR/<study>/.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    add_pipeline_options(p)
    p.add_argument("--series", metavar="UID", help="the DICOM series to read when a folder holds several")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    add_common_options(p)
    p.set_defaults(run=run)


def add_pipeline_options(p) -> None:
    p.add_argument("--liver-mask", metavar="FILE", help="liver mask on the input's grid (default: automatic segmentation)")
    p.add_argument("--liver-method", choices=("auto", "totalsegmentator"), default="auto",
                   help="automatic liver segmentation: built-in (auto) or TotalSegmentator where installed")
    p.add_argument("--weights", metavar="FILE", help="model checkpoint (.safetensors with its .json card); default: the shipped demo model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: 8 on CPU, from free memory on a GPU)")
    p.add_argument("--cam-threshold", type=float, default=0.5, help="fraction of a slice's heatmap maximum that marks the lesion (default 0.5)")
    p.add_argument("--cam-smoothing", type=float, default=None, metavar="CELLS",
                   help="Gaussian sigma of the heatmap in cells of the model's map (default 1.5; 0: plain bilinear upsampling)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    add_precision_options(p)


def options_from(args) -> PipelineOptions:
    return PipelineOptions(
        device=args.device,
        batch_size=args.batch_size,
        cam_threshold=args.cam_threshold,
        **({} if args.cam_smoothing is None else {"cam_smoothing": args.cam_smoothing}),
        amp=amp_choice(args),
        threads=args.threads,
        liver_method=args.liver_method,
    )


def _write_summary(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["study", "input", "status", "finding", "message"])
        writer.writeheader()
        writer.writerows(rows)


def run(args) -> int:
    reporter = args.reporter
    options = options_from(args)
    resolve_device(options.device)  # fail before reading anything
    studies = expand_inputs(args.inputs, args.liver_mask)
    single = len(studies) == 1
    out_dirs = {s.study_id: (args.out if single else args.out / s.study_id) for s in studies}
    if not args.overwrite:
        taken = [str(d) for d in out_dirs.values() if results_exist(d)]
        if single and taken:
            raise OutputExistsError(f"{taken[0]} already holds files: choose another --out folder, or pass --overwrite to replace it")
    check_output_location(args.out)  # an unwritable --out fails now, not after the model has run
    model = load_model(args.weights)
    if not model.trained:
        reporter.warning("no trained weights found: running an UNTRAINED model, results are meaningless (pass --weights)")
    failures = 0
    summary: list[dict] = []
    said: set[str] = set()
    for study, future in prefetch(studies, args.series):
        out_dir = out_dirs[study.study_id]
        try:
            if not args.overwrite and results_exist(out_dir):
                raise OutputExistsError(f"{out_dir} already holds files (pass --overwrite to replace)")
            t = time.perf_counter()
            loaded = future.result()
            ct, mask = loaded.ct, loaded.liver_mask
            read_s = time.perf_counter() - t
            if not single:
                reporter.info(f"[{study.study_id}] {study.path}")
            result = run_pipeline(
                ct, liver_mask=mask, model=model, options=options, progress=reporter,
                input_description={"path": str(study.path), "study_id": study.study_id},
            )
            result.report["timings_s"]["read"] = round(read_s, 4)
            for message in result.report.get("warnings", []):  # about the model and the mask, said once per run
                if message not in said and message != UNTRAINED_WARNING:
                    reporter.warning(f"model: {message}")
                    said.add(message)
            for message in loaded.notes:  # e.g. a localizer image left out of the DICOM series
                reporter.warning(f"input: {message}")
                result.report.setdefault("warnings", []).append(message)
            for message in result.report.get("liver_check", {}).get("warnings", []):
                reporter.warning(f"liver mask: {message}")
            reporter("write", 0, 1)
            write_results(result, out_dir, ct=ct, overwrite=args.overwrite)
            reporter("write", 1, 1)
            reporter.info(f"{study.study_id}: {result.report['summary']['finding']} -> {out_dir}")
            reporter.emit("study_done", study=study.study_id, out=str(out_dir), finding=result.report["summary"]["finding"])
        except UserInputError as exc:
            if single:
                raise
            failures += 1
            reporter.failure(f"{study.study_id}: skipped: {exc}")
            reporter.emit("study_failed", study=study.study_id, message=str(exc))
            summary.append({"study": study.study_id, "input": str(study.path), "status": "failed", "finding": "", "message": str(exc)})
        else:
            summary.append({"study": study.study_id, "input": str(study.path), "status": "ok",
                            "finding": result.report["summary"]["finding"], "message": ""})
    if not single:
        _write_summary(args.out / "studies.csv", summary)
    reporter.done(out=str(args.out), studies=len(studies), failed=failures)
    if failures == len(studies):
        return EXIT_INPUT
    return EXIT_PARTIAL if failures else 0
