"""A sweep's report.html in a real browser: opened as a file (no server), its figure drawn, its links followed.

The test runs a small sweep of tests/notebooks/tiny.ipynb with one failed run, writes the report with
``workbench report DIR --html``, and opens ``file://.../report.html`` in headless Chromium:

1. the embedded figure has loaded (an image with a width, not a broken icon), and nothing failed to load;
2. the page has one row per run, and the failed run's row shows its error line;
3. each run's "executed notebook" link opens that run's nbconvert page (the failed one shows the traceback);
   each run-folder link opens.

Screenshots go to ``runs/browser/report-*.png`` (see conftest.py for when this test runs at all).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workbench.cli import main

from ..test_report import ERROR_LINE, run_small_sweep


def test_the_sweep_report_opens_as_a_file_and_its_links_work(browser, shots, tmp_path):
    sweep = run_small_sweep(tmp_path)
    assert main(["report", str(sweep), "--html"]) == 0
    report = sweep / "report.html"
    results = pd.read_csv(sweep / "results.csv")
    failed = results.loc[results["status"] == "failed", "run_id"].tolist()

    browser.get(report.as_uri())
    assert browser.title == "sweep tiny_report"
    figure = browser.find_element("id", "figure")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", figure) > 300
    browser.save_screenshot(str(shots / "report-top.png"))

    rows = browser.find_elements("css selector", "tr.run")
    assert sorted(row.get_attribute("id")[len("run-"):] for row in rows) == sorted(results["run_id"])
    failed_row = browser.find_element("id", f"run-{failed[0]}")
    assert ERROR_LINE in failed_row.text
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", failed_row)
    browser.save_screenshot(str(shots / "report-runs.png"))

    links = {row.get_attribute("id")[len("run-"):]: row.find_element("css selector", "a.notebook").get_attribute("href")
             for row in rows}
    folders = [a.get_attribute("href") for a in browser.find_elements("css selector", "a.folder")]
    assert all(href.startswith("file://") for href in [*links.values(), *folders])
    for run_id, href in links.items():
        browser.get(href)
        body = browser.find_element("tag name", "body").text
        assert run_id in browser.title, f"{href} is not the page of {run_id}"
        if run_id in failed:
            assert "ValueError" in body and "cosin" in body
            browser.save_screenshot(str(shots / "report-failed-notebook.png"))
        else:
            assert "final_metrics" in body
        images = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert all(images), f"an image of {href} did not load"
    browser.get(folders[0])  # Chromium lists a folder given as a file:// URL
    assert "notebook.ipynb" in browser.find_element("tag name", "body").text

    browser.get(report.as_uri())  # once more: the report page logged no error while it loaded
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    assert Path(report).stat().st_size < 2_000_000, "one small file"
