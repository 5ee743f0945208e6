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
* text in legacy CJK encodings (Shift-JIS, GB18030/GBK, Big5, EUC-JP, EUC-KR, ISO 2022 JIS) around
  the searched values' own characters (``legacy_views``);
* zlib and gzip streams inside binary values (``compressed_views``);
* base64 payloads in kept text (``base64_views``).
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
    """What ``spans`` finds in another reading of a text: as it is, with accents folded and with
    ideographic spaces read as spaces (the reading's own views are not taken again)."""
    return spans(view, folded=True) + fold_accents(view, spans) + wide_space_views(view, spans)


_WIDE_SPACE = "\u3000".encode()  # the ideographic space: 山田　太郎, やまだ　たろう in Japanese text


def wide_space_views(text: bytes, spans: Spans) -> list[tuple[int, int, "Needle"]]:
    """The occurrences ``spans`` finds with each ideographic space (U+3000, UTF-8) of ``text`` read
    as one space, around those spaces only, at their offsets in ``text``: a CJK name's forms are
    written with an ASCII space between family and given name (a CJK form is a substring, which
    has no word to read white space loosely around)."""
    i = text.find(_WIDE_SPACE)
    if i < 0:
        return []
    out = []
    while i >= 0:
        s0, e0 = max(0, i - _FOLD_REACH), i + _FOLD_REACH
        j = text.find(_WIDE_SPACE, i + 3)
        while 0 <= j < e0:  # one window for the spaces near each other
            e0, j = j + _FOLD_REACH, text.find(_WIDE_SPACE, j + 3)
        window = text[s0:e0]
        at, pos = [], 0  # the offset in text of each byte of the view (and its end)
        for k in [m for m in range(len(window)) if window.startswith(_WIDE_SPACE, m)]:
            at += range(s0 + pos, s0 + k + 1)
            pos = k + 3
        at += range(s0 + pos, s0 + len(window) + 1)
        for s, e, n in spans(window.replace(_WIDE_SPACE, b" "), folded=True):
            if window.find(_WIDE_SPACE, max(0, at[s] - s0), at[e] - s0) >= 0:  # else found as written
                out.append((at[s], at[e - 1] + (3 if text.startswith(_WIDE_SPACE, at[e - 1]) else 1), n))
        i = j
    return out


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


# Text in the legacy CJK encodings: GB18030/GBK (and GB2312, ISO 2022 IR 58's bytes), Big5,
# Shift-JIS, EUC-JP and EUC-KR/UHC (ISO 2022 IR 149's bytes) that DICOM's SpecificCharacterSet
# names or vendors write into private values, and 7-bit ISO 2022 (IR 87, IR 159: JIS).  Found, as
# the UTF-16 views above, only around the first two bytes of a character the searched values hold
# (above Latin-1) in one of these encodings, then read from a character boundary before it, decoded
# and searched as UTF-8.  Every lead byte is >= 0x81: ASCII text never starts a read.
LEGACY_CODECS = ("gb18030", "big5", "cp932", "euc_jp", "cp949")
_LEGACY_REACH = 96  # bytes read after the character found
_LEGACY_BACK = 24  # and before it (the year of 1961年4月23日, a given name before its family name)
DATE_CHARS = frozenset("年년")  # a written date's year mark: read around it when dates are searched


@lru_cache(maxsize=64)
def _legacy_pairs(chars: frozenset[str]) -> tuple[bytes, dict[bytes, tuple[str, ...]]]:
    """The first two bytes of each of ``chars`` in each legacy codec (-> those codecs), and a
    translation table marking the first bytes (L), the second bytes (T) or both (B)."""
    pairs: dict[bytes, list[str]] = {}
    for c in chars:
        for codec in LEGACY_CODECS:
            try:
                e = c.encode(codec)
            except UnicodeEncodeError:
                continue
            if len(e) >= 2 and e[0] >= 0x81:
                pairs.setdefault(e[:2], []).append(codec)
    firsts, seconds = {p[0] for p in pairs}, {p[1] for p in pairs}
    table = bytes(ord("B") if b in firsts and b in seconds else ord("L") if b in firsts
                  else ord("T") if b in seconds else ord(".") for b in range(256))
    return table, {k: tuple(dict.fromkeys(v)) for k, v in pairs.items()}


def _decoded(data: bytes, codec: str) -> tuple[str, int]:
    """The longest prefix of ``data`` that decodes as ``codec``, decoded, and its length."""
    try:
        return data.decode(codec), len(data)
    except UnicodeDecodeError as exc:
        try:
            return data[:exc.start].decode(codec), exc.start
        except UnicodeDecodeError:  # (a codec that needs what follows to end its prefix)
            return "", 0


def _char_ends(data: bytes, chars: str, codec: str) -> list[int]:
    """The byte offset in ``data`` at which each of ``chars`` (its decoded prefix) ends."""
    import codecs
    ends: list[int] = []
    try:
        if not codec.startswith("iso2022"):
            pos = 0
            for c in chars:
                pos += len(c.encode(codec))
                ends.append(pos)
            return ends
        dec = codecs.getincrementaldecoder(codec)()  # escape sequences: fed byte by byte
        for i in range(len(data)):
            ends += [i + 1] * len(dec.decode(data[i:i + 1]))
            if len(ends) >= len(chars):
                break
    except UnicodeError:  # a character that does not go back: the ones before it are placed
        pass
    return ends


def _legacy_view(text: bytes, start: int, end: int, codec: str, spans: Spans) -> tuple[list, list[int]]:
    """The hits of ``spans`` in ``text[start:end]`` decoded as ``codec`` (as far as it decodes), at
    their offsets in ``text``, and the offsets at which the characters read start (and the last
    ends; not for ISO 2022)."""
    data = text[start:end]
    chars, _ = _decoded(data, codec)
    if max(chars, default="\0") <= "\xff":
        return [], []
    hits = _view_hits(chars.encode("utf-8"), spans)
    iso = codec.startswith("iso2022")
    if iso and not hits:
        return [], []
    at, pos = {0: start}, 0  # UTF-8 offset -> offset in text
    for c, e in zip(chars, _char_ends(data, chars, codec)):
        pos += len(c.encode("utf-8"))
        at[pos] = start + e
    return [(at[s], at[e], n) for s, e, n in hits if s in at and e in at], [] if iso else list(at.values())


def legacy_views(text: bytes, spans: Spans, chars: frozenset[str]) -> list[tuple[int, int, "Needle"]]:
    """The occurrences ``spans`` finds in the stretches of ``text`` (as read, not lower-cased: a
    second byte may be an ASCII letter) written in a legacy CJK encoding (:data:`LEGACY_CODECS`,
    7-bit ISO 2022 JIS) that hold one of ``chars``, at their offsets in ``text``."""
    out: list = []
    if not chars:
        return out
    table, pairs = _legacy_pairs(chars)
    if pairs:
        classes = text.translate(table)
        found = []
        for pat in (b"LT", b"LB", b"BT", b"BB"):
            i = classes.find(pat)
            while i >= 0:
                found.append(i)
                i = classes.find(pat, i + 1)
        read: dict[str, set[int]] = {}  # per codec: the character starts already read
        for i in sorted(found):
            for codec in pairs.get(text[i:i + 2], ()):
                done = read.setdefault(codec, set())
                if i in done:
                    continue
                hits, starts = [], []
                for q in _boundaries(text, i):
                    hits, starts = _legacy_view(text, q, i + _LEGACY_REACH, codec, spans)
                    if i in starts:  # read in step with the character found
                        break
                out += hits
                # a form (at most 48 bytes) that starts before the read's last 48 bytes was read whole
                done.update(x for x in starts if x <= starts[-1] - 48)
    # ISO 2022 IR 87 / IR 159: JIS X 0208 / 0212 in 7 bits, switched in and out by escape sequences;
    # read from a little before the first switch (the year before 年) as far as it decodes
    k, pos = text.find(b"\x1b$"), 0
    while k >= 0:
        start = max(pos, k - _LEGACY_BACK)
        if start + _decoded(text[start:k + 3], "iso2022_jp_2")[1] < k + 3:
            start = k  # the bytes before the switch are no ISO 2022 text
        out += _legacy_view(text, start, k + _ISO2022_READ, "iso2022_jp_2", spans)[0]
        pos = start + _decoded(text[start:k + _ISO2022_READ], "iso2022_jp_2")[1]
        k = text.find(b"\x1b$", max(pos, k + 3))
    return out


_ISO2022_READ = 4096


def _boundaries(text: bytes, i: int) -> list[int]:
    """Where to start reading the character at ``i``: at the first and at the last byte below 0x40
    (digits, space, punctuation: never the second byte of a character in these encodings, so a
    character starts there) of the :data:`_LEGACY_BACK` bytes before it, then at ``i`` itself."""
    safe = [q for q in range(max(0, i - _LEGACY_BACK), i) if text[q] < 0x40]
    return list(dict.fromkeys(safe[:1] + safe[-1:] + [i]))


# base64 payloads in kept text (a data URI, XML or JSON a device or a script encoded): the runs of
# the alphabet (URL-safe too) of at least _B64_MIN characters that decode to text are decoded and
# searched, and a hit covers the whole run.  Base64 of text has a shape: each group of four encodes
# three bytes of text (printable ASCII, tab, line ends, a UTF-16 zero byte), which leaves only some
# letters possible at each of a group's first three places; protocol identifiers (sCoilSelectMeas,
# aRxCoilSelectData: about 2,600 runs of twelve or more in a 134 kB Siemens header) rarely have it
# (of 2,512 distinct runs in 149 real Siemens and GE headers, 6 pass and decode to text, none to a
# name).  The runs are listed in C (translate, split), the test and the decoding are cached per run
# (a series repeats them), so a header without payloads pays the listing.  zlib and gzip streams
# (eJ, H4sI) are decoded and inflated whatever their shape.
_B64_MIN = 8  # characters: six bytes, a bare MRN
_B64_SHAPE_SHARE = 0.7  # of a run's groups that have the shape of text (UTF-8 beside ASCII lowers it)
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_B64_KEEP = bytes(c if c in _B64_ALPHABET else 32 for c in range(256))
_B64_VALUE = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_B64_VALUE.update({ord("-"): 62, ord("_"): 63})
_TEXT_BYTES = (0, 9, 10, 13, *range(0x20, 0x7F))
_TEXT_BYTE_SET = bytes(_TEXT_BYTES)


def _b64_place_table(ok: set[int]) -> bytes:
    return bytes(ord("y") if _B64_VALUE.get(c, -1) in ok else ord("n") for c in range(256))


_B64_PLACES = (_b64_place_table({b >> 2 for b in _TEXT_BYTES}),
               _b64_place_table({(x << 4) | (b >> 4) for x in range(4) for b in _TEXT_BYTES}),
               _b64_place_table({((b & 15) << 2) | (c >> 6) for b in _TEXT_BYTES for c in _TEXT_BYTES}))
_B64_URLSAFE = bytes.maketrans(b"-_", b"+/")


@lru_cache(maxsize=1 << 14)
def _b64_payloads(run: bytes) -> tuple[tuple[bytes, bool], ...]:
    """What ``run`` decodes to at each offset where it is base64 of text (at least two groups, most
    of them in the shape of base64 of text, and text once decoded), or of a zlib/gzip stream
    (``packed``): (bytes, packed) each.  Cached: a pure function of the run."""
    import binascii
    out = []
    for phase in range(4):
        packed = run.startswith((b"eJ", b"H4sI"), phase)
        groups = (len(run) - phase) // 4
        if not packed:
            if groups < 2:
                continue
            body = run[phase:phase + 4 * groups]
            places = [body[k::4].translate(t) for k, t in enumerate(_B64_PLACES)]
            shaped = sum(a == b == c == 121 for a, b, c in zip(*places))  # 121: "y", each place of text
            if shaped < _B64_SHAPE_SHARE * groups or (groups <= 3 and shaped < groups):
                continue
        body = run[phase:].translate(_B64_URLSAFE)
        body = body[:-1] if len(body) % 4 == 1 else body + b"=" * (-len(body) % 4)
        try:
            raw = binascii.a2b_base64(body)
        except binascii.Error:
            continue
        if packed or len(raw.translate(None, _TEXT_BYTE_SET)) <= (1 - _B64_SHAPE_SHARE) * len(raw):
            out.append((raw, packed))
    return tuple(out)


def base64_views(text: bytes, spans: Spans) -> list[tuple[int, int, "Needle"]]:
    """The values ``spans`` finds in the base64 runs of ``text`` (as read, not lower-cased) that
    decode to text (or to a zlib/gzip stream), each at the span of every occurrence of the run."""
    out: list = []
    for run in {r for r in text.translate(_B64_KEEP).split() if len(r) >= _B64_MIN}:
        found: dict[int, "Needle"] = {}
        for raw, packed in _b64_payloads(run):
            hits = compressed_views(raw, spans) if packed else _view_hits(raw, spans) + utf16_views(raw.lower(), spans)
            found.update((id(n), n) for _, _, n in hits)
        if found:
            i = text.find(run)
            while i >= 0:
                e = i + len(run)
                if (not i or text[i - 1] not in _B64_ALPHABET) and (e == len(text) or text[e] not in _B64_ALPHABET):
                    e += len(text[e:e + 2]) - len(text[e:e + 2].lstrip(b"="))  # and its padding
                    out += [(i, e, n) for n in found.values()]
                i = text.find(run, i + 1)
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
