"""The routing report: a self-contained page with every section, decodable images, no network."""

import base64
import re

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
