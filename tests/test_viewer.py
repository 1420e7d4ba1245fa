"""The viewer in a real browser: Playwright (Python) driving Debian's ``chromium`` (its system
binary: no browser download) against a real ``mris serve`` on 127.0.0.1 with the session's tiny
trained bundle. Every request to another host is refused and recorded: the page, its scripts and
the API docs must work offline. In CI (``CI=true``) a missing Playwright or chromium fails."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require, require_binary
from serve_process import ServeProcess

require("playwright")

TOKEN = "viewer-test-token"
K = 5


@pytest.fixture(scope="module")
def chromium_path() -> str:
    return require_binary("chromium", "chromium")


@pytest.fixture(scope="module")
def served(localised_bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("viewer-serve") / "serve.log"
    env = {"MRIS_API_TOKEN": TOKEN, "MRIS_INTRA_OP_THREADS": "1"}
    with ServeProcess(
        localised_bundles["model"], localised_bundles["index"], env=env, log_path=log
    ) as server:
        yield server


@pytest.fixture(scope="module")
def calibrated_served(localised_bundles, tmp_path_factory):
    """``mris serve`` on a copy of the session's index root with a calibration written into a
    new, published version (the quantiles a fit could give; ``mris index calibrate`` fits
    them)."""
    from mris.calibration import Calibration
    from mris.index.calibrate import write_calibrated_version

    root = tmp_path_factory.mktemp("viewer-calibrated")
    index = root / "index"
    shutil.copytree(localised_bundles["index"], index, symlinks=True)
    calibration = Calibration(
        coverage=0.9,
        sd_floor_mm=0.05,
        quantiles={"fc": {"all": 1.6}, "tc": {"all": 1.8}},
        method="test",
    )
    write_calibrated_version(index, calibration, publish=True)
    env = {"MRIS_API_TOKEN": TOKEN, "MRIS_INTRA_OP_THREADS": "1"}
    with ServeProcess(
        localised_bundles["model"], index, env=env, log_path=root / "serve.log"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium's sandbox cannot start.
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


class Page:
    """A fresh page that may reach ``base_url`` only; it records console errors, page errors
    and every request to another host (each refused)."""

    def __init__(self, browser, base_url: str, viewport=(1280, 800)) -> None:
        self.context = browser.new_context(
            viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.base_url = base_url
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.foreign_requests: list[str] = []
        self.page.on(
            "console",
            lambda message: (
                self.console_errors.append(message.text) if message.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.route("**/*", self._only_the_service)

    def _only_the_service(self, route) -> None:
        if route.request.url.startswith(self.base_url):
            route.continue_()
        else:
            self.foreign_requests.append(route.request.url)
            route.abort()

    def unexpected_console_errors(self, *expected_statuses: int) -> list[str]:
        """Console errors other than the browser's note on an HTTP status the test caused."""
        return [
            text
            for text in self.console_errors
            if not any(f"status of {status}" in text for status in expected_statuses)
        ]

    def close(self) -> None:
        self.context.close()


def _cohort_dicom(tiny_cohort: Path) -> Path:
    from mris.manifest import read_manifest

    table = read_manifest(tiny_cohort)
    return table.resolve_path(sorted({row.radiograph_path for row in table.rows})[0])


def _not_blank(png: bytes) -> float:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return float(pixels.std())


def test_viewer_shows_the_knees_maps_and_neighbours_of_a_radiograph(
    browser, served, tiny_cohort, tmp_path
):
    view = Page(browser, served.url)
    page = view.page
    try:
        page.goto(f"{served.url}/")
        assert page.url.endswith("/viewer/")
        page.wait_for_selector("body[data-ready=idle]")
        page.fill("#k", str(K))
        page.set_input_files("#file", str(_cohort_dicom(tiny_cohort)))
        # The service has a token: the page asks for it once, then carries on.
        page.wait_for_selector("#token-panel:not([hidden])")
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("body[data-ready=true]", timeout=90_000)

        knees = page.locator("section.knee")
        assert knees.count() == 2
        assert sorted(knees.nth(i).get_attribute("data-side") for i in range(2)) == [
            "LEFT",
            "RIGHT",
        ]
        for i in range(2):
            knee = knees.nth(i)
            tables = knee.locator("table.neighbours")
            assert tables.count() == 2  # fc and tc
            for t in range(2):
                assert tables.nth(t).locator("tbody tr").count() == K
            assert knee.locator("canvas.map-canvas[data-kind=thickness]").count() == 2
            assert knee.locator("canvas.map-canvas[data-kind=uncertainty]").count() == 2
            assert "medial" in knee.locator(".compartments").first.inner_text()
            # This index has no calibration: no bounds, and a notice saying what the SD is.
            assert knee.locator("canvas.map-canvas[data-kind=lower]").count() == 0
            notice = knee.locator(".uncertainty.notice")
            assert notice.is_visible() and notice.get_attribute("data-kind") == "raw-sd"
            assert "raw neighbours' weighted SD" in notice.inner_text()
            assert "no stated coverage" in notice.inner_text()
            assert "mris index calibrate" in notice.inner_text()  # the answer's note
        ticks = page.locator("section.knee .tick").all_inner_texts()
        assert "0" in ticks and any(text.endswith("+ mm") for text in ticks)
        assert page.locator("#centres button").count() == 2
        assert "localiser" in page.locator("#centres button").first.inner_text()

        # Sorting a neighbour table by KL grade and back by similarity.
        table = knees.nth(0).locator("table.neighbours").first
        table.locator("th button", has_text="similarity").click()
        similarities = [
            float(text)
            for text in knees.nth(0)
            .locator("table.neighbours")
            .first.locator("td.similarity")
            .all_inner_texts()
        ]
        assert similarities == sorted(similarities)  # ascending after one click

        # Hovering a map shows the thickness and uncertainty at that point.
        first_map = knees.nth(0).locator("canvas.map-canvas").first
        box = first_map.bounding_box()
        texts = []
        for fx in (0.2, 0.35, 0.5, 0.65, 0.8):
            for fy in (0.2, 0.35, 0.5, 0.65, 0.8):
                first_map.hover(position={"x": fx * box["width"], "y": fy * box["height"]})
                texts.append(page.locator("#tooltip").inner_text())
        assert all(" row " in text and " column " in text for text in texts)
        assert any("thickness" in text and "SD" in text and "mm" in text for text in texts)

        # The picture is a picture: the first map's region of a screenshot is not blank.
        shot = page.screenshot(
            clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"]}
        )
        assert _not_blank(shot) > 10
        page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

        # Moving a centre with the keyboard and re-running uses it as a given keypoint.
        centre = page.locator("#centres button").first
        centre.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        assert page.locator("#rerun").is_enabled()
        page.click("#rerun")
        page.wait_for_selector("body[data-ready=true]")  # the click set it to busy first
        assert "given keypoints" in page.locator("#centres button").first.inner_text()

        # A download is the service's answer in that format.
        with page.expect_download() as download:
            page.click("#downloads button[data-format=npz]")
        assert download.value.suggested_filename == "mris-maps.npz"

        assert view.page_errors == []
        assert view.unexpected_console_errors(401) == []
        assert view.foreign_requests == []
    finally:
        view.close()


@pytest.mark.parametrize("viewport", [(1280, 800), (480, 800)])
def test_viewer_shows_the_calibrated_intervals(
    browser, calibrated_served, tiny_cohort, tmp_path, viewport
):
    served = calibrated_served
    view = Page(browser, served.url, viewport=viewport)
    page = view.page
    try:
        page.goto(f"{served.url}/viewer/")
        page.evaluate(f"sessionStorage.setItem('mris-token', '{TOKEN}')")
        page.reload()
        page.wait_for_selector("body[data-ready=idle]")
        page.fill("#k", str(K))
        page.set_input_files("#file", str(_cohort_dicom(tiny_cohort)))
        page.wait_for_selector("body[data-ready=true]", timeout=90_000)

        knees = page.locator("section.knee")
        assert knees.count() == 2
        for i in range(2):
            knee = knees.nth(i)
            for kind in ("thickness", "uncertainty", "lower", "upper"):
                assert knee.locator(f"canvas.map-canvas[data-kind={kind}]").count() == 2, kind
            # A row per cartilage: its map, SD, lower and upper bound together.
            assert knee.locator(".maps[data-cartilage=fc] canvas.map-canvas").count() == 4
            line = knee.locator(".uncertainty.calibrated")
            assert line.is_visible() and line.get_attribute("data-kind") == "calibrated-interval"
            assert re.search(
                r"^90 % interval \(calibrated on held-out knees, group klg\d\): "
                r"mean width \d+\.\d\d mm",
                line.inner_text(),
            ), line.inner_text()
            assert knee.locator(".uncertainty.notice").count() == 0
            # The bounds' colour bars are the thickness maps' (0 to 6+ mm).
            lower = knee.locator("figure.map", has=page.locator("canvas[data-kind=lower]")).first
            assert "90 % interval, lower" in lower.locator("figcaption").inner_text()
            assert lower.locator(".tick").last.inner_text().endswith("+ mm")

        # Hovering a bound map gives the thickness, the SD and the interval at that point.
        lower_map = knees.nth(0).locator("canvas.map-canvas[data-kind=lower]").first
        lower_map.scroll_into_view_if_needed()
        box = lower_map.bounding_box()
        texts = []
        for fx in (0.2, 0.35, 0.5, 0.65, 0.8):
            for fy in (0.2, 0.35, 0.5, 0.65, 0.8):
                lower_map.hover(position={"x": fx * box["width"], "y": fy * box["height"]})
                texts.append(page.locator("#tooltip").inner_text())
        found = [re.search(r"90 % interval \[(\d+\.\d+), (\d+\.\d+)\] mm", t) for t in texts]
        found = [(text, match) for text, match in zip(texts, found) if match]
        assert found, texts
        for text, match in found:
            assert "thickness" in text and "SD" in text
            assert float(match.group(1)) <= float(match.group(2))

        # The keyboard reaches the same values: focus a map, move the probe with the arrows.
        page.mouse.move(0, 0)
        upper_map = knees.nth(1).locator("canvas.map-canvas[data-kind=upper]").first
        upper_map.focus()  # the probe starts on the cartilage cell nearest the centre
        tooltip = page.locator("#tooltip")
        assert tooltip.is_visible() and "interval [" in tooltip.inner_text()
        start = re.search(r"row (\d+), column (\d+)", tooltip.inner_text())
        page.keyboard.press("ArrowRight")
        moved = re.search(r"row (\d+), column (\d+)", tooltip.inner_text())
        assert moved.group(1) == start.group(1) and int(moved.group(2)) == int(start.group(2)) + 1
        page.keyboard.press("Tab")  # the next map: the TC row's synthesized thickness
        assert re.search(r"^(LEFT|RIGHT) TC row \d+, column \d+: thickness", tooltip.inner_text())
        page.locator("#k").focus()  # leaving the maps hides it
        assert tooltip.is_hidden()

        if viewport[0] < 700:  # a narrow window: the maps wrap, nothing runs off to the side
            overflow = page.evaluate(
                "[...document.querySelectorAll('section.knee .maps')]"
                ".some((row) => row.getBoundingClientRect().right > window.innerWidth)"
            )
            assert not overflow
            # ...two to a row: a cartilage's lower and upper bound side by side.
            fc_row = knees.nth(0).locator(".maps[data-cartilage=fc]")
            tops = [
                fc_row.locator(f"canvas[data-kind={kind}]").bounding_box()["y"]
                for kind in ("lower", "upper")
            ]
            assert tops[0] == pytest.approx(tops[1], abs=1)
        page.screenshot(path=str(tmp_path / "viewer-calibrated.png"), full_page=True)
        assert view.page_errors == []
        assert view.unexpected_console_errors() == []
        assert view.foreign_requests == []
    finally:
        view.close()


def test_a_file_that_is_not_a_dicom_shows_the_services_message(browser, served, tmp_path):
    view = Page(browser, served.url, viewport=(480, 800))  # a narrow window
    page = view.page
    try:
        page.goto(f"{served.url}/viewer/")
        page.evaluate(f"sessionStorage.setItem('mris-token', '{TOKEN}')")
        page.reload()
        page.wait_for_selector("body[data-ready=idle]")
        not_dicom = tmp_path / "notes.txt"
        not_dicom.write_text("this is not a radiograph")
        page.set_input_files("#file", str(not_dicom))
        page.wait_for_selector("body[data-ready=error]")
        problem = page.locator("#problem")
        assert problem.is_visible() and "Unreadable DICOM" in problem.inner_text()
        assert view.page_errors == [] and view.foreign_requests == []
        assert view.unexpected_console_errors(400) == []
    finally:
        view.close()


def test_a_radiograph_without_knees_shows_knee_not_found(
    browser, localised_bundles, tiny_cohort, tmp_path
):
    """The tiny localiser at its trained confidence finds no knee in noise."""
    import pydicom

    ds = pydicom.dcmread(_cohort_dicom(tiny_cohort))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 1 << int(ds.BitsStored), (ds.Rows, ds.Columns)).astype(np.uint16)
    ds.PixelData = noise.tobytes()
    path = tmp_path / "noise.dcm"
    ds.save_as(path, enforce_file_format=True)
    strict = ServeProcess(localised_bundles["strict_model"], localised_bundles["index"])
    with strict:
        view = Page(browser, strict.url)
        page = view.page
        try:
            page.goto(f"{strict.url}/viewer/")
            page.wait_for_selector("body[data-ready=idle]")
            page.set_input_files("#file", str(path))
            page.wait_for_selector("body[data-ready=error]", timeout=60_000)
            assert "Knee not found" in page.locator("#problem").inner_text()
            assert view.page_errors == [] and view.foreign_requests == []
            assert view.unexpected_console_errors(422) == []
        finally:
            view.close()


@pytest.mark.parametrize(
    ("path", "rendered"), [("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")]
)
def test_api_docs_render_offline(browser, served, path, rendered):
    view = Page(browser, served.url)
    page = view.page
    try:
        response = page.goto(f"{served.url}{path}")
        assert "default-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector(rendered, timeout=30_000)
        assert "MRIS" in page.locator(rendered).first.inner_text()
        assert view.foreign_requests == [] and view.page_errors == []
    finally:
        view.close()
