"""Reviewing runs in the MLflow dashboard: the link `transferlab ui` prints, checked in a real
headless Chromium, and the choice of experiment and columns behind it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import pytest
from clitools import SMOKE, error_line, start_dashboard, transferlab

from transferlab.errors import UserError
from transferlab.tracking import review
from transferlab.tracking.server import free_port

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_CHROMIUM = (
    "the dashboard test needs Chromium and its driver: `sudo apt-get install chromium "
    "chromium-driver` (Debian; `make test-slow` does it as root) and `pip install -e '.[dev]'`"
)


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def log_run(client, experiment_id: str, metrics: dict, params: dict | None = None, tags=None):
    run = client.create_run(experiment_id, tags=tags or {})
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_the_link_opens_the_experiment_of_the_newest_run(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(store_uri(tmp_path))
    assert review.review_experiment(client) is None  # no runs yet
    older = client.create_experiment("older")
    newer = client.create_experiment("newer")
    log_run(client, newer, {"best/val/acc": 0.5})
    time.sleep(0.01)
    log_run(client, older, {"best/val/acc": 0.6})

    # Created first, trained last: MLflow's last_update_time would say "newer".
    assert review.review_experiment(client).experiment_id == older
    assert review.review_experiment(client, "newer").experiment_id == newer
    with pytest.raises(UserError, match=r"no experiment 'gone' in the store; pass one of: .*"):
        review.review_experiment(client, "gone")


def test_the_columns_are_the_monitored_metric_then_the_test_metrics_logged() -> None:
    class Run:
        def __init__(self, metrics: dict, params: dict, tags: dict) -> None:
            self.data = type("Data", (), {"metrics": metrics, "params": params, "tags": tags})

    loss = {"monitor": "val/loss"}
    detection = {"task.compare_metrics": "test/map,test/map_50"}
    runs = [
        Run({"best/val/loss": 0.3, "val/loss": 0.4, "test/map": 0.2}, loss, detection),
        Run({"best/val/loss": 0.2, "test/map_50": 0.5}, loss, detection),
    ]
    assert review.review_metrics(runs) == ["best/val/loss", "test/map", "test/map_50"]
    # Without a best value the monitored metric itself; classification's test metrics.
    plain = [Run({"val/acc": 0.9, "test/acc": 0.8, "test/f1": 0.7}, {}, {})]
    assert review.review_metrics(plain) == ["val/acc", "test/acc", "test/f1"]


def test_the_view_is_a_named_experiment_tag_that_the_link_names(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(store_uri(tmp_path))
    experiment = client.create_experiment("smoke")
    assert review.save_review_view(client, experiment) is None  # no run, no metric
    log_run(client, experiment, {"best/val/acc": 0.5, "test/acc": 0.4}, {"monitor": "val/acc"})

    key = review.save_review_view(client, experiment)
    value = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{key}"])
    columns = ["metrics.`best/val/acc`", "metrics.`test/acc`"]
    assert value["name"] == "transferlab review"
    assert json.loads(value["state"]) == {"selectedColumns": columns}
    assert value["selectedColumns"] == columns
    assert review.runs_table_url("http://127.0.0.1:5000", experiment, key) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
        "?viewStateShareKey=transferlab-review&workflowType=machine_learning"
    )
    assert review.runs_table_url("http://h:1/", "7") == (
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_ui_with_an_unknown_experiment_names_the_known_ones(tmp_path: Path) -> None:
    mlflow.MlflowClient(store_uri(tmp_path)).create_experiment("smoke")
    line = error_line(transferlab("ui", "--experiment", "smoek", cwd=tmp_path))
    assert "no experiment 'smoek' in the store; pass one of: " in line and "'smoke'" in line


def test_open_waits_for_the_server_then_opens_the_link(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = HTTPServer(("127.0.0.1", port), Health)
    starter = threading.Timer(1.0, server.serve_forever)  # starts after the first tries fail
    starter.start()
    try:
        link = f"http://127.0.0.1:{port}/#/experiments/1/runs"
        assert review.open_when_serving(link, f"http://127.0.0.1:{port}/health", timeout_s=30)
    finally:
        server.shutdown()
        starter.join()
        server.server_close()
    assert opened == [link]


def headless_chromium(profile: Path):
    """Selenium's Chrome driver on Debian's Chromium, with nothing reaching for the network."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: {INSTALL_CHROMIUM}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL_CHROMIUM}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,800",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.mark.slow  # about 60 s on 2 cores: a run, a sweep of two jobs, the server, Chromium
def test_the_printed_link_shows_runs_metrics_and_sweeps_in_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link lands on the runs table of the model-training view (not the GenAI overview),
    with the monitored metric's best value and the test metrics as columns (MLflow presets
    them from a saved view the link names), and the sweep's jobs nested under its parent:
    hidden until the parent's expander is clicked.

    Screenshots go to $TRANSFERLAB_SCREENSHOTS, else into the test's folder.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("TRANSFERLAB_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium(tmp_path / "chromium-profile")  # fails first if it is missing
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
        run = transferlab("train", *SMOKE, f"hydra.run.dir={tmp_path / 'outputs'}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        sweep = transferlab(
            "train", "-m", *SMOKE, "callbacks.progress_bar.refresh_rate=0",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", "finetune=linear_probe,full",
            cwd=tmp_path,
        )  # fmt: skip
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        client = mlflow.MlflowClient(store_uri(tmp_path))
        experiment = [client.get_experiment_by_name("smoke").experiment_id]
        (parent,) = client.search_runs(experiment, "tags.`sweep.parent` = 'true'")
        children = client.search_runs(
            experiment, f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert len(children) == 2
        single = re.search(r"MLflow run: (\w+)", run.stdout).group(1)

        server, link = start_dashboard(tmp_path)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(link)
            header = '[data-testid="sort-header-{}"]'
            wait.until(
                shown.visibility_of_element_located((By.CSS_SELECTOR, header.format("Run Name")))
            )
            for column in ("best/val/acc", "test/acc", "test/f1"):
                wait.until(
                    shown.visibility_of_element_located((By.CSS_SELECTOR, header.format(column)))
                )
            assert "/runs?" in driver.current_url and "workflowType=machine_learning" in link
            # The job runs sit under the sweep, not in the table's top level.
            row = '.ag-center-cols-container [row-id="{}"]'
            wait.until(
                shown.visibility_of_element_located(
                    (By.CSS_SELECTOR, row.format(parent.info.run_id))
                )
            )
            for child in children:
                assert not driver.find_elements(By.CSS_SELECTOR, row.format(child.info.run_id))
            for close in driver.find_elements(By.CSS_SELECTOR, 'button[aria-label="Close"]'):
                close.click()  # MLflow's assistant panel, open on a first visit
            driver.save_screenshot(str(shots / "runs-table.png"))

            expander = (
                f'[row-id="{parent.info.run_id}"] button[data-component-id*="runnamecellrenderer"]'
            )
            wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, expander))).click()
            for child in children:
                wait.until(
                    shown.visibility_of_element_located(
                        (By.CSS_SELECTOR, row.format(child.info.run_id))
                    )
                )
            driver.save_screenshot(str(shots / "sweep-expanded.png"))

            # A run's own page: its metrics (here its test metrics), params and artifacts.
            driver.find_element(By.CSS_SELECTOR, f'a[href$="/runs/{single}"]').click()
            search = 'input[placeholder="Search metrics"]'
            wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, search))).send_keys("test/")
            wait.until(shown.visibility_of_element_located((By.LINK_TEXT, "test/acc")))
            wait.until(shown.invisibility_of_element_located((By.LINK_TEXT, "best/val/acc")))
            driver.save_screenshot(str(shots / "run-page.png"))

            # Compare of the two jobs: their root-level figures, side by side.
            ids = json.dumps([child.info.run_id for child in children])
            query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps(experiment)})
            driver.get(f"{link.split('#')[0]}#/compare-runs?{query}")
            figure = '//*[contains(text(), "confusion_matrix.png")]'
            wait.until(shown.visibility_of_element_located((By.XPATH, figure))).click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img")) >= 2)
            assert "No common artifacts" not in driver.page_source
            heading = driver.find_element(By.XPATH, '//*[text()="Artifacts"]')
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
            driver.save_screenshot(str(shots / "compare.png"))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    finally:
        driver.quit()
