"""An offline, real German->English corpus: the translators' gettext catalog of pretix.

    python -m fairseq_ext.corpus OUT [--wheel PRETIX_WHEEL] [--vocab 4000]

pretix (a pinned PyPI package, ``PRETIX``) ships its user-interface strings with German
translations written by people: about 5,000 single-line pairs plus longer multi-line ones. This
command downloads that wheel with pip (or takes ``--wheel``), parses its German catalogs (fuzzy
and obsolete entries, plurals and empty translations skipped), de-duplicates, splits
deterministically by a hash of the English side (so a repeated sentence never straddles splits),
learns a joint SentencePiece BPE model on the training side, and binarises with
``fairseq-preprocess`` into OUT/bin (joined dictionary). Files:

    OUT/raw/{train,valid,test}.{de,en}   plain sentences
    OUT/spm.model                         the subword model
    OUT/bin/                              fairseq's binarised data (source de, target en)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PRETIX = "pretix==2026.8.0"
_CATALOG = re.compile(r"/locale/de/LC_MESSAGES/[^/]+\.po$")


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


def clean(s: str) -> str:
    s = re.sub(r"<[^>]+>", " ", s)  # markup is not language
    return re.sub(r"\s+", " ", s).strip()


def extract_pairs(wheel: Path) -> list[tuple[str, str]]:
    """(German, English) pairs from every German catalog in the wheel, cleaned and de-duplicated."""
    seen = set()
    out = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if _CATALOG.search(n))
        if not names:
            raise ValueError(f"{wheel} has no German gettext catalogs (*/locale/de/LC_MESSAGES/*.po)")
        for name in names:
            for en, de in parse_po(z.read(name).decode("utf-8")):
                en, de = clean(en), clean(de)
                if not en or not de or len(en.split()) > 60 or len(de.split()) > 60 or (de, en) in seen:
                    continue
                seen.add((de, en))
                out.append((de, en))
    return out


def split_of(en: str) -> str:
    """Deterministic split by the English side: ~5% test, ~5% valid, the rest train."""
    bucket = int(hashlib.sha1(en.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < 5 else "valid" if bucket < 10 else "train"


def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), PRETIX], check=True)
    wheels = sorted(dest.glob("pretix-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {PRETIX} left no wheel in {dest}")
    return wheels[-1]


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


def prepare(out: Path, wheel: Path | None = None, vocab: int = 4000) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        wheel = download_wheel(out / "download")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for de, en in extract_pairs(wheel):
        splits[split_of(en)].append((de, en))
    return encode_and_binarize(out, splits, vocab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--wheel", type=Path, help=f"a downloaded {PRETIX} wheel (default: pip download it)")
    ap.add_argument("--vocab", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.wheel is not None and not args.wheel.is_file():
        print(f"error: --wheel {args.wheel} does not exist", file=sys.stderr)
        return 2
    counts = prepare(args.out, args.wheel, args.vocab)
    print(f"wrote {counts['train']} train, {counts['valid']} valid, {counts['test']} test pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
