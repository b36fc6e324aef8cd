"""The dashboard in a real headless browser (Debian's chromium driven by selenium): jobs appear
and progress live, a failure shows its code, a job shows its files, projects their figures,
computed files a download, the archive its fixity summary, the API its routes. Every view
leaves a screenshot (``<tmp>/screenshots/``, copied to ``docs/screenshots/`` for the README).

Under ``CI=true`` a missing chromium fails these tests (``.ci/run`` installs it); elsewhere
they skip saying why.
"""
import shutil
from pathlib import Path

import pytest
import requests

from tests.helpers import REPO, new_project, payload_bundle, wait_for
from tests.servers import need

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = REPO / "docs" / "screenshots"


def require_browser() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        need(False, "selenium is not installed (pip install '.[test]')")
    need(CHROMIUM.exists() and CHROMEDRIVER.exists(),
         "no headless browser: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")

    def take(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), name
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)
        return path
    return take


def text(driver, css: str, timeout: float = 60, message: str = "") -> str:
    """The text of the first visible element matching ``css``, once there is one. Read in the
    page itself: the live views re-render every second, so element handles go stale."""
    script = ("const e = document.querySelector(arguments[0]);"
              "return e && e.offsetParent !== null ? (e.innerText || e.value || ' ') : null;")
    return wait_for(lambda: driver.execute_script(script, css), timeout=timeout, interval=0.2,
                    message=message or css)


def click(driver, css: str, message: str = "") -> None:
    text(driver, css, message=message)
    driver.execute_script("document.querySelector(arguments[0]).click();", css)


def type_into(driver, css: str, value: str) -> None:
    text(driver, css)
    driver.find_element("css selector", css).send_keys(value)


def test_jobs_appear_and_finish_live_and_failures_show_their_code(stack, browser, shots):
    browser.get(stack.url("ingest") + "/dashboard/")
    text(browser, "#jobs thead")
    browser.execute_script("window.notReloaded = true;")

    job_id = stack.post(payload_bundle({"run/live.txt": b"seen live\n"}))["job_id"]
    bad_id = stack.post(b"this is not a tar" * 100)["job_id"]
    text(browser, f'#job-{job_id}[data-complete="true"][data-state="OK"]', message=f"job {job_id} OK on the page")
    assert "bad_tar" in text(browser, f'#job-{bad_id}[data-state="FAILED"] .exception',
                             message=f"job {bad_id} FAILED on the page")
    assert browser.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    shots(browser, "jobs")

    click(browser, f"#job-{job_id}")
    assert text(browser, "#job-files tbody tr td.mono", message="the job's files") == "run/live.txt"
    assert "sha1:" in text(browser, "#job-files tbody")
    shots(browser, "job")

    browser.get(stack.url("ingest") + f"/dashboard/#job/{bad_id}")
    wait_for(lambda: "bad_tar" in text(browser, "#job-state dd.exception"), timeout=20, message="why the job failed")
    assert "open tar" in text(browser, "#job-state")


def test_projects_downloads_fixity_and_api_views(stack, browser, shots):
    project = new_project(stack, "dash")
    job = stack.ingest(payload_bundle({"tables/cells.csv": b"cell,count\na,1\nb,2\nc,3\n"}, project=project,
                                      keys={"sample": "s1"}))
    assert job["state"] == "OK", job
    wait_for(lambda: [f for f in requests.get(stack.url("stats") + "/computed_files", params={"project": project},
                                              timeout=10).json() if f.get("sha256")],
             timeout=120, interval=0.5, message="the project's computed files")
    base = stack.url("ingest") + "/dashboard/"

    browser.get(base + "#projects")
    type_into(browser, "#project-id", project)
    click(browser, "#project-form button")
    text(browser, "#project-numbers", message="the project's numbers")
    shots(browser, "projects")

    browser.get(base + "#files")
    type_into(browser, "#files-project", project)
    click(browser, "#files-form button")
    click(browser, "#computed-files button.download", message="a download button")
    type_into(browser, "#download-email", "me@example.org")
    click(browser, "#download-terms")
    click(browser, "#download-token button")
    text(browser, "a.download-link, #error:not([hidden])", message="a download link")
    assert not browser.execute_script("return !document.querySelector('#error').hidden;"), text(browser, "#error")
    href = browser.execute_script("return document.querySelector('a.download-link').href;")
    assert "/download/computed/" in href
    shots(browser, "downloads")

    browser.get(base + "#fixity")
    assert text(browser, "#fixity dl, #fixity-missing", message="the fixity summary or 'not available'").strip()
    shots(browser, "archive")

    browser.get(base + "#api")
    click(browser, '#api-list a[href="api.html?service=ingest"]')
    text(browser, ".route", message="the API's routes")
    assert "/jobs" in text(browser, "#routes")
    shots(browser, "api")
