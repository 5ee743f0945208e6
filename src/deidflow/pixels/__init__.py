"""Clean Pixel Data: burned-in text in ultrasound, secondary captures, scanned documents and
angiography, and slide labels in whole-slide images (PS3.15 Clean Pixel Data Option).

* :mod:`.policy`: which objects are cleaned (``data/pixel_policy.tsv``) and per-device
  rectangles (``data/pixel_regions.tsv``);
* :mod:`.render`, :mod:`.ocr`: 8-bit renderings of each frame and text detection/recognition
  with the ONNX models shipped in ``rapidocr_onnxruntime`` (nothing is downloaded);
* :mod:`.identify`: the ``identifiers_only`` policy (patient's identifiers, generic patterns);
* :mod:`.layout`: padding and grouping of boxes; :mod:`.pixeldata`: decode, blank, write back;
* :mod:`.clean`: :class:`PixelCleaner`, one file at a time;
* :mod:`.screen`: ``pixels.clean: auto`` looks for text in every image series (sampled frames,
  frames with differing statistics, edges that stay in place);
* :mod:`.subject`: the ``dicom`` job's pixel step, series by series (rules, screen, clean), and
  the per-series facts in ``<restricted>/pixels/<subject>.json``;
* :mod:`.leakcheck`: the leak scan's reading of the released images the step touched;
* :mod:`.qc`: thumbnails and their index for the QC report.

See docs/pixels.md.
"""
from .clean import CAPTURE_TAGS, Outcome, PixelCleaner, PixelError, Redaction

__all__ = ["CAPTURE_TAGS", "Outcome", "PixelCleaner", "PixelError", "Redaction"]
