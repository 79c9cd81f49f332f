"""The docs stay honest: links resolve, the README stays short, every setting the code reads is
documented, and no file points outside the repository (the contract is docs/contract.md)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 420
CONTRACT = ROOT / "docs/contract.md"

SKIP_DIRS = {".git", "target", "node_modules", ".venv", ".venv-sam", "out", "__pycache__"}


def repo_files() -> list:
    """Tracked files (plus untracked, not ignored ones): what a clone of the branch holds."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [p for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file() and not SKIP_DIRS & set(f.relative_to(ROOT).parts)]


def markdown_files() -> list:
    return sorted(f for f in repo_files() if f.suffix == ".md")


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code, where `[x](y)` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2… for
    repeated headings."""
    seen: dict = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_in_the_markdown_resolves_to_a_file_and_anchor():
    files = markdown_files()
    assert ROOT / "README.md" in files and CONTRACT in files
    broken = []
    checked = 0
    for md in files:
        for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", strip_code(md.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            checked += 1
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
            elif dest.is_file() and ROOT not in dest.parents:
                broken.append(f"{md.relative_to(ROOT)}: {target} (outside the repository)")
    assert checked >= 50, checked
    assert not broken, "\n".join(broken)


def test_anchors_are_githubs(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title here\n## §4 Deadline budget — the heart of it\n## `cloudwatch`: how, why?\n"
        "## Title here\n```\n# not a heading\n```\n"
    )
    assert anchors(tmp_path / "a.md") == {
        "title-here", "4-deadline-budget--the-heart-of-it", "cloudwatch-how-why", "title-here-1"
    }


def test_the_readme_stays_short_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/*.md"
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"
    for command in ("make demo", "make test"):
        assert command in readme


def settings_read_by_the_code() -> set:
    """Every environment variable src/config.rs (or a src/config/ module) reads through its
    lookup — a call `.m("NAME"` of any method `fn m(&self, name, …)` defined there (`get`,
    `number`, `flag`, …) — and every `std::env::var` in src/."""
    names = set()
    config = [ROOT / "src/config.rs", *sorted((ROOT / "src/config").rglob("*.rs"))]
    sources = [p.read_text() for p in config if p.is_file()]
    methods = {"get", "number", "optional_number", "flag"}
    for src in sources:
        methods |= set(re.findall(r"fn (\w+)\(\s*&self,\s*name\b", src))
    for src in sources:
        names |= set(re.findall(rf"\.\s*(?:{'|'.join(sorted(methods))})\(\s*\"([A-Z][A-Z0-9_]+)\"", src))
    for path in (ROOT / "src").rglob("*.rs"):
        names |= set(re.findall(r"std::env::var(?:_os)?\(\s*\"([A-Z][A-Z0-9_]+)\"", path.read_text()))
    return names


def test_every_setting_the_code_reads_is_in_the_configuration_table():
    names = settings_read_by_the_code()
    # The parse must find the settings (a renamed lookup would otherwise make this test vacuous).
    assert {
        "OPENAI_API_KEY", "OPENAI_ORGANIZATION", "UPSTREAMS", "RETRY_MAX_ATTEMPTS", "ATTEMPT_TIMEOUT_MS",
        "SKIP_HOPELESS_ATTEMPTS", "INVOKE_MODE", "AWS_LAMBDA_LOG_LEVEL",
    } <= names, sorted(names)
    assert len(names) >= 30, sorted(names)
    table = (ROOT / "docs/configuration.md").read_text()
    first_cells = " ".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))
    missing = sorted(n for n in names if f"`{n}`" not in first_cells)
    assert not missing, f"read by the code, but no row in docs/configuration.md: {missing}"


# What points outside the repository: the shared workspace this project was started in.
OUTSIDE = re.compile(r"shared/spec\.md|shared/architecture\.md|\.\./shared\b|shared/seed|/work/")


def test_no_file_points_outside_the_repository():
    offenders = []
    for f in repo_files():
        if f.suffix in {".png", ".jpg", ".lock"} or f == Path(__file__).resolve():
            continue
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)


def test_every_section_cited_is_in_the_contract():
    """Code and docs cite the contract as §N; docs/contract.md has each of §1–§12."""
    contract = CONTRACT.read_text()
    headings = set(re.findall(r"^## §(\d+) ", contract, re.M))
    assert headings == {str(n) for n in range(1, 13)}, sorted(headings, key=int)
    cited = set()
    for f in repo_files():
        if f.suffix in {".rs", ".md", ".py", ".yaml", ".toml", ".sh", ".js", ".mjs"}:
            cited |= set(re.findall(r"§(\d+)", f.read_text(errors="replace")))
    assert cited, "no § citation found: the scan is broken"
    assert cited <= headings, f"cited but not in docs/contract.md: {sorted(cited - headings, key=int)}"


def error_codes_in_the_code() -> dict:
    """`code -> (status, type)` from the `ErrorCode` enum (`status`, `as_str`, `error_type`)."""
    src = next(p for p in sorted((ROOT / "src").rglob("*.rs")) if "pub enum ErrorCode" in p.read_text()).read_text()

    def arms(fn: str) -> dict:
        body = src.split(f"fn {fn}(self)", 1)[1].split("\n    }\n", 1)[0]
        out = {}
        for variants, value in re.findall(r"((?:ErrorCode::\w+[\s|]*)+)=>\s*\"?(\w+)\"?", body):
            for v in re.findall(r"ErrorCode::(\w+)", variants):
                out[v] = value
        return out

    status, name, kind = arms("status"), arms("as_str"), arms("error_type")
    assert set(status) == set(name) == set(kind) and len(name) >= 15, (status, name, kind)
    return {name[v]: (status[v], kind[v]) for v in name}


def table_rows(text: str) -> list:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]


def test_the_error_tables_give_each_code_the_status_and_type_the_code_answers_with():
    codes = error_codes_in_the_code()
    readme = (ROOT / "README.md").read_text().split("## The error contract", 1)[1].split("\n## ", 1)[0]
    contract = CONTRACT.read_text().split("## §5 ", 1)[1].split("\n## ", 1)[0]
    for code, (status, kind) in codes.items():
        rows = [r for r in table_rows(readme) if len(r) == 4 and r[1] == f"`{code}`"]
        assert rows, f"README's error table has no row for {code}"
        assert all((r[0], r[2]) == (status, f"`{kind}`") for r in rows), (code, status, kind, rows)
        rows = [r for r in table_rows(contract) if len(r) == 3 and f"`{code}`" in r[1].split(" / ")]
        assert rows, f"docs/contract.md §5 has no row for {code}"
        assert all(r[0] == status for r in rows), (code, status, rows)
