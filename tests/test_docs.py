"""The documentation a user needs is in the repository: the numerical contract
(docs/semantics.md) that the code cites, and the LICENSE that pyproject names."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "semantics.md"

# Written so that this file does not match itself.
_SPEC_REFERENCE = re.compile(r"[\w./-]*SEMANTICS\.md")
# "docs/semantics.md §2.4" or, in the kernels (ASCII only), "docs/semantics.md
# section 2.4", possibly wrapped onto the next comment line.
_CITATION = re.compile(r"docs/semantics\.md(?:[\s/#*]|\(|,)*(?:§\s*|section\s+)(\d+(?:\.\d+)?)")
_SECTION_MARK = re.compile(r"§\s*(\d+(?:\.\d+)?)")
_HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
_SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis",
              "node_modules"}


def _walk():
    for folder, dirs, files in os.walk(ROOT):
        here = pathlib.Path(folder)
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")
                   and not (here / d / "pyvenv.cfg").exists()]
        for name in files:
            yield here / name


def repo_files():
    """The repository's files: git's list (tracked and untracked, not ignored)
    when this is a git checkout, else every file under the root less build
    output and virtual environments (an unpacked sdist)."""
    try:
        result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return sorted(_walk())
    names = [n for n in result.stdout.decode().split("\0") if n]
    return sorted(p for p in (ROOT / n for n in names) if p.is_file())


def text_files():
    """(path, text) of every repository file that is text."""
    for path in repo_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        yield path, data.decode("utf-8", errors="replace")


def _line(text, index):
    return text.count("\n", 0, index) + 1


def _resolves(path, reference, names):
    if "/" not in reference:
        return reference in names
    for base in (path.parent, ROOT):
        target = (base / reference).resolve()
        if target.is_file() and ROOT in target.parents:
            return True
    return False


def contract_sections():
    return _HEADING.findall(CONTRACT.read_text(encoding="utf-8"))


def test_every_reference_to_a_semantics_file_resolves_in_the_repository():
    files = list(text_files())
    names = {path.name for path, _ in files}
    broken = [f"{path.relative_to(ROOT)}:{_line(text, m.start())}: {m.group(0)}"
              for path, text in files for m in _SPEC_REFERENCE.finditer(text)
              if not _resolves(path, m.group(0), names)]
    assert not broken, ("references to a specification that is not in the repository "
                        "(cite docs/semantics.md and its section instead):\n" + "\n".join(broken))


def test_contract_sections_are_numbered_once_each():
    sections = contract_sections()
    assert len(sections) >= 30, sections
    assert len(sections) == len(set(sections)), sections
    tops = [int(s) for s in sections if "." not in s]
    assert tops == list(range(1, len(tops) + 1)), tops
    for s in sections:
        if "." in s:
            assert s.split(".")[0] in sections, f"§{s} has no top-level section"


def test_every_section_cited_exists():
    sections = set(contract_sections())
    cited, missing = 0, []
    for path, text in text_files():
        found = [(m.start(), m.group(1)) for m in _CITATION.finditer(text)]
        # every § mark on a line that names the contract ("§3 and §4"), and
        # every § mark inside the contract itself
        for m in _SECTION_MARK.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            if path == CONTRACT or "docs/semantics.md" in text[start:end if end >= 0 else None]:
                found.append((m.start(), m.group(1)))
        for line, section in sorted({(_line(text, i), s) for i, s in found}):
            cited += 1
            if section not in sections:
                missing.append(f"{path.relative_to(ROOT)}:{line}: §{section}")
    assert not missing, "citations of sections docs/semantics.md does not have:\n" + "\n".join(
        missing)
    assert cited >= 40, f"only {cited} citations found: is the pattern still right?"


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib "
                                      "(Python >= 3.11) or tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_the_apache_license_that_pyproject_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"], text[:200]
    for clause in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                   "9. Accepting Warranty or Additional Liability.",
                   "END OF TERMS AND CONDITIONS",
                   "APPENDIX: How to apply the Apache License to your work."):
        assert clause in text, clause
    project = _pyproject()
    assert project["project"]["license"] == "Apache-2.0"
    assert "LICENSE" in project["project"]["license-files"]
    sdist = project["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    assert "LICENSE" in sdist and "docs" in sdist, sdist
