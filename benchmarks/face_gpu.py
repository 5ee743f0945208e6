"""Face backends that use torch (deepbet, quickshear's deepbet mask) on a CUDA GPU against the CPU
of the same machine, on chris_t1 (1 mm T1w, 176x256x176).

Not part of ``make bench`` (its machine has no GPU): run it where torch sees a CUDA device, e.g.
``PYTHONPATH=src python benchmarks/face_gpu.py [chris_t1.nii.gz]``.  Each row runs in a fresh
process: ``process s`` is interpreter + imports + model load + one volume, ``volume s`` the median
of three more volumes in that warm process (read, mask, write), ``GPU MB`` torch's peak
allocation.  The masks of GPU and CPU runs are compared voxel by voxel (``differ``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "data" / "mricron" / "chris_t1.nii.gz"

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from deidflow.face.apply import Nifti
from deidflow.face.backends import get_backend
from deidflow.face.volume import reference_volume
backend = get_backend(sys.argv[1])
path, out, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
times = []
for i in range(n + 1):
    t = time.perf_counter()
    nii = Nifti.from_bytes(open(path, "rb").read())
    vol = reference_volume(nii.real(), nii.affine)
    removed = backend.removal_mask(vol)
    open(out, "wb").write(nii.masked(vol.to_native(removed)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    if i == 0:
        first = time.perf_counter() - t0
np.save(out + ".npy", removed)
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
print(json.dumps({"first": first, "times": times[1:], "gpu_mb": gpu,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}))
'''


def measure(backend: str, gpu: bool, threads: int, volume: Path, work: Path, n: int = 3) -> dict:
    env = dict(os.environ, DEIDFLOW_FACE_GPU="1" if gpu else "0", DEIDFLOW_FACE_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0") if gpu else "")
    out = work / f"{backend}-{'gpu' if gpu else 'cpu'}-{threads}.nii.gz"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, backend, str(volume), str(out), str(n)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{backend} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process"] = time.perf_counter() - t
    res["mask"] = str(out) + ".npy"
    return res


def main() -> None:
    import numpy as np
    import torch
    volume = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not torch.cuda.is_available():
        raise SystemExit("face_gpu: torch sees no CUDA device here; nothing to compare")
    cores = os.cpu_count() or 1
    rows = [("backend", "device", "threads", "process s", "volume s (median of 3)", "GPU MB", "differ from CPU")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for backend in ("deepbet", "quickshear"):
            ref = None
            for gpu, threads in ((False, 2), (False, cores), (True, 2)):
                m = measure(backend, gpu, threads, volume, work)
                mask = np.load(m["mask"])
                ref = mask if ref is None else ref
                differ = f"{int((mask != ref).sum()):,} of {mask.size:,} voxels"
                rows.append((backend, m["device"], str(threads), f"{m['process']:.2f}",
                             f"{sorted(m['times'])[len(m['times']) // 2]:.2f}", f"{m['gpu_mb']:,.0f}",
                             "-" if not gpu and threads == 2 else differ))
    table(f"Face backends on GPU vs CPU ({volume.name}, torch {torch.__version__})", rows)


if __name__ == "__main__":
    main()
