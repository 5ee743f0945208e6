"""Build ``src/deidflow/data/han_readings.tsv``: the Mandarin readings (pinyin, without tones) of Han characters.

A Chinese name stored only in Han characters (``王^小明``) is written in pinyin in Latin-script text
(``Wang Xiaoming``, ``WANG XIAO MING``); the leak scan searches it in those spellings
(``identifiers.pinyin_spellings``).  The readings come from the character dictionary of pypinyin
(MIT, https://github.com/mozillazg/python-pinyin, ``pypinyin/pinyin_dict.json``, itself built from
pinyin-data, MIT, https://github.com/mozillazg/pinyin-data, which draws on Unihan): each
character's readings in the dictionary's order (the usual one first), tones dropped, ü kept,
duplicates after dropping the tones removed, at most :data:`MAX_READINGS`.  The file lists one
reading list a line, then a tab, then every character with that list.

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
MAX_READINGS = 4
HEADER = ("# Mandarin readings of Han characters (pinyin without tones, the usual reading first, at most {n}):\n"
          "# readings, a tab, the characters that have them.  Derived by tools/han_readings.py from the\n"
          "# character dictionary of pypinyin (MIT, https://github.com/mozillazg/python-pinyin; built from\n"
          "# pinyin-data, MIT, https://github.com/mozillazg/pinyin-data, which draws on Unicode's Unihan).\n")


def toneless(reading: str) -> str:
    """A toned pinyin syllable without its tone mark (ü stays ü): lǚ -> lü, zhāng -> zhang."""
    bare = "".join(c for c in unicodedata.normalize("NFD", reading) if c == "\u0308" or not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare).lower()


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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
