"""Soups, ensembles, TTA, temperature and honest held-out scores, on fabricated trials (no Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from search.backbones import build_backbone
from search.config import TrialConfig
from search.data import scan_dataset
from search.ensemble import (
    EnsembleNet,
    PoolTrial,
    Predictions,
    average_state_dicts,
    choose,
    ensemble_pool,
    expected_calibration_error,
    fit_temperature,
    format_ensemble,
    greedy_selection,
    greedy_soup,
    halves,
    pick_shipped,
    score,
)
from search.ensemble._select import Choice
from search.model_io import save_checkpoint, save_val_logits

CLASSES = ("circle", "square", "triangle")


def _config(backbone: str = "resnet18", **kw) -> TrialConfig:
    return TrialConfig(backbone=backbone, pretrained=False, image_size=32, epochs=1, batch_size=8, **kw)


def _trial(folder: Path, number: int, backbone: str = "resnet18", *, noise: float = 0.05,
           state: dict | None = None) -> PoolTrial:
    """A fabricated kept trial: one shared random init (per backbone) plus a trial's own noise,
    as fine-tunes of one pretrained model differ."""
    torch.manual_seed(0)
    bb = build_backbone(backbone, len(CLASSES), pretrained=False)
    if state is None:
        g = torch.Generator().manual_seed(number + 1)
        state = {k: (v + noise * torch.randn(v.shape, generator=g) * v.std().clamp(min=1e-3))
                 if v.is_floating_point() and "running" not in k else v for k, v in bb.model.state_dict().items()}
    bb.model.load_state_dict(state)
    path = folder / f"trial-{number}.pt"
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(bb.model, path)
    return PoolTrial(number, _config(backbone), str(path))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared small machine, more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ens") / "data", per_class=5,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[PoolTrial]:
    folder = tmp_path_factory.mktemp("ckpt")
    return [_trial(folder, 0), _trial(folder, 1), _trial(folder, 2, noise=0.2),
            _trial(folder, 3, "mobilenet_v3_small")]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


# ----- pure choices -------------------------------------------------------------------------------


def test_average_of_identical_state_dicts_is_that_state_dict() -> None:
    state = build_backbone("resnet18", 3, pretrained=False).model.state_dict()
    avg = average_state_dicts([state, state, state])
    assert avg.keys() == state.keys()
    assert all(torch.equal(avg[k], state[k]) for k in state)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    mid = average_state_dicts([state, other])
    assert torch.allclose(mid["head.1.weight"], state["head.1.weight"] + 0.5)
    assert torch.equal(mid["body.bn1.num_batches_tracked"], state["body.bn1.num_batches_tracked"])


def test_greedy_soup_keeps_an_ingredient_only_when_the_score_does_not_drop() -> None:
    scores = {(0,): 0.5, (0, 1): 0.4, (0, 2): 0.6, (0, 2, 3): 0.6}
    assert greedy_soup([0, 1, 2, 3], lambda ts: scores.get(ts, 0.0)) == (0, 2, 3)


def test_greedy_selection_with_one_step_is_the_best_single_and_never_worse() -> None:
    y = torch.tensor([0, 1, 2, 0])
    eye = torch.eye(3)
    good = eye[[0, 1, 0, 0]] * 0.6 + 0.1  # 3 of 4
    left = eye[[0, 2, 2, 1]] * 0.6 + 0.1  # 2 of 4, right where good is wrong
    right = eye[[1, 1, 2, 2]] * 0.6 + 0.1
    assert greedy_selection([left, good, right], y, max_members=1) == [1]
    picked = greedy_selection([good, left, right], y, max_members=5)
    avg = sum([good, left, right][i] for i in picked) / len(picked)
    assert score(avg, y) >= score(good, y)


def test_temperature_keeps_the_argmax_and_lowers_calibration_error() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    logits = torch.randn(400, 4, generator=g)
    logits[torch.arange(400), y] += 1.0
    logits = logits * 6  # overconfident
    t = fit_temperature(logits, y)
    assert t > 1.5
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    assert expected_calibration_error((logits / t).softmax(1), y) < expected_calibration_error(logits.softmax(1), y)
    assert fit_temperature(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) == 1.0


def test_halves_are_stratified_and_disjoint() -> None:
    y = torch.tensor([0] * 6 + [1] * 4 + [2] * 3)
    a, b = halves(y)
    assert sorted(a.tolist() + b.tolist()) == list(range(13))
    assert [int((y[a] == c).sum()) for c in range(3)] == [3, 2, 2]


def test_shipped_is_the_best_within_the_latency_budget() -> None:
    cs = [Choice("single", 0.8, 2.0, 0), Choice("ensemble", 0.9, 10.0, 4), Choice("soup", 0.8, 2.0, 2)]
    assert pick_shipped(cs).name == "ensemble"
    assert pick_shipped(cs, max_latency_ms=5).name == "single"  # ties: the simpler one
    with pytest.raises(ValueError, match="fastest, single, takes 2.0 ms"):
        pick_shipped(cs, max_latency_ms=1)


# ----- modules ------------------------------------------------------------------------------------


def test_ensemble_of_one_member_equals_it_and_tta_and_temperature_change_only_what_they_should(
        pool: list[PoolTrial], data: Path, cache: str) -> None:
    preds = Predictions(pool[:1], scan_dataset(data), device=torch.device("cpu"))
    member = preds.module("trial 0")
    x = torch.rand(4, 3, preds.canvas, preds.canvas)
    with torch.no_grad():
        alone = member(x).softmax(1)
        one = EnsembleNet([member], [1.0])(x).softmax(1)
        twice = EnsembleNet([member, member], [2.0, 3.0])(x).softmax(1)
        hot = EnsembleNet([member], [1.0], temperature=3.0)(x)
        tta = EnsembleNet([member], [1.0], tta=True)(x).softmax(1)
        mirrored = member(torch.flip(x, dims=[3])).softmax(1)
        symmetric = torch.cat([x[..., : preds.canvas // 2], torch.flip(x[..., : preds.canvas // 2], dims=[3])], 3)
        if preds.canvas % 2:
            symmetric = torch.cat([x[..., : preds.canvas // 2], x[..., preds.canvas // 2: preds.canvas // 2 + 1],
                                   torch.flip(x[..., : preds.canvas // 2], dims=[3])], 3)
        sym_plain = EnsembleNet([member], [1.0])(symmetric).softmax(1)
        sym_tta = EnsembleNet([member], [1.0], tta=True)(symmetric).softmax(1)
    assert torch.allclose(one, alone, atol=1e-6) and torch.allclose(twice, alone, atol=1e-6)
    assert torch.equal(hot.argmax(1), alone.argmax(1))
    assert torch.allclose((hot * 3.0).softmax(1), alone, atol=1e-6)
    assert torch.allclose(tta, 0.5 * (alone + mirrored), atol=1e-6)
    assert torch.allclose(sym_tta, sym_plain, atol=1e-5)  # a mirror-symmetric image: TTA changes nothing


def test_soup_of_identical_weights_equals_the_single_model(tmp_path: Path, data: Path, cache: str) -> None:
    first = _trial(tmp_path, 0)
    from search.model_io import load_checkpoint

    twin = _trial(tmp_path, 1, state=load_checkpoint(first.checkpoint))
    preds = Predictions([first, twin], scan_dataset(data), device=torch.device("cpu"))
    key = preds.soup_key((0, 1))
    assert key == "soup resnet18 [0, 1]"
    assert torch.allclose(preds.logits(key, "val"), preds.logits("trial 0", "val"), atol=1e-5)


def test_a_soup_recomputes_batchnorm_statistics_that_differ(tmp_path: Path, data: Path, cache: str) -> None:
    a = _trial(tmp_path, 0)
    from search.model_io import load_checkpoint

    state = load_checkpoint(a.checkpoint)
    state = {k: v + 0.5 if k == "body.layer4.1.bn2.running_mean" else v for k, v in state.items()}
    b = _trial(tmp_path, 1, state=state)
    preds = Predictions([a, b], scan_dataset(data), device=torch.device("cpu"))
    soup = preds.states[preds.soup_key((0, 1))]
    mean = soup["body.layer4.1.bn2.running_mean"]
    # Neither ingredient's statistics nor their average: the average model's, on training images.
    assert not torch.allclose(mean, load_checkpoint(a.checkpoint)["body.layer4.1.bn2.running_mean"] + 0.25)
    assert torch.equal(soup["body.bn1.running_mean"], load_checkpoint(a.checkpoint)["body.bn1.running_mean"])


def _tones_folder(root: Path, *, per_class: int) -> Path:
    """Three classes of noise images, dark, grey and bright: their features differ most between
    the classes, so a variance measured within one class is far below the data's."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", 2)):
        for name, low in (("bright", 190), ("dark", 0), ("grey", 95)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(low, low + 66, (24, 24, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{name}_{i:02d}.png")
    return root


def test_a_soups_batchnorm_statistics_come_from_batches_that_mix_the_classes(tmp_path: Path, cache: str) -> None:
    from search.model_io import load_checkpoint

    index = scan_dataset(_tones_folder(tmp_path / "data", per_class=24))
    a = _trial(tmp_path / "ckpt", 0)
    state = load_checkpoint(a.checkpoint)
    state["body.bn1.running_var"] = state["body.bn1.running_var"] + 1.0  # differs: recomputed for the soup
    b = _trial(tmp_path / "ckpt", 1, state=state)
    preds = Predictions([a, b], index, device=torch.device("cpu"), batch_size=8)
    member = preds.module(preds.soup_key((0, 1)))
    bn = member.model.body.bn1
    # bn1's input (the stem convolution's output) does not depend on any BatchNorm statistics: its
    # variance over all training images is what the recomputed running variance estimates.
    inputs: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    x, y = next(iter(torch.utils.data.DataLoader(preds._dataset(index.train), batch_size=len(index.train))))
    with torch.no_grad():
        member(x.float() / 255.0)
    hook.remove()
    features = inputs[0].transpose(0, 1).flatten(1)  # channels x (images, rows, columns)
    by_class = inputs[0].transpose(0, 1)
    within = torch.stack([by_class[:, y == c].flatten(1).var(1) for c in range(3)]).mean(0)
    true = features.var(1)
    assert within.sum() < 0.5 * true.sum()  # the classes differ: one class alone misses most of it
    # Measured: 12.3 from shuffled batches, 1.47 (the within-class variance) from batches sorted by path.
    assert bn.running_var.sum().item() == pytest.approx(true.sum().item(), rel=0.15)


def test_kept_validation_logits_are_used_when_the_trial_saw_the_same_images(
        tmp_path: Path, data: Path, cache: str) -> None:
    t = _trial(tmp_path, 0)
    index = scan_dataset(data)
    marker = torch.full((len(index.val), 3), 7.0)
    save_val_logits(marker, torch.tensor([y for _, y in index.val]), t.checkpoint)
    preds = Predictions([t], index, device=torch.device("cpu"))
    assert torch.equal(preds.logits("trial 0", "val"), marker)
    assert not torch.equal(preds.logits("trial 0", "test"), torch.full((len(index.test), 3), 7.0))


# ----- honesty -------------------------------------------------------------------------------------


def _choices(summary: dict) -> list:
    return [(c["name"], c["members"], c["tta"], c["temperature"], c["val_score"], c["shipped"])
            for c in summary["candidates"]]


def test_no_choice_reads_held_out_labels(pool: list[PoolTrial], data: Path, cache: str) -> None:
    index = scan_dataset(data)
    assert len(index.test) == 15
    clean = ensemble_pool(pool, index, max_members=3)
    poisoned_index = dataclasses.replace(index, test=tuple((p, (y + 1) % 3) for p, y in index.test))
    poisoned = ensemble_pool(pool, poisoned_index, max_members=3)
    assert clean["heldout"] == {**poisoned["heldout"]} and clean["heldout"]["kind"] == "test"
    assert _choices(clean) == _choices(poisoned)
    assert [c["heldout_accuracy"] for c in clean["candidates"]] != [c["heldout_accuracy"] for c in poisoned["candidates"]]
    names = [c["name"] for c in clean["candidates"]]
    assert names[:3] == ["best single", "soup resnet18", "ensemble"] or "soup resnet18" in names
    assert {n + " + flip TTA" for n in names if "TTA" not in n} <= set(names)
    assert sum(c["shipped"] for c in clean["candidates"]) == 1


class _Logits:
    """Predictions' interface over fixed logits: one backbone per trial (so no soups)."""

    def __init__(self, logits: dict[int, torch.Tensor], labels: torch.Tensor) -> None:
        from types import SimpleNamespace

        self._l = {f"trial {n}": v for n, v in logits.items()}
        self.labels = {"val": labels}
        self.trials = {n: SimpleNamespace(config=SimpleNamespace(backbone=f"net{n}")) for n in logits}
        self.index = SimpleNamespace(classes=[str(c) for c in range(next(iter(logits.values())).shape[1])])

    def trial_key(self, n: int) -> str:
        return f"trial {n}"

    def soup_key(self, trials) -> str:
        return self.trial_key(trials[0])

    def probs(self, key: str, split: str, *, tta: bool = False) -> torch.Tensor:
        return self._l[key].softmax(1)

    output = Predictions.output


def test_the_combination_ships_only_when_it_beats_the_best_single_out_of_sample() -> None:
    from search.ensemble import decide

    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    rows = torch.arange(60)
    ok = dict(metric="val_acc", max_members=6, latency=lambda c: 1.0, max_latency_ms=None)

    # A 70% model and eight models of pure noise: selection finds noise that helps on these 60 images
    # by chance, and the guard sees it does not hold on the other half.
    good = torch.where(torch.rand(60, generator=g) < 0.7, y, 1 - y)
    logits = {0: torch.nn.functional.one_hot(good, 2).float() * 1.5}
    logits.update({n: torch.randn(60, 2, generator=g) * 2 for n in range(1, 9)})
    cands, ship, guard = decide(_Logits(logits, y), rows, **ok)
    best_on_val = max(cands, key=lambda c: (c.val_score, -c.val_loss, -c.order))
    assert best_on_val.name != "best single" and best_on_val.val_score > cands[0].val_score
    assert guard["val_best"] == best_on_val.name and guard["shipped_single"] and guard["gain"] <= 0
    assert ship.name == "best single" and ship.members == (("trial 0", 1.0),)

    # Two experts, each sure and right on one class and unsure on the other: together they are right
    # everywhere, on any half.
    expert0 = torch.stack([torch.where(y == 0, 4.0, 0.5), torch.zeros(60)], 1)  # class 1: leans to 0, wrongly
    expert1 = torch.stack([torch.zeros(60), torch.where(y == 1, 4.0, 0.5)], 1)
    cands, ship, guard = decide(_Logits({0: expert0, 1: expert1}, y), rows, **ok)
    assert ship.kind == "ensemble" and not guard["shipped_single"] and guard["gain"] > 0
    assert {k for k, _ in ship.members} == {"trial 0", "trial 1"}


def _summary(metric: str = "val_acc", **fields) -> dict:
    """A summary as `ensemble_pool` returns it, one candidate, for the text `format_ensemble` makes."""
    row = {"name": "best single", "kind": "single", "shipped": True, "members": [{"member": "trial 1", "weight": 1.0}],
           "tta": False, "temperature": 1.0, "val_score": 0.5, "heldout_score": 0.5, "heldout_accuracy": 0.5,
           "heldout_ece_before": 0.1, "heldout_ece_after": 0.1, "latency_ms": 5.0, "size_mb": 1.0}
    return {"metric": metric, "heldout": {"kind": "test", "images": 10, "optimistic": False}, "val_images": 20,
            "candidates": [row], "shipped": "best single", "guard": {}, "shipped_heldout_score": 0.5,
            "test": None, "model_dir": None, **fields}


def test_a_latency_budget_leaves_slow_trials_out_of_every_choice_halves_included() -> None:
    from search.config import TLSearchError
    from search.ensemble import decide

    y = torch.arange(60) % 2
    rows = torch.arange(60)
    a, _ = halves(y)
    in_a = torch.zeros(60, dtype=torch.bool)
    in_a[a] = True
    right = 2 * y - 1  # +1 for class 1, -1 for class 0: a logit margin toward the true class

    def margins(m: torch.Tensor) -> torch.Tensor:
        return torch.stack([-m * right, m * right], 1) / 2

    hard = rows % 5 == 0  # where trial 1 is wrong
    logits = {
        0: margins(torch.where(in_a, 3.0, -2.0)),  # slow: right on half A only, so best single there
        1: margins(torch.where(hard, -0.5, 1.0)),  # 80%, the best single on all rows
        2: margins(torch.where(hard, 3.0, -0.3)),  # 20%, but sure where trial 1 is wrong: together 100%
    }
    ms = {"trial 0": 50.0, "trial 1": 5.0, "trial 2": 5.0}

    def latency(c) -> float:
        return sum(ms[k] for k, _ in c.members) * (2 if c.tta else 1)

    preds = _Logits(logits, y)
    cands, ship, guard = decide(preds, rows, metric="val_acc", max_members=4, latency=latency, max_latency_ms=20)
    assert not any(k == "trial 0" for c in cands for k, _ in c.members)
    assert ship.kind == "ensemble" and {k for k, _ in ship.members} == {"trial 1", "trial 2"}
    assert latency(ship) <= 20 and not guard["shipped_single"] and guard["over_latency"] == [0]
    # As if the slow trial were not in the pool (on half A it is the best single, and all chosen there hold it).
    assert cands == decide(_Logits({1: logits[1], 2: logits[2]}, y), rows, metric="val_acc", max_members=4,
                           latency=latency, max_latency_ms=None)[0]
    with pytest.raises(TLSearchError, match="within --max-latency-ms 4; the fastest, trial 1 alone, takes 5.0 ms"):
        decide(preds, rows, metric="val_acc", max_members=4, latency=latency, max_latency_ms=4)
    assert "(left out, slower alone than --max-latency-ms: trial 0)" in format_ensemble(_summary(guard=guard))


def test_cross_fitted_choices_read_only_their_half(pool: list[PoolTrial], data: Path, cache: str) -> None:
    index = scan_dataset(data)
    preds = Predictions(pool, index, device=torch.device("cpu"))
    a, b = halves(preds.labels["val"])
    before = choose(preds, a, metric="val_acc", max_members=3)
    preds.labels["val"][b] = (preds.labels["val"][b] + 1) % 3
    assert choose(preds, a, metric="val_acc", max_members=3) == before
    no_test = dataclasses.replace(index, test=())
    summary = ensemble_pool(pool, no_test, max_members=3)
    assert summary["heldout"]["kind"] == "cross-fitted" and summary["heldout"]["optimistic"] is True
    assert summary["heldout"]["images"] == len(index.val)
    assert summary["test"] is None


def test_a_val_loss_ensemble_shows_and_stores_losses(pool: list[PoolTrial], data: Path, tmp_path: Path,
                                                    cache: str) -> None:
    import pandas as pd

    from search.report._figures_ensemble import ensemble_figure

    summary = ensemble_pool(pool[:2], scan_dataset(data), metric="val_loss", max_members=2, out=tmp_path / "m")
    rows = summary["candidates"]
    # Log losses of near-random 3-class models: about log(3), never negative.
    assert all(0.5 < r[k] < 3.0 for r in rows for k in ("val_score", "heldout_score"))
    assert 0.5 < summary["shipped_heldout_score"] < 3.0
    shipped = next(r for r in rows if r["shipped"])
    stored = json.loads((tmp_path / "m" / "model.json").read_text())["metrics"]
    assert (stored["val_score"], stored["heldout_score"]) == (shipped["val_score"], shipped["heldout_score"])
    text = format_ensemble(summary)
    assert f"{shipped['val_score']:.4f}  {shipped['heldout_score']:>8.4f}" in text
    assert f"held-out val_loss of the whole procedure {summary['shipped_heldout_score']:.4f}" in text
    # The report draws the same values the table shows, on the trials' val_loss axis.
    board = pd.DataFrame({"trial": [], "state": [], "backbone": [], "val_loss": [], "latency_ms": []})
    drawn = {t.name: list(t.y) for t in ensemble_figure(board, summary, metric="val_loss").data}
    assert drawn["single (val)"] == [r["val_score"] for r in rows if r["kind"] == "single"]

    # The guard's line: the combination's change against the single trial, once, in the loss's own sign.
    guard = {"val_best": "ensemble", "gain": -0.0123, "loss_gain": -0.0123, "images": 30, "shipped_single": True}
    line = format_ensemble(_summary("val_loss", guard=guard)).splitlines()[-1]
    assert "(val_loss +0.0123 on 30 images)" in line and "-0.0123" not in line
    guard = {**guard, "gain": -0.01, "loss_gain": 0.005}
    assert "(val_acc -0.0100, log loss -0.0050 on 30 images)" in format_ensemble(_summary(guard=guard))


# ----- the shipped folder ----------------------------------------------------------------------------


def test_ensemble_folder_predicts_evaluates_and_its_onnx_agrees(
        pool: list[PoolTrial], data: Path, tmp_path: Path, cache: str) -> None:
    from search.ensemble import evaluate_model
    from search.ensemble import load_model
    from search.export import predict

    index = scan_dataset(data)
    out = tmp_path / "model"
    summary = ensemble_pool(pool, index, max_members=3, out=out)
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "ensemble" and meta["candidate"] == summary["shipped"]
    assert (out / "model.torchscript").is_file() and (out / "model.onnx").is_file(), meta["notes"]

    # Force a multi-member ensemble with TTA into a folder, so the graph holds averaging and the flip.
    from search.ensemble import save_ensemble

    preds = Predictions(pool, index, device=torch.device("cpu"))
    members = [("trial 0", 2.0), ("trial 3", 1.0)]
    net = preds.network(members, tta=True, temperature=1.7)
    ens = tmp_path / "ens"
    save_ensemble(net, [preds.specs[k] for k, _ in members], ens, class_names=index.classes, record={})
    model, meta = load_model(ens)
    x = torch.rand(2, 3, preds.canvas, preds.canvas)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(ens / "model.torchscript"))(x), expected, atol=1e-4)
    # The TorchScript file runs wherever it is moved: nothing in its graph names a device.
    assert _device_constants(torch.jit.load(str(ens / "model.torchscript")).inlined_graph) == []
    from onnx.reference import ReferenceEvaluator

    onnx_out = ReferenceEvaluator(str(ens / "model.onnx")).run(None, {"image": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(onnx_out), expected, atol=1e-3)

    image = index.test[0][0]
    rows = predict(ens, [image], top=3)
    assert len(rows[0]["top"]) == 3 and abs(sum(p for _, p in rows[0]["top"]) - 1) < 1e-2
    # evaluate on test/ gives the held-out accuracy the ensemble step reported for what it shipped.
    ev = evaluate_model(out, data)
    shipped = next(c for c in summary["candidates"] if c["shipped"])
    assert ev["images"] == 15 and ev["accuracy"] == pytest.approx(shipped["heldout_accuracy"], abs=1e-6)
    assert sum(map(sum, ev["confusion_matrix"])) == 15 and [r["class"] for r in ev["per_class"]] == list(CLASSES)


def _device_constants(graph: torch.Graph) -> list[str]:
    """Constants that tie a traced graph to one device: a device, or a tensor that is not a scalar
    (a CPU scalar tensor combines with tensors on any device)."""
    out = []
    for node in graph.nodes():
        if node.kind() == "prim::Constant":
            value = node.output().toIValue()
            if isinstance(value, torch.device) or (isinstance(value, torch.Tensor) and value.dim() > 0):
                out.append(str(node).strip())
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ensemble_torchscript_runs_on_cuda(pool: list[PoolTrial], data: Path, tmp_path: Path, cache: str) -> None:
    from search.ensemble import save_ensemble

    index = scan_dataset(data)
    preds = Predictions(pool, index, device=torch.device("cpu"))
    members = [("trial 0", 2.0), ("trial 3", 1.0)]
    net = preds.network(members, tta=True, temperature=1.7)
    save_ensemble(net, [preds.specs[k] for k, _ in members], tmp_path / "ens", class_names=index.classes, record={})
    x = torch.rand(2, 3, preds.canvas, preds.canvas)
    with torch.no_grad():
        expected = net.cpu()(x)
        scripted = torch.jit.load(str(tmp_path / "ens" / "model.torchscript")).to("cuda")
        got = scripted(x.to("cuda"))
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), expected, atol=1e-3)


# ----- the command ---------------------------------------------------------------------------------


def _study(tmp_path: Path, data: Path, pool: list[PoolTrial], name: str = "ens") -> None:
    import optuna

    from search.data import scan_dataset

    index = scan_dataset(data)
    (tmp_path / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'studies' / f'{name}.db'}",
                                direction="maximize")
    for key, value in {"dataset": index.source, "dataset_fingerprint": index.fingerprint,
                       "class_names": list(index.classes), "split_spec": index.split_spec.to_dict(),
                       "settings": {"metric": "val_acc"}}.items():
        study.set_user_attr(key, value)
    dist = {"backbone": optuna.distributions.CategoricalDistribution(["resnet18", "mobilenet_v3_small"])}
    for i, t in enumerate(pool):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.5 + 0.01 * i, params={"backbone": t.config.backbone},
            distributions=dist, user_attrs={"config": t.config.to_dict(), "checkpoint": t.checkpoint},
        ))
    study.add_trial(optuna.trial.create_trial(  # removed by the checkpoint bound: not in the pool
        state=optuna.trial.TrialState.COMPLETE, value=0.99, params={"backbone": "resnet18"}, distributions=dist,
        user_attrs={"config": _config().to_dict(), "checkpoint": None, "checkpoint_removed": True},
    ))


def test_tlsearch_ensemble_evaluate_and_predict(pool: list[PoolTrial], data: Path, tmp_path: Path, cache: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    monkeypatch.chdir(tmp_path)
    _study(tmp_path, data, pool[:2] + pool[3:])
    assert main(["ensemble", "ens", "--max-members", "2"]) == 0
    out = capsys.readouterr().out
    assert "held out: test/, 15 images" in out and "shipped (*)" in out
    assert "soup resnet18" in out and "ensemble + flip TTA" in out
    # The summary is kept next to the study, and the study's report draws its ensembles section from it.
    kept = json.loads((tmp_path / "studies" / "ens" / "ensemble.json").read_text())
    assert kept["study"] == "ens" and f"shipped (*): {kept['shipped']};" in out
    assert "report: " in out
    page = (tmp_path / "reports" / "ens" / "index.html").read_text()
    assert 'id="ensembles"' in page and 'id="calibration"' in page
    model = tmp_path / "models" / "ens-ensemble"
    assert json.loads((model / "model.json").read_text())["study"] == "ens"
    assert main(["evaluate", str(model), str(data), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["images"] == 15 and len(ev["confusion_matrix"]) == 3
    image = str(next((data / "test" / "circle").iterdir()))
    assert main(["predict", str(model), image]) == 0
    assert capsys.readouterr().out.startswith(image)
    # Bad input: one line, exit 2.
    assert main(["ensemble", "ens", "--max-latency-ms", "0.000001"]) == 2
    assert "no candidate runs within --max-latency-ms" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(tmp_path / "nowhere")]) == 2
    _study(tmp_path, data, [], name="empty")
    assert main(["ensemble", "empty"]) == 2
    assert "no COMPLETE trial with a kept checkpoint" in capsys.readouterr().err


def test_evaluate_needs_a_test_split(pool: list[PoolTrial], tmp_path: Path, tiny_dataset: Path, cache: str) -> None:
    from search.config import TLSearchError
    from search.ensemble import evaluate_model

    index = scan_dataset(tiny_dataset)
    ensemble_pool(pool[:1], index, max_members=1, out=tmp_path / "m")
    with pytest.raises(TLSearchError, match="has no test split"):
        evaluate_model(tmp_path / "m", tiny_dataset)


def test_a_member_sees_the_images_as_its_trial_did(data: Path, tmp_path: Path, cache: str) -> None:
    """The logits a trial kept equal the ensemble's own forward pass: same decode, crop, normalisation."""
    from search.model_io import load_val_logits
    from search.trial import fine_tune

    index = scan_dataset(data)
    cfg = _config("resnet18", freeze_depth=2)  # random mobilenet_v3_small logits hardly depend on the image
    ckpt = tmp_path / "trial-0.pt"
    fine_tune(cfg, index, checkpoint_path=str(ckpt), cache_dir=cache, threads=1)
    preds = Predictions([PoolTrial(0, cfg, str(ckpt))], index, device=torch.device("cpu"), cache_dir=cache)
    kept = load_val_logits(ckpt)[0]
    del preds._logits[("trial 0", "val", False)]  # computed again, through the member's own preprocessing
    assert (kept - kept.mean(0)).abs().max() > 0.05  # they do depend on the image
    assert torch.allclose(preds.logits("trial 0", "val"), kept, atol=1e-3)
