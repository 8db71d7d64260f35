"""fairseq_ext.corpus: catalog parsing (.po and .mo), filtering, splits, and one real build from two small wheels."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from fairseq_ext import corpus as C

ROOT = Path(__file__).resolve().parents[1]

PO = r'''# German translation
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: a.py:1
msgid "Save"
msgstr "Speichern"

#, fuzzy, python-format
msgid "Delete %(name)s"
msgstr "Entfernen"

msgid "One item"
msgid_plural "%d items"
msgstr[0] "Ein Eintrag"
msgstr[1] "%d Einträge"

#. a translator comment
msgid ""
"A long sentence that "
"continues on a second line\n"
"with a \"quote\"."
msgstr ""
"Ein langer Satz, der "
"auf einer zweiten Zeile\n"
"mit einem \"Zitat\" weitergeht."

msgctxt "month name"
msgid "May"
msgstr "Mai"

msgid "Untranslated"
msgstr ""

#~ msgid "Old"
#~ msgstr "Alt"
'''

PO_PAIRS = [("Save", "Speichern"),
            ('A long sentence that continues on a second line\nwith a "quote".',
             'Ein langer Satz, der auf einer zweiten Zeile\nmit einem "Zitat" weitergeht.'),
            ("May", "Mai")]


def test_parse_po_keeps_only_real_translations():
    assert C.parse_po(PO) == PO_PAIRS


def test_parse_po_reads_windows_line_ends():
    assert C.parse_po(PO.replace("\n", "\r\n")) == PO_PAIRS  # the \n inside the strings are escapes


def write_mo(entries: list[tuple[bytes, bytes]], order: str = "<") -> bytes:
    """A GNU .mo file, written from the format's specification: header, two (length, offset) tables, strings."""
    entries = sorted(entries)
    n = len(entries)
    orig_table, trans_table = 28, 28 + 8 * n
    pos = 28 + 16 * n
    blob, tables = b"", {"o": [], "t": []}
    for key, col in (("o", 0), ("t", 1)):
        for e in entries:
            tables[key].append((len(e[col]), pos + len(blob)))
            blob += e[col] + b"\x00"
    header = struct.pack(order + "7I", 0x950412DE, 0, n, orig_table, trans_table, 0, pos)
    body = b"".join(struct.pack(order + "2I", *x) for x in tables["o"] + tables["t"])
    return header + body + blob


MO_ENTRIES = [(b"", b"Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"),
              (b"Save", b"Speichern"),
              (b"Open file", "Datei öffnen".encode()),
              (b"month\x04May", b"Mai"),  # a context
              (b"One item\x00%d items", "Ein Eintrag\x00%d Einträge".encode()),  # a plural
              (b"Empty", b"")]


@pytest.mark.parametrize("order", ["<", ">"])
def test_parse_mo_reads_both_byte_orders(order):
    assert sorted(C.parse_mo(write_mo(MO_ENTRIES, order))) == [("May", "Mai"), ("Open file", "Datei öffnen"),
                                                               ("Save", "Speichern")]


def test_parse_mo_honours_the_header_charset():
    entries = [(b"", b"Content-Type: text/plain; charset=ISO-8859-1\n"), (b"Open", "Öffnen".encode("latin-1"))]
    assert C.parse_mo(write_mo(entries)) == [("Open", "Öffnen")]


def test_parse_mo_rejects_what_is_not_a_catalog():
    with pytest.raises(ValueError, match="magic"):
        C.parse_mo(b"\x00" * 40)
    with pytest.raises(ValueError, match="truncated"):
        C.parse_mo(write_mo(MO_ENTRIES)[:60])
    with pytest.raises(ValueError, match="header"):
        C.parse_mo(b"\xde\x12\x04\x95")


@pytest.mark.skipif(shutil.which("msgfmt") is None, reason="msgfmt (gettext) not installed")
def test_parse_mo_agrees_with_parse_po_on_a_msgfmt_catalog(tmp_path):
    (tmp_path / "de.po").write_text(PO, encoding="utf-8")
    subprocess.run(["msgfmt", "-o", str(tmp_path / "de.mo"), str(tmp_path / "de.po")], check=True)
    assert sorted(C.parse_mo((tmp_path / "de.mo").read_bytes())) == sorted(PO_PAIRS)  # msgfmt leaves fuzzy out


def test_clean_and_accelerators():
    assert C.clean("<b>Save</b>\n  the   file &amp; quit") == "Save the file & quit"
    assert C.strip_accelerator("Abo_ve:", "Ü_ber:") == ("Above:", "Über:")
    assert C.strip_accelerator("_City of %(place_name)s", "_Stadt von %(place_name)s") == \
        ("City of %(place_name)s", "Stadt von %(place_name)s")
    assert C.strip_accelerator("Available_until", "Verfügbar bis") == ("Available_until", "Verfügbar bis")
    assert C.strip_accelerator("a_b_c", "x_y") == ("a_b_c", "x_y")


@pytest.mark.parametrize("en,de,reason", [
    ("Save the file", "Datei speichern", None),
    ("Invitations for \"%(title)s\"", "Einladungen für \"%(title)s\"", None),
    ("See https://example.org for more", "Siehe https://example.org für mehr", None),
    ("OK", "OK", "copy"),
    ("a.m.", "vorm.", "no words"),  # no word of two letters
    ("", "Leer", "empty"),
    ("word " * 61, "Wort " * 61, "long"),
    ("Name", "Name", "copy"),
    ("%(name)s", "%(name)s", "copy"),
    ("%(count)s E", "%(count)s O", "no words"),
    ("%(part1)s - %(part2)s", "%(part1)s – %(part2)s", "no words"),
    ("https://example.org/a", "https://example.org/b", "no words"),
    ("{0}: {1}", "{0} : {1}", "no words"),
    ("!", "!!", "no words"),
    ("support@example.org", "hilfe@example.org", "no words"),
    ("error_message", "Fehlermeldung", "key"),
    ("list:admin:notice:new-list.txt", "Die Mailingliste wurde erstellt.", "key"),
])
def test_filter_rules(en, de, reason):
    assert C.keep_reason(en, de) == reason


def test_split_is_deterministic_and_proportioned():
    # fresh interpreters with other hash seeds; the module loaded by path (the package imports fairseq: slow)
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('c', sys.argv[1]);"
            " m = u.module_from_spec(s); s.loader.exec_module(m);"
            " print(''.join(m.split_of(f'sentence {i}')[1] for i in range(3000)))")
    runs = [subprocess.run([sys.executable, "-c", code, C.__file__], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")]
    assert runs[0] == runs[1] == "".join(C.split_of(f"sentence {i}")[1] for i in range(3000))
    share = Counter(runs[0])  # r(ain), a(lid), e(st)
    assert 0.86 < share["r"] / 3000 < 0.94 and 0.03 < share["a"] / 3000 < 0.07 and 0.03 < share["e"] / 3000 < 0.07


def _po(pairs) -> str:
    return 'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n' + "".join(
        f'msgid "{en}"\nmsgstr "{de}"\n\n' for en, de in pairs)


def _fake_wheel(path: Path, name: str, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        for n, data in files.items():
            z.writestr(n, data)
    return path


def test_collect_dedupes_across_packages_and_keeps_an_english_sentence_in_one_split(tmp_path):
    # 40 English sentences, each translated in both packages: some identically, some differently
    en = [f"Open the report number {i} now" for i in range(40)]
    a = _fake_wheel(tmp_path / "a-1.0-py3-none-any.whl", "a", {
        "a/locale/de/LC_MESSAGES/django.po": _po([(e, f"Öffne Bericht {i} jetzt") for i, e in enumerate(en)]),
        "a/locale/de/LC_MESSAGES/django.mo": write_mo([(b"Stale", b"Veraltet")]),  # the .po beside it wins
        "a/locale/fr/LC_MESSAGES/django.po": _po([("Save", "Enregistrer")])})  # not German
    b = _fake_wheel(tmp_path / "b-1.0-py3-none-any.whl", "b", {
        "b/locale/de.po": _po([(e, f"Öffne Bericht {i} jetzt" if i % 2 else f"Bericht {i} jetzt öffnen")
                                 for i, e in enumerate(en)] + [("Name", "Name")]),
        "share/locale/de_DE/LC_MESSAGES/b.mo": write_mo([(b"C_ity:", b"_Stadt:")])})
    assert C.catalogs(a) == ["a/locale/de/LC_MESSAGES/django.po"]
    logged = []
    splits, records = C.collect([a, b], log=logged.append)
    assert [(r["package"], r["pairs"], r["pairs_after_dedupe"]) for r in records] == [("a==1.0", 40, 40),
                                                                                     ("b==1.0", 41, 21)]
    assert records[1]["dropped"] == {"copy": 1}
    assert records[0]["sha256"] == __import__("hashlib").sha256(a.read_bytes()).hexdigest()
    assert "b==1.0: 41 pairs, 21 new" in logged[1]
    pairs = [p for items in splits.values() for p in items]
    assert len(pairs) == len(set(pairs)) == 61 and ("Stadt:", "City:") in pairs
    where = {}
    for split, items in splits.items():
        for _, e in items:
            assert where.setdefault(e, split) == split, f"{e!r} in {where[e]} and {split}"
            assert split == C.split_of(e)


def test_extract_pairs_names_a_wheel_without_german_catalogs(tmp_path):
    w = _fake_wheel(tmp_path / "x-1.0-py3-none-any.whl", "x", {"x/locale/fr/LC_MESSAGES/x.po": _po([("A", "B")])})
    with pytest.raises(ValueError, match="no German gettext catalogs"):
        C.extract_pairs(w)


def test_select_packages():
    assert C.select_packages(None) == list(C.PACKAGES)
    assert C.select_packages("pretix") == ["pretix==2026.8.0"]
    assert C.select_packages("Django, apache_superset") == [p for p in C.PACKAGES
                                                             if p.startswith(("django==", "apache-superset=="))]
    with pytest.raises(ValueError, match=r"unknown package nosuch .*allowed: pretix, .*django"):
        C.select_packages("pretix,nosuch")
    assert len({p.split("==")[0] for p in C.PACKAGES}) == len(C.PACKAGES)
    assert all(p.count("==") == 1 for p in C.PACKAGES)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """python -m fairseq_ext.corpus ARGS, in this process (a fresh interpreter spends ~10 s importing fairseq)."""
    rc = C.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, _, err = _main(capsys, out, "--packages", "pretix,nosuch")
    assert rc == 2 and "unknown package nosuch" in err and "allowed: pretix" in err
    rc, _, err = _main(capsys, out, "--wheel", str(tmp_path / "missing.whl"))
    assert rc == 2 and f"--wheel {tmp_path / 'missing.whl'} does not exist" in err
    (tmp_path / "text.whl").write_text("not a zip")
    rc, _, err = _main(capsys, out, "--wheel", str(tmp_path / "text.whl"), "--wheel", str(tmp_path / "missing.whl"))
    assert rc == 2 and "text.whl is not a wheel" in err
    rc, _, err = _main(capsys, out, "--wheel", str(tmp_path / "text.whl"), "--packages", "pretix")
    assert rc == 2 and "not both" in err
    fr = _fake_wheel(tmp_path / "x-1.0-py3-none-any.whl", "x", {"x/locale/fr/LC_MESSAGES/x.po": _po([("A", "B")])})
    rc, _, err = _main(capsys, out, "--wheel", str(fr))
    assert rc == 2 and f"{fr} has no German gettext catalogs" in err


SMALL = ("trac", "trytond")  # 2.9 MB and 1.2 MB; trac ships only compiled .mo catalogs, trytond Tryton's de.po


def test_build_from_two_small_real_wheels(tmp_path, capsys):
    pytest.importorskip("fairseq")
    pytest.importorskip("sentencepiece")
    pins = C.select_packages(",".join(SMALL))
    out = tmp_path / "corpus"
    try:  # network probe: fetch the two wheels the build will find already downloaded
        C.download_wheels(out / "download", pins)
    except RuntimeError as e:
        if any(s in str(e) for s in ("connect", "Network", "resolve", "No matching distribution", "timed out")):
            pytest.skip(f"no network for pip download: {str(e)[-300:]}")
        raise
    rc, stdout, err = _main(capsys, str(out), "--packages", ",".join(SMALL), "--vocab", "600")
    assert rc == 0, (stdout + err)[-4000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert [r["package"] for r in prov["packages"]] == pins
    for r in prov["packages"]:
        assert r["pairs"] > 500 and 0 < r["pairs_after_dedupe"] <= r["pairs"], r
        assert r["sha256"] == __import__("hashlib").sha256((out / "download" / r["wheel"]).read_bytes()).hexdigest()
        assert f"{r['package']}: {r['pairs']} pairs, {r['pairs_after_dedupe']} new" in stdout
    assert prov["packages"][0]["catalogs"] == ["trac/locale/de/LC_MESSAGES/messages.mo",
                                               "trac/locale/de/LC_MESSAGES/tracini.mo"]
    counts = {s: len((out / "raw" / f"{s}.en").read_text(encoding="utf-8").splitlines())
              for s in ("train", "valid", "test")}
    assert counts == prov["splits"] and prov["pairs"] == sum(counts.values())
    assert sum(r["pairs_after_dedupe"] for r in prov["packages"]) == prov["pairs"]
    assert counts["train"] > 1200 and counts["valid"] > 30 and counts["test"] > 30
    assert f"wrote {counts['train']} train, {counts['valid']} valid, {counts['test']} test" in stdout
    de = (out / "raw" / "train.de").read_text(encoding="utf-8").splitlines()
    assert len(de) == counts["train"] and any("ä" in s or "ü" in s or "ö" in s for s in de)
    by_split = {s: set((out / "raw" / f"{s}.en").read_text(encoding="utf-8").splitlines()) for s in counts}
    assert not (by_split["train"] & by_split["valid"]) and not (by_split["train"] & by_split["test"])
    for name in ("dict.de.txt", "dict.en.txt", "train.de-en.de.bin", "test.de-en.en.idx"):
        assert (out / "bin" / name).is_file(), name
    assert (out / "spm.model").is_file()
