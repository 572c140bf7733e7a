"""The README and docs/ stay consistent with the repository (no network, fast).

Checks that every relative Markdown link and image resolves (anchors into .md
files included), that every `configs/<name>.py` the documentation names exists,
that every `python -m` module and `--config` file it names exists (README.md
and docs/*.md alike), that the README stays short, and that its test command is
the one CI runs.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
# [label]: target
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"`[^`]*`")
CONFIG_PATH = re.compile(r"configs/[\w\-]+\.py")
PYTHON_MODULE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
CONFIG_FLAG = re.compile(r"--config(?:\s+|=)([^\s\\\"'`]+)")


def relative(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: pathlib.Path) -> list[str]:
    """The link and image targets of a Markdown file, outside code."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    found = []
    for line in prose:
        line = INLINE_CODE.sub("", line)
        found += INLINE_LINK.findall(line)
        match = REFERENCE_LINK.match(line)
        if match:
            found.append(match.group(1))
    return found


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:", target) is not None


def link_problem(source: pathlib.Path, target: str) -> str | None:
    """Why `target`, linked from `source`, does not resolve (None if it does)."""
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source
    if not resolved.exists():
        return f"{relative(source)}: link {target!r} -> missing file {resolved}"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return (
            f"{relative(source)}: link {target!r} -> no heading with anchor "
            f"#{anchor} in {relative(resolved)}"
        )
    return None


def relative_links() -> list[tuple[str, str]]:
    pairs = (
        (relative(path), target)
        for path in DOC_FILES
        for target in links(path)
        if not is_external(target)
    )
    return list(dict.fromkeys(pairs))  # each link once per file, in order


def mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(file, match) for every match of `pattern` in README.md and docs/*.md."""
    return sorted(
        {
            (relative(path), found)
            for path in DOC_FILES
            for found in pattern.findall(path.read_text(encoding="utf-8"))
        }
    )


def ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    return commands[-1]


def ids(pairs):
    return [f"{source} -> {target}" for source, target in pairs]


def test_the_parsers_find_what_the_readme_holds():
    # Guards the checks below: a parser that finds nothing would pass them all.
    targets = [target for source, target in relative_links() if source == "README.md"]
    assert "docs/quickstart_gallery.png" in targets
    assert any(target.startswith("docs/") and "#" in target for target in targets)
    assert ("README.md", "configs/quickstart.py") in mentions(CONFIG_PATH)
    assert ("README.md", "recontrast_jax.main") in mentions(PYTHON_MODULE)
    assert ("README.md", "configs/quickstart.py") in mentions(CONFIG_FLAG)


@pytest.mark.parametrize("source, target", relative_links(), ids=ids(relative_links()))
def test_relative_link_resolves(source, target):
    problem = link_problem(ROOT / source, target)
    assert problem is None, problem


@pytest.mark.parametrize(
    "source, config", mentions(CONFIG_PATH), ids=ids(mentions(CONFIG_PATH))
)
def test_mentioned_config_exists(source, config):
    assert (ROOT / config).is_file(), f"{source} names {config}, which does not exist"


@pytest.mark.parametrize(
    "source, module", mentions(PYTHON_MODULE), ids=ids(mentions(PYTHON_MODULE))
)
def test_python_module_resolves(source, module):
    assert importlib.util.find_spec(module) is not None, (
        f"{source} runs `python -m {module}`, which cannot be found"
    )


@pytest.mark.parametrize(
    "source, config", mentions(CONFIG_FLAG), ids=ids(mentions(CONFIG_FLAG))
)
def test_config_flag_file_exists(source, config):
    path = config.split(":", 1)[0]  # configs/mvtec.py:bottle -> configs/mvtec.py
    assert (ROOT / path).is_file(), f"{source} passes --config {config}: no {path}"


def test_readme_is_short():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md has {count} lines; keep it at most {MAX_README_LINES} and move "
        "details to docs/"
    )


def test_readme_test_command_is_what_ci_runs():
    _, code = split_code(README.read_text(encoding="utf-8"))
    test_commands = [line.strip() for line in code if "pytest" in line]
    assert test_commands == [ci_command()], (
        f"README.md's test command {test_commands} differs from .ci/run's "
        f"{ci_command()!r}"
    )
