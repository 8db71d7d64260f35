"""Multi30K German->English (WMT16 multimodal task 1), the field's small translation benchmark.

    python -m fairseq_ext.multi30k OUT [--source URL_OR_DIR] [--vocab 8000] [--test-set test_2016_flickr]

Needs internet once: downloads the task-1 raw files of the multi30k/dataset repository
(``data/task1/raw/{train,val,TEST_SET}.{de,en}.gz``; 29,000 train, 1,014 valid and, for
test_2016_flickr, 1,000 test caption pairs) with urllib from ``BASE`` into OUT/download. A file
already there is never downloaded again, so re-running (say with another --vocab) is offline and
cheap. Without internet, fetch those six files elsewhere and pass ``--source DIR``, a directory
holding them (``--source`` may also be another base URL). German and English files must have the
same number of lines. Lines keep their order (whitespace stripped and collapsed, nothing dropped, so
OUT/raw/test.en is the official reference). Then, exactly as ``fairseq_ext.corpus`` does, learns a
joint SentencePiece BPE model on the training side and binarises with ``fairseq-preprocess`` into
OUT/bin (joined dictionary). Files:

    OUT/download/*.gz                     the original files, as downloaded
    OUT/raw/{train,valid,test}.{de,en}    plain sentences (valid is val, test is --test-set)
    OUT/spm.model                         the subword model
    OUT/bin/                              fairseq's binarised data (source de, target en)
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import urllib.request
from pathlib import Path

from fairseq_ext.corpus import encode_and_binarize

BASE = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
BROWSE = "https://github.com/multi30k/dataset/tree/master/data/task1/raw"
TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")


class PrepareError(Exception):
    """A problem the user can fix (no network, a missing or broken file); main() prints it."""


def file_names(test_set: str = "test_2016_flickr") -> dict[str, tuple[str, str]]:
    """Our split -> the (German, English) file names of the Multi30K release."""
    return {split: (f"{name}.de.gz", f"{name}.en.gz")
            for split, name in (("train", "train"), ("valid", "val"), ("test", test_set))}


def fetch(name: str, source: str, dest: Path) -> Path:
    """dest/name, copied from the directory ``source`` or downloaded from the base URL ``source``; a file
    already at dest/name is kept (never downloaded again)."""
    target = dest / name
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")  # a download cut short never looks complete
    if "://" not in source:
        if not Path(source).is_dir():
            raise PrepareError(f"--source {source} is neither a directory nor a URL")
        src = Path(source) / name
        if not src.is_file():
            raise PrepareError(f"{src} does not exist: --source DIR must hold {name} "
                               f"(the Multi30K files from {BROWSE})")
        shutil.copyfile(src, part)
    else:
        url = source.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as f:
                shutil.copyfileobj(resp, f)
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors; ValueError: a malformed URL
            part.unlink(missing_ok=True)
            raise PrepareError(
                f"could not download {url}: {e}\n"
                f"Without internet, download the Multi30K files ({name} and the others of {BROWSE}) on another "
                f"machine, copy them into a directory and pass --source DIR (or --source URL for another base URL)"
            ) from e
    os.replace(part, target)
    return target


def read_lines(path: Path) -> list[str]:
    """The lines of a gzip'd UTF-8 text file, whitespace stripped and collapsed, none dropped."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:  # only \n ends a line
            return [" ".join(line.split()) for line in f]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path} is not a complete gzip'd UTF-8 text file ({e}); delete it to fetch it again") from e


def prepare(out: Path, source: str = BASE, vocab: int = 8000, test_set: str = "test_2016_flickr") -> dict[str, int]:
    """Fetch (or reuse) the Multi30K files, write OUT/raw, learn OUT/spm.model and binarise into OUT/bin."""
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, (de_name, en_name) in file_names(test_set).items():
        de_path, en_path = fetch(de_name, source, out / "download"), fetch(en_name, source, out / "download")
        de, en = read_lines(de_path), read_lines(en_path)
        if len(de) != len(en):
            raise PrepareError(f"{de_path} has {len(de)} lines but {en_path} has {len(en)}: the German and English "
                               f"files of a split must be line-aligned (delete a broken download to fetch it again)")
        if not de:
            raise PrepareError(f"{de_path} and {en_path} are empty")
        splits[split] = list(zip(de, en))
    return encode_and_binarize(out, splits, vocab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", default=BASE,
                    help="a directory holding the .gz files, or a base URL (default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=8000, help="SentencePiece vocabulary size (default: %(default)s)")
    ap.add_argument("--test-set", default="test_2016_flickr",
                    help=f"the test split, one of {', '.join(TEST_SETS)} (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        counts = prepare(args.out, args.source, args.vocab, args.test_set)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train, {counts['valid']} valid, {counts['test']} test ({args.test_set}) "
          f"pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
