"""Other readings of a text's bytes for the one identifier matcher
(:class:`deidflow.qc.identifiers.Matcher`), each searched with the same needles and its hits mapped
back to the text's offsets:

* accented Latin letters as their base letters: a name stored without accents
  (``MULLER^JURGEN``, as legacy systems and many DICOM exports write it) is found where a text
  writes it with them (``Müller Jürgen``), in UTF-8 and in Latin-1 bytes (the other direction,
  ``Müller`` stored and ``Mueller`` written, is a matter of the name's forms:
  :func:`deidflow.qc.identifiers.accented_spellings`, transliterations);
* UTF-16 text (Latin-1 range, either byte order) inside binary values: Windows-based devices keep
  XML and state in UTF-16 (``Z\0e\0b\0…``), which the byte forms of a value never match;
* UTF-16 text of the other scripts the searched values are written in (``script_views``);
* zlib and gzip streams inside binary values (``compressed_views``).
"""
from __future__ import annotations

import bisect
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .identifiers import Needle

Spans = Callable[..., list]


# Latin letters Unicode does not decompose into a base letter, in ASCII (the identifier forms'
# transliterations use the same table: identifiers.transliterations)
FOLD_EXTRA = {"ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "đ": "d", "Đ": "D", "ł": "l", "Ł": "L",
              "œ": "oe", "Œ": "OE", "þ": "th", "Þ": "TH", "ı": "i", "ħ": "h", "Ħ": "H", "ð": "d", "Ð": "D"}


@lru_cache(maxsize=1)
def _accent_table() -> dict[bytes, bytes]:
    """Lower-cased base letters of the accented Latin letters U+00C0-U+017F, by their UTF-8 bytes
    and (U+00C0-U+00FF) their Latin-1 byte: ü, Ü -> u; ß -> ss; ø, ł, đ -> o, l, d; combining
    accents (U+0300-U+036F) -> nothing."""
    import unicodedata
    out = {chr(cp).encode("utf-8"): b"" for cp in range(0x300, 0x370)}  # combining accents (NFD text): dropped
    for cp in range(0xC0, 0x180):
        c = chr(cp)
        base = (FOLD_EXTRA.get(c) or unicodedata.normalize("NFKD", c)[:1]).lower()
        if base.isascii() and base.isalpha():
            out[c.encode("utf-8")] = base.encode()
            if cp <= 0xFF:
                out[bytes([cp])] = base.encode()
    return out


# An accented letter: two UTF-8 bytes (U+00C0-U+017F), a combining accent (U+0300-U+036F: the
# decomposed form, NFD, that macOS file names and some exports write), or one Latin-1 byte that
# starts no UTF-8 character.
_ACCENT = rb"(?:[\xc3-\xc5][\x80-\xbf]|\xcc[\x80-\xbf]|\xcd[\x80-\xaf]|[\xc0-\xff](?![\x80-\xbf]))"
_ACCENTED = re.compile(_ACCENT)
# An accented letter inside a word of ASCII letters (Müller, Jürgen, Łódź; José at its end), found
# in the text's byte classes (a: ASCII letter, H: byte >= 0xC0, c: UTF-8 continuation) with
# bytes.find: a regex over a binary header cost more than the whole matcher.
_BYTE_CLASS = bytes(ord("a") if 97 <= b <= 122 else ord("H") if b >= 0xC0 else ord("c") if b >= 0x80 else ord(".")
                    for b in range(256))
_ACCENT_IN_WORD = ((b"aH", ((-1, b"aaH"), (0, b"aHa"), (0, b"aHca"))), (b"Ha", ((0, b"Haa"),)),
                   (b"Hca", ((0, b"Hcaa"),)))  # a pair found fast, then the shapes around it
_WORD_END = re.compile(rb"[a-z0-9\x80-\xff]*")
_WORD = re.compile(rb"[aHc]*")  # a word in the byte classes
_FOLD_REACH = 96  # bytes searched on either side of an accented letter next to an ASCII one


def fold_accents(low: bytes, spans: Spans) -> list[tuple[int, int, "Needle"]]:
    """The occurrences ``spans`` finds in ``low`` with its accented Latin letters written as their
    base letters (a name stored without accents, written with them), at their offsets in ``low``;
    only those that cover a folded letter (the others ``spans`` found in ``low`` itself).  Only the
    stretches around an accented letter next to ASCII letters are folded, and searched as one text
    (binary values hold many bytes >= 0xC0: folding a whole header cost more than matching it)."""
    classes = low.translate(_BYTE_CLASS)
    found = []
    for pair, shapes in _ACCENT_IN_WORD:
        i = classes.find(pair)
        while i >= 0:
            if any(classes.startswith(shape, i + at) for at, shape in shapes):
                found.append(i)
            i = classes.find(pair, i + 1)
    if not found:
        return []
    words: dict[int, int] = {}  # the words (letters, accented or not) holding them: start -> end
    for i in found:
        ws = i - len(_WORD.match(classes[max(0, i - 40):i][::-1]).group())
        we = i + len(_WORD.match(classes, i, i + 40).group())
        words[ws] = max(we, words.get(ws, we))
    windows: list[list[int]] = []  # the stretches searched: each word with what a name form reaches
    for ws in sorted(words):
        s0, e0 = max(0, ws - _FOLD_REACH), min(len(low), words[ws] + _FOLD_REACH)
        # start and end between words (a word cut in two would look bounded)
        s0 -= len(_WORD_END.match(low[max(0, s0 - 32):s0][::-1]).group())
        e0 += len(_WORD_END.match(low, e0, min(len(low), e0 + 32)).group())
        if windows and s0 <= windows[-1][1]:
            windows[-1][1] = max(e0, windows[-1][1])
        else:
            windows.append([s0, e0])
    spans_of_words = sorted(words.items())
    table = _accent_table()
    # marks: (folded start, folded end, original start, original end) of each folded letter and of
    # each NUL put between two windows (standing for the original bytes between them)
    parts, marks, letters, size, prev = [], [], [], 0, 0
    for ws, we in windows:
        parts.append(b"\x00")
        marks.append((size, size + 1, prev, ws))
        size, pos = size + 1, ws
        for m in (m for w0, w1 in spans_of_words if ws <= w0 < we for m in _ACCENTED.finditer(low, w0, w1)):
            base = table.get(m.group())
            if base is None or m.start() < pos:
                continue
            parts += [low[pos:m.start()], base]
            size += m.start() - pos
            marks.append((size, size + len(base), m.start(), m.end()))
            letters.append((size, size + len(base)))
            size, pos = size + len(base), m.end()
        parts.append(low[pos:we])
        size, prev = size + we - pos, we
    if not letters:
        return []
    folded = b"".join(parts)
    starts, letter_starts = [mk[0] for mk in marks], [lt[0] for lt in letters]
    out = []
    for s, e, n in spans(folded, folded=True):
        i = bisect.bisect_right(letter_starts, e - 1) - 1  # the last folded letter starting before e
        if i >= 0 and letters[i][1] > s:  # else found in the original text as it is
            out.append((_unfold(s, marks, starts, False), _unfold(e, marks, starts, True), n))
    return out


def _unfold(f: int, marks, starts, end: bool) -> int:
    """The offset in the original text of folded offset ``f`` (a start, or an ``end``)."""
    i = bisect.bisect_right(starts, f - 1 if end else f) - 1
    if i < 0:
        return f
    fs, fe, os_, oe = marks[i]
    if fs <= (f - 1 if end else f) < fe:
        return oe if end else os_
    return oe + (f - fe)


def _view_hits(view: bytes, spans: Spans) -> list:
    """What ``spans`` finds in another reading of a text: as it is and with accents folded (the
    reading's own views are not taken again)."""
    return spans(view, folded=True) + fold_accents(view, spans)


# UTF-16 text: Latin-1 characters each followed (LE) or preceded (BE) by a zero byte, found in the
# text's byte classes (t: printable Latin-1, z: zero byte) with bytes.find like the accents above.
_UTF16_CLASS = bytes(ord("z") if b == 0 else ord("t") if 0x20 <= b <= 0x7E or b >= 0xA0 else ord(".")
                     for b in range(256))
_UTF16_MIN = 4  # characters in a row: shorter runs are numbers in binary structures


def utf16_views(low: bytes, spans: Spans) -> list[tuple[int, int, "Needle"]]:
    """The occurrences ``spans`` finds in the UTF-16 stretches of ``low`` (Latin-1 characters,
    little- or big-endian) read as Latin-1 text, at their offsets in ``low``."""
    if b"\x00" not in low:
        return []
    classes = low.translate(_UTF16_CLASS)
    out = []
    for first in (0, 1):  # 0: little-endian (character, zero), 1: big-endian (zero, character)
        unit = b"tz" if first == 0 else b"zt"
        i = classes.find(unit * _UTF16_MIN)
        while i >= 0:
            j = i
            while classes.startswith(unit, j):
                j += 2
            # the other byte order's text read one byte off: little-endian text read as big-endian
            # loses its first character (a printable byte before, its last zero after), big-endian
            # text read as little-endian its last one (a zero before, a printable byte after)
            before = classes[i - 1:i] if i else b""
            after = classes[j:j + 1]
            if (before, after) != ((b"t", b"z") if first else (b"z", b"t")):
                view = low[i + first:j:2]
                hits = _view_hits(view, spans)
                out += [(i + 2 * s, i + 2 * e, n) for s, e, n in hits]
            i = classes.find(unit * _UTF16_MIN, j)
    return out


# UTF-16 text of other scripts (Cyrillic, Greek, CJK, Hangul, Latin Extended …): found around a
# code unit of a character the searched values hold above Latin-1 next to another letter, then read
# with the Latin-1 characters between its words, decoded and searched as UTF-8.  Only the searched
# values' characters start a read, so binary data rarely does.
_SCRIPT_MIN = 3  # code units in a row
_SCRIPT_REACH = 512  # bytes read on either side of the character found


@lru_cache(maxsize=64)
def _script_runs(chars: frozenset[str]) -> tuple[bytes, frozenset[bytes], frozenset[bytes], re.Pattern, re.Pattern]:
    """For ``chars``: a translation table marking the high bytes of their code units ``b``, their
    UTF-16LE and UTF-16BE code units, and the patterns of UTF-16LE and UTF-16BE runs of code units
    of their blocks and printable Latin-1 characters."""
    blocks = {ord(c) >> 8 for c in chars}
    table = bytes(ord("b") if c in blocks else ord(".") for c in range(256))
    hi = b"".join(re.escape(bytes([b])) for b in sorted(blocks))
    lat = rb"\x20-\x7e\xa0-\xff"
    le = rb"(?:[" + lat + rb"]\x00|[\x00-\xff][" + hi + rb"])"
    be = rb"(?:\x00[" + lat + rb"]|[" + hi + rb"][\x00-\xff])"
    return (table, frozenset(c.encode("utf-16-le") for c in chars), frozenset(c.encode("utf-16-be") for c in chars),
            re.compile(le + rb"{%d,}" % _SCRIPT_MIN, re.S), re.compile(be + rb"{%d,}" % _SCRIPT_MIN, re.S))


def _letter_unit(u: bytes, units: frozenset[bytes], little: bool) -> bool:
    """Whether the code unit ``u`` is one of ``units`` or a Latin-1 letter."""
    if u in units:
        return True
    lo, hi = (u[0], u[1]) if little and len(u) == 2 else (u[1], u[0]) if len(u) == 2 else (0, 1)
    return hi == 0 and (65 <= lo <= 90 or 97 <= lo <= 122 or lo >= 0xC0)


def script_views(text: bytes, spans: Spans, chars: frozenset[str]) -> list[tuple[int, int, "Needle"]]:
    """The occurrences ``spans`` finds in the UTF-16 stretches of ``text`` (as read, not
    lower-cased: the high byte of a code unit may be an ASCII letter) that hold ``chars`` (the
    searched values' characters above Latin-1), decoded and read as UTF-8, at their offsets in
    ``text``.  A stretch is read around a code unit of ``chars`` next to another letter; it is
    also read one byte on, in case its match began one byte early."""
    if not chars:
        return []
    table, le_units, be_units, le_run, be_run = _script_runs(chars)
    classes = text.translate(table)
    out: list = []
    done = 0  # the text up to here has been read
    k = classes.find(b"b")
    while k >= 0:
        if not ((k and text[k - 1:k + 1] in le_units and (_letter_unit(text[k - 3:k - 1], le_units, True)
                                                           or _letter_unit(text[k + 1:k + 3], le_units, True)))
                or (text[k:k + 2] in be_units and (_letter_unit(text[k - 2:k], be_units, False)
                                                   or _letter_unit(text[k + 2:k + 4], be_units, False)))):
            k = classes.find(b"b", k + 1)
            continue
        ws, we = max(done, k - _SCRIPT_REACH), k + _SCRIPT_REACH
        done = min(we, len(text))
        for pattern, codec in ((le_run, "utf-16-le"), (be_run, "utf-16-be")):  # a byte order may look like the other
            for m in pattern.finditer(text, ws):
                if m.start() >= we:
                    break
                out += _script_view(text, m.start(), m.end(), codec, spans)
                done = max(done, m.end())
        k = classes.find(b"b", done)
    return out


def _script_view(text: bytes, s0: int, e0: int, codec: str, spans: Spans) -> list:
    """The hits of ``spans`` in ``text[s0:e0]`` decoded as ``codec`` (also from one byte on)."""
    out = []
    for start in (s0, s0 + 1):
        chars = text[start:start + (e0 - start) // 2 * 2].decode(codec, "replace")
        if max(chars, default="\0") <= "\xff":
            continue  # Latin-1 only: utf16_views reads it
        view = chars.encode("utf-8")
        hits = _view_hits(view, spans)
        if hits:
            ends = [0]  # UTF-8 offset of each character (every code unit here is one character)
            for c in chars:
                ends.append(ends[-1] + len(c.encode("utf-8")))
            at = {o: k for k, o in enumerate(ends)}
            out += [(start + 2 * at[s], start + 2 * at[e], n) for s, e, n in hits if s in at and e in at]
    return out


# zlib and gzip streams inside binary values (GE's Protocol Data Block, a device's compressed XML
# state): inflated (at most MAX_INFLATED bytes) and searched; a hit covers the whole compressed
# stream, so the sweep's fill breaks it and the leak scan reports where it starts.
_STREAM_STARTS = (b"x\x9c", b"x\x01", b"x\xda", b"x^", b"\x1f\x8b\x08")  # zlib levels 6, 1, 9, 2-5; gzip
MAX_INFLATED = 1 << 24


def compressed_views(text: bytes, spans: Spans) -> list[tuple[int, int, "Needle"]]:
    """The values ``spans`` finds in the zlib and gzip streams of ``text`` (as read, not
    lower-cased), each at the span of its whole stream."""
    import zlib
    out = []
    view = memoryview(text)
    for start in _STREAM_STARTS:
        i = text.find(start)
        while i >= 0:
            d = zlib.decompressobj(31 if start[0] == 0x1F else 15)
            try:
                raw = d.decompress(view[i:], MAX_INFLATED)
            except zlib.error:
                raw = b""
            if raw:
                hits = _view_hits(raw, spans) + utf16_views(raw.lower(), spans)
                end = len(text) - len(d.unused_data) if d.eof else len(text)
                out += [(i, end, n) for n in {id(n): n for _, _, n in hits}.values()]
            i = text.find(start, i + 1)
    return out
