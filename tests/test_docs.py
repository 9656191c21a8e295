"""Every code block of the docs and the README runs, and every docstring example passes as a doctest.

Which fenced blocks run, by their language:

* ``python`` (or ``py``): the blocks of one page run in order in one namespace (like a notebook), in a
  fresh working folder;
* ``bash`` (or ``sh``, ``shell``): each block runs with ``bash -euo pipefail`` in a fresh working folder
  that links ``examples/``, ``benchmarks/``, ``scripts/`` and ``tests/`` of the repository, with
  ``python`` on the PATH being the test's interpreter and the repository on ``PYTHONPATH``;
* anything else (``text``, ``toml``, ``yaml``, ...) is shown, not run; a block with no language fails
  this test (give it one).

A block that cannot run in CI (it needs a GPU, ``torchrun``, the network, the real Omniglot archives,
or takes minutes) says so on the line just before its fence, where anyone reading the source sees it::

    <!-- docs-test: skip (needs a CUDA GPU) -->

The reason in the parentheses is required. A docstring example (``>>>``) may use every public name of
`metalearn`, and ``torch``, without importing them. A page whose blocks another test already runs is listed in
`TESTED_ELSEWHERE` with that test's file, which must name the page.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import metalearn

ROOT = Path(__file__).resolve().parents[1]
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell"}
SKIP = re.compile(r"^\s*<!-- docs-test: skip \((?P<reason>[^)]+)\) -->\s*$")
SKIP_LIKE = re.compile(r"docs-test")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
EXAMPLE_MARKER = re.compile(r"^<!-- example: (?P<script>[\w.-]+\.py)(?P<args>[^>]*)-->\s*$", re.MULTILINE)
TESTED_ELSEWHERE = {"docs/extending.md": "tests/test_custom_knowledge.py"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced code blocks of a Markdown file (also those indented inside admonitions or lists)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        lang = opening.group("info").strip().split(" ")[0].lstrip("{.").rstrip("}").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{i + 1}: a code fence that is never closed")
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(previous)
        if skip is None and SKIP_LIKE.search(previous):
            raise AssertionError(f"{page}:{i}: write the skip marker as <!-- docs-test: skip (REASON) -->")
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", skip.group("reason") if skip else None))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in doc_pages() for block in fenced_blocks(page)]


def runnable(lang: str) -> bool:
    return lang in PYTHON_LANGS | SHELL_LANGS


# ------------------------------------------------------------------------------- the convention


def test_the_block_finder_sees_fences_languages_and_skip_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n\n```bash\nnvidia-smi\n```\n\n"
        '!!! note\n\n    ```text\n    shown\n    ```\n\n````markdown\n```python\nnot a block\n```\n````\n'
    )
    found = fenced_blocks(page, root=tmp_path)
    assert [(b.lang, b.skip_reason) for b in found] == [
        ("python", None), ("bash", "needs a GPU"), ("text", None), ("markdown", None)
    ]
    assert found[0].code == "x = 1\n" and found[2].code == "shown\n"


def test_every_block_has_a_language_and_the_docs_have_blocks_to_run():
    blocks = all_blocks()
    unlabelled = [f"{b.page}:{b.line}" for b in blocks if not b.lang]
    assert not unlabelled, f"code blocks without a language (add python, bash, text, ...): {unlabelled}"
    run = [b for b in blocks if runnable(b.lang) and b.skip_reason is None and b.page not in TESTED_ELSEWHERE]
    assert len(run) >= 10, "the docs should hold code that runs; did the block finder break?"


@pytest.mark.parametrize("page,test_file", sorted(TESTED_ELSEWHERE.items()))
def test_pages_tested_elsewhere_are_named_by_their_test(page, test_file):
    assert (ROOT / page).exists() and page.split("/")[-1] in (ROOT / test_file).read_text(encoding="utf-8")


def test_tutorial_markers_name_examples_and_every_example_has_a_tutorial():
    named = {m.group("script") for page in doc_pages() for m in EXAMPLE_MARKER.finditer(page.read_text("utf-8"))}
    examples = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert named == examples, f"tutorial pages name {sorted(named)}, examples/ holds {sorted(examples)}"


def test_docs_link_to_no_python_file_and_nothing_outside_the_docs():
    for page in sorted((ROOT / "docs").rglob("*.md")):
        prose = re.sub(r"(`{3,}|~{3,}).*?\1", "", page.read_text(encoding="utf-8"), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", prose):
            target = link.split("#")[0]
            assert not target.endswith(".py"), f"{page.name} links to {link}: link the API page or name the file"
            if target and "://" not in target:
                assert (page.parent / target).resolve().is_relative_to(ROOT / "docs"), f"{page.name}: {link}"


# ------------------------------------------------------------------------------ running the blocks


def python_pages() -> list[str]:
    pages = {b.page for b in all_blocks() if b.lang in PYTHON_LANGS and b.skip_reason is None}
    return sorted(pages - set(TESTED_ELSEWHERE))


def shell_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.lang in SHELL_LANGS and b.skip_reason is None
            and b.page not in TESTED_ELSEWHERE]


@pytest.mark.parametrize("page", python_pages())
def test_python_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        for block in (b for b in fenced_blocks(ROOT / page) if b.lang in PYTHON_LANGS and b.skip_reason is None):
            exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)  # noqa: S102


def workdir_with_repo_links(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):  # a wrapper, not a link: a linked venv python would not find its venv
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("examples", "benchmarks", "scripts", "tests"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work


@pytest.mark.slow  # each runs examples at their smoke setting in a subprocess (seconds each)
@pytest.mark.parametrize("block", shell_blocks(), ids=lambda b: f"{b.page}:{b.line}")
def test_shell_blocks_run(block, tmp_path):
    work = workdir_with_repo_links(tmp_path)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.page}:{block.line} failed:\n{block.code}\n{proc.stdout}\n{proc.stderr}"


# --------------------------------------------------------------------------------- docstring examples


def package_modules() -> list[str]:
    return ["metalearn", *sorted(m.name for m in pkgutil.walk_packages(metalearn.__path__, "metalearn."))]


def doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in package_modules():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module, name) if t.examples and t.name.startswith(name)]
    return sorted({t.name: t for t in tests}.values(), key=lambda t: t.name)


def test_the_docstrings_hold_examples():
    assert len(doctests()) >= 3


@pytest.mark.parametrize("test", doctests(), ids=lambda t: t.name)
def test_docstring_example(test):
    # an example may use any public name of metalearn, and torch, without importing them
    test.globs.update({name: getattr(metalearn, name) for name in metalearn.__all__}, torch=torch)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = io.StringIO()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = runner.run(test, out=output.write)
    assert result.failed == 0, output.getvalue()


# ------------------------------------------------------------------------------ the docs build's hook


def docs_hooks():
    pytest.importorskip("mkdocs")
    pytest.importorskip("latex2mathml")  # the docs extra
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("mkdocs_hooks")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def render(markdown_text: str) -> str:
    import markdown

    hooks = docs_hooks()
    md = markdown.Markdown(
        extensions=["pymdownx.superfences", "pymdownx.highlight", "pymdownx.arithmatex", hooks.RstMathExtension()],
        extension_configs={"pymdownx.arithmatex": {"generic": True}},
    )
    return hooks.ARITHMATEX.sub(hooks.mathml, md.convert(markdown_text))


def test_docstring_rest_math_and_doctests_become_mathml_and_code():
    html = render(
        "Step :math:`\\theta - \\alpha g` here::\n\n.. math:: y = \\frac{1}{N}\\sum_i x_i\n\n"
        ">>> 1 + 1\n2\n\n```python\n>>> kept = ':math:`x`'\n```\n"
    )
    assert html.count("<math") == 2 and 'display="block"' in html and "<mfrac>" in html
    assert "here:</p>" in html and "::" not in html.split("<pre>")[0]  # reST's literal marker dropped
    assert '<span class="gp">&gt;&gt;&gt; </span>' in html  # the doctest is a highlighted console block
    assert ":math:`x`" in html.replace("&#39;", "'")  # fenced code is left alone


def test_a_formula_latex2mathml_cannot_read_fails_the_build_naming_it():
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="frac"):
        render(":math:`\\frac{1}{`")


def test_example_output_is_shown_with_the_command_line_names(tmp_path):
    hooks = docs_hooks()
    out = tmp_path / "run"
    text = f"epoch 10%\repoch 100%\nwrote {out}/results.json from {tmp_path}/omniglot"
    assert hooks.clean_output(text, out, tmp_path) == "epoch 100%\nwrote OUT/results.json from OMNIGLOT"
