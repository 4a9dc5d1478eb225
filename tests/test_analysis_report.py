"""The routing report: a self-contained page with every section, decodable images, no network."""

import base64
import os
import re
from pathlib import Path

import pytest

from modalmoe.cli import main
from modalmoe.model.presets import get_preset
from modalmoe.train import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    Trainer(get_preset("tiny/token-choice", overrides=["train.epochs=2"]), out, progress=False).fit()
    return out


def test_the_report_is_one_self_contained_page_with_every_section(run, tmp_path):
    page = tmp_path / "report.html"
    assert main(["analyze", str(run), "--out", str(page)]) == 0
    html = page.read_text()
    for section in ("summary", "layer-0", "layer-1", "missing", "training"):
        assert f'id="{section}"' in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) >= 9 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert "<link" not in html and "<script" not in html
    assert page.stat().st_size < 5 * 2**20
    # The modality-subset section lists each modality's routing shift with others missing.
    assert html.count("<td>m0</td>") >= 3


def test_a_dense_run_has_no_router_to_report(tmp_path, capsys):
    out = tmp_path / "dense"
    Trainer(get_preset("tiny/dense-early", overrides=["train.epochs=1"]), out, progress=False).fit()
    assert main(["analyze", str(out)]) == 2
    assert "no router to report on" in capsys.readouterr().out


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("MODALMOE_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
def test_the_report_renders_in_headless_chromium(run, tmp_path):
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "report.html"
    assert main(["analyze", str(run), "--out", str(page_path)]) == 0
    artifacts = Path(os.environ.get("MODALMOE_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        page.screenshot(path=str(artifacts / "routing-report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert requests == [page_path.resolve().as_uri()]  # the page itself, nothing else
    assert len(widths) >= 9 and min(widths) > 0  # every image decoded
    assert {"summary", "layer-0", "layer-1", "missing", "training"} <= set(sections)
    assert (artifacts / "routing-report.png").stat().st_size > 10_000
