"""Smoke tests of the accuracy experiments: a few dozen training steps of each on a small
slice of the real data (the loss must go down), the torch.optim twins of Dozat's cells,
the cell cache, the comparison logic and one end-to-end report."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastopt.schedules import taso_lr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

from bench.accuracy import __main__ as cli  # noqa: E402
from bench.accuracy import becher, common, data, dozat, report, slides, taso  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data is not beside this checkout")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fast_impl() -> str:
    """The first fastopt implementation available on the CPU."""
    return common.implementations(common.Options("x", impl="fastopt"))[0]


def opts(tmp_path: Path, name: str, **kw) -> common.Options:
    return common.Options(name, quick=True, out=str(tmp_path), data_dir=str(SHARED), progress=False, **kw)


# --- each experiment trains ------------------------------------------------------------------


@needs_data
def test_becher_cell_trains_and_scores(tmp_path: Path, fast_impl: str) -> None:
    plan = dataclasses.replace(becher.QUICK, train_subset=768, test_subset=300)
    ds = becher.load_data(opts(tmp_path, becher.NAME), plan)
    cell = dict(optimizer="SGD", lr=0.1, batch_size=16, seed=11, schedule="step", impl=fast_impl)
    out = becher.run_cell(ds, plan, opts(tmp_path, becher.NAME), cell)  # 48 steps
    assert out["steps"] == 48 and not out["diverged"]
    assert out["last_loss"] < out["first_loss"] - 0.2
    assert out["svm_acc"] > 40.0  # far above chance even after 48 steps
    assert out["backend"] == fast_impl


@needs_data
def test_becher_adam_at_high_lr_collapses(tmp_path: Path, fast_impl: str) -> None:
    plan = dataclasses.replace(becher.QUICK, train_subset=640, test_subset=300)
    ds = becher.load_data(opts(tmp_path, becher.NAME), plan)
    cell = dict(optimizer="Adam", lr=0.5, batch_size=16, seed=11, schedule="none", impl=fast_impl)
    out = becher.run_cell(ds, plan, opts(tmp_path, becher.NAME), cell)
    assert out["softmax_acc"] < 25.0  # the paper's 10 %: Adam at lr 0.5 destroys the network


@needs_data
def test_dozat_cell_trains(tmp_path: Path, fast_impl: str) -> None:
    plan = dataclasses.replace(dozat.QUICK, epochs=4, train_subset=512, batch_size=64)
    x = dozat.load_data(opts(tmp_path, dozat.NAME), plan)
    cell = next(c for c in dozat.table_cells() if dozat.label(c) == "NAG L2 mu=0.9 nu=0.9")
    cell = {**cell, "seed": 0, "impl": fast_impl}
    out = dozat.run_cell(x, plan, opts(tmp_path, dozat.NAME), cell)  # 32 steps
    assert out["steps"] == 32 and out["last_loss"] < 0.8 * out["first_loss"]
    assert math.isfinite(out["mse_x1000"]) and out["spec"] == dozat.spec_of(cell).short()


@needs_data
def test_taso_lenet_trains_with_the_sigmoid(tmp_path: Path, fast_impl: str) -> None:
    ds = taso.prepare("mnist", opts(tmp_path, taso.NAME)).subset(1024, 500)
    cell = dict(
        table="Table X",
        model="LeNet5",
        dataset="mnist",
        optimizer="TASO",
        seed=0,
        impl=fast_impl,
        epochs=3,
        paper_epochs=100,
        batch_size=64,
    )
    out = taso.run_cell({"mnist": ds}, opts(tmp_path, taso.NAME), cell)  # 48 steps
    assert out["steps"] == 48 and out["last_loss"] < out["first_loss"] - 0.5
    # the 100-epoch sigmoid compressed onto 3 epochs: flat, then down to ~lr_i / 20
    # after epoch 1 (16 of 48 steps) the scheduler has taken 34 of its 100 epoch steps: k = 35
    assert out["lrs"][0] == pytest.approx(taso_lr(0.05, 35, 100), rel=1e-9)
    assert out["lrs"][-1] < 0.003


@needs_data
def test_slides_cell_trains_and_logs_each_epoch(tmp_path: Path, fast_impl: str) -> None:
    ds = slides.load_data(opts(tmp_path, slides.NAME)).subset(1024, 500)
    cell = dict(
        optimizer="Adam", lr=0.001, momentum=None, rho=None, seed=1, impl=fast_impl, epochs=2, batch_size=64
    )
    out = slides.run_cell(ds, opts(tmp_path, slides.NAME), cell)
    assert out["steps"] == 32 and out["last_loss"] < out["first_loss"] - 0.2
    assert [h["epoch"] for h in out["log"]] == [1, 2] and out["accuracy"] > 35.0


def test_taso_cifar_is_skipped_without_a_gpu(tmp_path: Path) -> None:
    why = taso.unavailable("cifar10", common.Options("taso", device="cpu", out=str(tmp_path)))
    assert why is not None and "GPU" in why
    assert taso.unavailable("mnist", common.Options("taso", device="cpu")) is None


def test_cifar_augment_keeps_shape_and_content() -> None:
    x = torch.rand(6, 3, 32, 32)
    out = taso.cifar_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # each output image is a shifted (and maybe mirrored) window of its input
    assert all(float(o.abs().sum()) <= float(i.abs().sum()) + 1e-4 for o, i in zip(out, x))


# --- fastopt and torch.optim compute the same cells ------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CM mu=0.9 None",
        "NAG mu=0.95 None",
        "L2 nu=0.9 None",
        "L2 nu=0.999 Bias-fix",
        "Linf nu=0.9 None",
        "CM L2 mu=0.9 nu=0.999",
    ],
)
def test_dozat_torch_twins_match_fastopt(name: str, fast_impl: str) -> None:
    cell = next(c for c in dozat.table_cells() if dozat.label(c) == name)
    recipe = dozat.recipe(cell)
    assert recipe.torch_class is not None
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    twin = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    fused = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    opt_t, opt_f = recipe.build(common.TORCH_IMPL, twin), recipe.build(fast_impl, fused)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for step in range(25):
        for params, opt in ((twin, opt_t), (fused, opt_f)):
            w1, b1, w2, b2 = params
            loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step == 10:  # the experiment's lr decay must act on both alike
            for opt in (opt_t, opt_f):
                for g in opt.param_groups:
                    g["lr"] *= 0.94
    for a, b in zip(twin, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_every_dozat_cell_is_a_valid_spec() -> None:
    cells = dozat.table_cells()
    assert len(cells) == 42
    assert len({dozat.spec_of(c) for c in cells if c["table"] == "Table 3"}) == 6  # 2 momenta x 3 norms


# --- cache, comparison, CLI ------------------------------------------------------------------


def test_grid_resumes_from_cached_cells(tmp_path: Path) -> None:
    o = common.Options("demo", out=str(tmp_path), progress=False)
    calls = []

    def run_cell(cell):
        calls.append(cell["a"])
        return {"value": cell["a"] * 2.0}

    cells = [{"a": 1, "b": 0.5}, {"a": 2, "b": 0.5}]
    first = common.run_grid(o, cells, run_cell, "demo")
    second = common.run_grid(o, cells + [{"a": 3, "b": 0.5}], run_cell, "demo")
    assert calls == [1, 2, 3] and [r["value"] for r in second] == [2.0, 4.0, 6.0]
    assert first[0]["value"] == 2.0
    files = sorted((o.out_dir / "cells").glob("*.json"))
    assert len(files) == 3 and json.loads(files[0].read_text())["a"] == 1


def test_compare_row_tolerances() -> None:
    row = report.compare_row("T", "c", 91.0, 0.2, [91.2, 91.4])
    assert row["agree"] == "yes" and row["tolerance"] == pytest.approx(0.4)
    assert report.compare_row("T", "c", 91.0, 0.2, [90.0])["agree"] == "NO"
    assert report.compare_row("T", "c", 10.0, 0.0, [10.0])["agree"] == "yes"  # std 0 allows rounding
    assert report.compare_row("T", "c", 7.0, None, [8.4])["agree"] == "yes"  # +-1.5 without a std
    assert report.compare_row("T", "c", 7.0, None, [8.6])["agree"] == "NO"
    assert report.compare_row("T", "c", float("nan"), None, [float("nan")])["agree"] == "yes"
    assert report.compare_row("T", "c", 7.0, None, [float("nan")])["agree"] == "NO"
    assert report.compare_row("T", "c", None, None, [1.0])["agree"] == "n/a"


def test_paper_files_parse() -> None:
    assert len(report.load_paper("becher_fashion")) == 84
    assert len(report.load_paper("dozat_autoencoder")) == 42
    assert {r["source"] for r in report.load_paper("taso")} == {
        "Table VI",
        "Table VII",
        "Table VIII",
        "Table IX",
        "Table X",
    }
    assert len([r for r in report.load_paper("slides_mnist") if r["epoch"] == 10]) == 12


def test_cli_reports_missing_data_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(
        ["slides-mnist", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--no-progress"]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and data.SHA256["mnist/train-images-idx3-ubyte.gz"] in err


@needs_data
def test_taso_end_to_end_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole (tiny) run through the CLI: grid, tables, figures, run record."""
    tiny = dataclasses.replace(taso.QUICK, epoch_scale=0.01, min_epochs=1, seeds=(0,))
    monkeypatch.setattr(taso, "QUICK", tiny)
    real_prepare = taso.prepare
    monkeypatch.setattr(taso, "prepare", lambda name, o, n=None: real_prepare(name, o, 512).subset(None, 300))
    argv = [
        "taso",
        "--quick",
        "--impl",
        "both",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(SHARED),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = tmp_path / "taso" / "quick"
    text = (out / "report.md").read_text()
    assert (
        "Reduced run" in text and "Table X" in text and "skipped" in text and "fastopt vs torch.optim" in text
    )
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # accuracy and loss for four optimizers
    impl = (out / "implementations.csv").read_text()
    assert "torch.optim" in impl and "fastopt:" in impl
    record = json.loads((out / "run.json").read_text())
    assert record["device"] == "cpu" and "torch" in record and record["wall_seconds"] > 0
    assert (out / "train_loss.png").stat().st_size > 1000


def test_models_have_the_documented_sizes() -> None:
    from bench.accuracy import models

    assert models.count_parameters(models.BecherCNN()) == 206_922
    assert models.count_parameters(models.DozatAutoencoder()) == 261_777
    assert models.count_parameters(models.LeNet5()) == 61_706
    assert models.count_parameters(models.SlidesNet()) == 21_840
    x = torch.rand(2, 1, 28, 28)
    assert models.DozatAutoencoder()(x).shape == x.shape and models.BecherCNN().features(x).shape == (2, 128)
    cifar = torch.rand(2, 3, 32, 32)
    assert models.VGG19(100)(cifar).shape == (2, 100) and models.ResNet18(10)(cifar).shape == (2, 10)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--threads", "0"], "must be from 1"),
        (["--threads", "100000"], "must be from 1"),
        (["--device", "foo"], "must be cpu, cuda"),
        (["--device", "mps"], "must be cpu, cuda"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str, capsys) -> None:
    """Refused by the parser (exit status 2, the reason named), not deep in a run."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["taso", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
