"""The report's error gallery (`search.report._gallery`) and its label-issues section, from a
study whose kept trial left validation logits, on a tiny generated dataset with hostile names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from search import report
from search.data import scan_dataset
from search.model_io import save_val_logits
from search.report._gallery import trial_errors
from search.studies import get_storage
from tests.conftest import make_image_folder
from tests.test_report import CHROMIUM, HOSTILE, _chromium, _Dom, html_escape, needs_chromium

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_with_kept_logits(tmp_path: Path, *, max_wrong: int | None = None) -> tuple[optuna.Study, list]:
    """A dataset with a hostile class and file name; a COMPLETE trial whose kept logits get some
    val images wrong. Returns the study and (val path, true, predicted, loss) of each mistake."""
    root = make_image_folder(tmp_path / "data", classes=("cat", HOSTILE, "dog"), per_class=4, size=48)
    hostile_file = root / "val" / "cat" / f"{HOSTILE}.png"
    (root / "val" / "cat" / "cat_0.png").rename(hostile_file)
    index = scan_dataset(root)
    labels = torch.tensor([y for _, y in index.val])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 4.0
    mistakes = []
    for k, (i, pred, margin) in enumerate([(0, 1, 2.0), (1, 2, 6.0), (4, 0, 3.0), (5, 0, 9.0)]):
        logits[i] = 0.0
        logits[i, pred] = margin
        mistakes.append((index.val[i][0], int(labels[i]), pred))
    ckpt = tmp_path / "ckpt" / "trial-0.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    save_val_logits(logits, labels, ckpt)
    study = optuna.create_study(study_name="gallery", storage=get_storage(f"sqlite:///{tmp_path / 's.db'}"),
                                direction="maximize")
    study.set_user_attr("dataset", str(root))
    study.set_user_attr("dataset_fingerprint", index.fingerprint)
    study.set_user_attr("split_spec", index.split_spec.to_dict())
    study.set_user_attr("class_names", list(index.classes))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.67, params={},
                                 distributions={}, user_attrs={"checkpoint": str(ckpt), "epochs_run": 1}))
    return study, mistakes


def test_trial_errors_are_sorted_by_loss_with_the_confused_pairs() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 3, 0], [0, 0, 1], [0, 4, 0], [2, 0, 0], [9, 0, 0]])
    view = trial_errors(logits, labels, max_images=2)
    assert view["wrong"] == 4
    assert [r["row"] for r in view["shown"]] == [5, 1]  # the two highest losses, highest first
    assert view["shown"][0]["true"] == 2 and view["shown"][0]["pred"] == 0 and view["shown"][0]["prob"] > 0.99
    assert view["pairs"] == [{"true": 2, "pred": 0, "count": 2}, {"true": 0, "pred": 1, "count": 1},
                             {"true": 1, "pred": 2, "count": 1}]


def test_gallery_data_from_the_kept_logits(tmp_path: Path) -> None:
    study, mistakes = _study_with_kept_logits(tmp_path)
    data = report.collect(study)
    g = data.gallery
    assert isinstance(g, dict), g
    (t,) = g["trials"]
    assert t["trial"] == 0 and t["wrong"] == 4 and t["images"] == 12
    names = [g["images"][r["image"]]["name"] for r in t["shown"]]
    # Highest loss first: the 9.0 margin, then 6.0, 3.0, 2.0.
    order = [mistakes[3], mistakes[1], mistakes[2], mistakes[0]]
    assert names == [str(Path(p).relative_to(Path(data.attrs["dataset"]))) for p, _, _ in order]
    assert [(r["true"], r["pred"]) for r in t["shown"]] == [(tr, pr) for _, tr, pr in order]
    assert all(i["src"].startswith("data:image/jpeg;base64,") and len(i["src"]) < 8000 for i in g["images"])
    assert f"val/cat/{HOSTILE}.png" in names  # the hostile file name, as data
    capped = report.collect(study, gallery_images=2).gallery
    assert len(capped["trials"][0]["shown"]) == 2 and len(capped["images"]) == 2


def test_gallery_says_why_it_is_missing(tmp_path: Path) -> None:
    study, _ = _study_with_kept_logits(tmp_path)
    study.set_user_attr("dataset", str(tmp_path / "gone"))
    assert "could not be read" in report.collect(study).gallery
    page = report.render_page(report.collect(study), [])
    assert 'data-gallery-note="1"' in page


def test_hostile_names_are_text_in_the_page(tmp_path: Path) -> None:
    import plotly.offline

    study, _ = _study_with_kept_logits(tmp_path)
    page = report.write_report(study, out_dir=tmp_path / "r").read_text()
    outside = page.replace(plotly.offline.get_plotlyjs(), "")
    assert HOSTILE not in outside and "<img" not in outside
    assert outside.count("</script>") == 3
    blob = re.search(r'<script type="application/json" id="tl-figures">(.*?)</script>', page, re.S).group(1)
    assert "<" not in blob and ">" not in blob
    gallery = json.loads(blob)["gallery"]
    assert HOSTILE in gallery["classes"]  # as data, drawn with textContent by app.js
    assert html_escape(HOSTILE) in outside  # the header's class list, escaped


def test_label_issues_section_when_check_ran_on_the_dataset(tmp_path: Path) -> None:
    from search.label_issues import LabelIssues, keep

    study, mistakes = _study_with_kept_logits(tmp_path)
    path = mistakes[0][0]
    keep(LabelIssues(backbone="resnet18", image_size=32, folds=3, images=24, probe_accuracy=0.9, seconds=1.0,
                     feature_seconds=0.5, fingerprint=study.user_attrs["dataset_fingerprint"],
                     issues=[{"rank": 1, "path": path, "split": "val", "given": HOSTILE, "suggested": "dog",
                              "given_prob": 0.01, "suggested_prob": 0.97}]), cache_dir=tmp_path / "cache")
    data = report.collect(study, cache_dir=tmp_path / "cache")
    page = report.render_page(data, [])
    section = re.search(r'<section class="card" id="label-issues-section">.*?</section>', page, re.S).group(0)
    assert html_escape(HOSTILE) in section and HOSTILE not in section
    assert section.count('<img class="thumb" alt="" src="data:image/jpeg;base64,') == 1
    other = report.collect(study, cache_dir=tmp_path / "elsewhere")
    assert other.label_issues is None and 'id="label-issues-section"' not in report.render_page(other, [])


@needs_chromium
def test_browser_draws_the_gallery_and_its_pairs_as_text(tmp_path: Path) -> None:
    study, mistakes = _study_with_kept_logits(tmp_path)
    page = report.write_report(study, out_dir=tmp_path / "r")
    dom = _Dom()
    dom.feed(_chromium(tmp_path, page.as_uri(), "--dump-dom"))
    assert dom.status.get("data-done") == "1", dom.status
    assert dom.status["data-errors"] == "" and dom.status["data-violations"] == ""
    assert dom.status.get("data-gallery") == "4"
    shown = [i for i in dom.imgs if (i.get("src") or "").startswith("data:image/jpeg")]
    assert len(shown) == 4 and not [i for i in dom.imgs if i.get("src") == "x"]
    text = "".join(dom.text)
    assert f"true: {HOSTILE}" in text and f"{HOSTILE}.png" in text
    assert "4 shown of 4 wrong (12 validation images)" in text
    # A link opens one confused pair: only its images are drawn.
    t, p = mistakes[2][1], mistakes[2][2]
    dom = _Dom()
    dom.feed(_chromium(tmp_path, page.as_uri() + f"#gallery.trial=0&gallery.pair={t}-{p}", "--dump-dom"))
    assert dom.status.get("data-gallery") == str(sum(1 for _, a, b in mistakes if (a, b) == (t, p)))
