"""The built docs site (``make docs``) in a real browser: figures drawn, links whole, search working.

The site in ``docs/_build/html`` is served over HTTP on a free local port (as a reader's browser would get it from
any static host) and opened in headless Chromium:

1. the index, each workflow page and an API page load, and every image on them has loaded (``naturalWidth > 0``,
   not a broken icon); each workflow page shows its executed notebook's figures (at least one image in a cell
   output);
2. no internal link is broken: every link on every page of the site leads to a file of the site, and a link to
   ``page#anchor`` to an element with that id (checked on the built files), and the links of the pages opened in
   the browser answer 200;
3. the search page finds ``load_pretrained`` and links to its API page.

``make test-browser`` builds the site first (``make docs``). Screenshots go to ``runs/browser/docs-*.png``.
"""

from __future__ import annotations

import functools
import html.parser
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, free_port

SITE = ROOT / "docs" / "_build" / "html"
WORKFLOWS = sorted(yaml.safe_load((ROOT / "docs" / "notebooks.yaml").read_text()))
API_PAGE = "generated/workbench.transfer.html"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A browser that closes a connection early (a cancelled image, a page left) is no error of the site."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def site():
    """The built site, served on 127.0.0.1; its base URL."""
    if not (SITE / "index.html").is_file():
        pytest.fail(f"{SITE / 'index.html'} does not exist: build the site with `make docs` first "
                    "(`make test-browser` does)")
    server = QuietServer(("127.0.0.1", free_port()), functools.partial(QuietHandler, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def open_page(browser, url: str) -> None:
    browser.get(url)
    browser.execute_async_script(
        "const done = arguments[0];"
        "if (document.readyState === 'complete') { done(); } else { window.addEventListener('load', () => done()); }")


def image_states(browser) -> list[dict]:
    return browser.execute_script(
        "return Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,"
        " output: !!i.closest('.cell_output, .output')}))")


@pytest.mark.parametrize("page", ["index.html", *[f"workflows/{name}.html" for name in WORKFLOWS], API_PAGE])
def test_page_loads_with_its_figures_and_links(browser, shots, site, page):
    open_page(browser, site + page)
    assert "workbench" in browser.title, browser.title
    images = image_states(browser)
    broken = [image["src"] for image in images if not image["ok"]]
    assert not broken, f"{page}: images that did not load: {broken}"
    if page.startswith("workflows/"):
        figures = [image for image in images if image["output"]]
        assert figures, f"{page}: no figure among the notebook's outputs ({len(images)} images on the page)"
    browser.save_screenshot(str(shots / f"docs-{page.replace('/', '-').removesuffix('.html')}.png"))

    links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
    internal = sorted({link.split("#")[0] for link in links if link.startswith(site)})
    assert internal, f"{page} has no internal links"
    for link in internal:
        try:
            with urllib.request.urlopen(link, timeout=10) as answer:
                assert answer.status == 200, f"{page}: {link} answered {answer.status}"
        except urllib.error.HTTPError as err:
            pytest.fail(f"{page}: the link {link} is broken ({err.code})")


def test_the_search_page_finds_load_pretrained(browser, shots, site):
    open_page(browser, site + "search.html?q=load_pretrained")
    found = browser.execute_async_script(
        "const done = arguments[0]; const started = Date.now();"
        "(function poll() {"
        "  const links = Array.from(document.querySelectorAll('#search-results ul.search li a'));"
        "  if (links.length || Date.now() - started > 30000) { done(links.map(a => [a.href, a.textContent])); }"
        "  else { setTimeout(poll, 200); }"
        "})();")
    browser.save_screenshot(str(shots / "docs-search.png"))
    assert found, "the search page found nothing for load_pretrained"
    assert any("load_pretrained" in text and "workbench.transfer" in href for href, text in found), found


class Links(html.parser.HTMLParser):
    """The hrefs/srcs and the ids of one HTML page."""

    def __init__(self):
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.targets.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.targets.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") in ("stylesheet", "next", "prev", "index", "search"):
            self.targets.append(attrs["href"])


def parsed(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(errors="replace"))
    return links


def broken_links(site: Path) -> list[str]:
    """``page: target`` for every relative link of the site that leads to no file, or to a missing anchor."""
    pages = {path: parsed(path) for path in site.rglob("*.html")}
    broken = []
    for path, links in pages.items():
        for target in links.targets:
            parts = urllib.parse.urlsplit(target)
            if parts.scheme or parts.netloc or target.startswith(("mailto:", "javascript:")):
                continue
            file = (path.parent / urllib.parse.unquote(parts.path)).resolve() if parts.path else path
            if file.is_dir():
                file = file / "index.html"
            if not file.is_file():
                broken.append(f"{path.relative_to(site)}: {target}")
            elif parts.fragment and file.suffix == ".html":
                ids = pages[file].ids if file in pages else parsed(file).ids
                if urllib.parse.unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(site)}: {target} (no such anchor)")
    return broken


def test_no_link_of_the_site_is_broken(site):
    broken = broken_links(SITE)
    assert not broken, f"{len(broken)} broken links, the first: {broken[:10]}"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.html").write_text('<a href="b.html">b</a> <a href="a.html#top">top</a> <img src="x.png">')
    (tmp_path / "b.html").write_text('<p id="here"></p><a href="a.html">a</a>')
    assert sorted(broken_links(tmp_path)) == ["a.html: a.html#top (no such anchor)", "a.html: x.png"]
