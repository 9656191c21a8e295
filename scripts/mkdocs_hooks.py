"""mkdocs hooks for the docs site (``hooks:`` in mkdocs.yml): executed tutorials and math without JavaScript.

* **Tutorials.** A page holding a line ``<!-- example: NAME.py ARGS -->`` gets, in its place, the
  command, what the example printed and the figures it drew, from running ``examples/NAME.py ARGS``
  during the build, and the example's source. ``{out}`` in ARGS is a fresh output folder (its PNGs
  become images of the page), ``{omniglot}`` a folder holding the synthetic Omniglot archives of
  ``tests/omniglot_fixture.py``. Nothing is pasted by hand: the page shows this build's run, and an
  example that fails fails the build.
* **Math.** The docstrings are written with reStructuredText's ``:math:`...``` role and
  ``.. math::`` directive; a small Markdown preprocessor turns them into arithmatex's ``\\(...\\)`` and
  ``\\[...\\]``, and every arithmatex span or block is converted to MathML (``latex2mathml``) when the
  page is rendered, so browsers draw it natively: no CDN, no script, nothing fetched when a page is read.
"""

from __future__ import annotations

import html
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from latex2mathml.converter import convert as latex_to_mathml
from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.metalearn")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MARKER = re.compile(r"^<!-- example: (?P<script>[\w.-]+\.py)(?P<args>[^>]*)-->\s*$", re.MULTILINE)
EXAMPLE_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------- math


class RstMathPreprocessor(Preprocessor):
    """reST in docstrings to Markdown: ``:math:`x``` -> ``\\(x\\)``; ``.. math:: x`` (and its indented
    continuation) -> a ``\\[x\\]`` block; a paragraph ending in ``::`` (reST's literal-block marker) ends in
    ``:``. Runs after the fenced code blocks are stashed, so code is never changed."""

    ROLE = re.compile(r":math:`([^`]+)`")
    DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<first>.*)$")

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(lines):
            match = self.DIRECTIVE.match(lines[i])
            if match is None:
                line = self.ROLE.sub(lambda m: rf"\({m.group(1)}\)", lines[i])
                if line.rstrip().endswith("::") and not line.lstrip().startswith(("```", "    ")):
                    line = line.rstrip()[:-1]
                out.append(line)
                i += 1
                continue
            indent = len(match.group("indent"))
            body = [match.group("first").rstrip()] if match.group("first").strip() else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                if not lines[i].strip() and body:
                    break
                if lines[i].strip():
                    body.append(lines[i].strip())
                i += 1
            tex = " ".join(part.rstrip("\\").rstrip() for part in body)
            pad = " " * indent
            out.extend(["", pad + r"\[", pad + tex, pad + r"\]", ""])
        return out


class DoctestPreprocessor(Preprocessor):
    """A doctest outside a code fence (``>>>`` lines and their output, up to a blank line) -> a ``pycon`` fence.

    Runs before the fences are read (so the new fence is highlighted), and leaves fenced code alone.
    """

    FENCE = re.compile(r"^\s*(```|~~~)")

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        in_fence = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if self.FENCE.match(line):
                in_fence = not in_fence
            indented_code = len(line) - len(line.lstrip()) >= 4  # already a Markdown code block
            if in_fence or indented_code or not line.lstrip().startswith(">>> "):
                out.append(line)
                i += 1
                continue
            indent = line[: len(line) - len(line.lstrip())]
            session = []
            while i < len(lines) and lines[i].strip():
                session.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].strip())
                i += 1
            out.extend(["", indent + "```pycon", *[indent + s for s in session], indent + "```", ""])
        return out


class RstMathExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Markdown's API)
        md.preprocessors.register(DoctestPreprocessor(md), "metalearn_doctest", 27)  # before fences (25)
        md.preprocessors.register(RstMathPreprocessor(md), "metalearn_rst_math", 5)  # after them


ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>',
    re.DOTALL,
)


def mathml(match: re.Match[str]) -> str:
    """One arithmatex span/div as MathML (the TeX it came from kept as the annotation for copy and search)."""
    display = "inline" if match.group("inline") is not None else "block"
    tex = html.unescape(match.group("inline") if display == "inline" else match.group("block")).strip()
    try:
        rendered = latex_to_mathml(tex, display=display)
    except Exception as error:  # latex2mathml raises many kinds; name the formula so it can be fixed
        raise PluginError(f"cannot render the math {tex!r} to MathML: {error}") from error
    tag = "span" if display == "inline" else "div"
    return f'<{tag} class="arithmatex" title="{html.escape(tex)}">{rendered}</{tag}>'


# ------------------------------------------------------------------------------------------ examples


@dataclass
class ExampleRun:
    """One example run at its tiny setting: what it printed and the figures it wrote."""

    script: str
    args: list[str]
    shown_args: str
    out_dir: Path
    process: subprocess.Popen[str] | None = None
    started: float = 0.0
    seconds: float = 0.0
    stdout: str = ""
    figures: list[str] = field(default_factory=list)


class ExampleRunner:
    """Runs the examples the tutorial pages name, two at a time, once per build."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="metalearn-docs-"))
        self.runs: dict[str, ExampleRun] = {}

    def placeholders(self, out_dir: Path) -> dict[str, str]:
        values = {"out": str(out_dir)}
        omniglot = self.tmp / "omniglot"
        if not omniglot.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            try:
                from omniglot_fixture import write_omniglot
            finally:
                sys.path.remove(str(ROOT / "tests"))
            write_omniglot(omniglot)
        values["omniglot"] = str(omniglot)
        return values

    def add(self, key: str, script: str, raw_args: str) -> None:
        out_dir = self.tmp / key.replace("/", "_")
        out_dir.mkdir(parents=True, exist_ok=True)
        values = self.placeholders(out_dir)
        args = [arg.format(**values) for arg in shlex.split(raw_args)]
        shown = " ".join(arg.format(out="OUT", omniglot="OMNIGLOT") for arg in shlex.split(raw_args))
        self.runs[key] = ExampleRun(script, args, shown, out_dir)

    def run_all(self, parallel: int = 2) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        pending = list(self.runs.values())
        running: list[ExampleRun] = []
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                run.started = time.perf_counter()
                with open(run.out_dir.with_suffix(".log"), "w") as output:  # a file: a pipe could fill and block
                    run.process = subprocess.Popen(
                        [sys.executable, str(ROOT / "examples" / run.script), *run.args],
                        cwd=run.out_dir, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                    )
                running.append(run)
            time.sleep(0.05)
            for run in [r for r in running if r.process is not None and r.process.poll() is not None]:
                running.remove(run)
                self.finish(run)
            for run in running:
                if time.perf_counter() - run.started > EXAMPLE_TIMEOUT_S:
                    assert run.process is not None
                    run.process.kill()
                    raise PluginError(f"examples/{run.script} {run.shown_args} ran past {EXAMPLE_TIMEOUT_S} s")

    def finish(self, run: ExampleRun) -> None:
        assert run.process is not None
        run.seconds = time.perf_counter() - run.started
        output = run.out_dir.with_suffix(".log").read_text()
        if run.process.returncode != 0:
            raise PluginError(
                f"examples/{run.script} {run.shown_args} failed (exit {run.process.returncode}):\n{output}"
            )
        run.stdout = clean_output(output, run.out_dir, self.tmp)
        run.figures = sorted(str(p.relative_to(run.out_dir)) for p in run.out_dir.rglob("*.png"))
        log.info(f"ran examples/{run.script} {run.shown_args} in {run.seconds:.1f} s")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def clean_output(text: str, out_dir: Path, tmp: Path) -> str:
    """Printed output as a reader would see it: temp paths named as on the command line, no bar redraws."""
    text = text.replace(str(out_dir), "OUT").replace(str(tmp / "omniglot"), "OMNIGLOT")
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]  # a bar's final state (splitlines splits at \r)
    return "\n".join(lines).strip()


def tutorial_markdown(run: ExampleRun, page_dir: str) -> str:
    """The generated part of a tutorial page: command, output, figures, source."""
    source = (ROOT / "examples" / run.script).read_text()
    parts = [
        f"Run at its tiny setting while these docs were built ({run.seconds:.0f} s on the build machine, "
        "two examples at a time):",
        "",
        "```bash",
        f"python examples/{run.script} {run.shown_args}".rstrip(),
        "```",
        "",
        "What it printed:",
        "",
        "```text",
        run.stdout or "(nothing)",
        "```",
        "",
    ]
    for figure in run.figures:
        parts += [f"![{figure} written by examples/{run.script}]({figure_uri(run, figure, page_dir)})", ""]
    parts += [
        f'??? example "The source: examples/{run.script}"',
        "",
        "    ```python",
        *[("    " + line).rstrip() for line in source.splitlines()],
        "    ```",
        "",
    ]
    return "\n".join(parts)


def figure_uri(run: ExampleRun, figure: str, page_dir: str) -> str:
    target = f"tutorials/figures/{Path(run.script).stem}/{figure}"
    return os.path.relpath(target, page_dir or ".").replace(os.sep, "/")


# ---------------------------------------------------------------------------------------- API index

EXPORTS_MARKER = "<!-- api-exports -->"
API_DIRECTIVE = re.compile(r"^::: (metalearn\.[\w.]+)\s*$", re.MULTILINE)


def is_module(dotted: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


def exports_table(api_dir: Path) -> str:
    """Every name in ``metalearn.__all__`` with a link to where the API pages document it.

    A name documented on no API page fails the build, so the reference stays whole as the API grows.
    """
    import importlib
    import inspect

    import metalearn

    documented = [name for page in sorted(api_dir.glob("*.md")) for name in API_DIRECTIVE.findall(page.read_text())]
    homes = [importlib.import_module(name) for name in documented if is_module(name)]
    rows = ["| name | what | documented in |", "| --- | --- | --- |"]
    for name in metalearn.__all__:
        obj = getattr(metalearn, name)
        home = next((m for m in homes if name in getattr(m, "__all__", ()) and getattr(m, name, None) is obj), None)
        if home is None:
            raise PluginError(f"metalearn.{name} is documented on no API page: add its module to docs/api/")
        own_doc = inspect.getdoc(obj) if getattr(obj, "__module__", "").startswith("metalearn") else None
        summary = (own_doc or "").strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        target = f"{home.__name__}.{name}"
        if is_module(target):  # a submodule of that name hides it from griffe
            target = f"{obj.__module__}.{obj.__qualname__}"  # documented at its own path (docs/api/ says so)
        rows.append(f"| [`{name}`][{target}] | {summary} | `{home.__name__}` |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- events

_runner: ExampleRunner | None = None


@event_priority(100)  # before mkdocstrings reads the Markdown extensions, so docstrings get the math too
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.markdown_extensions.append(RstMathExtension())  # type: ignore[arg-type]  # Markdown takes instances
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Run every example a tutorial page names, and add the figures it drew to the site."""
    global _runner
    _runner = ExampleRunner()
    for file in list(files.documentation_pages()):
        text = Path(file.abs_src_path).read_text() if file.abs_src_path else (file.content_string or "")
        for match in EXAMPLE_MARKER.finditer(text):
            _runner.add(f"{file.src_uri}:{match.group('script')}", match.group("script"), match.group("args"))
    if os.environ.get("METALEARN_DOCS_SKIP_EXAMPLES"):  # for quick local previews only; CI never sets it
        log.warning("METALEARN_DOCS_SKIP_EXAMPLES is set: the tutorials show no run (a strict build fails)")
        for run in _runner.runs.values():
            run.stdout = "(not run: METALEARN_DOCS_SKIP_EXAMPLES was set for this build)"
        return files
    _runner.run_all()
    for run in _runner.runs.values():
        for figure in run.figures:
            uri = f"tutorials/figures/{Path(run.script).stem}/{figure}"
            files.append(File.generated(config, uri, content=(run.out_dir / figure).read_bytes()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        assert _runner is not None
        run = _runner.runs[f"{page.file.src_uri}:{match.group('script')}"]
        return tutorial_markdown(run, os.path.dirname(page.file.src_uri))

    markdown = EXAMPLE_MARKER.sub(replace, markdown)
    if EXPORTS_MARKER in markdown:
        markdown = markdown.replace(EXPORTS_MARKER, exports_table(Path(config.docs_dir) / "api"))
    return markdown


def on_page_content(html_text: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return ARITHMATEX.sub(mathml, html_text)


def on_post_build(config: MkDocsConfig) -> None:
    if _runner is not None:
        _runner.close()
