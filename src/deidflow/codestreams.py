"""Where the image of Pixel Data ends: bytes no decoder reads are no part of the image.

A decoder stops at the end of each frame's codestream (JPEG and JPEG-LS end-of-image, the JPEG
2000 end-of-codestream after the last tile-part, the RLE segments' decoded length) and after the
frames of native data; it reads a Basic Offset Table only as offsets.  Whatever follows (text
appended after a frame, an extra fragment, text in the offset table or in the unused offsets of
an RLE header, bytes after the last native frame) travels with a release that copies Pixel Data
as it is, and the leak scan does not read pixel data.  :func:`image_extent` finds those bytes;
:func:`trim_pixel_data` rewrites a written file without them.  Only the bytes outside the image
change: every frame decodes to the same pixels.  Bytes that are all zero (padding) are left as
they are (and the one byte that makes a value's length even, which encoders fill with 0xFF or
anything), so a file without extra bytes stays byte-identical.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import NamedTuple


class CodestreamError(ValueError):
    """Pixel Data whose image cannot be told from the rest (the file is quarantined)."""


_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
JPEG_FAMILY = frozenset(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"))
J2K_FAMILY = frozenset(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                        "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                        "1.2.840.10008.1.2.4.203"))
RLE = "1.2.840.10008.1.2.5"
NATIVE = frozenset(("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"))


class Geometry(NamedTuple):
    """What the length of a frame depends on."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    subsampled: bool = False  # YBR_FULL_422 / YBR_PARTIAL_422: two samples per pixel


def native_length(g: Geometry) -> int:
    """Bytes of ``g.frames`` native frames (without the padding to even length)."""
    per_pixel = 2 if g.subsampled and g.samples == 3 else g.samples
    bits = g.rows * g.columns * per_pixel * g.frames * g.bits_allocated
    return (bits + 7) // 8


def padding(b: bytes) -> bool:
    """Whether ``b`` is padding: zeros, or the one byte that makes a value even (any value)."""
    return len(b) <= 1 or not b.strip(b"\x00")


def jpeg_end(frame: bytes) -> int | None:
    """End of a JPEG / JPEG-LS codestream (after its EOI), or None when it has none.  EOI never
    occurs in entropy-coded data (0xFF is followed by 0x00 or a restart marker; in JPEG-LS by a
    byte below 0x80), so the first one after the first scan ends the image."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xDA:
            eoi = frame.find(b"\xff\xd9", pos + 2)
            return None if eoi < 0 else eoi + 2
        pos += 2 + struct.unpack(">H", frame[pos + 2:pos + 4])[0]
    return None


def j2k_end(frame: bytes) -> int | None:
    """End of a JPEG 2000 codestream (after its EOC), walking the tile-parts by their lengths; in
    a JP2 wrapper, the end of its codestream box (boxes after it are no part of the image; text
    boxes before it quarantine the file, see ``dicomio.j2k_frame_without_comments``).  None for a
    codestream without EOC."""
    if frame[4:8] == b"jP  ":
        pos = 0
        while pos + 8 <= len(frame):
            size, kind = struct.unpack(">I", frame[pos:pos + 4])[0], frame[pos + 4:pos + 8]
            head = 8
            if size == 1 and pos + 16 <= len(frame):  # XLBox: a 64-bit length follows
                size, head = struct.unpack(">Q", frame[pos + 8:pos + 16])[0], 16
            if kind == b"jp2c":
                if size:
                    return pos + size
                end = j2k_end(frame[pos + head:])  # the last box runs to the frame's end
                return None if end is None else pos + head + end
            if size < head:
                return None
            pos += size
        return None
    if frame[:2] != b"\xff\x4f":
        return None
    pos = 2
    while pos + 4 <= len(frame) and frame[pos:pos + 2] != b"\xff\x90":
        n = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if frame[pos] != 0xFF or n < 2:
            return None
        pos += 2 + n
    while pos + 10 <= len(frame) and frame[pos:pos + 2] == b"\xff\x90":
        psot = struct.unpack(">I", frame[pos + 6:pos + 10])[0]
        if psot == 0:  # the last tile-part runs to the EOC (never inside coded data)
            eoc = frame.find(b"\xff\xd9", pos + 12)
            return None if eoc < 0 else eoc + 2
        pos += psot
    return pos + 2 if frame[pos:pos + 2] == b"\xff\xd9" else None


def packbits_length(data: bytes, start: int, end: int, want: int) -> int | None:
    """Bytes of one RLE segment (PackBits) from ``start`` that decode to ``want`` bytes."""
    pos, got = start, 0
    while got < want:
        if pos >= end:
            return None
        n = data[pos]
        if n < 128:
            pos, got = pos + 2 + n, got + n + 1
        elif n > 128:
            pos, got = pos + 2, got + 257 - n
        else:
            pos += 1
    return pos - start if pos <= end else None


def rle_frame(frame: bytes, g: Geometry) -> bytes:
    """An RLE frame with only its header's segment offsets and its segments' coded bytes (each
    padded to even length); ``frame`` itself when it holds nothing else."""
    if len(frame) < 64:
        raise CodestreamError("RLE frame shorter than its header")
    header = struct.unpack("<16I", frame[:64])
    n, offsets = header[0], list(header[1:])
    if not 1 <= n <= 15 or offsets[0] != 64 or any(b <= a for a, b in zip(offsets[:n - 1], offsets[1:n])) \
            or offsets[n - 1] >= len(frame):
        raise CodestreamError("RLE frame with a damaged header")
    ends = offsets[1:n] + [len(frame)]
    segments, changed = [], any(offsets[n:])
    for a, b in zip(offsets[:n], ends):
        used = packbits_length(frame, a, b, g.rows * g.columns)
        if used is None:
            raise CodestreamError("RLE segment shorter than its frame")
        seg = frame[a:a + used]
        if not padding(frame[a + used:b]):
            changed = True
        segments.append(seg + b"\x00" * (len(seg) % 2))
    if not changed:
        return frame
    offs, pos = [], 64
    for s in segments:
        offs.append(pos)
        pos += len(s)
    return struct.pack("<16I", n, *offs, *[0] * (15 - n)) + b"".join(segments)


def _frame_image(frame: bytes, ts: str, g: Geometry) -> bytes:
    """``frame`` without bytes after its codestream; itself when there are none (or when the
    end of its codestream cannot be found: such a frame is left to the decoders)."""
    if ts == RLE:
        return rle_frame(frame, g)
    end = jpeg_end(frame) if ts in JPEG_FAMILY else j2k_end(frame) if ts in J2K_FAMILY else None
    if end is None or padding(frame[end:]):
        return frame
    return frame[:end]


def _items(value: bytes) -> list[bytes]:
    """The items of an encapsulated Pixel Data value (offset table first), without the sequence
    delimiter; DicomError when anything else lies between, or after, them."""
    out, pos = [], 0
    while pos + 8 <= len(value):
        tag, n = value[pos:pos + 4], struct.unpack("<I", value[pos + 4:pos + 8])[0]
        if tag == _SEQ_END:
            if n or not padding(value[pos + 8:]):
                raise CodestreamError("encapsulated pixel data with bytes after its sequence delimiter")
            return out
        if tag != _ITEM or pos + 8 + n > len(value):
            raise CodestreamError("encapsulated pixel data with a damaged item")
        out.append(value[pos + 8:pos + 8 + n])
        pos += 8 + n
    if not padding(value[pos:]):
        raise CodestreamError("encapsulated pixel data with bytes after its items")
    return out


def _frames(fragments: list[bytes], bot: bytes, ts: str, count: int) -> tuple[list[bytes], bool]:
    """The frames of ``fragments`` and whether ``bot`` is a valid offset table for them: all of
    them for one frame, one each when they are as many, else by a valid offset table or by the
    codestreams' start markers."""
    starts, pos = [], 0
    for f in fragments:
        starts.append(pos)
        pos += 8 + len(f)
    if count <= 1:
        return [b"".join(fragments)], bot in (b"", b"\x00" * 4)
    if len(bot) == 4 * count:
        offsets = list(struct.unpack(f"<{count}I", bot))
        if offsets[0] == 0 and all(o in starts for o in offsets) and offsets == sorted(set(offsets)):
            idx = [starts.index(o) for o in offsets] + [len(fragments)]
            return [b"".join(fragments[a:b]) for a, b in zip(idx, idx[1:])], True
    if len(fragments) == count:
        return fragments, not bot
    soi = b"\xff\xd8" if ts in JPEG_FAMILY else b"\xff\x4f" if ts in J2K_FAMILY else None
    if soi is not None:
        frames: list[list[bytes]] = []
        for f in fragments:
            if f[:2] == soi or not frames:
                frames.append([f])
            else:
                frames[-1].append(f)
        if len(frames) == count:
            return [b"".join(f) for f in frames], not bot
    raise CodestreamError("encapsulated pixel data whose frames cannot be told apart")


def _offset_table(frames: list[bytes]) -> bytes:
    offs, pos = [], 0
    for f in frames:
        offs.append(pos)
        pos += 8 + len(f) + len(f) % 2
    return struct.pack(f"<{len(offs)}I", *offs)


def encapsulated_image(value: bytes, ts: str, g: Geometry) -> bytes:
    """An encapsulated Pixel Data value (items and delimiter) holding only its frames' codestreams
    and a valid offset table (left empty when it was); ``value`` itself when it holds nothing else."""
    items = _items(value)
    if not items:
        raise CodestreamError("encapsulated pixel data without an offset table item")
    bot, fragments = items[0], items[1:]
    frames, bot_valid = _frames(fragments, bot, ts, g.frames)
    new = [_frame_image(f, ts, g) for f in frames]
    if bot_valid and all(a is b for a, b in zip(new, frames)):
        return value
    table = _offset_table(new) if bot else b""
    out = [_ITEM, struct.pack("<I", len(table)), table]
    for f in new:
        f = f + b"\x00" * (len(f) % 2)
        out += [_ITEM, struct.pack("<I", len(f)), f]
    out.append(_SEQ_END + b"\x00" * 4)
    return b"".join(out)


def image_extent(value: bytes, ts: str, g: Geometry) -> bytes:
    """Pixel Data ``value`` without what no decoder reads (see the module docstring)."""
    if ts in NATIVE:
        n = native_length(g)
        if len(value) <= n or padding(value[n:]):
            return value
        return value[:n] + b"\x00" * (n % 2)
    if ts in JPEG_FAMILY or ts in J2K_FAMILY or ts == RLE:
        return encapsulated_image(value, ts, g)
    return value  # video and other codestreams: not parsed here


def trim_pixel_data(path: Path, ts: str, g: Geometry | None) -> bool:
    """Rewrite the written Part-10 file ``path`` (in place) with its Pixel Data reduced to the
    image (:func:`image_extent`); True when anything was removed.  Native data of the right
    length are judged by their length alone (the file is not read)."""
    from .qc.leakscan import pixel_region
    if g is None or not ts:
        return False
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        region = pixel_region(mm)
        if region is None:
            return False
        start, end = region
        order = ">" if ts == "1.2.840.10008.1.2.2" else "<"
        explicit = mm[start - 8:start - 6] in (b"OB", b"OW", b"OF", b"OD", b"UN")
        (group, element) = struct.unpack(order + "HH", mm[start - (12 if explicit else 8):start - (8 if explicit else 4)])
        if group != 0x7FE0 or element not in (0x0008, 0x0009, 0x0010):
            return False
        if element != 0x0010 and ts not in NATIVE:
            return False
        if ts in NATIVE and end - start <= native_length(g) + 1:
            return False
        value = mm[start:end]
        new = image_extent(value, ts, g)
        if new is value:
            return False
        if mm.rfind(b"\xe0\x7f\x01\x00", 0, start) >= 0:  # (7FE0,0001) Extended Offset Table
            raise CodestreamError("encapsulated pixel data with bytes outside its frames and an Extended Offset Table")
        undefined = mm[start - 4:start] == b"\xff\xff\xff\xff"
        length = b"\xff\xff\xff\xff" if undefined else struct.pack(order + "I", len(new))
        head, tail = mm[:start - 4], mm[end:]
    with open(path, "wb") as fh:
        fh.write(head + length + new + tail)
    return True
