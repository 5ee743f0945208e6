"""Build ``src/deidflow/data/han_readings.tsv``: the Mandarin readings (pinyin, without tones) of Han characters,
and ``src/deidflow/data/pinyin_wade_giles.tsv``: those syllables in Wade-Giles as Taiwanese passports write it.

A Chinese name stored only in Han characters (``王^小明``) is written in pinyin in Latin-script text
(``Wang Xiaoming``, ``WANG XIAO MING``); the leak scan searches it in those spellings
(``identifiers.pinyin_spellings``).  The readings come from the character dictionary of pypinyin
(MIT, https://github.com/mozillazg/python-pinyin, ``pypinyin/pinyin_dict.json``, itself built from
pinyin-data, MIT, https://github.com/mozillazg/pinyin-data, which draws on Unihan): each
character's readings in the dictionary's order (the usual one first), tones dropped, ü kept,
duplicates after dropping the tones removed, at most :data:`MAX_READINGS`.  The file lists one
reading list a line, then a tab, then every character with that list.

Names from Taiwan (and older records) are written in Wade-Giles without its apostrophes and
umlauts (張志明 Chang Chih-Ming, 謝 Hsieh, 曾 Tseng, 郭 Kuo): :func:`wade_giles` spells each syllable
so by the system's rules, and the second file lists the syllables whose spelling differs.

Run once by a maintainer (needs ``pip download --no-deps pypinyin`` unpacked somewhere); the
product only reads the .tsv:

    PYTHONPATH=src python tools/han_readings.py /path/to/unpacked/pypinyin
"""
from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "deidflow" / "data" / "han_readings.tsv"
OUT_WG = ROOT / "src" / "deidflow" / "data" / "pinyin_wade_giles.tsv"
MAX_READINGS = 4
HEADER = ("# Mandarin readings of Han characters (pinyin without tones, the usual reading first, at most {n}):\n"
          "# readings, a tab, the characters that have them.  Derived by tools/han_readings.py from the\n"
          "# character dictionary of pypinyin (MIT, https://github.com/mozillazg/python-pinyin; built from\n"
          "# pinyin-data, MIT, https://github.com/mozillazg/pinyin-data, which draws on Unicode's Unihan).\n")


def toneless(reading: str) -> str:
    """A toned pinyin syllable without its tone mark (ü stays ü): lǚ -> lü, zhāng -> zhang."""
    bare = "".join(c for c in unicodedata.normalize("NFD", reading) if c == "\u0308" or not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare).lower()


WG_HEADER = ("# Pinyin syllables (as in han_readings.tsv) and their Wade-Giles spelling as Taiwanese passports and\n"
             "# older records write it, without apostrophes and umlauts (zhang chang, xie hsieh, zhi chih, guo kuo):\n"
             "# the syllables whose spelling differs.  Derived by tools/han_readings.py by the system's rules.\n")
_WG_WHOLE = {"zhi": "chih", "chi": "chih", "shi": "shih", "ri": "jih", "zi": "tzu", "ci": "tzu", "si": "ssu",
             "er": "erh", "yi": "i", "you": "yu", "yan": "yen", "ye": "yeh", "yong": "yung", "yue": "yueh"}
_WG_INITIALS = (("zh", "ch"), ("ch", "ch"), ("sh", "sh"), ("b", "p"), ("p", "p"), ("d", "t"), ("t", "t"), ("g", "k"),
                ("k", "k"), ("j", "ch"), ("q", "ch"), ("x", "hs"), ("r", "j"), ("z", "ts"), ("c", "ts"), ("m", "m"),
                ("f", "f"), ("n", "n"), ("l", "l"), ("h", "h"))


def wade_giles(syllable: str) -> str:
    """A toneless pinyin syllable in Wade-Giles without apostrophes and umlauts: zhang -> chang,
    xie -> hsieh, zhi -> chih, zi -> tzu, guo -> kuo, duo -> to, gui -> kuei, ge -> ko, rong -> jung."""
    if syllable in _WG_WHOLE:
        return _WG_WHOLE[syllable]
    initial, final = "", syllable
    for p, wg in _WG_INITIALS:
        if syllable.startswith(p):
            initial, final = wg, syllable[len(p):]
            break
    head = syllable[:len(syllable) - len(final)]
    final = final.replace("ü", "u")
    if final.endswith("ong"):
        final = final[:-3] + "ung"  # rong jung, xiong hsiung
    elif final.endswith("ian"):
        final = final[:-3] + "ien"
    elif final in ("ie", "ue"):
        final += "h"  # xie hsieh, jue chueh, lüe lueh
    elif final == "uo" and head not in ("g", "k", "h", "sh"):
        final = "o"  # duo to, zhuo cho; guo kuo, shuo shuo
    elif final == "ui" and head in ("g", "k"):
        final = "uei"  # gui kuei
    elif final == "e" and head in ("g", "k", "h"):
        final = "o"  # ge ko, he ho
    return initial + final


def readings(folder: Path) -> dict[str, tuple[str, ...]]:
    """Each character of pypinyin's dictionary in ``folder`` -> its toneless readings."""
    table = json.loads((folder / "pinyin_dict.json").read_text(encoding="utf-8"))
    out = {}
    for cp, text in table.items():
        c = chr(int(cp))
        if unicodedata.category(c) != "Lo":
            continue
        rs = tuple(dict.fromkeys(toneless(r) for r in text.split(",") if r.strip()))
        rs = tuple(r for r in rs if r.replace("ü", "").isalpha() and r.replace("ü", "").isascii())[:MAX_READINGS]
        if rs:
            out[c] = rs
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    groups: dict[tuple[str, ...], list[str]] = {}
    for c, rs in sorted(readings(Path(argv[0])).items()):
        groups.setdefault(rs, []).append(c)
    rows = sorted(f"{' '.join(rs)}\t{''.join(cs)}" for rs, cs in groups.items())
    OUT.write_text(HEADER.format(n=MAX_READINGS) + "".join(r + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {sum(map(len, groups.values()))} characters, {len(rows)} reading lists")
    syllables = sorted({r for rs in groups for r in rs})
    wg = [f"{s}\t{wade_giles(s)}" for s in syllables if wade_giles(s) != s]
    OUT_WG.write_text(WG_HEADER + "".join(r + "\n" for r in wg), encoding="utf-8")
    print(f"{OUT_WG}: {len(wg)} of {len(syllables)} syllables differ")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
