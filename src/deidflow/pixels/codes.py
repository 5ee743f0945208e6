"""Barcodes and QR codes in a frame: machine-readable identifiers (a slide label's specimen or
accession number, a requisition form's MRN) that no text reader reads.  A frame with text in it
has its codes blanked with the text (:class:`deidflow.pixels.clean.PixelCleaner`)."""
from __future__ import annotations

import numpy as np

from .layout import Box, clip

PAD = 0.1  # of the code's larger side, on every side: the quiet zone and the digits printed under it
ROUNDS = 4  # OpenCV may find part of a 1D code: blank it and look again, until nothing is found


def code_boxes(gray: np.ndarray) -> list[tuple[Box, str]]:
    """(box, ``code:barcode`` or ``code:qr``) of each 1D barcode and QR code OpenCV finds in the
    frame ``gray`` (0..1023, :func:`deidflow.pixels.render.normalized`), looking again with what
    was found blanked (the detector may find part of a code)."""
    img = (gray.astype(np.float32) * (255.0 / 1023.0)).astype(np.uint8)
    out: list[tuple[Box, str]] = []
    for _ in range(ROUNDS):
        found = _find(img)
        if not found:
            break
        fill = int(np.median(img))
        for (x0, y0, x1, y1), _why in found:
            img[y0:y1, x0:x1] = fill
        out += found
    return out


def _find(img: np.ndarray) -> list[tuple[Box, str]]:
    import cv2
    shape = img.shape[:2]
    soft = cv2.GaussianBlur(img, (3, 3), 0)  # the 1D detector misses sharp synthetic bars it finds softened
    out: list[tuple[Box, str]] = []
    for kind, find in (("barcode", lambda: cv2.barcode.BarcodeDetector().detect(img)),
                       ("barcode", lambda: cv2.barcode.BarcodeDetector().detect(soft)),
                       ("qr", lambda: cv2.QRCodeDetector().detectMulti(img))):
        try:
            ok, points = find()
        except cv2.error:  # too small or degenerate for the detector
            continue
        if not ok or points is None:
            continue
        for quad in np.asarray(points, np.float32).reshape(-1, 4, 2):
            (x0, y0), (x1, y1) = quad.min(axis=0), quad.max(axis=0)
            p = PAD * max(x1 - x0, y1 - y0)
            box = clip((int(x0 - p), int(y0 - p), int(np.ceil(x1 + p)) + 1, int(np.ceil(y1 + p)) + 1), shape)
            if box is not None:
                out.append((_along_bars(img, box) if kind == "barcode" else box, f"code:{kind}"))
    return out


def _along_bars(img: np.ndarray, box: Box) -> Box:
    """``box`` grown along the code's bars while dark bars follow within a gap: the 1D detector
    often finds only part of a code (the rest would still carry digits)."""
    x0, y0, x1, y1 = box
    part = img[y0:y1, x0:x1].astype(np.float32)
    along_rows = np.abs(np.diff(part.mean(axis=1))).mean() > np.abs(np.diff(part.mean(axis=0))).mean()
    if along_rows:  # (a box one pixel wide or high compares NaN: taken as bars across, no recursion)  # bars lie along the rows: work on the transposed image
        x0, y0, x1, y1 = _along_bars(img.T, (y0, x0, y1, x1))
        return y0, x0, y1, x1
    band = img[y0:y1]
    dark = band.min(axis=0) < (int(band.max()) + int(band.min())) // 2
    gap = max(6, (x1 - x0) // 10)
    while x1 < img.shape[1] and dark[x1:x1 + gap].any():
        x1 = min(img.shape[1], x1 + 1 + int(np.flatnonzero(dark[x1:x1 + gap])[-1]))
    while x0 > 0 and dark[max(0, x0 - gap):x0].any():
        x0 = max(0, x0 - gap) + int(np.flatnonzero(dark[max(0, x0 - gap):x0])[0])
    return x0, y0, x1, y1
