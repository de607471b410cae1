"""Security: pickle payloads refused, corrupt weights a clear error, foreign folders refused, loopback only."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from reliability._util import FIGURES, ROOT, cli, clear_error, expect_bad_inputs, record_bad_input
from tests.conftest import make_image_folder


class Payload:
    """Unpickling this runs code: it writes `path` (the side effect the tests look for)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _plant_payload(target: Path, marker: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, target)
    FIGURES["payloads_tried"] += 1


def _count(marker: Path) -> None:
    if marker.exists():
        FIGURES["payloads_executed"] += 1


def _model_copy(trained_model: Path, dest: Path) -> Path:
    shutil.copytree(trained_model, dest)
    return dest


def test_pickle_payload_in_model_folder_refused_by_predict(trained_model: Path, tmp_path: Path) -> None:
    model = _model_copy(trained_model, tmp_path / "model")
    marker = tmp_path / "pwned"
    _plant_payload(model / "model.pt", marker)
    img = next((trained_model.parent / "data" / "val" / "a").iterdir())
    proc = cli(["predict", str(model), str(img)], cwd=tmp_path)
    _count(marker)
    clear_error(proc, "model.pt", name="security: pickle payload in model.pt")
    assert not marker.exists()


def test_pickle_payload_in_trial_checkpoint_refused(tmp_path: Path) -> None:
    from search.config import TLSearchError
    from search.trial import load_checkpoint

    marker = tmp_path / "pwned"
    _plant_payload(tmp_path / "trial-0.pt", marker)
    with pytest.raises(TLSearchError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "trial-0.pt")
    _count(marker)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(trained_model: Path, tmp_path: Path) -> None:
    from search.config import TLSearchError
    from search.trial import load_checkpoint

    expect_bad_inputs("checkpoint: truncated")
    ckpt = tmp_path / "trial-3.pt"
    data = (trained_model / "model.pt").read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a crash mid-write, as a non-atomic save would leave
    with pytest.raises(TLSearchError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    record_bad_input("checkpoint: truncated", "\n" not in msg and str(ckpt) in msg, msg)


@pytest.mark.parametrize("case", ["truncated", "empty", "wrong shapes", "missing"])
def test_corrupt_model_folder_predict_is_one_line(trained_model: Path, tmp_path: Path, case: str) -> None:
    model = _model_copy(trained_model, tmp_path / "model")
    pt = model / "model.pt"
    if case == "truncated":
        pt.write_bytes(pt.read_bytes()[:100_000])
    elif case == "empty":
        pt.write_bytes(b"")
    elif case == "wrong shapes":
        torch.save({"fc.weight": torch.zeros(3, 3)}, pt)
    else:
        pt.unlink()
    img = next((trained_model.parent / "data" / "val" / "a").iterdir())
    clear_error(cli(["predict", str(model), str(img)], cwd=tmp_path), name=f"model folder: model.pt {case}")


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    """A crash mid-save leaves the previous checkpoint, never half a file."""
    from search.trial import load_checkpoint, save_checkpoint

    m = torch.nn.Linear(2, 2)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(m, path)
    real = torch.save

    def crash(obj, f, *a, **k):  # noqa: ANN001
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    torch.save = crash
    try:
        with pytest.raises(OSError):
            save_checkpoint(torch.nn.Linear(2, 2), path)
    finally:
        torch.save = real
    assert torch.equal(load_checkpoint(path)["weight"], m.state_dict()["weight"])


def _foreign(tmp_path: Path) -> tuple[Path, str]:
    import optuna

    from search.settings import SearchSettings

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=16)
    s = SearchSettings(study="victim", data=str(data), pretrained=False,
                       studies_dir=str(tmp_path / "studies"), reports_dir=str(tmp_path / "reports"))
    (tmp_path / "studies").mkdir()
    st = optuna.create_study(study_name="victim", storage=s.storage_url, direction="maximize")
    st.set_user_attr("settings", s.to_dict())
    s.experiment_dir.mkdir()
    (s.experiment_dir / "precious.txt").write_text("not made by tlsearch")
    return s.experiment_dir, str(data)


def test_resume_and_run_refuse_a_folder_they_did_not_create(tmp_path: Path) -> None:
    exp, data = _foreign(tmp_path)
    clear_error(cli(["resume", "victim", "--no-progress"], cwd=tmp_path), "not created by tlsearch",
                name="security: resume into a foreign experiment folder")
    clear_error(cli(["run", data, "--study", "victim", "--no-pretrained", "--no-progress"], cwd=tmp_path),
                "not created by tlsearch", name="security: run into a foreign experiment folder")
    assert sorted(p.name for p in exp.iterdir()) == ["precious.txt"]


def test_nothing_binds_to_every_interface() -> None:
    """We serve nothing ourselves; Ray is started with its dashboard off."""
    wide = []
    for py in (ROOT / "search").rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for needle in ("0.0.0.0", "INADDR_ANY", "::/0"):
            if needle in text:
                wide.append(f"{py.name}: {needle}")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("bind", "serve_forever", "run_server"):
                wide.append(f"{py.name}:{node.lineno}: .{node.attr}")
    assert not wide, wide
    runner = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "search").rglob("*.py") if "runner" in p.parts
                       or p.stem == "runner")
    inits = [n for n in ast.walk(ast.parse(runner)) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "init" and getattr(n.func.value, "id", None) == "ray"]
    assert inits, "the runner no longer calls ray.init"

    def local_address(n: ast.Call) -> bool:  # no address, or address="local": a Ray of the search's own
        kw = {k.arg: k.value for k in n.keywords}
        return "address" not in kw or (isinstance(kw["address"], ast.Constant) and kw["address"].value == "local")

    local = [n for n in inits if local_address(n)]
    assert local, "no local ray.init"
    for n in local:  # the one that starts Ray here: no dashboard, so no HTTP server at all
        kw = {k.arg: k.value for k in n.keywords}
        assert isinstance(kw.get("include_dashboard"), ast.Constant) and kw["include_dashboard"].value is False
        assert "dashboard_host" not in kw or kw["dashboard_host"].value in ("127.0.0.1", "localhost")
