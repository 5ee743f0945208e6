"""`make bench`, face stage: per-volume wall time and peak memory of each backend on chris_t1
(1 mm T1w, 176x256x176), against MEDE (`mede-deidentify -de` / `-s`) measured in the same run.

First table: the ants backend on ONE thread (registration + mask + write of one volume, wall and
CPU seconds, with the load average: on a shared machine wall time overstates the cost). Then each
measurement runs in a fresh process with 2 threads (the machine has 2 cores):
* ``volume s``  — one volume in a warm process: read the NIfTI, compute the mask, write the result
  (median of 3);
* ``process s`` — the whole process for one volume: interpreter, imports, model or template
  loading, one volume — what a command-line tool like MEDE costs per call;
* ``peak MB``   — the largest resident memory of the process and its children together
  (sampled from /proc every 50 ms; MEDE starts data-loader worker processes).

MEDE is installed into its own virtual environment (default /tmp/deidflow-bench-mede, or
$DEIDFLOW_MEDE_VENV) on first use; MEDE 0.0.12 pins torch==2.2.2, whose wheel pulls about 3 GB of
CUDA libraries, so the bench installs it with ``--no-deps`` next to the CPU build of torch 2.13.0
and MEDE's other requirements. When that fails the table says why.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import table

ROOT = Path(__file__).resolve().parents[1]
CHRIS = ROOT.parent / "shared" / "data" / "mricron" / "chris_t1.nii.gz"
MEDE_VENV = Path(os.environ.get("DEIDFLOW_MEDE_VENV", "/tmp/deidflow-bench-mede"))
MEDE_DEPS = ["deid", "nibabel", "opencv-python-headless<5", "pandas", "pillow", "pydicom", "pytesseract", "pyyaml",
             "safetensors", "scikit-image", "timm==1.0.7", "torchio", "tqdm", "python-bidi", "shapely",
             "pyclipper", "scipy"]
THREADS = "2"
REPEAT = 3

CHILD = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
from deidflow.face.apply import Nifti
from deidflow.face.backends import get_backend
from deidflow.face.volume import reference_volume
backend = get_backend(sys.argv[1])
path, out = sys.argv[2], sys.argv[3]
times, cpus = [], []
for i in range(int(sys.argv[4])):
    t, c = time.perf_counter(), time.process_time()
    nii = Nifti.from_bytes(open(path, "rb").read())
    vol = reference_volume(nii.real(), nii.affine)
    removed = backend.removal_mask(vol)
    open(out, "wb").write(nii.masked(vol.to_native(removed)))
    times.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
    if i == 0:
        first = time.perf_counter() - t0
print(json.dumps({"first": first, "times": times, "cpus": cpus, "removed": float(removed.mean()),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


SHIM = """# deidflow bench: torchvision's PyPI wheel is built against CUDA torch; with the CPU build of
# torch its compiled ops (nms, roi_align: unused by MEDE's 3D networks) do not load and registering
# their fake kernels fails at import. Skip those registrations so torchvision.transforms imports.
import torch.library as _lib
_orig = _lib.register_fake
def register_fake(op, *a, **kw):
    deco = _orig(op, *a, **kw)
    def wrap(fn):
        try:
            return deco(fn)
        except RuntimeError:
            return fn
    return wrap if callable(deco) else deco
_lib.register_fake = register_fake
"""


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (kB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measured(cmd: list[str], timeout: float = 1800, threads: str = THREADS
             ) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd``: wall seconds, peak resident memory of its whole process tree (MB), result."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kb(proc.pid))
        if time.perf_counter() - t > timeout:
            proc.kill()
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    return wall, peak / 1024, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def env(threads: str = THREADS) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=threads, DEIDFLOW_FACE_THREADS=threads, MKL_NUM_THREADS=threads,
                ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads)


def run_backend(name: str, scratch: Path) -> dict:
    """Process seconds and peak MB for one volume, and the median warm volume seconds."""
    process, peak, r = measured([sys.executable, "-c", CHILD, name, str(CHRIS), str(scratch / f"{name}.nii.gz"), "1"])
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
    _, peak_n, r = measured([sys.executable, "-c", CHILD, name, str(CHRIS), str(scratch / f"{name}.nii.gz"),
                             str(REPEAT + 1)])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    warm = sorted(res["times"][1:])[len(res["times"][1:]) // 2]
    return {"process": process, "volume": warm, "peak_mb": max(peak, peak_n), "removed": res["removed"]}


def one_thread(scratch: Path) -> dict:
    """The ants backend on chris_t1 with ONE thread, in a warm process: read, register, mask and
    write one volume (median of REPEAT after a first call), wall and CPU seconds."""
    _, _, r = measured([sys.executable, "-c", CHILD, "ants", str(CHRIS), str(scratch / "one.nii.gz"), str(REPEAT + 1)],
                       threads="1")
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    med = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731
    return {"wall": med(res["times"]), "cpu": med(res["cpus"]), "first": res["first"]}


def mede_python() -> tuple[Path | None, str]:
    """MEDE's venv python, installing it when missing; (None, reason) when it cannot be had."""
    py = MEDE_VENV / "bin" / "python"
    exe = MEDE_VENV / "bin" / "mede-deidentify"
    if exe.exists():
        return py, ""
    pip = [str(py), "-m", "pip", "install", "-q"]
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(MEDE_VENV)], check=True, capture_output=True)
        subprocess.run(pip + ["torch==2.13.0", "torchvision<=0.29.1"], check=True, capture_output=True, timeout=1800)
        subprocess.run(pip + ["--no-deps", "mede==0.0.12", "easyocr==1.7.2"], check=True, capture_output=True,
                       timeout=1800)
        subprocess.run(pip + MEDE_DEPS, check=True, capture_output=True, timeout=1800)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "deidflow_bench_shim.py").write_text(SHIM)
        Path(site, "deidflow_bench_shim.pth").write_text("import deidflow_bench_shim\n")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        err = getattr(exc, "stderr", b"") or b""
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip() and "Location" not in ln]
        return None, f"pip install failed: {lines[-1] if lines else exc}"
    return (py, "") if exe.exists() else (None, "installed, but no mede-deidentify entry point")


def run_mede(flag: str, scratch: Path) -> dict | str:
    py, why = mede_python()
    if py is None:
        return why
    out = scratch / f"mede{flag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    inp = scratch / "mede_in"
    inp.mkdir(exist_ok=True)
    shutil.copy(CHRIS, inp / CHRIS.name)
    wall, peak, r = measured([str(MEDE_VENV / "bin" / "mede-deidentify"), "-i", str(inp), "-o", str(out), flag])
    if r.returncode != 0 or not any(out.rglob("*.nii*")):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"mede-deidentify {flag} failed: {tail[0][:160]}"
    return {"process": wall, "peak_mb": peak}


def main() -> None:
    if not CHRIS.exists():
        print(f"\nface benchmark skipped: {CHRIS} is missing (../shared/data)")
        return
    scratch = Path(tempfile.mkdtemp(prefix="deidflow-face-bench-"))
    try:
        load = os.getloadavg()[0]
        try:
            one = one_thread(scratch)
            table(f"Defacing chris_t1 (1 mm, 176x256x176) on ONE thread, warm process, median of {REPEAT} "
                  f"(load average {load:.1f} on {os.cpu_count()} cores: wall > CPU when the machine is shared)",
                  [("measure", "seconds", "target"),
                   ("read + register + mask + write, wall", f"{one['wall']:.2f}", "<= 2 s"),
                   ("read + register + mask + write, CPU", f"{one['cpu']:.2f}", ""),
                   ("whole process for one volume (start-up, imports, template)", f"{one['first']:.2f}", "")])
        except RuntimeError as exc:
            print(f"one-thread defacing failed: {exc}")
        if "--one-thread" in sys.argv[1:]:
            return
        rows = [("backend", "task", "process s", "volume s", "peak MB", "target", "removed %")]
        results = {}
        plan = [("ants", "deface", "<= 15 s, <= 3 GB"), ("deepbet", "skullstrip", "<= 8 s, <= 3 GB"),
                ("quickshear", "deface (deepbet mask)", "")]
        for name, task, target in plan:
            try:
                res = run_backend(name, scratch)
            except RuntimeError as exc:
                rows.append((name, task, "failed", "", "", f"{target} ({exc})", ""))
                continue
            results[name] = res
            rows.append((name, task, f"{res['process']:.1f}", f"{res['volume']:.1f}", f"{res['peak_mb']:.0f}", target,
                         f"{100 * res['removed']:.1f}"))
        for flag, task, ours in (("-de", "deface", "ants"), ("-s", "skullstrip", "deepbet")):
            res = run_mede(flag, scratch)
            if isinstance(res, str):
                rows.append((f"MEDE {flag}", task, "n/a", "", "", res, ""))
                continue
            ratio = (f"x{res['process'] / results[ours]['process']:.1f} of deidflow {ours} (process)"
                     if ours in results else "")
            rows.append((f"MEDE {flag}", task, f"{res['process']:.1f}", "", f"{res['peak_mb']:.0f}", ratio, ""))
        table(f"Face stage on chris_t1 ({THREADS} threads; process = one CLI-style call incl. start-up, "
              f"volume = one volume in a warm process, median of {REPEAT})", rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
