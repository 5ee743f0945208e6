"""Command line: ``deidflow run | dry-run preview | inventory | demo | verify | keygen``.

``run`` validates everything first (configuration, folders, key, programs, lock) without writing
anything, then runs Snakemake in this process with the restricted folder as its working
directory, so ``.snakemake/`` and every log stay out of the release.  The terminal shows one
progress line per stage and a closing summary (:mod:`deidflow.progress`, :mod:`deidflow.summary`);
Snakemake's own log goes to ``<restricted>/logs``.

Every user mistake ends as one line ``deidflow: error: …`` on stderr with a documented exit
status (:mod:`deidflow.errors`); a traceback is shown only with ``--debug``.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

import yaml

from . import __version__
from .errors import EXIT_BUG, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PublicError, UsageError
from .fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_release_dir, make_restricted_dir, restricted_umask
from .publish import check_folders, current_subjects, release_status, release_subjects
from .pseudonym import KEY_ENV, MIN_KEY_BYTES, MissingKeyError, ephemeral_key, fingerprint, load_key
from ._snakemake import run_snakemake
from .settings import (SNAKEFILE, WORKFLOW_DIR, ConfigError, Paths, deep_update, load_defaults, parse_set,
                       resolve_paths, validate, workflow_files_present)

INTERRUPTED = "deidflow: interrupted — the release is incomplete; run the same command to resume"
PATH_MAX, NAME_MAX = 4096, 255
MIN_FREE_BYTES = 64 * 1024  # a file system with less free space cannot take even the restricted folder
# Characters Snakemake reads as wildcards or that break its job scripts and our log lines.
BAD_PATH_CHARS = {"{": "'{'", "}": "'}'", "\n": "a line break", "\r": "a carriage return", "\t": "a tab"}
LOCK_FILE = ".deidflow.lock"
# The restricted folder of the run in progress, once it exists: an internal error's traceback
# (which may name input paths) goes there, never to the terminal unless --debug.
_restricted_log_dir: Path | None = None


def _yaml_file(path: str) -> dict:
    """The mapping in the --config file, or a UsageError naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a folder, not a YAML file") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UsageError(f"--config {path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must be a mapping of config keys (see config/README.md), "
                         f"not a {type(data).__name__}")
    return data


def _effective_config(args: argparse.Namespace) -> dict:
    config = load_defaults()
    if getattr(args, "config", None):
        deep_update(config, _yaml_file(args.config))
    try:
        deep_update(config, parse_set(getattr(args, "set", None) or []))
    except yaml.YAMLError:
        raise UsageError("--set: the value is not valid YAML (quote it)") from None
    for name in ("input", "output", "restricted", "key_file"):
        value = getattr(args, name, None)
        if value:
            _check_path_text(value, name.replace("_", "-"))
    config["input"] = str(Path(args.input).resolve())
    config["output"] = str(Path(args.output).resolve())
    if getattr(args, "restricted", None):
        config["restricted"] = str(Path(args.restricted).resolve())
    if getattr(args, "key_file", None):
        config["key_file"] = args.key_file
    # Files named in the configuration are relative to where the command runs (Snakemake runs in
    # the restricted folder).
    if isinstance(config.get("key_file"), str) and config["key_file"]:
        # absolute, links not resolved: /dev/fd/63 of `--key-file <(…)` resolved to a "pipe:[…]"
        # name that does not exist, so a pipe was reported as "no such file"
        config["key_file"] = os.path.abspath(os.path.expanduser(config["key_file"]))
    ps = config.get("pseudonym")
    if isinstance(ps, dict) and isinstance(ps.get("mapping_csv"), str) and ps["mapping_csv"]:
        ps["mapping_csv"] = str(Path(ps["mapping_csv"]).expanduser().resolve())
    if getattr(args, "strict", False):
        config["strict"] = True
    for name in ("input", "output", "restricted"):
        if isinstance(config.get(name), str) and config[name]:
            _check_path_text(config[name], name)
    if getattr(args, "force", False):
        config["force"] = True
    return validate(config, semantics=True)


def _check_path_text(value: str, what: str) -> None:
    """Refuse a path Snakemake or the file system cannot take (never echoes the value)."""
    for ch, name in BAD_PATH_CHARS.items():
        if ch in value:
            raise UsageError(f"{what}: the path contains {name}, which Snakemake cannot handle; "
                             "use a folder name without it")
    if len(os.fsencode(value)) >= PATH_MAX:
        raise UsageError(f"{what}: the path is longer than the system allows ({PATH_MAX} bytes)")
    if any(len(os.fsencode(part)) > NAME_MAX for part in value.split("/")):
        raise UsageError(f"{what}: a folder name in the path is longer than {NAME_MAX} bytes")


def _writable_parent(path: Path, what: str) -> None:
    """``path`` can be created or written: its nearest existing ancestor is a writable folder."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p == path and not p.is_dir():
        raise UsageError(f"{what} {path} exists and is not a folder")
    if not p.is_dir():
        raise UsageError(f"{what} {path}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        reason = "Read-only file system" if os.statvfs(p).f_flag & os.ST_RDONLY else "Permission denied"
        raise UsageError(f"{what} {path} cannot be written ({reason}: {p})")
    if shutil.disk_usage(p).free < MIN_FREE_BYTES:
        raise UsageError(f"{what} {path}: No space left on device ({shutil.disk_usage(p).free // 1024} KiB free on {p})")


def _check_key(config: dict, argv: list[str]) -> bytes:
    """Load the key, refusing a key given where it does not belong, and warn about exposed keys."""
    key_file = config.get("key_file") or None
    if key_file and not Path(key_file).exists():
        given = os.path.basename(key_file)
        if len(given) >= MIN_KEY_BYTES and "." not in given and not os.path.dirname(os.path.relpath(key_file)):
            raise UsageError("--key-file expects a file holding the key, and the value given is no file; if it "
                             "was the key itself, it is now in your shell history: make a new key with "
                             "'deidflow keygen FILE' and pass --key-file FILE")
        raise UsageError(f"key file {key_file}: no such file")
    key = load_key(key_file)
    secret = key.decode("utf-8", "replace")
    if any(secret in a for a in argv):
        _warn("the key appears on the command line, where shell history and 'ps' keep it; put it in a "
              "file (deidflow keygen FILE) or the environment instead")
    if key_file:
        mode = Path(key_file).stat().st_mode
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            _warn(f"key file {key_file} is readable by every user of this machine; run: chmod 600 {key_file}")
        elif mode & stat.S_IRGRP:
            _warn(f"key file {key_file} is readable by its group; consider: chmod 600 {key_file}")
    return key


def _warn(message: str) -> None:
    print(f"deidflow: warning: {message}", file=sys.stderr)


def _check_cores(cores: str) -> str:
    if cores == "all" or (cores.isdigit() and int(cores) >= 1):
        return cores
    raise UsageError(f"--cores expects a positive number or 'all', got {cores!r}")


def _check_profile(profile: str | None) -> str | None:
    if not profile:
        return None
    for candidate in (Path(profile), WORKFLOW_DIR / "profiles" / profile, WORKFLOW_DIR / profile):
        if (candidate / "config.yaml").is_file():
            try:
                settings = yaml.safe_load((candidate / "config.yaml").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                raise UsageError(f"--profile {profile}: its config.yaml is not valid YAML{where}") from None
            if settings is not None and not isinstance(settings, dict):
                raise UsageError(f"--profile {profile}: its config.yaml must be a mapping of Snakemake options")
            return str(candidate.resolve())
    raise UsageError(f"--profile {profile}: no such Snakemake profile (a folder with config.yaml; "
                     "bundled: default, slurm)")


SNAKEMAKE_OWNED = (("config", "--config", "use --set KEY=VALUE before --"),
                   ("configfile", "--configfile", "use --config FILE before --"),
                   ("directory", "--directory", "the restricted folder; choose it with --restricted"),
                   ("snakefile", "--snakefile", "the packaged workflow"))
# Options that make Snakemake skip jobs the configuration or the input asks for, or take outputs
# for current without making them: with them a changed policy left the release as the last run
# made it, and the run still said "release complete" (exit 0).
_SKIPS = "a release must be remade whole whenever its configuration or input changes"
SNAKEMAKE_SKIPPING = (("touch", "--touch", _SKIPS), ("rerun_triggers", "--rerun-triggers", _SKIPS),
                      ("consider_ancient", "--consider-ancient", _SKIPS),
                      ("drop_metadata", "--drop-metadata", _SKIPS), ("notemp", "--notemp", _SKIPS),
                      ("ignore_incomplete", "--ignore-incomplete", _SKIPS),
                      ("allowed_rules", "--allowed-rules", _SKIPS), ("omit_from", "--omit-from", _SKIPS),
                      ("until", "--until", _SKIPS), ("batch", "--batch", _SKIPS),
                      ("targets", "a target", "deidflow runs the whole workflow"),
                      ("target_jobs", "--target-jobs", "deidflow runs the whole workflow"),
                      ("dryrun", "--dry-run", "use deidflow's own --dry-run before --"))
# Options that make Snakemake do something else than run the workflow: deidflow then reported the
# last run's state as this run's ("release complete", exit 0); --delete-all-output deleted the QC
# report from the release and mapping/uids.csv from the restricted folder on the way.
SNAKEMAKE_MODES = ("summary", "detailed_summary", "list_rules", "list_target_rules", "lint", "dag", "rulegraph",
                   "filegraph", "d3dag", "debug_dag", "list_changes", "list_input_changes", "list_params_changes",
                   "list_untracked", "list_conda_envs", "delete_all_output", "delete_temp_output",
                   "cleanup_metadata", "cleanup_shadow", "unlock", "report", "archive", "containerize",
                   "export_cwl", "generate_unit_tests", "print_compilation")


def _check_snakemake_args(extra: list[str]) -> None:
    """Arguments after ``--`` must parse as Snakemake's (its parser's message, as one line)."""
    if not extra:
        return
    import contextlib
    from snakemake.cli import get_argument_parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser = get_argument_parser()
            given, default = parser.parse_args(extra), parser.parse_args([])
    except SystemExit as exc:
        if exc.code:
            last = (err.getvalue().strip().splitlines() or ["not valid"])[-1]
            last = last.split(" error: ", 1)[-1]
            raise UsageError(f"arguments after -- are passed to Snakemake, which says: {last}") from None
    except Exception as exc:  # Snakemake's own argument checks (CliException, ValueError)
        raise UsageError(f"arguments after -- are passed to Snakemake, which says: "
                         f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    # Options that would replace what deidflow checked and set: the configuration (unchecked, a value
    # in Snakemake's log), the working folder (.snakemake/ and logs written into the release) and
    # the workflow itself.
    for dest, option, instead in SNAKEMAKE_OWNED:
        if getattr(given, dest, None) != getattr(default, dest, None):
            raise UsageError(f"{option} after -- is not passed to Snakemake: deidflow sets it ({instead})")
    for dest in SNAKEMAKE_MODES:
        if getattr(given, dest, None) != getattr(default, dest, None):
            raise UsageError(f"--{dest.replace('_', '-')} after -- is not passed to Snakemake: deidflow run runs "
                             "the workflow, nothing else")
    for dest, option, why in SNAKEMAKE_SKIPPING:
        if getattr(given, dest, None) != getattr(default, dest, None):
            raise UsageError(f"{option} after -- is not passed to Snakemake: it skips jobs or takes outputs "
                             f"for current ({why})")


def _check_programs(config: dict) -> None:
    if config["outputs"].get("bids", True):
        from .bids.dcm2niix import executable
        try:
            executable()
        except Exception as exc:  # ConversionError: the message names the install command
            raise UsageError(f"outputs.bids needs dcm2niix: {exc}") from None


def _lock_release(output: Path, *, create: bool) -> int | None:
    """A kernel lock on the release folder itself (its open descriptor; held until the process and
    the job processes it forked end), so that two runs with different restricted folders cannot
    publish into one release at once; None when the folder does not exist and ``create`` is False.
    The restricted folder's lock did not cover that: a second run on the same release with another
    ``--restricted`` (at the start, while the release was still empty, or with ``--force``) ran to
    "release complete" beside the first."""
    if not output.is_dir():
        if not create:
            return None
        make_release_dir(output)  # 0755 whatever the umask (as the workflow makes it)
    fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another deidflow run is using {output}; wait for it to finish") from None
    except OSError:
        # NFS emulates flock with POSIX locks, which need a descriptor open for writing: lock a
        # hidden file beside the release instead (where a publish by copy keeps its scratch too)
        os.close(fd)
        try:
            fd = os.open(output.parent / f".{output.name}.deidflow-lock", os.O_RDWR | os.O_CREAT, RESTRICTED_FILE_MODE)
        except OSError:
            return None  # no place for a lock: the restricted folder's lock still holds
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another deidflow run is using {output}; wait for it to finish") from None
    return fd


def _restricted_lock_free(restricted: Path) -> None:
    lock = restricted / LOCK_FILE
    if not lock.exists():
        return
    try:
        with open(lock) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another deidflow run is using {restricted}; wait for it to finish") from None
    except PermissionError:
        raise UsageError(f"restricted folder {restricted} cannot be read (Permission denied)") from None


def check_run(config: dict, argv: list[str] | None = None) -> tuple[Paths, bytes]:
    """Everything that can be checked before a run writes anything: folders, writability, free
    space, key (and its fingerprint against the release's), programs, the run lock."""
    if not workflow_files_present():
        raise UsageError(f"the workflow files (Snakefile, config/) are missing from {WORKFLOW_DIR}; "
                         "reinstall deidflow")
    paths = resolve_paths(config)
    if not paths.input.exists():
        raise UsageError(f"input folder {paths.input} does not exist")
    if not paths.input.is_dir():
        raise UsageError(f"input {paths.input} is not a folder")
    if not os.access(paths.input, os.R_OK | os.X_OK):
        raise UsageError(f"input folder {paths.input} cannot be read (Permission denied)")
    try:
        empty = next(os.scandir(paths.input), None) is None
    except OSError as exc:
        raise UsageError(f"input folder {paths.input} cannot be read ({exc.strerror})") from None
    if empty:
        raise UsageError(f"input folder {paths.input} is empty: nothing to de-identify")
    check_folders(paths.input, paths.output, paths.restricted, force=bool(config.get("force")))
    _writable_parent(paths.output, "output")
    _writable_parent(paths.restricted, "restricted folder")
    key_file = Path(config.get("key_file") or "/").resolve()
    if paths.output in key_file.parents:
        # the release is what is shared; a run would also move the file into <restricted>/foreign
        raise UsageError(f"key file {key_file} is inside the release {paths.output}, which is shared: keep the key "
                         "apart from the release (with the restricted folder) and pass that path")
    key = _check_key(config, argv or [])
    from .pipeline import recorded_fingerprint
    old, new = recorded_fingerprint(paths.restricted), fingerprint(key)
    if old is not None and old != new:
        raise UsageError(f"{paths.output} was made with the key whose fingerprint is {old}; the key given "
                         f"has fingerprint {new}: use the original key, or release into a new output folder")
    _check_programs(config)
    _restricted_lock_free(paths.restricted)
    fd = _lock_release(paths.output, create=False)
    if fd is not None:
        os.close(fd)
    return paths, key


class _Interrupt:
    """Remembers a Ctrl-C or SIGTERM while Snakemake runs (Snakemake turns both into its own
    shutdown and an exit status of 1).

    Snakemake's scheduler installs its own SIGTERM handler when it starts (finish the running jobs,
    then stop), replacing ours: its handler is wrapped to note the signal too. Without it, a run
    stopped by ``kill``, SLURM or systemd exited with status 1 (a bug) and a summary claiming every
    subject withheld."""

    def __init__(self):
        self.seen = False

    def __enter__(self):
        def on_signal(signum, frame):
            self.seen = True
            signal.default_int_handler(signum, frame)
        self._old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        from snakemake.scheduling.job_scheduler import JobScheduler
        self._graceful = graceful = JobScheduler.exit_gracefully

        def exit_gracefully(scheduler, *args):
            self.seen = True
            return graceful(scheduler, *args)
        JobScheduler.exit_gracefully = exit_gracefully
        return self

    def __exit__(self, *exc):
        from snakemake.scheduling.job_scheduler import JobScheduler
        JobScheduler.exit_gracefully = self._graceful
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def run_workflow(config: dict, *, cores: int | str = "all", profile: str | None = None,
                 env: dict | None = None, extra: list[str] | None = None, verbose: bool = False) -> int:
    """Run the Snakemake workflow for ``config`` (checked by :func:`check_run`); return the exit status."""
    global _restricted_log_dir
    paths = resolve_paths(config)
    restricted_umask()  # .snakemake/, logs and every job's files 0600/0700 (the release gate sets 0644/0755)
    make_restricted_dir(paths.restricted)
    _restricted_log_dir = paths.restricted / "logs"
    # One run per restricted folder: a kernel lock that dies with the process, so a killed run
    # never leaves a stale lock behind (Snakemake's own lock is turned off with --nolock).
    lock = os.fdopen(os.open(paths.restricted / LOCK_FILE, os.O_RDWR | os.O_CREAT, RESTRICTED_FILE_MODE), "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another deidflow run is using {paths.restricted}; wait for it to finish") from None
    release_fd = _lock_release(paths.output, create=True)
    try:
        return _run_locked(config, paths, cores=cores, profile=profile, env=env, extra=extra, verbose=verbose)
    finally:
        if release_fd is not None:
            os.close(release_fd)


def _run_locked(config: dict, paths: Paths, *, cores: int | str, profile: str | None, env: dict | None,
                extra: list[str] | None, verbose: bool) -> int:
    """:func:`run_workflow` once both locks are held."""
    from . import progress, summary
    cfg_file = paths.restricted / "run-config.yaml"
    atomic_write_text(cfg_file, yaml.safe_dump(config, sort_keys=True), RESTRICTED_FILE_MODE)
    if env is not None:
        os.environ.update(env)  # e.g. the demo's ephemeral key: environment, never an argument
    args = ["--snakefile", str(SNAKEFILE), "--directory", str(paths.restricted),
            "--configfile", str(cfg_file), "--cores", str(cores), "--nolock"]
    if profile:
        args += ["--profile", profile]
    args += extra or []
    _absolute_pythonpath()
    started = time.time()
    server = None
    with _Interrupt() as interrupt, progress.quiet_terminal(paths.restricted, verbose=verbose) as (term, log):
        # With --verbose Snakemake's log is the display; the handler still collects failed rules.
        display = progress.StageProgress(io.StringIO() if verbose else term, paths.restricted,
                                         tty=not verbose and term.isatty())
        logger = progress.attach(display)
        try:
            if profile is None and not os.environ.get("DEIDFLOW_NO_ZYGOTE"):
                from . import zygote  # local jobs start from a process with the libraries imported
                server = zygote.start()  # inside the redirection: what it prints goes to the log
                os.environ[zygote.ENV] = server[1]
            rc = run_snakemake(args)
        except KeyboardInterrupt:
            interrupt.seen, rc = True, EXIT_INTERRUPTED
        finally:
            if server:
                os.environ.pop(zygote.ENV, None)
                zygote.stop(*server)
            display.close_display()
            logger.removeHandler(display)
    if interrupt.seen:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    failures = _job_failures(paths.restricted / "logs", started)
    failed_rules = sorted(set(display.failed_rules))
    if rc and failed_rules and not failures:
        failures = [f"deidflow: job(s) failed in: {', '.join(failed_rules)}"]
    _emit(failures, sys.stderr)
    counts = summary.collect(paths)
    _emit((["deidflow: Nothing to be done: the release is up to date."] if rc == 0 and display.nothing_to_do else [])
          + summary.lines(counts, paths, finished=rc == 0)
          + ([f"  Snakemake's log: {log}"] if log is not None else []), sys.stdout)
    if rc == 0:
        status = release_status(paths.output, paths.restricted)
        _emit(status["lines"], sys.stderr)
        return EXIT_INCOMPLETE if counts.leaky else status["exit"]
    if failures or failed_rules:
        return EXIT_INCOMPLETE
    print(f"deidflow: error: the workflow stopped before its jobs ran; see {log or 'the output above'}",
          file=sys.stderr)
    return EXIT_BUG


def _absolute_pythonpath() -> None:
    """Jobs run in the restricted folder: relative ``PYTHONPATH`` entries (``../src``) are made
    absolute, so that the jobs import the same deidflow as this process."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if any(entries):
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p for p in entries)


def _emit(lines: list[str], stream) -> None:
    """Print ``lines``; a reader that went away (``| head``) silences the rest, not the exit status."""
    try:
        for line in lines:
            print(line, file=stream)
        stream.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _cmd_verify(args: argparse.Namespace) -> int:
    from .qc import leakscan
    out = Path(args.output).resolve()
    restricted = Path(args.restricted).resolve() if args.restricted else out.with_name(out.name + "_restricted")
    if not out.is_dir() or not (restricted / "manifests").is_dir():
        raise UsageError(f"verify: {out} is not a release or {restricted} is not its restricted folder")
    status = release_status(out, restricted)
    result = leakscan.verify(out, restricted, pixel_data=args.pixel_data)
    lines = leakscan.hit_lines(result)
    for line in lines:
        print(line)
    subs = {s: r for u in result["units"] for s, r in u["subjects"].items()}
    current = current_subjects(restricted)  # a withdrawn subject's manifest may stay: counted only with files here
    subs = {s: r for s, r in subs.items() if current is None or s in current or r["files"] or r["hits"]}
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
    known = {s for u in result["units"] for s in u["subjects"]}
    unknown = sorted(release_subjects(out) - known)
    for s in unknown:
        print(f"deidflow verify: UNKNOWN SUBJECT: {s} is no subject of {restricted}: its files were searched for "
              "the values of that folder's subjects only; the next run takes it out")
    for rel in result["not_files"]:
        print(f"deidflow verify: NOT A FILE: {rel} is a symbolic link or special file, which no run writes "
              "and no scan reads through (a copy that follows links ships its target); remove it")
    if (result["not_files"] or unknown) and not lines:
        print(f"deidflow verify: {len(result['not_files'])} entries that are not files, {len(unknown)} unknown "
              "subject folders; the release is not as a run leaves it")
        return EXIT_INCOMPLETE
    if lines:
        print(f"deidflow verify: LEAK: {len(lines)} hit(s) in {', '.join(leaky)}")
        return EXIT_INCOMPLETE
    print("deidflow verify: no identifying value found")
    for line in status["lines"]:
        print(line.replace("deidflow:", "deidflow verify:", 1))
    return status["exit"]


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
    cores = _check_cores(args.cores)
    profile = _check_profile(args.profile)
    _check_snakemake_args(args.snakemake_args)
    config = _effective_config(args)
    paths, key = check_run(config, args.argv)
    if args.dry_run:
        from . import preview
        for line in preview.lines(config, key):
            print(line)
        return EXIT_OK
    return run_workflow(config, cores=cores, profile=profile, extra=args.snakemake_args, verbose=args.verbose)


def _cmd_inventory(args: argparse.Namespace) -> int:
    from . import inventory, pipeline
    config = _effective_config(args)
    paths, key = check_run(config, args.argv)
    restricted_umask()
    make_restricted_dir(paths.restricted)
    inv = inventory.build(paths.input, pipeline.pseudonymizer(key, config),
                          previous=paths.restricted / "inventory.parquet",
                          unmapped=config["pseudonym"]["unmapped"])
    target = inventory.write(inv, paths.restricted)
    ok = sum(r["status"] == "ok" for r in inv.rows)
    print(f"{len(inv.rows)} files: {ok} to release for {len(inv.subjects)} subjects, "
          f"{len(inv.rows) - ok} quarantined; inventory in {target}")
    return EXIT_OK


DEMO_MARK = ".deidflow-demo"  # in a demo's --dest: its input, release and restricted folder are the demo's


def _made_by_demo(base: Path) -> bool:
    """Whether ``base`` holds an earlier demo (its mark, or a restricted run record of ``deidflow
    demo``): only then may the demo delete what is there. `deidflow demo --dest /data` deleted a
    real export in /data/input and a real release with its mappings."""
    if (base / DEMO_MARK).is_file():
        return True
    try:
        command = json.loads((base / "release_restricted" / "run.json").read_text()).get("command") or []
    except (OSError, ValueError, AttributeError):
        return False
    return command[1:2] == ["demo"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import make_demo_input
    cores = _check_cores(args.cores)
    base = Path(args.dest).resolve()
    _check_path_text(str(base), "--dest")
    _writable_parent(base, "--dest")
    inp, out = base / "input", base / "release"
    args.input, args.output = str(inp), str(out)
    args.restricted = args.key_file = None
    config = _effective_config(args)  # a bad --set fails before anything is generated
    folders = (inp, out, out.with_name(out.name + "_restricted"))
    existing = [p for p in folders if os.path.lexists(p)]
    if existing and not _made_by_demo(base):
        raise UsageError(f"demo: {existing[0]} exists and no earlier demo made it (the demo replaces "
                         f"{base}/input, release and release_restricted); choose a new or empty --dest")
    base.mkdir(parents=True, exist_ok=True)
    (base / DEMO_MARK).write_text("made by deidflow demo: it may replace input/, release/, release_restricted/\n")
    for p in existing:
        shutil.rmtree(p)
    patients = make_demo_input(inp)
    print(f"deidflow demo: generated {len(patients)} fake patients under {inp}")
    print("deidflow demo: using an EPHEMERAL random key (demo only): pseudonyms change on every run; "
          f"real runs need ${KEY_ENV} or --key-file")
    env = {KEY_ENV: ephemeral_key().decode()}
    os.environ.update(env)
    check_run(config, [])
    return run_workflow(config, cores=cores, env=env, verbose=args.verbose)


def _cmd_keygen(args: argparse.Namespace) -> int:
    """A new random key (64 hex digits, 256 bits) in a new file of mode 0600."""
    target = Path(args.file)
    _check_path_text(args.file, "keygen")
    if target.exists():
        raise UsageError(f"keygen: {target} exists; deidflow never overwrites a key (pseudonyms depend on it)")
    _writable_parent(target.resolve().parent, "keygen: folder")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    os.chmod(target, 0o600)
    print(f"deidflow: wrote a new key to {target} (mode 0600, fingerprint {fingerprint(target.read_bytes().strip())}).")
    print("deidflow: keep it with the restricted folder, never with the release; losing it means new "
          "pseudonyms for the next delivery. Use it with: deidflow run INPUT OUTPUT --key-file " + str(target))
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (raised, so main() prints it)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deidflow", description=__doc__.splitlines()[0],
                epilog="Exit status: 0 release complete, 1 internal error (a bug), 2 usage or configuration "
                       "error, 3 release incomplete (files or subjects withheld, leak found), 130 interrupted.")
    p.add_argument("--version", action="version", version=f"deidflow {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML file with config keys (see config/README.md)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="set one config key (repeatable)")
        sp.add_argument("--restricted", help="restricted folder (default: <OUTPUT>_restricted)")
        sp.add_argument("--key-file", help=f"file holding the secret key (default: ${KEY_ENV})")

    def shown(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--verbose", action="store_true", help="show Snakemake's log instead of the progress lines")
        sp.add_argument("--debug", action="store_true", help="show the traceback of an error")

    r = sub.add_parser("run", help="de-identify INPUT into the release OUTPUT",
                       epilog="Arguments after a lone -- are passed to Snakemake unchanged.")
    r.add_argument("input")
    r.add_argument("output")
    common(r)
    r.add_argument("--cores", default="all", help="cores for Snakemake (default: all)")
    r.add_argument("--profile", help="Snakemake profile: a folder, or a bundled one (default, slurm)")
    r.add_argument("--strict", action="store_true", help="fail when any input file is quarantined")
    r.add_argument("--dry-run", action="store_true",
                   help="preview subjects, series, BIDS names, defacing, pixel cleaning and quarantine; write nothing")
    r.add_argument("--force", action="store_true",
                   help="use a non-empty output folder that no deidflow run wrote (its files are moved into the restricted folder)")
    shown(r)
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("inventory", help="inventory INPUT into the restricted folder of OUTPUT")
    i.add_argument("input")
    i.add_argument("output")
    common(i)
    i.add_argument("--debug", action="store_true", help="show the traceback of an error")
    i.set_defaults(func=_cmd_inventory)

    d = sub.add_parser("demo", help="generate fake patients and de-identify them (ephemeral key)")
    d.add_argument("--dest", default="demo", help="folder for demo input, release and restricted (default: demo)")
    d.add_argument("--cores", default="all")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--config")
    shown(d)
    d.set_defaults(func=_cmd_demo)

    v = sub.add_parser("verify", help="leak-scan the release OUTPUT for its subjects' original identifiers "
                                      "(exit status 3 on any hit)")
    v.add_argument("output")
    v.add_argument("--restricted", help="restricted folder (default: <OUTPUT>_restricted)")
    v.add_argument("--pixel-data", action="store_true", help="also search pixel data and NIfTI image blocks")
    v.add_argument("--debug", action="store_true", help="show the traceback of an error")
    v.set_defaults(func=_cmd_verify)

    k = sub.add_parser("keygen", help="write a new random secret key to FILE (mode 0600)")
    k.add_argument("file")
    k.add_argument("--debug", action="store_true", help="show the traceback of an error")
    k.set_defaults(func=_cmd_keygen)
    return p


# Exceptions that are user mistakes; their messages name the key, file or folder at fault.
def _user_error(exc: BaseException) -> str | None:
    from .inventory import InventoryError
    from .pipeline import ReleaseKeyMismatch
    if isinstance(exc, (UsageError, ConfigError, MissingKeyError, ReleaseKeyMismatch, InventoryError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                  errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOENT,
                                                  errno.ENOTDIR, errno.EEXIST, errno.ELOOP):
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit status (see the README's Troubleshooting)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    debug = "--debug" in argv or os.environ.get("DEIDFLOW_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        args.snakemake_args, args.argv = extra, argv + extra
        return args.func(args)
    except KeyboardInterrupt:
        print("\n" + INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise  # --help, --version
    except BrokenPipeError:  # the reader of our output went away (``| head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except BaseException as exc:
        message = _user_error(exc)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f"deidflow: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        what = str(exc) if isinstance(exc, PublicError) else type(exc).__name__
        where = _write_traceback()
        print(f"deidflow: error: internal error ({what}); this is a bug: please report it"
              + (f" (traceback in {where})" if where else " with the output of the same command run with --debug"),
              file=sys.stderr)
        return EXIT_BUG


def _write_traceback() -> Path | None:
    """The current exception's traceback in the restricted logs folder (mode 0600), if there is one."""
    if _restricted_log_dir is None:
        return None
    try:
        make_restricted_dir(_restricted_log_dir)
        target = _restricted_log_dir / time.strftime("deidflow-error-%Y%m%dT%H%M%S.log")
        atomic_write_text(target, traceback.format_exc(), RESTRICTED_FILE_MODE)
        return target
    except OSError:
        return None


def console_main() -> None:
    """The ``deidflow`` console script: :func:`main`'s status as the exit status."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
