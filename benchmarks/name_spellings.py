"""What the spellings of names cost (issue 21: a dataset of 10,000 subjects, each subject's name
forms becoming needles): the needles of N subjects' names and one Matcher of all of them, for
Latin names (whose forms pinyin and the Cyrillic systems never touch), names stored only in Han
characters (spelled in pinyin too) and names stored in Cyrillic (spelled in five systems and
mixes).  Each subject's values are a PatientName (its own forms) and the same name as another
unit's subject sees it (``whole_name``).  ``python benchmarks/name_spellings.py 10000 1000`` prints
the table (Latin names at the first size, Han and Cyrillic at the second)."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from deidflow.qc import identifiers, leakscan  # noqa: E402
from tables import table  # noqa: E402

LATIN_FAMILY = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
                "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
                "Mueller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann O'Brien McDonald").split()
LATIN_GIVEN = ("James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara Richard "
               "Susan Joseph Jessica Thomas Sarah Charles Karen Juergen Anna Mary-Kate Hans Lucinda Kasimir").split()
HAN_FAMILY = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曾单欧阳司马"
HAN_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英小东国华建文"
CYR_FAMILY = "Иванов Смирнов Кузнецов Попов Васильев Петров Соколов Михайлов Новиков Фёдоров Морозов Волков " \
             "Алексеев Лебедев Семёнов Егоров Павлов Козлов Степанов Николаев Орлов Андреев Макаров Щербаков " \
             "Чайковский Жуков Хрущёв Цветаева Юсупова".split()
CYR_GIVEN = "Александр Алексей Дмитрий Сергей Андрей Юрий Евгений Пётр Мария Елена Ольга Наталья Татьяна " \
            "Ксения Юлия Анастасия Фёдор Илья".split()


def names(kind: str, n: int) -> list[str]:
    rnd = random.Random(21)
    out = []
    for i in range(n):
        if kind == "latin":
            out.append(f"{rnd.choice(LATIN_FAMILY)}{i}^{rnd.choice(LATIN_GIVEN)}")  # one of its own per subject
        elif kind == "han":
            fam = rnd.choice([HAN_FAMILY[k] for k in range(len(HAN_FAMILY) - 4)] + ["欧阳", "司马"])
            out.append(fam + "^" + "".join(rnd.choice(HAN_GIVEN) for _ in range(rnd.choice((1, 2, 2)))))
        else:
            # with a patronymic (Алексеевич-like: a given name + ович), so that few values repeat
            out.append(f"{rnd.choice(CYR_FAMILY)}^{rnd.choice(CYR_GIVEN)}^{rnd.choice(CYR_GIVEN)}ович")
    return out


def measure(kind: str, n: int) -> dict:
    identifiers._searched.cache_clear()
    identifiers._cyrillic_word.cache_clear() if hasattr(identifiers, "_cyrillic_word") else None
    values = names(kind, n)
    t = time.perf_counter()
    needles = []
    for i, v in enumerate(values):
        needles += identifiers.needles_for(f"sub-{i}", [("name", "PatientName", v), ("whole_name", "PatientName", v)],
                                           b"0" * 16)
    forms = time.perf_counter() - t
    t = time.perf_counter()
    m = identifiers.Matcher(needles)
    build = time.perf_counter() - t
    return {"kind": kind, "subjects": n, "needles": len(m), "forms_s": forms, "build_s": build}


def unit_job(kind: str, n: int) -> dict:
    identifiers._searched.cache_clear()
    values = names(kind, n)
    t = time.perf_counter()
    m = leakscan.UnitMatcher([], {f"sub-{i}": v for i, v in enumerate(values)}, b"0" * 16)
    build = time.perf_counter() - t
    t = time.perf_counter()
    m.find(b"<td>t1 mprage head</td> report text " * 200 + "Иванов Иван Петрович 王小明".encode())
    return {"kind": kind, "subjects": n, "made": len(m.made), "build_s": build, "find_s": time.perf_counter() - t}


def table_rows(results: list[dict]) -> list[tuple]:
    rows = [("names", "subjects", "searched forms", "forms s", "matcher build s", "per subject ms")]
    for r in results:
        rows.append((r["kind"], f"{r['subjects']:,}", f"{r['needles']:,}", f"{r['forms_s']:.2f}", f"{r['build_s']:.2f}",
                     f"{1000 * (r['forms_s'] + r['build_s']) / r['subjects']:.2f}"))
    return rows


def main(latin: int, other: int) -> None:
    results = [measure("latin", latin), measure("han", other), measure("cyrillic", other)]
    table("Name spellings: needles of N subjects' names and one Matcher of them", table_rows(results))
    rows = [("other subjects' names", "subjects", "needles made at once", "unit matcher s", "text search s")]
    for r in (unit_job(k, latin) for k in ("latin", "han", "cyrillic")):
        rows.append((r["kind"], f"{r['subjects']:,}", f"{r['made']:,}", f"{r['build_s']:.2f}", f"{r['find_s']:.3f}"))
    table("A unit job's matcher of the other subjects' whole names", rows)


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [10000, 1000]
    main(sizes[0], sizes[-1])
