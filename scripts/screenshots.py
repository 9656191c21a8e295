"""Look at the built docs site as a reader would: headless Chromium screenshots, and checks of what they show.

Usage (after ``mkdocs build``; needs the ``chromium`` system package and Pillow)::

    python scripts/screenshots.py [--site site] [--out site-screenshots]

It serves the built site on 127.0.0.1 (a random free port), and for the home page, a tutorial and an API
page it writes a full-width screenshot PNG and checks the page after its scripts ran (Chromium's
``--dump-dom``):

* navigation: the site's navigation lists every top-level section;
* code: highlighted code blocks are there;
* math: formulas are MathML ``<math>`` elements (rendered by the browser itself, from nothing fetched);
* images: every ``<img>`` of the page is served by the site and decodes as a picture;
* nothing from outside: no page of the site loads a script, style sheet, font or image from another host;
* the screenshot is not blank.

Exit status 1 names every check that failed. Look at the PNGs too: a check sees structure, not layout.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import urlopen

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Home", "Getting started", "Concepts", "Tutorials", "How-to guides", "API reference", "Results")
EXTERNAL_RESOURCE = re.compile(r"<(?:script|link|img|source|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.I)


@dataclass(frozen=True)
class Shot:
    name: str
    path: str  # under the site root
    needs_code: bool
    needs_math: bool
    needs_image: bool


SHOTS = (
    Shot("home", "index.html", needs_code=True, needs_math=False, needs_image=False),
    Shot("tutorial-sinusoid", "tutorials/sinusoid/index.html", needs_code=True, needs_math=True, needs_image=True),
    Shot("api-evaluate", "api/loops/index.html", needs_code=True, needs_math=True, needs_image=False),
)


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """The site on a free loopback port, in a background thread."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: install it (apt-get install chromium)")
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def check_page(shot: Shot, url: str, dom: str, png: Path) -> list[str]:
    problems = []
    nav_labels = set(re.findall(r'class="md-nav__link[^"]*"[^>]*>\s*(?:<[^>]+>\s*)*([^<]+?)\s*<', dom))
    missing = [s for s in SECTIONS if s not in nav_labels and f">{s}<" not in dom]
    if missing:
        problems.append(f"navigation lacks {missing}")
    if shot.needs_code and not re.search(r'<div class="[^"]*\bhighlight\b', dom):
        problems.append("no highlighted code block")
    if shot.needs_math:
        if "<math" not in dom:
            problems.append("no MathML formula")
        if re.search(r'class="arithmatex"[^>]*>\s*\\[(\[]', dom):
            problems.append("a formula left as raw TeX")
    images = re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', dom)
    if shot.needs_image and not images:
        problems.append("no image")
    for src in images:
        try:
            with urlopen(urljoin(url, src), timeout=10) as response:
                Image.open(io.BytesIO(response.read())).verify()
        except Exception as error:
            problems.append(f"image {src} does not load: {error}")
    picture = Image.open(png).convert("L")
    lo, hi = picture.getextrema()
    if hi - lo < 64 or len(picture.resize((64, 64)).getcolors(4096) or ()) < 8:
        problems.append("the screenshot looks blank")
    return [f"{shot.name}: {p}" for p in problems]


def external_resources(site: Path) -> list[str]:
    """Pages that would fetch a script, style, font or image from another host when read."""
    found = []
    for page in sorted(site.rglob("*.html")):
        for match in EXTERNAL_RESOURCE.finditer(page.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{page.relative_to(site)}: {match.group(0)[:120]}")
    for css in sorted(site.rglob("*.css")):
        for url in re.findall(r"url\((['\"]?)(?:https?:)?//[^)]+\)", css.read_text(errors="replace")):
            found.append(f"{css.relative_to(site)}: url({url}...)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (mkdocs build)")
    parser.add_argument("--out", type=Path, default=ROOT / "site-screenshots", help="where the PNGs go")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        parser.error(f"{args.site} holds no built site: run `mkdocs build` first (or pass --site)")
    args.out.mkdir(parents=True, exist_ok=True)
    server, base = serve(args.site)
    problems = [f"external resource: {r}" for r in external_resources(args.site)]
    try:
        for shot in SHOTS:
            url = base + shot.path
            png = (args.out / f"{shot.name}.png").resolve()
            taken = chromium(f"--window-size={args.width},{args.height}", f"--screenshot={png}", url)
            if not png.exists():
                problems.append(f"{shot.name}: no screenshot ({taken.stderr.strip()[-300:]})")
                continue
            dom = chromium("--dump-dom", url).stdout
            problems += check_page(shot, url, dom, png)
            print(f"{shot.name}: {url} -> {png}")
    finally:
        server.shutdown()
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    print(f"{len(SHOTS)} pages: " + ("all checks passed" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
