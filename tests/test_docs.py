"""The documentation holds together: every relative link in README.md, docs/, deploy/ and bench/
reaches a file (and, with a #anchor into a .md file, one of its headings under GitHub's slug
rules), every command in README's command table is a real one, and README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted({README, *REPO.glob("docs/*.md"), *REPO.glob("deploy/*.md"), *REPO.glob("bench/*.md")})

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (links reduced to their text, code spans
    to their content), lowercased, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeated headings numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside fenced code blocks and code spans."""
    out = []
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("code", line)
        out.extend((no, m.group(1)) for m in LINK.finditer(line))
    return out


def broken_links(path: Path) -> list[str]:
    """One line per relative link of `path` that reaches no file, or no heading of its .md file."""
    problems = []
    for no, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{no}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading '#{anchor}' in {dest.name}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


def test_the_checker_reports_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Does federation pay?\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#does-federation-pay) [self](#page) [web](https://example.org/x.md#nothing)\n"
        "[gone](missing.md) and [bad anchor](other.md#no-such-heading) and [bad self](#nowhere)\n"
        "```\n[inside a fence](also-missing.md)\n```\n"
        "`[inside code](missing-too.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md" in problems[0] and "no such file" in problems[0]
    assert "#no-such-heading" in problems[1] and "#nowhere" in problems[2]


@pytest.mark.parametrize("heading, anchor", [
    ("Does federation pay?", "does-federation-pay"),
    ("The model's own quantifier", "the-models-own-quantifier"),
    ("What is promised, against whom", "what-is-promised-against-whom"),
    ("`fl_round_overhead.py`", "fl_round_overheadpy"),
    ("Test — the transfer split with the shipped recipe, fine-tuned (2026-12-07)",
     "test--the-transfer-split-with-the-shipped-recipe-fine-tuned-2026-12-07"),
    ("[Linked](x.md) heading", "linked-heading"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


PAGES = ["docs/results.md", "docs/benchmark.md", "docs/privacy.md", "deploy/README.md", "bench/README.md"]


@pytest.mark.parametrize("page", PAGES)
def test_every_section_of_the_pages_is_one_click_from_readme(page):
    targets = {target for _, target in links(README)}
    assert page in targets
    sections = [slug(m.group(2)) for _, line in prose_lines((REPO / page).read_text(encoding="utf-8"))
                if (m := HEADING.match(line)) and len(m.group(1)) == 2]
    assert sections and [s for s in sections if f"{page}#{s}" not in targets] == []


def command_table() -> list[str]:
    """The first cell's command of every row of README's command table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]


def help_argv(command: str) -> list[str]:
    words = command.split()
    if words[0] == "mrsfm":
        return [sys.executable, "-m", "mrsfm_model.cli", words[1], "--help"]
    assert words[:2] == ["python", "-m"], f"README command table: unknown program in {command!r}"
    return [sys.executable, "-m", words[2], "--help"]


def test_command_table_lists_every_mrsfm_subcommand():
    commands = command_table()
    listed = {c.split()[1] for c in commands if c.startswith("mrsfm ")}
    usage = subprocess.run([sys.executable, "-m", "mrsfm_model.cli", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    groups = [set(g.split(",")) for g in re.findall(r"\{([\w,-]+)\}", usage.stdout)]
    real = next((g for g in groups if "inspect" in g), set())  # the subcommands, not --log-level's choices
    assert {"inspect", "convert", "simulate", "pretrain", "finetune", "predict", "quantify", "demo", "compare"} <= real
    assert real <= listed, f"subcommands missing from README's table: {sorted(real - listed)}"


@pytest.mark.parametrize("command", command_table(), ids=lambda c: " ".join(c.split()[:3]).replace("\\|", "|"))
def test_command_table_commands_exist(command):
    run = subprocess.run(help_argv(command), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{command}: {run.stderr[-2000:]}"
    assert "usage:" in run.stdout


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, len(lines)


def test_readme_commands_are_what_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert [b.strip() for b in blocks[:2]] == [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/mrsfm demo --out runs/demo",
        ".venv/bin/python -m pytest",
    ]
    assert all(b.strip() in ci for b in blocks[:2])
