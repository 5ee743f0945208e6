"""Face registration options on the real heads: CPU per head and how far each moves the eye/brow box.

The guard for any change to the ants registration (docs/design-notes.md, face stage): on every
real head of ../shared/data — chris_t1, dcm_qa_xa30 series 5 and 6, dcm_qa_decubitus HFS and HFP
(dcm2niix), the dcm_qa_ct_ge head CT (reconstructed from its DICOM) — each corner of the
template's eye/brow box, mapped to the subject, moves by at most 1 mm against the shipped
registration. The heads are prepared as the face stage prepares them (RAS reference volume, CT in
T1-like contrast, longer fields of view cropped to the head). For each option set the table gives
the registration's CPU seconds on one thread (best of ``--reps``), the largest corner movement
against the shipped settings and against an independent, thorough registration (2 mm, three
levels, four times the iterations: the reference of tests/test_face_realdata.py).

    python benchmarks/face_registration.py [--reps 2] [--only shipped,bins24,...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tables import table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

# option sets of ants_deface.affine_registration, against the shipped ones (module constants)
OPTIONS: dict[str, dict] = {
    "shipped": {},
    "seed + 1 (sampling noise)": {"seed": "+1"},
    "24 bins": {"bins": 24},
    "16 bins": {"bins": 16},
    "gradient step 0.4": {"step": 0.4},
    "4 mm level: at most 25 iterations": {"convergence": "[100x25,1e-5,5]"},
    "4 mm level: at most 15 iterations": {"convergence": "[100x15,1e-5,5]"},
    "stop at 1e-4": {"convergence": "[100x50,1e-4,5]"},
    "5 % sampling": {"sampling": 0.05},
}
REFERENCE = {"sampling": 0.25, "convergence": "[200x100x50,1e-6,10]", "shrink": "4x2x1", "smoothing": "2x1x0vox",
             "step": 0.1, "seed": 1}


def heads() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (RAS data, affine) of the volume the face stage registers."""
    import nibabel as nib

    from deidflow.bids.dcm2niix import executable
    from deidflow.face import dicomvol, render
    from deidflow.face.volume import crop, for_backend, head_part, reference_volume
    raw = {}
    for name, rel in (("chris_t1", "mricron/chris_t1.nii.gz"), ("xa30_5", "dcm_qa_xa30/Ref/5_anat-T1w_acq-tfl.nii"),
                      ("xa30_6", "dcm_qa_xa30/Ref/6_anat-T1w_acq-tfl.nii")):
        img = nib.load(DATA / rel)
        raw[name] = (img.get_fdata(dtype=np.float32), img.affine, "MR")
    with tempfile.TemporaryDirectory() as tmp:
        for pos in ("HFS", "HFP"):
            subprocess.run([executable(), "-z", "n", "-f", pos, "-o", tmp, str(DATA / "dcm_qa_decubitus" / "In" / pos)],
                           check=True, capture_output=True)
            img = nib.load(Path(tmp) / f"{pos}.nii")
            raw[f"decubitus_{pos}"] = (img.get_fdata(dtype=np.float32), img.affine, "MR")
    files = {p.name: p.read_bytes() for p in sorted((DATA / "dcm_qa_ct_ge" / "In" / "GE").glob("*.dcm"))}
    ct = dicomvol.reconstruct(files, dicomvol.scan(files).stacks()[0])
    raw["ct_ge"] = (np.asarray(ct.data, np.float32), ct.affine, "CT")
    out = {}
    for name, (data, affine, modality) in raw.items():
        vol = for_backend(reference_volume(data, affine), modality)
        vol = crop(vol, head_part(vol, render.skin_threshold(vol.data)))
        out[name] = (vol.data, vol.affine)
    return out


def register(data: np.ndarray, affine: np.ndarray, reference: bool = False, **opts) -> np.ndarray:
    """What HeadRegistration.fit does, with ``opts`` replacing the shipped settings."""
    from deidflow.face import ants_deface as ad
    tpl = ad.template()
    kw = dict(sampling=ad.SAMPLING, convergence=ad.CONVERGENCE, shrink="2x1", smoothing="1x0vox")
    kw.update(REFERENCE if reference else opts)
    if kw.get("seed") == "+1":
        kw["seed"] = ad.SEED + 1
    small = ad.downsample(data, affine, 2.0 if reference else ad.REG_MM)
    return ad.affine_registration(small, (tpl.image.astype(np.float32), tpl.image_affine), **kw)


def corners(to_template: np.ndarray) -> np.ndarray:
    from deidflow.face import ants_deface as ad
    inv = np.linalg.inv(to_template)
    return ad.template().eye_brow_box @ inv[:3, :3].T + inv[:3, 3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated option set names (default: all)")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"\nface registration benchmark skipped: {DATA} is missing")
        return
    from deidflow.face.ants_deface import HeadRegistration
    hs = heads()
    ref = {n: corners(register(d, a, reference=True)) for n, (d, a) in hs.items()}
    shipped = {}
    for n, (d, a) in hs.items():
        shipped[n] = corners(register(d, a))
        assert np.allclose(shipped[n], HeadRegistration.fit(d, a).eye_brow_box()), n   # the same as the stage's
    names = [s for s in args.only.split(",") if s] or list(OPTIONS)
    rows = [("options", "CPU s, 6 heads", "CPU s per head", "corner mm vs shipped", "corner mm vs reference")]
    for name in names:
        cpus, moved, off = [], [], []
        for n, (d, a) in hs.items():
            cpu = []
            for _ in range(args.reps):
                t = time.process_time()
                m = register(d, a, **OPTIONS[name])
                cpu.append(time.process_time() - t)
            c = corners(m)
            cpus.append(min(cpu))
            moved.append(np.linalg.norm(c - shipped[n], axis=1).max())
            off.append(np.linalg.norm(c - ref[n], axis=1).max())
        rows.append((name, f"{sum(cpus):.2f}", " ".join(f"{v:.2f}" for v in cpus), " ".join(f"{v:.1f}" for v in moved),
                     " ".join(f"{v:.1f}" for v in off)))
    table(f"Face registration options on the real heads (one thread, best of {args.reps}; load average "
          f"{os.getloadavg()[0]:.1f}); heads in the order {', '.join(hs)}; largest eye/brow corner movement, "
          f"the guard being <= 1 mm against the shipped registration on every head", rows)


if __name__ == "__main__":
    main()
