"""The README gets a newcomer from install to a trained adapter, and its commands are what CI
runs: `.ci/run`'s marked steps are the README's set-up/run and test commands split at `&&`,
CONTRIBUTING.md's install line is the README's test command, the torch pins and extras the
lines name exist, and the README is short, with a table of contents whose anchors (and
those of its links into docs/) resolve to headings."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
# `.ci/run` marks each run of README steps with `# README run:` or `# README test (...):`;
# a run ends at the first blank line.
CI_MARKER = re.compile(r"^# README (run|test)\b.*:$")


def without_fences(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `#` in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def one_liners(text: str) -> list[str]:
    """Every fenced one-command set-up: a line that makes the venv and goes on with `&&`."""
    return [line for line in text.splitlines() if line.startswith("python3 -m venv .venv && ")]


def readme_command(kind: str) -> list[str]:
    """The README's CPU set-up/run (`run`) or test (`test`) command, split into its steps."""
    ends = {"run": ".venv/bin/basehold serve --demo", "test": ".venv/bin/python -m pytest"}
    found = [
        line
        for line in one_liners(README.read_text())
        if line.endswith(ends[kind]) and "whl/cpu" in line
    ]
    assert len(found) == 1, f"the README should have one CPU {kind} command: {found}"
    return found[0].split(" && ")


def ci_steps() -> dict[str, list[str]]:
    steps: dict[str, list[str]] = {"run": [], "test": []}
    current: list[str] | None = None
    for line in CI.read_text().splitlines():
        marker = CI_MARKER.match(line)
        if marker:
            current = steps[marker.group(1)]
        elif current is not None and line.strip():
            current.append(line.removesuffix(" &"))  # the server runs in the background
        else:
            current = None
    return steps


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in without_fences(page.read_text())
        if re.match(r"#{1,6} ", line)
    }


def test_ci_runs_the_readmes_commands_step_by_step() -> None:
    ci = ci_steps()
    assert ci["run"] == readme_command("run")
    assert ci["test"] == readme_command("test")


def test_contributing_installs_as_the_readme_tests() -> None:
    assert " && ".join(readme_command("test")) in one_liners(CONTRIBUTING.read_text())


def test_install_lines_name_a_cpu_torch_a_cuda_torch_and_real_extras() -> None:
    import tomllib  # Python 3.11+, as the tests run (the package supports 3.10)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_range = next(
        Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"
    )
    extras = set(project["optional-dependencies"])
    lines = one_liners(README.read_text())
    gpu = [line for line in lines if "download.pytorch.org/whl/cu" in line]
    assert gpu, "no GPU line: a CUDA build of torch from PyTorch's index"
    assert all('-e ".[gpu' in line for line in gpu), "a GPU line installs a gpu extra"
    for line in lines:
        pins = re.findall(r"pip install torch==(\S+) --index-url (\S+)", line)
        assert len(pins) == 1, f"torch pinned from one index first: {line}"
        version, index = pins[0]
        assert Version(version).local == ("cpu" if index.endswith("/cpu") else None), line
        assert Version(version) in torch_range.specifier, (version, torch_range)
        for named in re.findall(r'-e "\.\[([^\]]+)\]"', line):
            assert set(named.split(",")) <= extras, line


def test_readme_is_short_with_a_table_of_contents_that_resolves() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 250
    lines = without_fences(text)
    sections = [line[3:] for line in lines if line.startswith("## ")]
    assert sections[0] == "Contents"
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    assert listed == [slug(s) for s in sections[1:]], "the contents list every section, in order"
    assert set(listed) <= anchors(README)


def test_the_readmes_links_to_headings_resolve() -> None:
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", README.read_text()):
        page = ROOT / target if target else README
        if page.exists():  # a page another change adds is test_docs' to check
            assert anchor in anchors(page), f"README: {target}#{anchor}"
