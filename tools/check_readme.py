#!/usr/bin/env python3
"""Run the README's commands, verbatim, in a fresh clone of this repository.

Every line of the README's fenced code blocks is a command (``\\`` continues a line, ``#`` starts a
comment).  They run in order with bash in a temporary clone (``git clone`` of this checkout), with
HOME set to a temporary folder, ``/data/`` mapped to a temporary folder holding the demo's fake export
as ``/data/export``, and the ``deidflow``/``snakemake`` of this interpreter first on PATH.  Commands
that need the network or a cluster (installing packages, cloning from GitHub, SLURM) run only with
``--full``; without it they are listed as skipped.  Exit status 0 when every command that ran
succeeded.

    python tools/check_readme.py [--full] [--keep]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_NETWORK = re.compile(r"^(pipx install|pip install|git clone|make (install|install-all|test|demo)\b)")
NEEDS_CLUSTER = re.compile(r"--profile slurm")


def commands(readme: str) -> list[str]:
    """The lines of the README's shell code blocks (no language, sh or bash; ``text`` blocks are
    not commands), continuations joined, comments and blank lines dropped."""
    out, lang, pending = [], None, ""
    for line in readme.splitlines():
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang not in ("", "sh", "bash"):
            continue
        line = "" if line.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also run the commands that need the network or a cluster")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="deidflow-readme-"))
    try:
        clone = tmp / "deidflow"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for rel in subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--modified"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.split():
            if (ROOT / rel).is_file():  # uncommitted work: the clone shows the tree as it is
                (clone / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, clone / rel)
        home, data, bindir = tmp / "home", tmp / "data", tmp / "bin"
        for d in (home, data, bindir):
            d.mkdir()
        sys.path.insert(0, str(ROOT / "src"))
        from deidflow.demo import make_demo_input
        make_demo_input(data / "export")
        for tool, module in (("deidflow", "deidflow.cli"), ("snakemake", "snakemake")):
            shim = bindir / tool
            shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
            shim.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("DEIDFLOW_KEY",)}
        env.update(HOME=str(home), PATH=f"{bindir}{os.pathsep}{env['PATH']}",
                   PYTHONPATH=str(clone / "src"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        failed = ran = 0
        for cmd in commands((ROOT / "README.md").read_text()):
            if not args.full and (NEEDS_NETWORK.search(cmd) or NEEDS_CLUSTER.search(cmd)):
                print(f"skipped (network or cluster): {cmd}")
                continue
            local = cmd.replace("/data/", f"{data}/")
            r = subprocess.run(["bash", "-c", local], cwd=clone, env=env, capture_output=True, text=True,
                               timeout=1200)
            ran += 1
            status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
            print(f"{status}: {cmd}")
            if r.returncode:
                failed += 1
                print("  " + "\n  ".join((r.stdout + r.stderr).strip().splitlines()[-8:]))
        print(f"{ran} README commands run, {failed} failed")
        return 1 if failed or not ran else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
