"""What a user touches after training, for real: `mlflow models serve` answering HTTP requests in the documented
format, and the MLflow UI in a real browser (Debian's Chromium driven by Playwright) showing the runs, the
test/accuracy chart, the GradCAM artifacts and the `champion` alias. One store serves every test, the suite's
shared one (conftest.trained): a tiny training run (3 epochs) and its analysis run, both through the real
`mlflow run`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import RUN_LINKS_JS, TRAINED, UI_TIMEOUT_MS, free_port, shown, ui_server

MODEL = "cifar10-resnet18"
CHAMPION_URI = f"models:/{MODEL}@champion"
EPOCHS = int(TRAINED["epochs"])


# ---------------------------------------------------------------------------------------------------------------
# Serving: `mlflow models serve -m models:/cifar10-resnet18@champion --env-manager local`, without the project


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(
                    f"{what} exited with code {proc.returncode} before answering {url}:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.25)
    pytest.fail(f"{what} did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (mlflow -> uvicorn -> workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served_model(trained, tmp_path_factory):
    """The champion served on 127.0.0.1 by the MLflow CLI, the registry read from the store: its base URL. The
    server runs as on a machine where this project is not installed (tests/without_project: cifar_mlflow,
    torchvision, safetensors and the training libraries cannot be imported), with the model's own code."""
    port = free_port()
    tmp_path = tmp_path_factory.mktemp("serve")
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        CHAMPION_URI,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as fh:
        # MLFLOW_TRACKING_URI = the store, and this environment's bin/ first on PATH (the CLI execs `uvicorn` from
        # PATH)
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=trained.store.env_without_project(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log, "mlflow models serve", timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_champion_answers_like_the_model_in_process(trained, served_model, cifar_root, tmp_path):
    import mlflow
    from PIL import Image

    from cifar_mlflow import data

    test = data.read_cifar10(cifar_root, max_test=4, test_only=True).test
    # The recipe of docs/models.md: image files -> float32 (N, 3, 32, 32) in [0, 1] -> {"inputs": nested lists}
    paths = []
    for i, img in enumerate(test.images):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(img).save(paths[-1])
    x = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32) / 255 for p in paths]
    ).transpose(0, 3, 1, 2)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, (test.images.transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32))

    status, body = _post(f"{served_model}/invocations", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200, body
    served = np.asarray(body["predictions"], dtype=np.float64)
    assert served.shape == (4, 10), served.shape
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)

    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    expected = np.asarray(model.predict(list(x)))
    np.testing.assert_allclose(
        served, expected, atol=1e-5, rtol=0, err_msg="served probabilities differ from the in-process pyfunc's"
    )
    assert len(model.metadata.metadata["class_names"]) == served.shape[1]

    # a wrongly shaped batch (16 rows instead of 32) is refused with the reason, not answered
    status, body = _post(f"{served_model}/invocations", json.dumps({"inputs": x[:, :, :16].tolist()}).encode())
    assert status == 400, (status, body)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE", body
    assert body["message"].endswith(f"input of shape (4, 3, 16, 32) is not allowed: {EXPECTED_INPUT}"), body["message"][
        -500:
    ]


def test_served_model_answers_what_real_clients_send(trained, served_model, tmp_path):
    """Request bodies other programs wrote: MLflow's own serving_input_example.json (logged beside MLmodel), and
    the curl command of docs/models.md on a file. Formats MLflow accepts for other models (pandas' dataframe_split,
    TF-serving's instances) and malformed JSON get a 400 with a reason, never a 500 or a traceback."""
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(CHAMPION_URI, dst_path=str(tmp_path / "model")))
    example = (folder / "serving_input_example.json").read_bytes()
    status, body = _post(f"{served_model}/invocations", example)
    rows = np.asarray(body["predictions"])
    assert status == 200 and rows.shape == (2, 10), body
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)

    (tmp_path / "batch.json").write_bytes(example)
    curl = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", f"{served_model}/invocations", "-H", "Content-Type: application/json"]
        + ["--data", f"@{tmp_path / 'batch.json'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    answer, code = curl.stdout.rsplit("\n", 1)
    assert code == "200" and np.asarray(json.loads(answer)["predictions"]).shape == (2, 10), curl.stdout[-500:]

    import pandas as pd

    frame = pd.DataFrame({"pixels": [np.full(3 * 32 * 32, 0.5).tolist()]})
    for payload in (
        '{"dataframe_split": ' + frame.to_json(orient="split") + "}",
        json.dumps({"instances": np.full((1, 3, 32, 32), 0.5).tolist()}),
    ):
        status, body = _post(f"{served_model}/invocations", payload.encode())
        assert status == 400 and "\n" not in body["message"].strip(), (payload[:60], status, body)
        assert "Traceback" not in body["message"], body
    # malformed JSON is refused by MLflow's scoring server before the model sees it; its message (MLflow's own)
    # spans lines, quoting the body back
    for payload in ('{"inputs": [[[[0.5, 0.5]', ""):
        status, body = _post(f"{served_model}/invocations", payload.encode())
        assert status == 400 and body["error_code"] == "BAD_REQUEST", (payload, status, body)
        assert body["message"].startswith("Invalid input. Ensure that input is a valid JSON formatted string.")
        assert "Traceback" not in body["message"], body


def test_served_model_under_50_concurrent_requests_and_an_empty_batch(served_model):
    """Issue 26's probes: a 0-image batch is refused with the reason; 50 requests at once are all answered, the
    server stays up and its memory stays bounded (the one worker holds one model)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    status, body = _post(f"{served_model}/invocations", b'{"inputs": []}')
    assert status == 400 and body["message"].endswith(f"input of shape (0,) is not allowed: {EXPECTED_INPUT}"), body
    batch = json.dumps({"inputs": np.full((2, 3, 32, 32), 0.5).tolist()}).encode()
    peak = [0]
    port = served_model.rsplit(":", 1)[1]
    server = [p for p in psutil.process_iter(["cmdline"]) if port in " ".join(p.info["cmdline"] or [])]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = 0
            for proc in server:
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak[0] = max(peak[0], rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: _post(f"{served_model}/invocations", batch), range(50)))
    finally:
        done.set()
        sampler.join()
    assert [status for status, _ in answers] == [200] * 50
    assert all(np.asarray(body["predictions"]).shape == (2, 10) for _, body in answers)
    assert urllib.request.urlopen(f"{served_model}/ping", timeout=10).status == 200
    assert server and 0 < peak[0] < 4 * 1024**3, f"server memory peaked at {peak[0] / 1024**2:.0f} MB"


EXPECTED_INPUT = "expected float32 images (N, 3, 32, 32) with values in [0, 1] (pixel / 255)"


def _image_with(value) -> list:
    """One image of 0.5s, the first pixel replaced by `value` (any JSON value)."""
    image = np.full((1, 3, 32, 32), 0.5).tolist()
    image[0][0][0][0] = value
    return image


@pytest.mark.parametrize(
    "body, reason",
    [
        (
            '{{"inputs": {}}}'.format(json.dumps(_image_with(0.5)).replace("0.5", "NaN", 1)),
            "input holds 1 NaN or infinite values",
        ),
        (
            '{{"inputs": {}}}'.format(json.dumps(_image_with(0.5)).replace("0.5", "Infinity", 1)),
            "input holds 1 NaN or infinite values",
        ),
        (json.dumps({"inputs": _image_with(None)}), "input holds nulls, which are not pixel values"),
        (json.dumps({"inputs": _image_with(True)}), "input holds booleans, which are not pixel values"),
        (json.dumps({"inputs": _image_with("0.5")}), "input holds strings, which are not pixel values"),
        (json.dumps({"inputs": _image_with(255)}), "input holds 1 values outside [0, 1], e.g. 255"),
        (json.dumps({"inputs": _image_with(-0.1)}), "input holds 1 values outside [0, 1], e.g. -0.1"),
    ],
    ids=["nan", "infinity", "null", "bool", "string", "int-255", "negative"],
)
def test_served_model_refuses_values_that_are_not_pixels(served_model, body, reason):
    """Issue 15: NaN/Inf/null used to answer 200 with NaN rows (not even valid JSON); out-of-range values, ints,
    bools and "0.5" were accepted silently. Each is now HTTP 400 with the reason (integers 0 and 1 are fine:
    JSON has one number type)."""
    status, answer = _post(f"{served_model}/invocations", body.encode())
    assert status == 400, (status, answer)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].endswith(f"{reason}: {EXPECTED_INPUT}"), answer["message"][-500:]
    assert len(answer["message"]) < 500, "the refusal repeats the request"


def test_served_model_refuses_an_oversized_request_before_computing(served_model):
    """Issue 15: a 250 MB request answered 504 after 60 s while the worker computed for 90 s more. More than
    served_model.MAX_REQUEST_IMAGES images are refused once parsed, before any conversion or computation."""
    from cifar_mlflow.tracking.served_model import MAX_REQUEST_IMAGES

    n = MAX_REQUEST_IMAGES + 1
    body = ('{"inputs": [' + ",".join([json.dumps(np.zeros((3, 32, 32), int).tolist())] * n) + "]}").encode()
    start = time.time()
    status, answer = _post(f"{served_model}/invocations", body)
    assert status == 400, (status, str(answer)[:500])
    assert answer["message"].endswith(
        f"a request of {n} images is too large: at most {MAX_REQUEST_IMAGES} per "
        "request (send several, or predict in-process with mlflow.pytorch.load_model)"
    )
    assert time.time() - start < 30
    ok, answer = _post(f"{served_model}/invocations", json.dumps({"inputs": _image_with(0)}).encode())
    assert ok == 200 and len(answer["predictions"]) == 1, "the server is still answering"


def test_the_runs_and_the_model_are_linked_as_mlflow_3_links_them(trained):
    """The champion's logged model carries the training run's final test metrics on the evaluation dataset and is
    what search_logged_models ranks first by test/accuracy; the analysis run has the model as an input and its
    metrics are the model's too; both runs have a description (mlflow.note.content) saying what they found."""
    import mlflow

    client = MlflowClient(trained.store.uri)
    mlflow.set_tracking_uri(trained.store.uri)
    champion = client.get_model_version(MODEL, trained.version)
    model_id = champion.source.removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert model.source_run_id == trained.train_run_id and model.status == "READY"
    final = {m.key: m for m in model.metrics if m.run_id == trained.train_run_id}
    train_run = client.get_run(trained.train_run_id)
    assert final["test/accuracy"].value == pytest.approx(train_run.data.metrics["test/accuracy"])
    assert final["test/accuracy"].step == EPOCHS and final["test/accuracy"].dataset_name == "cifar10"
    assert "test/accuracy_tta" in final and "test/loss" in final
    (best,) = mlflow.search_logged_models(
        experiment_ids=[trained.experiment_id],
        order_by=[{"field_name": "metrics.test/accuracy", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    assert best.model_id == model_id

    analysis = client.get_run(trained.analysis_run_id)
    assert [m.model_id for m in analysis.inputs.model_inputs] == [model_id]
    from_analysis = {m.key: m.value for m in model.metrics if m.run_id == trained.analysis_run_id}
    assert from_analysis["test/accuracy"] == pytest.approx(analysis.data.metrics["test/accuracy"])
    assert set(from_analysis) == {k for k in analysis.data.metrics if not k.startswith("system/")}

    note = train_run.data.tags["mlflow.note.content"]
    assert note.startswith(
        "**ResNet18** at width 16 (batch norm) on **cifar10** (256 training / 128 test images): 3 epochs"
    )
    assert f"Test accuracy **{train_run.data.metrics['test/accuracy']:.4f}**" in note
    assert f"Registered as `models:/{MODEL}/{trained.version}`, now @champion." in note
    note = analysis.data.tags["mlflow.note.content"]
    assert note.startswith(f"Analysis of version {trained.version} of `{MODEL}` (`{CHAMPION_URI}`")
    assert f"test accuracy **{analysis.data.metrics['test/accuracy']:.4f}**" in note


# ---------------------------------------------------------------------------------------------------------------
# The MLflow UI in a real browser


@pytest.fixture(scope="module")
def ui(trained, tmp_path_factory):
    """`mlflow server` over the trained store on 127.0.0.1."""
    yield from ui_server(trained.store.uri, tmp_path_factory.mktemp("ui_server"))


def _expect(locator, message: str):
    from playwright.sync_api import expect

    return expect(locator, message)


ARTIFACTS_JS = (
    "() => [...document.querySelectorAll('[data-testid=\"artifact-tree-node\"]')]"
    ".map(n => n.getAttribute('artifact-name'))"
)
ALIASES_JS = (
    "() => [...document.querySelectorAll('[data-testid=\"descriptions-item\"]')]"
    ".map(n => n.innerText.replace(/\\s+/g, ' ').trim())"
)


def test_ui_experiment_lists_training_and_analysis_runs(trained, ui, page, tmp_path):
    page.goto(f"{ui.uri}/#/experiments/{trained.experiment_id}/runs")
    for run_id, name, what in (
        (trained.train_run_id, trained.train_run_name, "training"),
        (trained.analysis_run_id, trained.analysis_run_name, "analysis"),
    ):
        shown(
            page,
            tmp_path,
            page.locator(f'a[href$="/runs/{run_id}"]', has_text=name),
            f"the {what} run {name!r} ({run_id}) in the runs table",
            RUN_LINKS_JS,
        )
    count = page.locator("span").filter(has_text=re.compile(r"^\d+ matching runs?$"))
    _expect(count, "the runs table's run count").to_have_text("2 matching runs")
    page.screenshot(path=tmp_path / "experiment_runs.png")


def test_ui_run_page_charts_test_accuracy_one_point_per_epoch(trained, ui, page, tmp_path):
    page.goto(f"{ui.uri}/#/experiments/{trained.experiment_id}/runs/{trained.train_run_id}")
    _expect(page.get_by_test_id("runs-header"), "the run page's title").to_have_text(trained.train_run_name)
    page.get_by_role("tab", name="Model metrics").click()
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
        has=page.locator('h4[title="test/accuracy"]')
    )
    shown(
        page,
        tmp_path,
        card,
        "a chart card titled test/accuracy on the Model metrics tab",
        "() => [...document.querySelectorAll('h4[title]')].map(h => h.title)",
    )
    card.scroll_into_view_if_needed()  # charts render once they are in view
    # Plotly draws each data point of a lines+markers trace as one <path class="point">
    markers = card.locator("g.scatterlayer path.point")
    _expect(markers, f"the test/accuracy chart should draw one marker per epoch ({EPOCHS})").to_have_count(EPOCHS)
    card.screenshot(path=tmp_path / "test_accuracy_chart.png")
    page.screenshot(path=tmp_path / "run_model_metrics.png")
    # what the chart plots (plotly keeps its data on the chart's element): steps 1..3 with the logged values
    plotted = card.locator(".js-plotly-plot").evaluate(
        "gd => gd.data.filter(t => (t.mode || '').includes('markers')).map(t => ({x: t.x, y: t.y}))"
    )
    history = sorted(
        MlflowClient(trained.store.uri).get_metric_history(trained.train_run_id, "test/accuracy"), key=lambda m: m.step
    )
    assert len(plotted) == 1, f"expected one trace with markers (the run), saw {plotted}"
    assert plotted[0]["x"] == [1, 2, 3], f"expected steps [1, 2, 3] on the x axis, saw {plotted[0]['x']}"
    assert plotted[0]["y"] == pytest.approx([m.value for m in history]), (
        f"expected the logged values {[m.value for m in history]}, saw {plotted[0]['y']}"
    )


def test_ui_analysis_artifacts_list_gradcam_images(trained, ui, page, tmp_path):
    page.goto(f"{ui.uri}/#/experiments/{trained.experiment_id}/runs/{trained.analysis_run_id}/artifacts")
    node = '[data-testid="artifact-tree-node"][artifact-name="{}"]'.format
    shown(page, tmp_path, page.locator(node("gradcam")), "a 'gradcam' folder in the artifact tree", ARTIFACTS_JS)
    page.locator(node("gradcam")).click()
    for name in ("layer3.png", "layer4.png"):
        shown(page, tmp_path, page.locator(node(name)), f"gradcam/{name} in the opened gradcam folder", ARTIFACTS_JS)
    listed = page.evaluate(ARTIFACTS_JS)
    assert listed[:3] == ["gradcam", "layer3.png", "layer4.png"], (
        f"expected gradcam/ holding exactly layer3.png and layer4.png first in the tree, saw {listed}"
    )
    page.screenshot(path=tmp_path / "analysis_artifacts.png")
    # opening one shows the image itself (fetched from the server and decoded by the browser)
    page.locator(node("layer4.png")).click()
    preview = page.locator('img[alt="gradcam/layer4.png"]')
    shown(
        page,
        tmp_path,
        preview,
        "the preview image of gradcam/layer4.png",
        "() => [...document.querySelectorAll('img')].map(i => i.alt)",
    )
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())
    width = preview.evaluate("img => img.naturalWidth")
    assert width > 100, f"expected the GradCAM figure in the preview, saw an image {width} px wide"
    page.screenshot(path=tmp_path / "gradcam_layer4_preview.png")


def test_ui_model_version_page_shows_champion_alias(trained, ui, page, tmp_path):
    page.goto(f"{ui.uri}/#/models/{MODEL}/versions/{trained.version}")
    _expect(
        page.get_by_role("heading", name=f"Version {trained.version}"), "the model version page's title"
    ).to_be_visible()
    aliases = page.locator('[data-testid="descriptions-item"]').filter(
        has=page.locator('[data-testid="descriptions-item-label"]', has_text="Aliases")
    )
    shown(page, tmp_path, aliases.locator('[title="champion"]'), "the alias 'champion' under Aliases", ALIASES_JS)
    source = page.locator('[data-testid="descriptions-item"]').filter(has_text="Source Run")
    shown(
        page,
        tmp_path,
        source.get_by_role("link", name=trained.train_run_name),
        f"the source run {trained.train_run_name!r} linked",
        ALIASES_JS,
    )
    page.screenshot(path=tmp_path / "model_version.png")


def test_ui_run_page_steps_through_the_gradcam_panels(trained, ui, page, tmp_path):
    """The panel logged with log_image(key="gradcam_panel", step=epoch) after each of the 3 epochs: the run's
    Model metrics tab has a card for it whose step slider shows the image of the chosen epoch."""
    page.goto(f"{ui.uri}/#/experiments/{trained.experiment_id}/runs/{trained.train_run_id}")
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("gradcam_panel")
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(has_text="gradcam_panel")
    shown(
        page,
        tmp_path,
        card,
        "an image card titled gradcam_panel on the Model metrics tab",
        "() => [...document.querySelectorAll('[data-testid=\"experiment-view-compare-runs-card\"]')]"
        ".map(c => c.innerText.slice(0, 40))",
    )
    card.scroll_into_view_if_needed()
    card.locator("button").first.click()  # the card's expand button: a dialog with a large preview
    dialog = page.get_by_role("dialog")
    slider = dialog.get_by_role("slider").first
    for step in range(1, EPOCHS + 1):  # the slider starts at step 0; each arrow goes to the next epoch
        slider.focus()
        slider.press("ArrowRight")
        image = dialog.locator(f'img[src*="gradcam_panel%2Bstep%2B{step}%2B"]')
        shown(
            page,
            tmp_path,
            image,
            f"the panel image of epoch {step} on the slider",
            "() => [...document.querySelectorAll('img')].map(i => decodeURIComponent(i.src).slice(-90))",
        )
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.first.element_handle())
        dialog.screenshot(path=tmp_path / f"gradcam_panel_epoch{step}.png")


# the grid's rows as {row index: {column id: text}} (its pinned left part and its body are separate row elements)
MODEL_ROWS_JS = """() => { const rows = {};
    for (const r of document.querySelectorAll('[role="row"][row-index]')) {
        const cells = rows[r.getAttribute('row-index')] ||= {};
        for (const c of r.querySelectorAll('[role="gridcell"]'))
            cells[c.getAttribute('col-id').replaceAll('&quot;', '"')] = c.innerText.trim();
    }
    return rows; }"""
# The grid renders only the columns in view: scroll its body right, a screen at a time, until the column shows
SCROLL_RIGHT_JS = """() => { const v = document.querySelector('.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport');
    const before = v.scrollLeft; v.scrollLeft += v.clientWidth * 0.8; return v.scrollLeft > before; }"""


def test_ui_models_tab_lists_the_champions_model_with_its_test_accuracy(trained, ui, browser, tmp_path):
    """The experiment's Models tab (MLflow 3's logged models, the "Model training" view): the champion's model is
    listed with its registered version, its source run, and its test accuracy on the evaluation dataset in a
    column of that dataset."""
    client = MlflowClient(trained.store.uri)
    model_id = client.get_model_version(MODEL, trained.version).source.removeprefix("models:/")
    (linked,) = [
        m
        for m in client.get_logged_model(model_id).metrics
        if m.key == "test/accuracy" and m.run_id == trained.train_run_id
    ]
    column = f'"metricKey":"test/accuracy","datasetName":"cifar10","datasetDigest":"{linked.dataset_digest}"'
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(f"{ui.uri}/#/experiments/{trained.experiment_id}/runs")
        training_view = page.get_by_text("Model training", exact=True)
        shown(page, tmp_path, training_view, "the 'Model training' view switch", "() => document.body.innerText")
        training_view.click()
        page.get_by_role("link", name="Models", exact=True).first.click()
        _expect(page.get_by_role("heading", name="Models"), "the Models tab's title").to_be_visible()
        version = page.get_by_text(f"v{trained.version}", exact=True)
        shown(page, tmp_path, version, f"the registered version v{trained.version} in the models table", MODEL_ROWS_JS)
        page.screenshot(path=tmp_path / "models_tab.png")
        rows = page.evaluate(MODEL_ROWS_JS)
        index = next((i for i, r in rows.items() if r.get("registered_models") == f"{MODEL}\nv{trained.version}"), None)
        assert index is not None, f"no row lists {MODEL} v{trained.version}: {rows}"
        # the column shows the run's ID until the UI has fetched the run, then its name
        source = page.locator(f'[role="row"][row-index="{index}"] [role="gridcell"][col-id="source_run_id"]')
        shown(
            page,
            tmp_path,
            source.get_by_text(trained.train_run_name, exact=True),
            f"the source run's name {trained.train_run_name!r} in row {index}",
            MODEL_ROWS_JS,
        )
        accuracy = None
        for _ in range(40):
            cells = page.evaluate(MODEL_ROWS_JS).get(index, {})
            accuracy = next((v for k, v in cells.items() if column in k), None)
            if accuracy is not None or not page.evaluate(SCROLL_RIGHT_JS):
                break
            page.wait_for_timeout(250)
        assert accuracy is not None, f"no test/accuracy column of the evaluation dataset ({column}) in {cells}"
        page.screenshot(path=tmp_path / "models_tab_test_accuracy.png")
        assert float(accuracy) == pytest.approx(linked.value, abs=0.005), (accuracy, linked.value)
    finally:
        context.close()
