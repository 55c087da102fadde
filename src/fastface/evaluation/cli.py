"""``fastface eval``: dataset init/check, run, score, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="the evaluation protocol: datasets, generation grid, scores, reports")
    evsub = ev.add_subparsers(dest="eval_command", required=True, parser_class=type(ev))

    ds = evsub.add_parser("dataset", help="write the bundled smoke set, or check a dataset")
    dssub = ds.add_subparsers(dest="dataset_command", required=True, parser_class=type(ev))
    init = dssub.add_parser("init", help="write the offline smoke set (2 identities, 34 + 34 prompts)")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    init.set_defaults(func=cmd_dataset_init)
    check = dssub.add_parser("check", help="validate a dataset: photos, faces, ids, prompt splits")
    check.add_argument("dir", metavar="DIR")
    check.add_argument("--face-backend", default="dlib", help="detector used to find a face in every photo")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--no-progress", action="store_true")
    check.set_defaults(func=cmd_dataset_check)

    run = evsub.add_parser("run", help="generate the grid identity x prompt x seed into a run folder (resumable)")
    from ..commands import add_generation_options

    add_generation_options(run)
    run.add_argument("--dataset", required=True, metavar="DIR")
    run.add_argument("--run-dir", required=True, metavar="DIR")
    run.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per (identity, prompt)")
    run.add_argument("--split", choices=("realistic", "stylistic", "all"), default="all")
    run.add_argument("--limit", type=int, default=None, metavar="N", help="first N prompts of each split")
    run.add_argument("--no-identity", action="store_true",
                     help="no adapter: the reference run for the disruption metric (same seeds)")
    run.add_argument("--negative-prompt", default=None, metavar="TEXT")
    run.add_argument("--reference-photos", type=int, default=1, metavar="K",
                     help="the first K photos of an identity condition; the rest are held out (copy-paste index)")
    run.add_argument("--batch-size", type=int, default=1, metavar="B", help="seeds generated per UNet batch")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    sc = evsub.add_parser("score", help="score a run folder (cached per image)")
    sc.add_argument("--run-dir", required=True, metavar="DIR")
    sc.add_argument("--metrics", default=None, metavar="LIST",
                    help="comma-separated families: identity,clip,aesthetic,image-reward,disruption,cost (default all)")
    sc.add_argument("--reference-run", default=None, metavar="DIR", help="the --no-identity run, for CLIP-I disruption")
    sc.add_argument("--dataset", default=None, metavar="DIR", help="the dataset, when not where the manifest says")
    sc.add_argument("--face-backends", default=None, metavar="LIST",
                    help="identity encoders (default arcface,dlib,facenet; env FASTFACE_FACE_BACKENDS)")
    sc.add_argument("--clip-model", action="append", default=None, metavar="NAME_OR_DIR",
                    help="CLIP model for CLIP-T/CLIP-I, repeatable (default ViT-L/14 and ViT-B/32; env FASTFACE_CLIP_MODELS)")
    sc.add_argument("--aesthetic-head", default=None, metavar="NAME_OR_PATH",
                    help="LAION aesthetic MLP weights: hub repo, folder or .pth/.safetensors (env FASTFACE_AESTHETIC_HEAD)")
    sc.add_argument("--image-reward", default=None, metavar="NAME_OR_PATH",
                    help="ImageReward model name or checkpoint (env FASTFACE_IMAGE_REWARD)")
    sc.add_argument("--crop-backend", default="dlib", help="face detector for the style-on-face-crop score")
    sc.add_argument("--device", default=None)
    sc.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS",
                    help="under a launcher, how long rank 0 waits for the other ranks' scores")
    sc.add_argument("--allow-partial", action="store_true",
                    help="exit 0 even when no quality metric (ImageReward, aesthetic) could be scored")
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(func=cmd_score)

    rep = evsub.add_parser("report", help="tables, image grids and a quality-versus-cost plot over scored runs")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", required=True, metavar="DIR")
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    rep.set_defaults(func=cmd_report)


def cmd_dataset_init(args: argparse.Namespace) -> int:
    from .dataset import write_smoke_dataset

    dataset = write_smoke_dataset(args.dir, overwrite=args.overwrite)
    summary = dataset.summary()
    print(f"smoke set written to {dataset.root}: {summary['identities']} identities, {summary['photos']} photos, "
          f"{summary['prompts']['realistic']} realistic + {summary['prompts']['stylistic']} stylistic prompts")
    return 0


def cmd_dataset_check(args: argparse.Namespace) -> int:
    from .dataset import check_dataset

    dataset, problems = check_dataset(args.dir, face_backend=args.face_backend, progress=not args.no_progress)
    fingerprint = dataset.fingerprint()
    if args.json:
        print(json.dumps({**dataset.summary(), "fingerprint": fingerprint, "problems": problems}, indent=2))
    else:
        summary = dataset.summary()
        print(f"{dataset.root} ({summary['layout']} layout): {summary['identities']} identities, "
              f"{summary['photos']} photos, prompts {summary['prompts']}; fingerprint {fingerprint}")
        for problem in problems:
            print(f"  problem: {problem}")
    if problems:
        raise InputError(f"dataset {dataset.root} has {len(problems)} problem(s), listed above")
    if not args.json:
        print("ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import Grid, RunConfig, run_grid

    config = RunConfig(
        backbone=args.backbone, adapter=None if args.no_identity else args.adapter, method=args.method,
        steps=args.steps, height=args.height, width=args.width, ip_scale=args.ip_scale, lora_scale=args.lora_scale,
        alpha=args.alpha, beta=args.beta, rescale=args.rescale, rescale_on=args.rescale_on,
        face_backend=args.face_backend, base_model=args.base_model, adapter_path=args.adapter_path,
        image_encoder=args.image_encoder, controlnet_scale=args.controlnet_scale, sampler=args.sampler,
        scheduler=args.scheduler, cfg_scale=args.cfg_scale, lora=tuple(args.lora), dtype=args.dtype, vae=args.vae,
        vae_tiling=args.vae_tiling, negative_prompt=args.negative_prompt, reference_photos=args.reference_photos, batch_size=args.batch_size)
    grid = Grid(seeds=args.seeds, split=args.split, limit=args.limit)
    summary = run_grid(config, args.dataset, args.run_dir, grid, device=args.device,
                       command=["fastface", *sys.argv[1:]], progress=not args.no_progress,
                       cpu_offload=args.cpu_offload, compile=bool(getattr(args, "compile", False)),
                       limits=args.limits)
    where = "" if summary.world == 1 else f" (rank {summary.rank} of {summary.world}: {summary.assigned} samples)"
    if summary.repaired:
        from .run import damaged_line

        print(f"warning: regenerated {damaged_line(summary.run_dir, summary.repaired)}", file=sys.stderr)
    print(f"{summary.run_dir}: {summary.generated} generated, {summary.skipped} already done, "
          f"{len(summary.repaired)} repaired, {summary.total} in the grid{where}; {summary.seconds:.1f} s")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import FAMILIES, ScoreOptions, score_run

    kwargs: dict = {"crop_backend": args.crop_backend, "device": args.device, "wait_timeout_s": args.wait}
    if args.metrics:
        kwargs["metrics"] = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.face_backends:
        kwargs["face_backends"] = tuple(b.strip() for b in args.face_backends.split(",") if b.strip())
    if args.clip_model:
        kwargs["clip_models"] = tuple(args.clip_model)
    if args.aesthetic_head:
        kwargs["aesthetic_head"] = args.aesthetic_head
    if args.image_reward:
        kwargs["image_reward"] = args.image_reward
    if args.reference_run:
        kwargs["reference_run"] = Path(args.reference_run)
    if args.dataset:
        kwargs["dataset"] = Path(args.dataset)
    result = score_run(args.run_dir, ScoreOptions(**kwargs), progress=not args.no_progress)
    if "metrics" not in result:
        print(f"rank {result['rank']} of {result['world_size']}: scored {result['scored']} images")
        return 0
    print(f"{args.run_dir}: {len(result['samples'])} samples, {result['scored_now']} scored now "
          f"(families: {', '.join(kwargs.get('metrics', FAMILIES))})")
    told: set[str] = set()
    for key, status in result["metrics"].items():
        if status["status"] != "ok":
            if status["scorer"] not in told:  # one reason per model, not per metric it would give
                told.add(status["scorer"])
                print(f"  {status['scorer']}: unavailable: {status['reason']}")
            continue
        values = [r[key] for r in result["samples"] if key in r]
        ok = [v for v in values if v is not None]
        mean = f"{sum(ok) / len(ok):.4g}" if ok else "–"
        print(f"  {key}: mean {mean} over {len(ok)}/{len(values)} images")
    if result.get("damaged"):
        from .run import REPAIR_HINT, damaged_line

        raise InputError(f"not scored: {damaged_line(Path(args.run_dir), result['damaged'])}; {REPAIR_HINT}, "
                         "then score again")
    return _quality_verdict(result["metrics"], allow_partial=args.allow_partial)


QUALITY_KEYS = ("image_reward", "aesthetic")  # PROTOCOL.md: the quality metrics


def _quality_verdict(metrics: dict, *, allow_partial: bool) -> int:
    """Exit status of ``eval score``: 2 when quality metrics were asked for and none could be scored."""
    asked = [key for key in QUALITY_KEYS if key in metrics]
    if not asked or any(metrics[key]["status"] == "ok" for key in asked):
        return 0
    reasons = "; ".join(f"{key}: {metrics[key]['reason']}" for key in asked)
    what = ("NO QUALITY METRIC could be scored (" + ", ".join(asked) + "): these scores cannot rank image "
            "quality. Fetch the scoring models with `fastface download --eval` (or pass them with "
            "--aesthetic-head / --image-reward)")
    if allow_partial:
        sys.stderr.write(f"warning: {what}; kept as partial scores (--allow-partial). Reasons: {reasons}\n")
        return 0
    sys.stderr.write(f"error: {what}, or pass --allow-partial to accept partial scores "
                     f"(scores.json is written). Reasons: {reasons}\n")
    return 2


def cmd_report(args: argparse.Namespace) -> int:
    from ..atomic import ensure_writable_dir
    from .report import build_report

    ensure_writable_dir(args.out, "--out")
    paths = build_report(args.runs, args.out, seed=args.seed)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
