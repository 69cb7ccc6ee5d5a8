"""The cell-type notebook in a real browser: JupyterLab, headless Chromium and the widget panel.

The test does in a browser what a user does by hand after ``make lab``, on a copy of
``notebooks/cell_type_annotation.ipynb`` with tiny parameters:

1. open the notebook and choose Run > Run All Cells;
2. check that the figures are images, that no output holds a traceback and that the panel is drawn;
3. switch the panel's ``lr_scheduler_type`` from cosine to constant: the LR preview follows;
4. click Train in the panel: a run folder with ``final_metrics.json`` and figures appears;
5. click Export sweep: a YAML spec appears next to the notebook, and the sweep driver runs it;
6. open the log console: nothing the kernel printed outside the cells is an error either.

Screenshots of the steps, JupyterLab's log and the time each step took go to ``runs/browser/``
(see conftest.py for when this test runs at all).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "cell_type_annotation.ipynb"
#: New defaults for the copy's parameters cell, as source text: a small, fast run.
TINY = {"epochs": "2", "pretrained_checkpoint": '"none"', "batch_size": "64"}
KERNEL = "Python (workbench)"  # the display name of the project's kernel

# How long each wait may take, in seconds: generous, a 2-core CI machine is slow.
OPEN_TIMEOUT = 120
RUN_ALL_TIMEOUT = 400
WIDGET_TIMEOUT = 60
TRAIN_TIMEOUT = 180


def test_cell_type_notebook_and_its_panel_work_in_a_real_browser(jupyter_lab, browser, shots, tmp_path):
    notebook = copy_with_parameters(NOTEBOOK, jupyter_lab.root, TINY)
    page = Page(browser, lab=jupyter_lab, shots=shots)

    with page.step("open the notebook"):
        open_notebook(page, notebook.name)
    with page.step("run all cells"):
        run_all_cells(page)
    with page.step("check the notebook's outputs"):
        check_outputs(page)
        first_figure = page.js("return document.querySelector('.jp-Notebook .jp-RenderedImage')"
                               ".closest('.jp-CodeCell')")
        page.shot("01-run-all-figures", first_figure)  # the LR schedule, then the panel
        last_cell = page.js("const cells = document.querySelectorAll('.jp-Notebook .jp-CodeCell');"
                            "return cells[cells.length - 1]")
        page.shot("02-run-all-end", last_cell, block="end")  # training curves, confusion matrix, metrics
    with page.step("check the panel's controls"):
        check_panel_controls(page, notebook)
    with page.step("switch the schedule to constant"):
        switch_schedule(page)
        page.shot("03-panel-constant-schedule", panel_title(page))
    with page.step("train in the panel"):
        run_dir = train_in_panel(page)
        page.shot("04-panel-after-train", panel_title(page))
    with page.step("check the panel's run folder"):
        check_run_folder(jupyter_lab.root / run_dir)
    with page.step("export a sweep from the panel"):
        spec_path = export_sweep(page)
        page.shot("05-panel-after-export", panel_title(page))
    with page.step("check and run the exported sweep"):
        run_exported_sweep(spec_path, notebook=notebook, output_root=tmp_path / "sweep-runs")
    with page.step("check the whole page and the log console once more"):
        open_log_console(page)
        page.shot("06-log-console")
        check_no_errors(page)
    page.write_timings()


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


def copy_with_parameters(notebook: Path, folder: Path, values: dict[str, str]) -> Path:
    """Copy ``notebook`` into ``folder`` with new defaults in its parameters cell.

    ``values`` maps a parameter name to its new default as source text (``'"none"'`` for a
    string). The line ``name: type = old  # help`` keeps its type and help comment.
    """
    nb = json.loads(notebook.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    for name, value in values.items():
        line = re.compile(rf"^({name}\s*:\s*\w+\s*=\s*)[^#\n]*?(\s*#.*)?$", re.M)
        source, found = line.subn(lambda match: match.group(1) + value + (match.group(2) or ""), source)
        assert found == 1, f"{notebook.name}: no line `{name}: <type> = ...` in its parameters cell"
    cell["source"] = source.splitlines(keepends=True)
    copy = folder / notebook.name
    copy.write_text(json.dumps(nb, indent=1))
    return copy


def open_notebook(page: Page, name: str) -> None:
    """Open the notebook by its URL and wait until the project's kernel is idle."""
    page.driver.get(f"{page.lab.url}/lab/tree/{name}")
    page.wait(lambda d: page.find_all_css(".jp-Notebook .jp-CodeCell"), OPEN_TIMEOUT, "the notebook's cells")
    page.wait(lambda d: f"{KERNEL} | Idle" in page.status_bar(), OPEN_TIMEOUT,
              f"the status bar to say '{KERNEL} | Idle' (the project's kernel, started and idle)")


def run_all_cells(page: Page) -> None:
    """Run > Run All Cells, then wait until every code cell has run and the kernel is idle."""
    page.click_xpath("//li[contains(@class,'lm-MenuBar-item')][normalize-space()='Run']")
    page.click_xpath("//li[contains(@class,'lm-Menu-item')]"
                     "[.//div[contains(@class,'lm-Menu-itemLabel')][normalize-space()='Run All Cells']]")

    def finished(driver):
        state = page.js("""
            const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
            return {
                prompts: cells.map(c => c.querySelector('.jp-InputPrompt').textContent.trim()),
                last: cells[cells.length - 1].querySelector('.jp-OutputArea').textContent,
            };""")
        idle = f"{KERNEL} | Idle" in page.status_bar()
        problems = tracebacks(page)
        if idle and problems:  # a cell failed: Run All stops there, so say so now instead of timing out
            raise AssertionError("a cell failed during Run All:\n" + "\n---\n".join(problems))
        all_ran = all(re.fullmatch(r"\[\d+\]:", prompt) for prompt in state["prompts"])
        return idle and all_ran and "run folder:" in state["last"] and "test_macro_f1" in state["last"]

    page.wait(finished, RUN_ALL_TIMEOUT, "every code cell to run (numbered prompts, the last cell printing "
              "'run folder:' and the test metrics, the kernel idle)")


def check_outputs(page: Page) -> None:
    """Figures are decoded images, nothing printed a traceback, every widget rendered."""
    check_no_errors(page)
    images = page.js("""
        return [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output[data-mime-type="image/png"] img')]
            .filter(img => !img.closest('.widget-output'))
            .map(img => img.complete && img.naturalWidth > 0);""")
    assert sum(images) >= 3, (f"expected at least 3 figures drawn as images in the cells' outputs (LR schedule, "
                              f"training curves, confusion matrix), found {sum(images)} of {len(images)} decoded")
    per_cell = page.js("""
        return [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].map(cell =>
            [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="image/png"] img')]
                .filter(img => !img.closest('.widget-output')).length);""")
    assert max(per_cell) == 1, f"one figure per cell: the cells show {per_cell} images (live curves shown twice?)"
    as_text = [t for t in page.output_texts("text/plain") if t.lstrip().startswith("<Figure size")]
    assert not as_text, f"figures shown as text (a non-inline matplotlib backend reached the kernel): {as_text}"


def check_panel_controls(page: Page, notebook: Path) -> None:
    """One labelled field per parameter, the three tabs, the Train and Export sweep buttons."""
    from workbench.execute import notebook_parameters

    page.wait(lambda d: page.find_all_css(".widget-tab"), WIDGET_TIMEOUT, "the widget panel to render")
    for name in notebook_parameters(notebook):
        assert panel_field(page, name) is not None, f"the panel has no field labelled {name!r}"
    tabs = [tab.text for tab in page.find_all_css(".widget-tab .lm-TabBar-tab")]
    assert tabs == ["LR schedule", "Train", "Export sweep"], f"the panel's tabs are {tabs}"
    for label in ("Train", "Export sweep"):
        assert page.find_all_xpath(button_xpath(label)), f"the panel has no {label!r} button"
    cut = page.js("""
        return [...document.querySelectorAll('.widget-label')]
            .filter(label => label.offsetParent && label.scrollWidth > label.clientWidth + 1)
            .map(label => label.textContent);""")
    assert not cut, f"field labels cut off (too narrow for their text): {cut}"
    too_narrow = cut_off_values(page)
    assert not too_narrow, f"fields too narrow to show their value (or, for a dropdown, each option): {too_narrow}"
    preview = preview_state(page)
    assert preview["title"].startswith("cosine schedule"), (
        f"the LR preview's title should start with 'cosine schedule' (the notebook's default), "
        f"it is {preview['title']!r}")
    assert preview["image"], "the LR preview shows no image"


def switch_schedule(page: Page) -> None:
    """Choose 'constant' in the lr_scheduler_type dropdown; the preview's title and image follow."""
    from selenium.webdriver.support.ui import Select

    schedule = Select(panel_field(page, "lr_scheduler_type").find_element("tag name", "select"))
    assert schedule.first_selected_option.text == "cosine"
    before = preview_state(page)
    schedule.select_by_visible_text("constant")
    page.wait(lambda d: preview_state(page)["title"].startswith("constant schedule"), WIDGET_TIMEOUT,
              f"the LR preview's title to start with 'constant schedule' (it was {before['title']!r})")
    page.wait(lambda d: preview_state(page)["image"] not in ("", before["image"]), WIDGET_TIMEOUT,
              "the LR preview's image to be redrawn")
    page.wait(lambda d: "-p lr_scheduler_type constant" in page.command_line(), WIDGET_TIMEOUT,
              "the panel's terminal command to include '-p lr_scheduler_type constant'")


def train_in_panel(page: Page) -> Path:
    """Train tab, Train button; wait for 'Done. Run folder: ...' and return that folder (as printed)."""
    page.click_xpath(tab_xpath("Train"))
    page.click_xpath(button_xpath("Train"))

    def done(driver):
        text = page.tab_text(2)
        if "Training failed" in text:
            raise AssertionError(f"the Train tab says: {text.strip()}")
        return re.search(r"Done\. Run folder: (\S+)", text)

    found = page.wait(done, TRAIN_TIMEOUT, "'Done. Run folder: ...' in the Train tab")
    page.wait(lambda d: page.find_xpath(button_xpath("Train")).is_enabled(), WIDGET_TIMEOUT,
              "the Train button to be enabled again")
    curves = page.js("return document.querySelectorAll("
                     "'.widget-tab-contents > :nth-child(2) img').length")
    assert curves >= 1, "the Train tab shows no training curves"
    return Path(found.group(1))


def check_run_folder(run_dir: Path) -> None:
    """The panel's run wrote its record: final_metrics.json and the figures."""
    assert run_dir.is_dir(), f"the Train tab names the run folder {run_dir}, which does not exist"
    metrics = run_dir / "final_metrics.json"
    held = sorted(p.name for p in run_dir.iterdir())
    assert metrics.is_file(), f"{run_dir} has no final_metrics.json; it holds {held}"
    assert "test_macro_f1" in json.loads(metrics.read_text())
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert figures, f"{run_dir / 'figures'} holds no .png figure"


def export_sweep(page: Page) -> Path:
    """Export sweep tab: a two-run sweep of one epoch each; return the path the panel wrote."""
    from selenium.webdriver.common.keys import Keys

    page.click_xpath(tab_xpath("Export sweep"))
    too_narrow = cut_off_values(page)
    assert not too_narrow, f"fields too narrow to show their value: {too_narrow}"
    # vary the schedule (the Text field of the same name inside the Export sweep tab) ...
    vary = page.find_xpath(field_xpath("lr_scheduler_type", in_tabs=True) + "//input")
    vary.clear()
    vary.send_keys("constant, cosine", Keys.TAB)
    # ... and make each run short: the panel's epochs field (above the tabs) becomes 1
    epochs = panel_field(page, "epochs").find_element("tag name", "input")
    epochs.click()
    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("1", Keys.TAB)
    # The kernel echoes the epochs value in the terminal command. Each field sends its value as it
    # is typed; by the time the echo of the epochs field (typed last) shows, the vary field's value
    # has reached the kernel too (the YAML check below would say if it had not).
    page.wait(lambda d: "-p epochs 1" in page.command_line(), WIDGET_TIMEOUT,
              "the panel's terminal command to include '-p epochs 1' (the kernel got the typed value)")
    page.click_xpath(button_xpath("Export sweep"))

    def written(driver):
        text = page.tab_text(3)
        if "Export failed" in text:
            raise AssertionError(f"the Export sweep tab says: {text.strip()}")
        return re.search(r"Wrote (\S+\.yaml)", text)

    found = page.wait(written, WIDGET_TIMEOUT, "'Wrote <path>.yaml' in the Export sweep tab")
    return Path(found.group(1))


def run_exported_sweep(spec_path: Path, *, notebook: Path, output_root: Path) -> None:
    """The spec sits in sweeps/ next to the open notebook, holds the panel's values, and runs."""
    import yaml

    from workbench.sweeps import load_spec, run_sweep

    assert spec_path.parent == notebook.parent / "sweeps", (
        f"the panel wrote {spec_path}; expected it in sweeps/ next to the open notebook {notebook}")
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["grid"] == {"lr_scheduler_type": ["constant", "cosine"]}, (
        f"the spec's grid is {spec['grid']}; expected the values typed into the vary field lr_scheduler_type")
    assert spec["parameters"]["epochs"] == 1 and spec["parameters"]["pretrained_checkpoint"] == "none", spec
    assert spec["parameters"].get("interactive") is False, "a sweep run must not draw the panel"
    # run it as written, only into a folder of this test instead of runs/sweeps of the current folder
    sweep = dataclasses.replace(load_spec(spec_path), output_root=output_root)
    assert sweep.notebook.resolve() == notebook.resolve()
    result = run_sweep(sweep, workers=1, progress=False)
    statuses = result.results.filter(["run_id", "status", "error"]).to_dict("records")
    assert result.n_runs == 2 and result.n_failed == 0, f"sweep runs: {statuses}"


def open_log_console(page: Page) -> None:
    """Open JupyterLab's log console (its status bar item), when the kernel logged anything.

    What a kernel prints outside a cell's execution, and outside an Output widget, lands there:
    an error in a widget callback, and the printed lines of a panel run. Once open, its outputs
    are part of the page, so :func:`check_no_errors` reads them too.
    """
    item = page.find_all_css(".jp-LogConsoleStatusItem")
    if not item or not item[0].is_displayed():
        return  # nothing was logged
    item[0].click()
    page.wait(lambda d: page.find_all_css(".jp-LogConsolePanel .jp-OutputArea-output"), WIDGET_TIMEOUT,
              "the log console to open and show its entries")


def check_no_errors(page: Page) -> None:
    """No widget failed to render and no output (cells and panel) holds a traceback or an error."""
    text = page.js("return document.body.textContent")
    assert "Error displaying widget" not in text, "a widget failed to render: 'Error displaying widget' on the page"
    problems = tracebacks(page)
    assert not problems, "outputs with an error:\n" + "\n---\n".join(problems)


# --------------------------------------------------------------------------------------------
# finding things on the page
# --------------------------------------------------------------------------------------------


def tracebacks(page: Page) -> list[str]:
    """Texts of stderr/error outputs that hold a traceback, an exception or a panel failure message."""
    bad = re.compile(r"Traceback|^\w*(Error|Exception)\b|\bfailed: \w+", re.M)
    return [text[-2000:] for text in page.output_texts("application/vnd.jupyter.stderr") if bad.search(text)]


def cut_off_values(page: Page) -> list[str]:
    """``label: value`` of the visible fields whose value does not fit in them.

    A dropdown must fit each of its options (any of them can be picked); a text or number field
    its current value when that is at most 30 characters long (a long path may scroll).
    The widths are measured with the field's own font, as the browser draws it.
    """
    return page.js("""
        const ctx = document.createElement('canvas').getContext('2d');
        const cut = [];
        for (const field of document.querySelectorAll('.widget-inline-hbox > select, .widget-inline-hbox > input')) {
            if (!field.offsetParent || field.type === 'checkbox') continue;  // hidden tab, or no text
            const style = getComputedStyle(field);
            ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
            const room = field.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            const texts = field.tagName === 'SELECT' ? [...field.options].map(o => o.text)
                                                     : [field.value].filter(v => v.length <= 30);
            const label = field.parentElement.querySelector('.widget-label').textContent;
            for (const text of texts) {
                if (ctx.measureText(text).width > room) cut.push(`${label}: ${text}`);
            }
        }
        return cut;""")


def field_xpath(name: str, *, in_tabs: bool = False) -> str:
    """A labelled ipywidgets field: above the tabs (the parameters), or inside them (the vary fields)."""
    where = "ancestor" if in_tabs else "not(ancestor"
    close = "" if in_tabs else ")"
    return (f"//div[contains(@class,'widget-inline-hbox')][{where}::div[contains(@class,'widget-tab')]{close}]"
            f"[label[normalize-space()='{name}']]")


def panel_field(page: Page, name: str):
    """The panel's field for parameter ``name`` (label plus input), or None."""
    found = page.find_all_xpath(field_xpath(name))
    return found[0] if found else None


def tab_xpath(title: str) -> str:
    return f"//div[contains(@class,'widget-tab')]//li[contains(@class,'lm-TabBar-tab')][normalize-space()='{title}']"


def button_xpath(label: str) -> str:
    return f"//button[contains(@class,'jupyter-button')][normalize-space()='{label}']"


def panel_title(page: Page):
    """The panel's first line (``<notebook>: parameters``); screenshots scroll it to the top."""
    return page.find_xpath("//div[contains(@class,'widget-html-content')][contains(., ': parameters')]")


def preview_state(page: Page) -> dict:
    """The LR tab's title text and the start of its image's data URL ('' when there is none)."""
    return page.js("""
        const tab = document.querySelector('.widget-tab-contents > :first-child');
        const title = tab && tab.querySelector('.widget-html-content');
        const img = tab && tab.querySelector('img');
        return {title: title ? title.textContent.trim() : '', image: img ? img.src.slice(-200) : ''};""")


class Page:
    """The JupyterLab page, with the waits, look-ups and screenshots the steps share."""

    def __init__(self, driver, *, lab, shots: Path):
        self.driver, self.lab, self.shots = driver, lab, shots
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        """Run one step; on failure save a screenshot and the page source, and say which step failed."""
        started = time.monotonic()
        try:
            yield
        except Exception as error:
            slug = re.sub(r"\W+", "-", name).strip("-")
            png, html = self.shots / f"FAILED-{slug}.png", self.shots / f"FAILED-{slug}.html"
            try:
                self.driver.save_screenshot(str(png))
                html.write_text(self.driver.page_source)
            except Exception as lost:  # the browser itself may be gone; the step's error matters more
                png = html = f"(not saved: {type(lost).__name__})"
            message = getattr(error, "msg", None) or str(error)  # selenium's msg: without its C++ stack
            raise AssertionError(
                f"browser test step {name!r} failed: {type(error).__name__}: {message}\n"
                f"  screenshot: {png}\n  page source: {html}\n  JupyterLab log: {self.lab.log}\n"
                f"last lines of the JupyterLab log:\n{self.lab.log_tail(15)}"
            ) from error
        self.timings[name] = time.monotonic() - started

    def write_timings(self) -> None:
        lines = [f"{seconds:6.1f} s  {name}" for name, seconds in self.timings.items()]
        lines.append(f"{sum(self.timings.values()):6.1f} s  in all")
        (self.shots / "timings.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    def wait(self, condition, timeout: float, what: str):
        """Wait until ``condition(driver)`` is truthy and return it; fail naming ``what`` after ``timeout`` s."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        waiter = WebDriverWait(self.driver, timeout, poll_frequency=0.5,
                               ignored_exceptions=(StaleElementReferenceException,))
        return waiter.until(condition, message=f"waited {timeout} s for {what}")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find_css(self, css: str):
        return self.driver.find_element("css selector", css)

    def find_all_css(self, css: str) -> list:
        return self.driver.find_elements("css selector", css)

    def find_xpath(self, xpath: str):
        return self.driver.find_element("xpath", xpath)

    def find_all_xpath(self, xpath: str) -> list:
        return self.driver.find_elements("xpath", xpath)

    def click_xpath(self, xpath: str, timeout: float = WIDGET_TIMEOUT) -> None:
        """Click the element at ``xpath`` once it is visible and enabled."""
        from selenium.webdriver.support import expected_conditions

        element = self.wait(expected_conditions.element_to_be_clickable(("xpath", xpath)), timeout,
                            f"a clickable element at {xpath}")
        self.js("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def status_bar(self) -> str:
        return " ".join(item.text for item in self.find_all_css(".jp-StatusBar-TextItem"))

    def output_texts(self, mime_type: str) -> list[str]:
        """Texts of every output of that MIME type on the page (cells and the panel's Output widgets)."""
        return self.js("return [...document.querySelectorAll("
                       "`.jp-OutputArea-output[data-mime-type='${arguments[0]}']`)].map(e => e.textContent)",
                       mime_type)

    def tab_text(self, number: int) -> str:
        """All text in the panel's tab ``number`` (1: LR schedule, 2: Train, 3: Export sweep)."""
        return self.js("const tab = document.querySelector(`.widget-tab-contents > :nth-child(${arguments[0]})`);"
                       "return tab ? tab.textContent : '';", number)

    def command_line(self) -> str:
        """The panel's 'same run from a terminal' command."""
        return self.js("const code = [...document.querySelectorAll('.widget-html-content code')]"
                       "  .find(c => c.textContent.startsWith('workbench run'));"
                       "return code ? code.textContent : '';")

    def shot(self, name: str, element=None, *, block: str = "start") -> None:
        """Save a screenshot of the window as ``runs/browser/<name>.png``, ``element`` scrolled into view."""
        if element is not None:
            self.js(f"arguments[0].scrollIntoView({{block: '{block}'}})", element)
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))
