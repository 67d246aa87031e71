"""`segscale ui` end to end in a real browser: Debian's headless Chromium, driven by Selenium
through its chromedriver, opens the MLflow UI that `segscale ui` serves over a real run's store
and finds the run, its Dice metric and its validation picture grid.

.ci/run installs Chromium; elsewhere the test is skipped when no Chromium is installed, unless
SEGSCALE_REQUIRE_BROWSER=1 (as in CI) makes that a failure. SEGSCALE_SCREENSHOT_DIR=DIR keeps the
screenshots (the README's comes from here)."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import prepare_run_dir

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("SEGSCALE_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)"
            )
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # no network here: without these Chromium keeps trying Google's services
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def ui_server(tmp_path, real_store):
    """A run trained with the MLflow tracker under tmp_path/runs, and `segscale ui` serving it."""
    cfg = tiny_config(real_store, epochs=2, steps_per_epoch=8, batch_size=8)
    cfg.update(name="watched", tracker="mlflow", monitor={"pictures": 2})
    run = tmp_path / "runs" / "watched"
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "segscale.cli", "ui", str(run.parent), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"segscale ui did not start:\n{server.stdout.read()}")
        time.sleep(0.5)
    yield url, run
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def test_segscale_ui_shows_the_run_its_dice_and_its_validation_pictures(
    ui_server, browser, tmp_path
):
    from mlflow.tracking import MlflowClient
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, run = ui_server
    run_id = (run / "mlflow_run_id").read_text().strip()
    experiment_id = (
        MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}").get_run(run_id).info.experiment_id
    )

    def page_text(driver) -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    def shot(name: str) -> None:
        path = tmp_path / name
        browser.save_screenshot(str(path))
        keep = os.environ.get("SEGSCALE_SCREENSHOT_DIR")
        if keep:
            shutil.copy(path, Path(keep) / name)

    # the experiment's run list names the run
    browser.get(f"{url}/#/experiments/{experiment_id}/runs")
    WebDriverWait(browser, 90).until(lambda d: "watched" in page_text(d))
    # for the screenshots only: MLflow's model-training view, its assistant panel closed
    for control in ("//*[text()='Model training']", "//button[@aria-label='Close']"):
        for element in browser.find_elements(By.XPATH, control)[:1]:
            element.click()
    # the run's page: its validation Dice among the metrics, then drawn as curves
    browser.get(f"{url}/#/experiments/{experiment_id}/runs/{run_id}")
    WebDriverWait(browser, 60).until(lambda d: "val_dice" in page_text(d))
    assert "watched" in page_text(browser)
    browser.get(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
    WebDriverWait(browser, 60).until(lambda d: "val_dice" in page_text(d))
    with contextlib.suppress(TimeoutException):  # the screenshot once the charts are drawn
        WebDriverWait(browser, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 6
        )
    shot("mlflow-ui-run.png")
    # its artifacts: the validation folder, then the last epoch's picture grid, drawn
    browser.get(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts")
    WebDriverWait(browser, 60).until(lambda d: "validation" in page_text(d))
    browser.find_element(By.XPATH, "//*[text()='validation']").click()
    WebDriverWait(browser, 30).until(lambda d: "validation_epoch002.png" in page_text(d))
    browser.find_element(By.XPATH, "//*[text()='validation_epoch002.png']").click()

    def picture_width(driver) -> int:
        for img in driver.find_elements(By.TAG_NAME, "img"):
            if (img.get_attribute("src") or "").startswith("blob:"):  # fetched from the server
                width = driver.execute_script(
                    "return arguments[0].complete ? arguments[0].naturalWidth : 0", img
                )
                if width:
                    return width
        return 0

    width = WebDriverWait(browser, 60).until(picture_width)
    expected = (run / "pictures" / "validation_epoch002.png").read_bytes()
    from PIL import Image

    with Image.open(run / "pictures" / "validation_epoch002.png") as png:
        assert width == png.width and len(expected) > 1000
    shot("mlflow-ui-pictures.png")


def test_segscale_ui_refuses_what_it_cannot_serve_in_one_line(tmp_path):
    import socket

    from conftest import cli

    missing = cli("ui", tmp_path / "nowhere")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "runs").mkdir()
    empty = cli("ui", tmp_path / "runs")
    assert empty.returncode == 2 and "no MLflow store (mlflow.db) here" in empty.stderr
    (tmp_path / "runs" / "mlflow.db").touch()
    (tmp_path / "runs" / "a-run").mkdir()
    (tmp_path / "runs" / "a-run" / "config.yaml").touch()
    inside = cli("ui", tmp_path / "runs" / "a-run")
    assert inside.returncode == 2 and "a run folder; its runs' store is in" in inside.stderr
    (tmp_path / "runs" / "mlflow.db").write_text("not a database")
    damaged = cli("ui", tmp_path / "runs")
    assert damaged.returncode == 2 and "not a readable MLflow store" in damaged.stderr
    import sqlite3

    (tmp_path / "runs" / "mlflow.db").unlink()
    with sqlite3.connect(tmp_path / "runs" / "mlflow.db") as db:  # a store's tables, empty
        db.execute("CREATE TABLE experiments (experiment_id, name, artifact_location)")
        db.execute("CREATE TABLE runs (experiment_id)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = cli("ui", tmp_path / "runs", "--port", port)
    assert taken.returncode == 2 and f"--port {port}: cannot listen there" in taken.stderr
    for result in (missing, empty, damaged, taken):
        assert "Traceback" not in result.stderr


def test_a_ui_served_to_the_network_answers_by_this_machines_names(tmp_path):
    """`--host 0.0.0.0` shows the UI to the network, but MLflow 3 answered every Host header but
    localhost and private addresses with 403 (DNS-rebinding protection): a browser on another
    machine using this one's name was refused. Its names and addresses are allowed now, and
    --allowed-hosts adds more (a proxy's); any other name is still refused."""
    import http.client
    import socket

    from segscale.tracking import default_uri, mlflow_client

    runs = tmp_path / "runs"
    runs.mkdir()
    mlflow_client(default_uri(runs)).search_experiments()  # creates the store
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "segscale.cli", "ui", str(runs), "--port", str(port)),
            *("--host", "0.0.0.0", "--allowed-hosts", "proxy.example.org"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def status(host_header: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request(
            "GET",
            "/ajax-api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host_header},
        )
        return connection.getresponse().status

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status(f"localhost:{port}")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"segscale ui did not start:\n{server.stdout.read()}")
                time.sleep(0.5)
        assert status(f"{socket.gethostname()}:{port}") == 200
        assert status("proxy.example.org") == status(f"proxy.example.org:{port}") == 200
        assert status(f"attacker.example.com:{port}") == 403
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert f"http://{socket.gethostname()}:{port}" in server.stdout.read()
