"""Text detection and recognition with the PP-OCRv4 ONNX models shipped in ``rapidocr_onnxruntime``.

The models are files inside the installed wheel; nothing is downloaded, and :func:`model_files`
fails with a clear message when the package is missing.  RapidOCR's detector (DBNet) and
recognizer (CRNN, CTC) are used directly, without its angle classifier (burned-in text is
upright).  Frames are scaled so their short side is about :data:`DET_SIDE` pixels (small MR
frames with 4-pixel text need it) and padded, not stretched, to a multiple of 32.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DET_SIDE = 1024
MAX_SIDE = 2560
MAX_UPSCALE = 4.0
DET_MODEL = "models/ch_PP-OCRv4_det_infer.onnx"
REC_MODEL = "models/ch_PP-OCRv4_rec_infer.onnx"


class OcrUnavailable(RuntimeError):
    """The OCR engine's package is not installed."""


@dataclass(frozen=True)
class TextBox:
    """An axis-aligned text box in frame pixels (x1, y1 exclusive) with what was read in it."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0
    text: str = ""
    text_score: float = 0.0
    curve: str = ""

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def model_files() -> tuple[Path, Path, Path]:
    """(package folder, detection model, recognition model); raises OcrUnavailable."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise OcrUnavailable("pixel cleaning needs the OCR models of rapidocr_onnxruntime: "
                             "pip install 'deidflow[pixels]', or set pixels.clean: off")
    root = Path(list(spec.submodule_search_locations)[0])
    det, rec = root / DET_MODEL, root / REC_MODEL
    for p in (det, rec):
        if not p.is_file():
            raise OcrUnavailable(f"OCR model file missing from the installed package: {p.name}")
    return root, det, rec


class OcrEngine:
    """Detector + recognizer, loaded once per process (see :func:`engine`)."""

    def __init__(self, threads: int = 1):
        import yaml
        root, det_path, rec_path = model_files()
        import cv2
        cv2.setNumThreads(threads)  # resizing stays on the job's cores too
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
        cfg = yaml.safe_load((root / "config.yaml").read_text())
        common = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "use_cuda": False, "use_dml": False}
        det = {**cfg["Det"], **common, "model_path": str(det_path),
               "limit_type": "max", "limit_side_len": 1 << 16}  # we scale and pad ourselves
        rec = {**cfg["Rec"], **common, "model_path": str(rec_path)}
        self.det = TextDetector(det)
        self.rec = TextRecognizer(rec)

    @staticmethod
    def scale_for(h: int, w: int) -> float:
        s = min(MAX_UPSCALE, max(1.0, DET_SIDE / max(1, min(h, w))))
        return min(s, MAX_SIDE / max(h, w))

    def detect(self, img: np.ndarray, curve: str = "",
               scale: float | None = None) -> tuple[list[TextBox], np.ndarray, float]:
        """Text boxes in ``img`` (uint8, 2-D); also the scaled RGB image and the scale used
        (default :meth:`scale_for`; the screen passes its own, smaller one)."""
        import cv2
        h, w = img.shape[:2]
        s = self.scale_for(h, w) if scale is None else scale
        scaled = img if s == 1.0 else cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                                                 interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
        sh, sw = scaled.shape[:2]
        ph, pw = -sh % 32, -sw % 32
        padded = np.pad(scaled, ((0, ph), (0, pw))) if (ph or pw) else scaled
        rgb = np.repeat(padded[:, :, None], 3, axis=2)
        boxes, _ = self.det(rgb)
        out = []
        for b in [] if boxes is None else boxes:
            x0, y0 = np.floor(b.min(0) / s)
            x1, y1 = np.ceil((b.max(0) + 1) / s)
            x0, y0, x1, y1 = int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))
            if x1 > x0 and y1 > y0:
                out.append(TextBox(x0, y0, x1, y1, 1.0, curve=curve))
        return out, rgb, s

    def read(self, scaled_rgb: np.ndarray, scale: float, boxes: list[TextBox],
             views: tuple[tuple[bool, bool], ...] = ((False, False),)) -> list[TextBox]:
        """The boxes with the text read in them (crops from the scaled image), each crop read in
        every one of ``views`` (upside down, mirrored): the best reading counts."""
        if not boxes:
            return []
        crops, owner = [], []
        H, W = scaled_rgb.shape[:2]
        for i, b in enumerate(boxes):
            y0, y1 = max(0, int(b.y0 * scale)), min(H, int(np.ceil(b.y1 * scale)))
            x0, x1 = max(0, int(b.x0 * scale)), min(W, int(np.ceil(b.x1 * scale)))
            box = scaled_rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            for fy, fx in views:
                crop = box[::-1 if fy else 1, ::-1 if fx else 1]
                if crop.shape[0] * 1.5 <= crop.shape[1] or crop.shape[0] < 2:
                    crops.append(np.ascontiguousarray(crop))
                    owner.append(i)
                else:  # tall boxes: vertical text, read top-down and bottom-up (labels run either way)
                    crops += [np.ascontiguousarray(np.rot90(crop)), np.ascontiguousarray(np.rot90(crop, -1))]
                    owner += [i, i]
        res, _ = self.rec(crops)
        best: dict[int, tuple[str, float]] = {}
        for i, (t, sc, *_) in zip(owner, res):  # another reading counts when it reads as a word
            if i not in best or (float(sc) > best[i][1] and len(re.findall(r"[0-9A-Za-z]", str(t))) >= 3):
                best[i] = (str(t), float(sc))
        return [TextBox(b.x0, b.y0, b.x1, b.y1, b.score, *best[i], b.curve) for i, b in enumerate(boxes)]


_ENGINE: OcrEngine | None = None


def engine(threads: int = 1) -> OcrEngine:
    """The process-wide engine (ONNX sessions cost ~0.3 s to create)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = OcrEngine(threads)
    return _ENGINE
