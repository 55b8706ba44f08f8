"""MMBench from its TSV (dev: scored locally; test: a submission file).

TSV columns: ``index, question, hint, A, B, C, D, answer (dev), category,
l2-category, split, image`` (base64; a short number instead of base64 refers
to the row with that index, as the circular TSVs do). Circular evaluation:
rows ``i + k*1e6`` are copies of question ``i`` with rotated options; when the
TSV has none, ``eval`` makes them (one per option) unless ``--no-circular``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import sys
from pathlib import Path
from typing import Any

from .. import scorers
from ..registry import Benchmark
from ..samples import Sample
from . import common
from .common import DataError

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H", "I")
REQUIRED = ("index", "question", "A", "B", "image")
KEEP_META = ("hint", "category", "l2-category", "split")


def _present(v: Any) -> bool:
    return v is not None and str(v).strip() not in ("", "nan", "NaN", "None")


def read_tsv(path: Path) -> list[dict]:
    """The TSV's rows (with ``_line``), checked field by field; images not decoded yet."""
    common.require_file(path, "MMBench TSV")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far beyond the 128 kB default
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(path, f"header lacks column(s) {', '.join(missing)}; has {', '.join(header)}", line=1)
        seen: dict[int, int] = {}
        for row in reader:
            n = reader.line_num
            try:
                idx = int(float(row["index"]))
            except (TypeError, ValueError):
                raise DataError(path, f"must be an integer, got {row['index']!r}", line=n, field="index") from None
            if idx in seen:
                raise DataError(path, f"index {idx} repeats line {seen[idx]}", line=n, field="index")
            seen[idx] = n
            for key in ("question", "A", "B", "image"):
                if not _present(row.get(key)):
                    raise DataError(path, "is empty", line=n, field=key)
            if "answer" in row and _present(row["answer"]):
                opts = [c for c in LETTERS if _present(row.get(c))]
                if row["answer"].strip() not in opts:
                    raise DataError(path, f"{row['answer']!r} is not one of the options {opts}", line=n,
                                    field="answer")
            row["_line"], row["_index"] = n, idx
            rows.append(row)
    if not rows:
        raise DataError(path, "holds no rows")
    return rows


def decode_images(rows: list[dict], path: Path) -> dict[int, Any]:
    """index -> lazily decoded PIL image (the header is parsed now, so a broken image fails here)."""
    from PIL import Image, UnidentifiedImageError

    by_index = {r["_index"]: r for r in rows}
    images: dict[int, Any] = {}
    for r in rows:
        field = r["image"].strip()
        if len(field) <= 64 and field.lstrip("-").isdigit():  # a reference to another row's image
            ref = int(field)
            if ref not in by_index or len(by_index[ref]["image"].strip()) <= 64:
                raise DataError(path, f"refers to row {ref}, which holds no image", line=r["_line"], field="image")
            continue
        try:
            raw = base64.b64decode(field, validate=True)
            images[r["_index"]] = Image.open(io.BytesIO(raw))
        except (binascii.Error, ValueError) as exc:
            raise DataError(path, f"is not valid base64 ({exc})", line=r["_line"], field="image") from None
        except UnidentifiedImageError:
            raise DataError(path, "decodes to bytes that are not an image", line=r["_line"], field="image") from None
    for r in rows:
        if r["_index"] not in images:
            images[r["_index"]] = images[int(r["image"].strip())]
    return images


def build_prompt(question: str, hint: str | None, options: dict[str, str], suffix: str) -> str:
    """LLaVA-1.5's MMBench prompt: hint, question, one 'X. option' line each, then the instruction."""
    text = f"{hint}\n{question}" if _present(hint) else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return common.with_suffix(text, suffix)


def rotations(row: dict) -> list[tuple[int, dict[str, str], str | None]]:
    """(index, options, answer) of the question and its circular copies: copy k shifts the
    option texts k places (A gets the old B ...) and moves the answer letter with them."""
    letters = [c for c in LETTERS if _present(row.get(c))]
    texts = [row[c] for c in letters]
    answer = row["answer"].strip() if _present(row.get("answer")) else None
    out = []
    for k in range(len(letters)):
        rotated = texts[k:] + texts[:k]
        new_answer = None
        if answer is not None:
            new_answer = letters[(letters.index(answer) - k) % len(letters)]
        out.append((row["_index"] + k * scorers.MMBENCH_CIRCULAR_OFFSET, dict(zip(letters, rotated)), new_answer))
    return out


class MMBench(Benchmark):
    name = "mmbench"
    description = "MMBench (dev: circular and single-pass accuracy; test: submission file)"
    default_max_new_tokens = 128

    def add_eval_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, required=True,
                            help="the MMBench TSV (e.g. mmbench_dev_20230712.tsv) or a folder holding one")
        parser.add_argument("--no-circular", action="store_true",
                            help="ask each question once (single pass); default: add rotated copies when the "
                                 "TSV has answers and no copies of its own")
        common.add_prompt_arg(parser, common.MMBENCH_LETTER)

    def tsv(self, args: argparse.Namespace) -> Path:
        data = Path(args.data)
        if data.is_dir():
            found = sorted(data.glob("*.tsv"))
            if len(found) != 1:
                raise DataError(data, f"expected one *.tsv here, found {len(found)}; pass the file itself")
            return found[0]
        return common.require_file(data, "MMBench TSV")

    def fingerprint(self, args: argparse.Namespace) -> Any:
        path = self.tsv(args)
        return {"files": common.fingerprint_files(path), "circular": not args.no_circular,
                "prompt_suffix": args.prompt_suffix}

    def load_samples(self, args: argparse.Namespace) -> list[Sample]:
        path = self.tsv(args)
        rows = read_tsv(path)
        images = decode_images(rows, path)
        has_copies = any(r["_index"] >= scorers.MMBENCH_CIRCULAR_OFFSET for r in rows)
        has_answers = all(_present(r.get("answer")) for r in rows)
        samples = []
        for r in rows:
            if has_copies or args.no_circular or not has_answers:
                if args.no_circular and r["_index"] >= scorers.MMBENCH_CIRCULAR_OFFSET:
                    continue
                letters = [c for c in LETTERS if _present(r.get(c))]
                variants = [(r["_index"], {c: r[c] for c in letters},
                             r["answer"].strip() if _present(r.get("answer")) else None)]
            else:
                variants = rotations(r)
            for index, options, answer in variants:
                meta = {"index": index, "answer": answer, "options": options, "question": r["question"],
                        **{k: r[k] for k in KEEP_META if k in r and _present(r[k])}}
                samples.append(Sample(id=str(index), image=images[r["_index"]],
                                      prompt=build_prompt(r["question"], r.get("hint"), options, args.prompt_suffix),
                                      meta=meta))
        return samples

    def score(self, run_dir: Path, args: argparse.Namespace | None = None) -> dict:
        recs = common.predictions(run_dir)
        rows = [{"index": r["meta"]["index"], "answer": r["meta"]["answer"], "options": r["meta"]["options"],
                 "prediction": common.response_text(r)} for r in recs]
        errors = sum(bool(r.get("error")) for r in recs)
        sub = Path(run_dir) / "submission_mmbench.xlsx"
        write_xlsx(sub, _submission_rows(recs))
        summary: dict[str, Any] = {"samples": len(recs), "errors": errors}
        lines = [f"# MMBench — {run_dir}", "", f"submission: {sub.name} ({len(recs)} rows)"]
        answered = [r for r in rows if r["answer"] is not None]
        if answered:
            summary["single"] = 100 * scorers.mmbench_accuracy(answered, circular=False)
            summary["circular"] = 100 * scorers.mmbench_accuracy(answered, circular=True)
            copies = sum(scorers.mmbench_group(r["index"])[1] > 0 for r in answered)
            summary["questions"] = len({scorers.mmbench_group(r["index"])[0] for r in answered})
            lines.append(f"circular accuracy: {summary['circular']:.2f}%  single pass: {summary['single']:.2f}%  "
                         f"({summary['questions']} questions, {copies} rotated copies, {errors} errors)")
            if copies == 0:
                lines.append("no rotated copies in this run: circular equals single pass")
        else:
            lines.append("no answers in this run (test split): upload the submission file")
        return common.write_scores(run_dir, self.name, summary, {"submission": sub.name}, lines)


def _submission_rows(recs: list[dict]) -> list[list[Any]]:
    header = ["index", "question", "hint", *LETTERS[:4], "prediction", "category", "l2-category", "split"]
    out: list[list[Any]] = [header]
    for r in recs:
        m = r["meta"]
        opts = m.get("options", {})
        out.append([m["index"], m.get("question", ""), m.get("hint", ""), *[opts.get(c, "") for c in LETTERS[:4]],
                    common.response_text(r), m.get("category", ""), m.get("l2-category", ""), m.get("split", "")])
    return out


def _xml_escape(s: str) -> str:
    s = "".join(ch for ch in s if ch in "\t\n\r" or ord(ch) >= 0x20)  # XML 1.0 forbids other control chars
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _col(i: int) -> str:
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def write_xlsx(path: Path, rows: list[list[Any]]) -> None:
    """A one-sheet .xlsx (what MMBench's submission page takes) with no dependency:
    the minimal Office Open XML parts, numbers as numbers, text as inline strings."""
    import zipfile

    cells = []
    for r, row in enumerate(rows, 1):
        parts = []
        for c, v in enumerate(row):
            ref = f"{_col(c)}{r}"
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f'<c r="{ref}"><v>{v}</v></c>')
            else:
                parts.append(f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{_xml_escape(str(v))}</t></is></c>')
        cells.append(f'<row r="{r}">{"".join(parts)}</row>')
    ns = "http://schemas.openxmlformats.org"
    sheet = (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
             f'<worksheet xmlns="{ns}/spreadsheetml/2006/main"><sheetData>{"".join(cells)}</sheetData></worksheet>')
    files = {
        "[Content_Types].xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Types xmlns="{ns}/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'),
        "_rels/.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Relationships xmlns="{ns}/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{ns}/officeDocument/2006/relationships/officeDocument" '
            'Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<workbook xmlns="{ns}/spreadsheetml/2006/main" xmlns:r="{ns}/officeDocument/2006/relationships">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<Relationships xmlns="{ns}/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{ns}/officeDocument/2006/relationships/worksheet" '
            'Target="worksheets/sheet1.xml"/></Relationships>'),
        "xl/worksheets/sheet1.xml": sheet,
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)


def read_xlsx_rows(path: Path) -> list[list[str]]:
    """Read back what ``write_xlsx`` wrote (tests; a check without openpyxl)."""
    import re
    import zipfile
    from xml.sax.saxutils import unescape

    xml = zipfile.ZipFile(path).read("xl/worksheets/sheet1.xml").decode()
    rows = []
    for row in re.findall(r"<row [^>]*>(.*?)</row>", xml):
        vals = re.findall(r"<c [^>]*>(?:<v>(.*?)</v>|<is><t[^>]*>(.*?)</t></is>)</c>", row, flags=re.S)
        rows.append([unescape(v or t, {"&quot;": '"'}) for v, t in vals])
    return rows


BENCHMARK = MMBench()
