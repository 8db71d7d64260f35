"""Every relative link and image in README.md and docs/*.md resolves: the file exists and, for
`#anchor`, the target page has that heading (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks, inline code and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to
    '-', a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert links(page) or page.name != "README.md", "README.md links nothing: the parser is broken"
    assert broken(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some section (`x`)\n\ntext\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#some-section-x) ![img](docs/a.md) [web](https://x.y/z)\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#nope) [self](#title)\n"
                    "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n<!-- [comment](nowhere.md) -->\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken(page) == ["docs/b.md: no such file docs/b.md",
                                "docs/a.md#nope: no heading with anchor #nope in docs/a.md",
                                "#title: no heading with anchor #title in README.md"]
    finally:
        ROOT = old


def test_anchor_rules():
    text = "# FNGD-plugin\n## Ablation of FNGD's open choices (`python -m fngd_slurm ablation`)\n## Use\n## Use\n"
    assert anchors(text) == {"fngd-plugin", "ablation-of-fngds-open-choices-python--m-fngd_slurm-ablation",
                             "use", "use-1"}
