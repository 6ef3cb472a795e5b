"""The web page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium) against a
real `distill serve`: API key handling, the submit form with field errors, the live job list with one overall
bar per job, the job page with its estimate, stages, preview and manifest, the archive downloaded by the page
and verified, an evaluation started from the page, and the comparison of a dataset's jobs.

Set DISTILL_SCREENSHOTS=DIR to save PNGs of the list, a job page and the form at 1280 px (docs/screenshots/).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support.helpers import wait_until

from distill.archive import read_archive
from distill.client import Client

from .conftest import KEY, SLOW_PARAMS, Server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup-system.sh)")
SCREENSHOTS = os.environ.get("DISTILL_SCREENSHOTS")
WATCHABLE = {"iterations": "40", "compile_real": "off", "batch_real": "8"}  # a DM job that runs for some seconds


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                 "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_window_size(1280, 900)
    try:
        yield driver, downloads
    finally:
        driver.quit()


def find(driver, css: str, timeout: float = 30):  # noqa: ANN001, ANN201
    return wait_until(lambda: (found := driver.find_elements(By.CSS_SELECTOR, css)) and found[0], timeout=timeout)


def visible_text(driver, css: str, timeout: float = 30) -> str:  # noqa: ANN001
    return wait_until(lambda: next((e.text for e in driver.find_elements(By.CSS_SELECTOR, css)
                                    if e.is_displayed() and e.text), None), timeout=timeout)


def use_key(driver, key: str) -> None:  # noqa: ANN001
    field = find(driver, "#api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def open_page(driver, server: Server, path: str, key: str | None = KEY) -> None:  # noqa: ANN001
    """Load ``path`` with ``key`` already in the tab's sessionStorage (as after entering it once)."""
    driver.get(server.url + "/openapi.json")
    driver.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('distill.apiKey', arguments[0])",
                          key)
    driver.get(server.url + path)


def shot(driver, name: str, height: int = 900) -> None:  # noqa: ANN001
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1280, height)
        driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.3)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))
        driver.set_window_size(1280, 900)


def test_api_key_wrong_then_right(server: Server, browser) -> None:  # noqa: ANN001
    driver, _ = browser
    open_page(driver, server, "/", key=None)
    assert "API key" in visible_text(driver, "#banner")  # keys configured, none entered yet
    use_key(driver, "definitely-wrong")
    wait_until(lambda: "refused" in driver.find_element(By.ID, "banner").text)
    assert driver.find_element(By.ID, "banner").text.startswith("The server needs a valid API key")
    use_key(driver, KEY)
    wait_until(lambda: not driver.find_element(By.ID, "banner").is_displayed())
    assert driver.execute_script("return sessionStorage.getItem('distill.apiKey')") == KEY
    driver.refresh()  # kept for the browser session
    find(driver, "table.jobs")
    assert not driver.find_element(By.ID, "banner").is_displayed()


def test_bad_form_values_show_field_errors(server: Server, browser) -> None:  # noqa: ANN001
    driver, _ = browser
    open_page(driver, server, "/#/new")
    Select(find(driver, "#f-method")).select_by_value("herding")
    ipc = find(driver, "#f-ipc")
    ipc.clear()
    ipc.send_keys("0")
    ipc.send_keys(Keys.ENTER)  # Enter submits: the form works from the keyboard
    assert "greater than or equal to 1" in visible_text(driver, "#f-ipc-error")
    assert ipc.get_attribute("aria-invalid") == "true"
    assert driver.switch_to.active_element == ipc  # focus moves to the first bad field
    # the method's own parameters are checked by the server too; their errors land next to their fields
    ipc.clear()
    ipc.send_keys("1")
    assert not find(driver, "#param-batch_size").is_displayed()  # method parameters start folded
    find(driver, "#advanced summary").click()
    batch = find(driver, "#param-batch_size")
    batch.clear()
    batch.send_keys("big", Keys.ENTER)
    assert "integer" in visible_text(driver, "#param-batch_size-error")
    assert driver.find_element(By.ID, "f-ipc-error").is_displayed() is False  # the fixed field's error is gone
    assert driver.current_url.endswith("#/new")  # nothing was submitted


def test_gpu_only_parameters_are_set_apart_on_a_cpu_host(server: Server, browser) -> None:  # noqa: ANN001
    """A parameter marked as having an effect only on a CUDA GPU (the site plugin's tf32) is not an ordinary field
    on a host without one: folded under its device with the reason, disabled, and not sent. oq's diffusion decode
    parameters run on the CPU too (fp32) and stay ordinary fields."""
    import torch

    driver, _ = browser
    open_page(driver, server, "/#/new")
    Select(find(driver, "#f-method")).select_by_value("site-random")
    find(driver, "#advanced summary").click()
    tf32 = find(driver, "#param-tf32")
    if torch.cuda.is_available():  # a GPU host: an ordinary field
        assert tf32.is_displayed() and tf32.is_enabled()
        assert not driver.find_elements(By.CSS_SELECTOR, "details.device-params")
        return
    section = tf32.find_element(By.XPATH, "ancestor::details[1]")
    assert section.get_attribute("data-device") == "cuda" and section.get_attribute("open") is None
    assert not tf32.is_displayed() and not tf32.is_enabled()
    assert section.text == "Only with a CUDA GPU (1)"  # folded: the summary alone
    section.find_element(By.TAG_NAME, "summary").click()
    assert "needs a CUDA GPU; this host has none" in visible_text(driver, "details.device-params .hint")
    assert tf32.is_displayed() and not tf32.is_enabled()
    Select(find(driver, "#f-dataset")).select_by_value("mnist")
    for field, value in (("#f-ipc", "1"), ("#f-max_per_class", "5")):
        find(driver, field).clear()
        find(driver, field).send_keys(value)
    find(driver, "#submit").click()
    wait_until(lambda: "#/jobs/job_" in driver.current_url)
    with Client(server.url, api_key=KEY) as client:
        job = client.get(driver.current_url.rsplit("/", 1)[1])
        assert job.request.method == "site-random" and job.request.params == {}  # the default applies
        client.wait(job, timeout=120)

    open_page(driver, server, "/#/new")
    Select(find(driver, "#f-method")).select_by_value("oq")
    find(driver, "#advanced summary").click()
    for name in ("prior", "strength", "steps", "scheduler", "guidance"):
        control = find(driver, f"#param-{name}")
        assert control.is_displayed() and control.is_enabled(), name
    assert not driver.find_elements(By.CSS_SELECTOR, "details.device-params")


def test_submit_watch_open_preview_download(server: Server, browser) -> None:  # noqa: ANN001
    driver, downloads = browser
    open_page(driver, server, "/#/new")
    Select(find(driver, "#f-method")).select_by_value("dm")
    Select(find(driver, "#f-dataset")).select_by_value("mnist")
    for field, value in (("#f-ipc", "3"), ("#f-max_per_class", "10"), ("#f-name", "watch me")):
        find(driver, field).clear()
        find(driver, field).send_keys(value)
    find(driver, "#advanced summary").click()
    for name, value in WATCHABLE.items():
        control = find(driver, f"#param-{name}")
        if control.tag_name == "select":
            Select(control).select_by_visible_text(value)
        else:
            control.clear()
            control.send_keys(value)
    shot(driver, "form.png", height=1300)
    find(driver, "#submit").click()
    wait_until(lambda: "#/jobs/job_" in driver.current_url)
    job_id = driver.current_url.rsplit("/", 1)[1]

    with Client(server.url, api_key=KEY) as client:  # company in the list: one waiting, one cancelled
        waiting = client.submit("random", "mnist", 2, max_per_class=20)
        client.cancel(client.submit("herding", "fashion-mnist", 1, max_per_class=10))
    driver.get(server.url + "/#/")
    row = f'tr[data-job="{job_id}"]'
    find(driver, f'tr[data-job="{waiting.id}"]')
    assert {"queued", "cancelled"} <= {e.get_attribute("data-status") for e in driver.find_elements(By.CSS_SELECTOR, "tr")}
    find(driver, row)
    values: list[float] = []

    def progressed() -> bool:
        state = driver.execute_script(
            "const r = document.querySelector(arguments[0]);"
            "return r && [r.dataset.status, Number(r.querySelector('progress').value)]", row)
        if not state:
            return False
        status, value = state
        values.append(value)
        if status == "running" and 0 < value < 1 and len(set(values)) >= 3:
            return True
        assert status in ("queued", "running"), f"job ended before the bar was seen moving: {values}"
        return False

    wait_until(progressed, timeout=240, interval=0.3)
    assert values == sorted(values)  # the bar only moves forward, without a page reload
    shot(driver, "jobs.png")

    assert "watch me" in driver.find_element(By.CSS_SELECTOR, row).text  # the name, not only the id
    assert "iterations=40" in driver.find_element(By.CSS_SELECTOR, f"{row} td.params").text
    link = find(driver, f"{row} a")
    link.send_keys(Keys.ENTER)  # the row link survives the list's refreshes, so the keyboard can open it
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#events li"))
    assert "estimate at submit" in visible_text(driver, "#job-timing")
    assert driver.find_elements(By.CSS_SELECTOR, "#stages li")  # the stage list, before and while it runs
    with Client(server.url, api_key=KEY) as client:
        job = client.wait(job_id, timeout=300)
    assert job.status == "succeeded", job.error
    image = find(driver, "#preview-img", timeout=60)
    wait_until(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100)
    assert "images" in visible_text(driver, "#manifest")
    log = driver.find_element(By.ID, "events").text
    assert "job queued" in log and "succeeded" in log  # the streamed event log reached the end
    assert driver.find_elements(By.ID, "cancel") == []  # nothing to cancel any more
    wait_until(lambda: all(li.get_attribute("class").endswith("done")
                           for li in driver.find_elements(By.CSS_SELECTOR, "#stages li")))
    assert "distill" in [li.get_attribute("data-stage") for li in driver.find_elements(By.CSS_SELECTOR, "#stages li")]
    assert find(driver, "#rerun").is_displayed() and find(driver, "#evaluate").is_displayed()
    shot(driver, "job.png", height=1500)

    find(driver, "#download").click()
    wait_until(lambda: "sha256 verified" in driver.find_element(By.ID, "download-state").text, timeout=60)
    saved = wait_until(lambda: [p for p in downloads.glob("*.tar")], timeout=60)[0]
    time.sleep(0.5)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == job.artifact.sha256
    assert read_archive(saved).manifest["method"] == "dm"


def test_cancel_from_the_job_page_and_phone_width(server: Server, browser) -> None:  # noqa: ANN001
    driver, _ = browser
    with Client(server.url, api_key=KEY) as client:
        job = client.submit("dm", "mnist", 1, params=SLOW_PARAMS, max_per_class=10)
        try:
            open_page(driver, server, f"/#/jobs/{job.id}")
            find(driver, "#cancel").click()
            driver.switch_to.alert.dismiss()  # the page asks first: dismissed, nothing happens
            time.sleep(0.5)
            assert not client.get(job).cancel_requested
            find(driver, "#cancel").click()
            driver.switch_to.alert.accept()
            wait_until(lambda: "cancel requested" in driver.find_element(By.ID, "job-status").text
                       or "cancelled" in driver.find_element(By.ID, "job-status").text)
            assert client.wait(job, timeout=180, raise_on_failure=False).status == "cancelled"
            wait_until(lambda: "cancelled" in driver.find_element(By.ID, "job-status").text, timeout=60)
        finally:
            if not client.get(job).terminal:
                client.cancel(job)
    driver.set_window_size(390, 844)  # a phone
    try:
        for page in ("/#/", f"/#/jobs/{job.id}", "/#/new"):
            open_page(driver, server, page)
            find(driver, "main h1")
            time.sleep(0.5)
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{page} is wider than a phone screen by {overflow}px"
    finally:
        driver.set_window_size(1280, 900)


def test_evaluate_from_the_page_then_compare(server: Server, browser) -> None:  # noqa: ANN001
    driver, _ = browser
    with Client(server.url, api_key=KEY) as client:
        first = client.wait(client.submit("random", "tiny-folder", 2, name="two per class"), timeout=120)
        second = client.wait(client.submit("random", "tiny-folder", 3, name="three per class"), timeout=120)
    open_page(driver, server, f"/#/jobs/{first.id}")
    find(driver, "#eval-runs").send_keys("1")
    find(driver, "#eval-epochs").send_keys("2")
    find(driver, "#evaluate").click()
    wait_until(lambda: "#/jobs/job_" in driver.current_url and first.id not in driver.current_url)
    evaluation_id = driver.current_url.rsplit("/", 1)[1]
    wait_until(lambda: "gain over the control" in driver.find_element(By.ID, "evaluation").text, timeout=240)
    result = driver.find_element(By.ID, "evaluation").text
    assert "random-subset control" in result and "1 × convnet, 2 epochs" in result
    with Client(server.url, api_key=KEY) as client:
        done = client.get(first)
    assert done.evaluation is not None and done.evaluation.job_id == evaluation_id
    assert f"{done.evaluation.accuracy.mean:.2f} %" in result

    open_page(driver, server, "/#/")
    find(driver, '#compare-links a[data-dataset="tiny-folder"]').click()
    row = find(driver, f'#compare-rows tr[data-job="{first.id}"]')
    assert driver.find_elements(By.CSS_SELECTOR, f'#compare-rows tr[data-job="{second.id}"]')
    assert find(driver, "#compare-rows tr").get_attribute("data-job") == first.id  # evaluated first (by gain)
    cells = {c.get_attribute("data-label"): c.text for c in row.find_elements(By.CSS_SELECTOR, "td")}
    assert cells["Accuracy"] == f"{done.evaluation.accuracy.mean:.2f} %"
    assert cells["Control"] == f"{done.evaluation.control.mean:.2f} %" and cells["Gain"].lstrip("+-")
    assert cells["Method"] == "random" and cells["IPC"] == "2" and cells["Time"]
    shot(driver, "compare.png")


def test_docs_work_offline(server: Server, browser) -> None:  # noqa: ANN001
    driver, _ = browser
    driver.get(server.url + "/docs")
    assert "distillery" in visible_text(driver, ".swagger-ui .title", timeout=60)
    sources = driver.execute_script("return Array.from(document.scripts).map(s => s.src)")
    assert all(src == "" or src.startswith(server.url) for src in sources)  # nothing from a CDN
