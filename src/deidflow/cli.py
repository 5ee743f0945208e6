"""Command line: ``deidflow run | inventory | demo | verify``.

``run`` wraps Snakemake: it validates the configuration first (a bad value fails before any job,
naming the key), writes the effective configuration into the restricted folder and runs
Snakemake there (in this process), so ``.snakemake/`` and every log stay out of the release.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from . import __version__
from .fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir
from .pseudonym import KEY_ENV, MissingKeyError, ephemeral_key, load_key
from ._snakemake import run_snakemake
from .settings import (SNAKEFILE, ConfigError, deep_update, load_defaults, parse_set, resolve_paths,
                       validate, workflow_files_present)


def _effective_config(args: argparse.Namespace) -> dict:
    config = load_defaults()
    if getattr(args, "config", None):
        deep_update(config, yaml.safe_load(Path(args.config).read_text()) or {})
    deep_update(config, parse_set(getattr(args, "set", None) or []))
    config["input"] = str(Path(args.input).resolve())
    config["output"] = str(Path(args.output).resolve())
    if getattr(args, "restricted", None):
        config["restricted"] = str(Path(args.restricted).resolve())
    if getattr(args, "key_file", None):
        config["key_file"] = str(Path(args.key_file).resolve())
    if getattr(args, "strict", False):
        config["strict"] = True
    return validate(config, semantics=False)  # profile semantics are checked at Snakefile parse


def run_workflow(config: dict, *, cores: int | str = "all", profile: str | None = None,
                 dry_run: bool = False, env: dict | None = None, extra: list[str] | None = None) -> int:
    """Run the Snakemake workflow for ``config`` (already validated); return its exit status."""
    if not workflow_files_present():
        raise SystemExit("deidflow: the workflow files (Snakefile, config/) were not found next to the "
                         "package; install deidflow from a clone with 'pip install -e .'")
    paths = resolve_paths(config)
    if not paths.input.is_dir():
        raise SystemExit(f"deidflow: input folder {paths.input} does not exist")
    make_restricted_dir(paths.restricted)
    # One run per restricted folder: a kernel lock that dies with the process, so a killed run
    # never leaves a stale lock behind (Snakemake's own lock is turned off with --nolock).
    lock = os.fdopen(os.open(paths.restricted / ".deidflow.lock", os.O_RDWR | os.O_CREAT, RESTRICTED_FILE_MODE), "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"deidflow: another deidflow run is using {paths.restricted}") from None
    cfg_file = paths.restricted / "run-config.yaml"
    atomic_write_text(cfg_file, yaml.safe_dump(config, sort_keys=True), RESTRICTED_FILE_MODE)
    args = ["--snakefile", str(SNAKEFILE), "--directory", str(paths.restricted),
            "--configfile", str(cfg_file), "--cores", str(cores), "--nolock"]
    if profile:
        args += ["--profile", profile]
    if dry_run:
        args += ["--dry-run"]
    args += extra or []
    if env is not None:
        os.environ.update(env)  # e.g. the demo's ephemeral key: environment, never an argument
    started = time.time()
    server = None
    if profile is None and not dry_run and not os.environ.get("DEIDFLOW_NO_ZYGOTE"):
        from . import zygote  # local jobs start from a process with the libraries imported
        server = zygote.start()
        os.environ[zygote.ENV] = server[1]
    try:
        rc = run_snakemake(args)
    finally:
        if server:
            os.environ.pop(zygote.ENV, None)
            zygote.stop(*server)
    if rc == 0 and not dry_run:
        quarantine = paths.restricted / "quarantine.tsv"
        n_bad = max(0, len(quarantine.read_text().splitlines()) - 1) if quarantine.exists() else 0
        print(f"deidflow: release in {paths.output}; mappings, audit and quarantine list in {paths.restricted}")
        if n_bad:
            print(f"deidflow: {n_bad} input file(s) quarantined, each with its reason in {quarantine}")
        _print_qc(paths)
    elif rc:
        for line in _job_failures(paths.restricted / "logs", started):
            print(line, file=sys.stderr)
    return rc


def _print_qc(paths) -> None:
    """One summary line per stage, then where the QC report is."""
    from .qc.report import QC_SUBDIR, stage_summaries
    for line in stage_summaries(paths.restricted):
        print(line)
    report = paths.output / QC_SUBDIR / "report.html"
    if report.exists():
        print(f"deidflow: QC report: {report} (restricted copy with before-images: "
              f"{paths.restricted / 'qc' / 'report-full.html'})")


def _cmd_verify(args: argparse.Namespace) -> int:
    from .qc import leakscan
    out = Path(args.output).resolve()
    restricted = Path(args.restricted).resolve() if args.restricted else out.with_name(out.name + "_restricted")
    if not out.is_dir() or not (restricted / "manifests").is_dir():
        print(f"deidflow verify: {out} is not a release or {restricted} is not its restricted folder", file=sys.stderr)
        return 2
    result = leakscan.verify(out, restricted, pixel_data=args.pixel_data)
    lines = leakscan.hit_lines(result)
    for line in lines:
        print(line)
    subs = {s: r for u in result["units"] for s, r in u["subjects"].items()}
    excluded: dict[str, int] = {}
    for u in result["units"]:
        for k, n in u["excluded_forms"].items():
            excluded[k] = excluded.get(k, 0) + n
    files = sum(r["files"] for r in subs.values()) + result["dataset"]["files"]
    scanned = sum(r["bytes_scanned"] for r in subs.values()) + result["dataset"]["bytes_scanned"]
    skipped = sum(r["bytes_not_scanned"] for r in subs.values()) + result["dataset"]["bytes_not_scanned"]
    print(f"deidflow verify: {len(subs)} subjects, {files} files, {scanned:,} bytes searched"
          f" ({skipped:,} bytes of image samples not searched{'' if skipped == 0 else '; --pixel-data searches them'});"
          f" forms excluded by rule: {', '.join(f'{k} {n}' for k, n in sorted(excluded.items())) or 'none'}")
    leaky = sorted({s for s, r in subs.items() if r["hits"]} | ({"dataset"} if result["dataset"]["hits"] else set()))
    if lines:
        print(f"deidflow verify: LEAK: {len(lines)} hit(s) in {', '.join(leaky)}")
        return 1
    print("deidflow verify: no identifying value found")
    return 0


def _job_failures(logs: Path, since: float) -> list[str]:
    """The one-line failure summaries jobs wrote during this run (public by construction:
    see deidflow.joblog), so the reason reaches the terminal without the job's traceback."""
    out = []
    for log in sorted(logs.rglob("*.log")) if logs.is_dir() else ():
        if log.stat().st_mtime >= since:
            out += [ln for ln in log.read_text(errors="replace").splitlines()
                    if ln.startswith("deidflow: ") and " failed" in ln]
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _effective_config(args)
        load_key(config.get("key_file") or None)  # refuse before starting anything
    except (ConfigError, MissingKeyError) as exc:
        print(f"deidflow: {exc}", file=sys.stderr)
        return 2
    return run_workflow(config, cores=args.cores, profile=args.profile, dry_run=args.dry_run,
                        extra=args.snakemake_args)


def _cmd_inventory(args: argparse.Namespace) -> int:
    from . import inventory, pipeline
    try:
        config = _effective_config(args)
        key = load_key(config.get("key_file") or None)
    except (ConfigError, MissingKeyError) as exc:
        print(f"deidflow: {exc}", file=sys.stderr)
        return 2
    paths = resolve_paths(config)
    make_restricted_dir(paths.restricted)
    inv = inventory.build(paths.input, pipeline.pseudonymizer(key, config),
                          previous=paths.restricted / "inventory.parquet",
                          unmapped=config["pseudonym"]["unmapped"])
    target = inventory.write(inv, paths.restricted)
    ok = sum(r["status"] == "ok" for r in inv.rows)
    print(f"{len(inv.rows)} files: {ok} to release for {len(inv.subjects)} subjects, "
          f"{len(inv.rows) - ok} quarantined; inventory in {target}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo_input
    base = Path(args.dest).resolve()
    inp, out = base / "input", base / "release"
    for p in (inp, out, out.with_name(out.name + "_restricted")):
        if p.exists():
            shutil.rmtree(p)
    patients = make_demo_input(inp)
    print(f"deidflow demo: generated {len(patients)} fake patients under {inp}")
    print("deidflow demo: using an EPHEMERAL random key (demo only): pseudonyms change on every run; "
          f"real runs need ${KEY_ENV} or --key-file")
    env = dict(os.environ)
    env[KEY_ENV] = ephemeral_key().decode()
    args.input, args.output = str(inp), str(out)
    args.restricted = args.key_file = None
    try:
        config = _effective_config(args)
    except ConfigError as exc:
        print(f"deidflow: {exc}", file=sys.stderr)
        return 2
    return run_workflow(config, cores=args.cores, env=env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deidflow", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"deidflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML file with config keys (see config/README.md)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="set one config key (repeatable)")
        sp.add_argument("--restricted", help="restricted folder (default: <OUTPUT>_restricted)")
        sp.add_argument("--key-file", help=f"file holding the secret key (default: ${KEY_ENV})")

    r = sub.add_parser("run", help="de-identify INPUT into the release OUTPUT",
                       epilog="Arguments after a lone -- are passed to Snakemake unchanged.")
    r.add_argument("input")
    r.add_argument("output")
    common(r)
    r.add_argument("--cores", default="all", help="cores for Snakemake (default: all)")
    r.add_argument("--profile", help="Snakemake profile (e.g. profiles/slurm)")
    r.add_argument("--strict", action="store_true", help="fail when any input file is quarantined")
    r.add_argument("--dry-run", action="store_true", help="show the jobs without running them")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("inventory", help="inventory INPUT into the restricted folder of OUTPUT")
    i.add_argument("input")
    i.add_argument("output")
    common(i)
    i.set_defaults(func=_cmd_inventory)

    d = sub.add_parser("demo", help="generate fake patients and de-identify them (ephemeral key)")
    d.add_argument("--dest", default="demo", help="folder for demo input, release and restricted (default: demo)")
    d.add_argument("--cores", default="all")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--config")
    d.set_defaults(func=_cmd_demo)

    v = sub.add_parser("verify", help="leak-scan the release OUTPUT for its subjects' original identifiers "
                                      "(exit status 1 on any hit)")
    v.add_argument("output")
    v.add_argument("--restricted", help="restricted folder (default: <OUTPUT>_restricted)")
    v.add_argument("--pixel-data", action="store_true", help="also search pixel data and NIfTI image blocks")
    v.set_defaults(func=_cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.snakemake_args = extra
    return args.func(args)


def console_main() -> None:
    """The ``deidflow`` console script: :func:`main`, then exit without the interpreter's module
    teardown, which after a Snakemake run took 0.3-0.5 s of every run's wall time. Output is
    flushed and exit handlers (logging shutdown, temporary-folder finalizers) still run."""
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(rc)


if __name__ == "__main__":
    console_main()
