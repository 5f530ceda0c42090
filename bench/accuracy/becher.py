"""becher-fashion: Becher & Ponti, Table 1 and Figs. 2-3 (small CNN on Fashion-MNIST).

SGD, Adam and RAdam (torch defaults but the lr) over learning rates x batch sizes x seeds;
the score is the test accuracy of a linear SVM (C = 1) trained on the penultimate-layer
features. Step decay (x0.5 every 5 epochs) and exponential decay (x exp(-0.1) per epoch)
run at one batch size beside the constant-lr cell.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import fastopt

from . import data, plots, report
from .common import (
    OptimizerRecipe,
    Options,
    environment,
    implementations,
    primary_impl,
    resolved_backend,
    run_grid,
    seed_everything,
)
from .models import BecherCNN
from .svm import svm_accuracy
from .train import evaluate, extract_features, train

NAME = "becher-fashion"
OPTIMIZERS = ("SGD", "Adam", "RAdam")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The grid and training length of one mode."""

    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    train_subset: int | None
    test_subset: int | None
    decay_batch: int
    decay_optimizers: tuple[str, ...]
    decay_seeds: tuple[int, ...]
    tsne_points: int
    decay_lrs: tuple[float, ...] = (0.5, 0.1, 0.01, 0.001)


FULL = Plan(
    lrs=(0.5, 0.1, 0.01, 0.001),
    batch_sizes=(8, 16, 32, 64, 128, 256, 512),
    seeds=(11, 27, 44, 86, 104),
    epochs=10,
    train_subset=None,
    test_subset=None,
    decay_batch=32,
    decay_optimizers=OPTIMIZERS,
    decay_seeds=(11, 27, 44, 86, 104),
    tsne_points=2000,
)
QUICK = Plan(
    lrs=(0.5, 0.1, 0.01, 0.001),
    batch_sizes=(16, 64, 256),
    seeds=(11, 27),
    epochs=1,
    train_subset=6000,
    test_subset=2000,
    decay_batch=64,
    decay_optimizers=("SGD", "RAdam"),
    decay_seeds=(11,),
    tsne_points=500,
    decay_lrs=(0.1, 0.01, 0.001),
)
# lr decay is defined per epoch of the full run; a quick run compresses it onto its steps
DECAY_EPOCHS = FULL.epochs


def plan_for(opts: Options) -> Plan:
    """The plan of this mode, with ``--seeds`` replacing the seed lists if given."""
    plan = QUICK if opts.quick else FULL
    if opts.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(opts.seeds), decay_seeds=tuple(opts.seeds[:1]))
    return plan


def recipe(optimizer: str, lr: float) -> OptimizerRecipe:
    """torch.optim's defaults for everything but the learning rate (the paper's setting)."""
    return OptimizerRecipe.torch_like(optimizer, lr=lr)


def make_scheduler(kind: str, opt: torch.optim.Optimizer) -> Any | None:
    """The paper's step decay (x0.5 every 5 epochs) or exponential decay (x exp(-0.1))."""
    if kind == "step":
        return fastopt.schedules.StepDecay(opt, step_size=5, gamma=0.5)
    if kind == "exp":
        return fastopt.schedules.ExponentialDecay(opt, rate=math.exp(-0.1), every=1)
    return None


def cells(plan: Plan, impls: list[str]) -> list[dict[str, Any]]:
    """Every (optimizer, lr, batch size, seed, schedule, implementation) to run.

    The training length and data size are part of each cell (and so of its cache key).
    """
    size = dict(epochs=plan.epochs, n_train=plan.train_subset or 60000, n_test=plan.test_subset or 10000)
    out = []
    for impl in impls:
        for opt in OPTIMIZERS:
            for lr in plan.lrs:
                for bs in plan.batch_sizes:
                    for seed in plan.seeds:
                        out.append(
                            dict(optimizer=opt, lr=lr, batch_size=bs, seed=seed, schedule="none", impl=impl)
                        )
        for opt in plan.decay_optimizers:
            for lr in plan.decay_lrs:
                for sched in ("step", "exp"):
                    for seed in plan.decay_seeds:
                        out.append(
                            dict(
                                optimizer=opt,
                                lr=lr,
                                batch_size=plan.decay_batch,
                                seed=seed,
                                schedule=sched,
                                impl=impl,
                            )
                        )
    return [{**c, **size} for c in out]


def load_data(opts: Options, plan: Plan) -> data.Dataset:
    """Fashion-MNIST on the device, reduced to the plan's subsets."""
    ds = data.load("fashion-mnist", opts.data_dir, "cpu").subset(plan.train_subset, plan.test_subset, seed=0)
    return ds.to(opts.device)


def train_one(
    ds: data.Dataset, cell: dict[str, Any], plan: Plan, progress: bool
) -> tuple[BecherCNN, Any, torch.optim.Optimizer]:
    """Train the CNN of one cell; return the model, its TrainResult and the optimizer."""
    gen = seed_everything(int(cell["seed"]))
    model = BecherCNN().to(ds.x_train.device)
    opt = recipe(cell["optimizer"], cell["lr"]).build(cell["impl"], model.parameters())
    result = train(
        model,
        opt,
        ds.x_train,
        ds.y_train,
        loss_fn=F.cross_entropy,
        batch_size=int(cell["batch_size"]),
        epochs=plan.epochs,
        generator=gen,
        scheduler=make_scheduler(cell["schedule"], opt),
        virtual_epochs=DECAY_EPOCHS,
        progress=progress,
        desc=f"{cell['optimizer']} lr={cell['lr']} bs={cell['batch_size']}",
    )
    return model, result, opt


def run_cell(ds: data.Dataset, plan: Plan, opts: Options, cell: dict[str, Any]) -> dict[str, Any]:
    """Train one cell and score its feature space with the linear SVM."""
    model, result, opt = train_one(ds, cell, plan, opts.progress)
    train_f = extract_features(model, ds.x_train)
    test_f = extract_features(model, ds.x_test)
    svm = svm_accuracy(train_f, ds.y_train.cpu().numpy(), test_f, ds.y_test.cpu().numpy())
    softmax_acc, test_loss, _ = evaluate(model, ds.x_test, ds.y_test, F.cross_entropy)
    return dict(
        svm_acc=svm,
        softmax_acc=softmax_acc,
        test_loss=test_loss,
        backend=resolved_backend(opt),
        **_train_fields(result),
    )


def _train_fields(result: Any) -> dict[str, Any]:
    return dict(
        diverged=result.diverged,
        first_loss=result.first_loss,
        last_loss=result.last_loss,
        epoch_losses=result.epoch_losses,
        steps=result.steps,
        step_ms=result.step_ms,
        opt_ms=result.opt_ms,
    )


# --- tables, findings, figures ----------------------------------------------------------------


def _by_config(
    results: list[dict[str, Any]], impl: str, schedule: str = "none", metric: str = "svm_acc"
) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        if r["impl"] == impl and r["schedule"] == schedule:
            out[(r["optimizer"], r["lr"], r["batch_size"])].append(float(r[metric]))
    return out


def comparison_rows(results: list[dict[str, Any]], impl: str) -> list[dict[str, Any]]:
    """Table 1 cell by cell, for the cells this run has."""
    ours = _by_config(results, impl)
    softmax = _by_config(results, impl, metric="softmax_acc")
    rows = []
    for p in report.load_paper("becher_fashion"):
        key = (p["optimizer"], p["lr"], int(p["batch_size"]))
        if key in ours:
            cell = f"{key[0]} lr={key[1]:g} bs={key[2]}"
            row = report.compare_row(p["source"], cell, p["mean"], p["std"], ours[key])
            row["ours_cnn"] = report.mean_std(softmax[key])[0]  # the CNN's own test accuracy, for context
            rows.append(row)
    return rows


def findings(results: list[dict[str, Any]], impl: str, plan: Plan) -> list[str]:
    """The paper's qualitative claims, each checked on this run's numbers (a claim whose
    cells this run lacks is left out)."""
    mean = {k: float(np.mean(v)) for k, v in _by_config(results, impl).items()}
    small, large = min(plan.batch_sizes), max(plan.batch_sizes)
    lines = []

    def claim(text: str, ok: bool, evidence: str) -> None:
        lines.append(f"{'REPRODUCED' if ok else 'NOT reproduced'}: {text} ({evidence})")

    for o in ("Adam", "RAdam"):
        high = [v for (opt, lr, _), v in mean.items() if opt == o and lr >= 0.1]
        if high:
            dead = sum(v < 15.0 for v in high)
            claim(
                f"{o} at lr >= 0.1 collapses to chance (10 %)",
                dead == len(high),
                f"{dead} of {len(high)} cells below 15 %; highest {max(high):.1f} %",
            )
    if small != large:
        sgd = [
            (lr, mean[("SGD", lr, small)], mean[("SGD", lr, large)])
            for lr in plan.lrs
            if lr <= 0.1 and ("SGD", lr, small) in mean and ("SGD", lr, large) in mean
        ]
        if sgd:
            claim(
                f"SGD prefers small batches (lr <= 0.1: batch {small} beats batch {large})",
                all(a > b for _, a, b in sgd),
                "; ".join(f"lr {lr:g}: {a:.1f} vs {b:.1f}" for lr, a, b in sgd),
            )
        ad = [
            (o, mean[(o, 0.001, small)], mean[(o, 0.001, large)])
            for o in ("Adam", "RAdam")
            if (o, 0.001, small) in mean and (o, 0.001, large) in mean
        ]
        if ad:
            claim(
                f"Adam/RAdam at lr 0.001 prefer large batches (batch {large} beats batch {small})",
                all(b > a for _, a, b in ad),
                "; ".join(f"{o}: {a:.1f} vs {b:.1f}" for o, a, b in ad),
            )
    best = {
        o: max((v, k[1]) for k, v in mean.items() if k[0] == o)
        for o in OPTIMIZERS
        if any(k[0] == o for k in mean)
    }
    if len(best) == len(OPTIMIZERS) and len(plan.lrs) > 1:
        claim(
            "SGD's best lr is high (0.1-0.5); Adam's and RAdam's is 0.001",
            best["SGD"][1] >= 0.1 and best["Adam"][1] == 0.001 and best["RAdam"][1] == 0.001,
            ", ".join(f"{o}: lr {lr:g} ({v:.1f} %)" for o, (v, lr) in best.items()),
        )
    if best:
        claim(
            "each optimizer reaches ~92 % with its best choices",
            min(v for v, _ in best.values()) >= 90.0,
            ", ".join(f"{o}: {v:.1f} %" for o, (v, _) in best.items()),
        )
    decay = [r for r in decay_rows(results, impl, plan) if None not in (r["none"], r["step"], r["exp"])]
    decay = [r for r in decay if max(r["none"], r["step"], r["exp"]) >= 15.0]  # leave out collapsed cells
    if decay:
        ok = sum(r["step"] > r["none"] and r["exp"] > r["none"] for r in decay)
        claim(
            "both step and exponential decay improve on a constant lr",
            ok == len(decay),
            f"both better in {ok} of {len(decay)} (optimizer, lr) cells",
        )
    return lines


def decay_rows(results: list[dict[str, Any]], impl: str, plan: Plan) -> list[dict[str, Any]]:
    """Constant lr vs step and exponential decay at the decay batch size (ours only: the
    paper's decay table is for MobileNet on CIFAR-10/Flowers)."""
    rows = []
    for opt in plan.decay_optimizers:
        for lr in plan.decay_lrs:
            row: dict[str, Any] = dict(optimizer=opt, lr=lr, batch_size=plan.decay_batch)
            for sched in ("none", "step", "exp"):
                vals = [
                    float(r["svm_acc"])
                    for r in results
                    if r["impl"] == impl
                    and r["schedule"] == sched
                    and (r["optimizer"], r["lr"], r["batch_size"]) == (opt, lr, plan.decay_batch)
                    and r["seed"] in plan.decay_seeds
                ]
                row[sched] = report.mean_std(vals)[0] if vals else None
            rows.append(row)
    return rows


def make_bubbles(results: list[dict[str, Any]], impl: str, plan: Plan, out: Path) -> Path:
    """Fig. 3 beside the paper's: ours (left) and Table 1 (right) per optimizer."""
    ours = _by_config(results, impl)
    paper = {
        (p["optimizer"], p["lr"], int(p["batch_size"])): (p["mean"], p["std"])
        for p in report.load_paper("becher_fashion")
    }
    panels = {}
    for o in OPTIMIZERS:
        panels[f"{o} (ours)"] = {(k[1], k[2]): report.mean_std(v) for k, v in ours.items() if k[0] == o}
        panels[f"{o} (paper, Table 1)"] = {(k[1], k[2]): v for k, v in paper.items() if k[0] == o}
    return plots.bubble_maps(
        panels,
        list(plan.lrs),
        list(FULL.batch_sizes),
        out / "bubbles.png",
        "SVM accuracy on Fashion-MNIST features",
    )


def make_tsne(ds: data.Dataset, results: list[dict[str, Any]], impl: str, plan: Plan, opts: Options) -> Path:
    """Fig. 2: t-SNE of test features for each optimizer at its best batch size, per lr.

    The models are retrained from the same seed (the grid keeps no weights); the
    embeddings are cached in ``tsne.npz``.
    """
    from sklearn.manifold import TSNE

    mean = {k: float(np.mean(v)) for k, v in _by_config(results, impl).items()}
    cache_path = opts.out_dir / "tsne.npz"
    cache = dict(np.load(cache_path)) if cache_path.exists() else {}
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(ds.x_test), generator=gen)[: plan.tsne_points].to(ds.x_test.device)
    x, labels = ds.x_test[pick], ds.y_test[pick].cpu().numpy()
    emb = {}
    for o in OPTIMIZERS:
        best_bs = max((v, k[2]) for k, v in mean.items() if k[0] == o)[1]
        for lr in plan.lrs:
            # everything the embedding depends on: a rerun into the same folder with another
            # implementation, seed or sample size must not reuse it
            key = f"{o}_{lr:g}_{best_bs}_{impl}_seed{plan.seeds[0]}_n{plan.tsne_points}"
            if key not in cache:
                cell = dict(
                    optimizer=o, lr=lr, batch_size=best_bs, seed=plan.seeds[0], schedule="none", impl=impl
                )
                model, _, _ = train_one(ds, cell, plan, opts.progress)
                feats = np.nan_to_num(extract_features(model, x), nan=0.0, posinf=0.0, neginf=0.0)
                # a collapsed network maps (nearly) every image to one point; Barnes-Hut t-SNE
                # crashes on such duplicates, and there is nothing to show anyway
                if len(np.unique(feats.round(6), axis=0)) < 20:
                    cache[key] = np.zeros((len(feats), 2))
                else:
                    cache[key] = TSNE(2, init="pca", perplexity=30, random_state=0).fit_transform(feats)
                np.savez_compressed(cache_path, **cache)
            emb[(f"{o} (bs {best_bs})", f"lr {lr:g}")] = (cache[key], labels)
    rows = list(dict.fromkeys(r for r, _ in emb))
    return plots.tsne_grid(
        emb,
        rows,
        [f"lr {lr:g}" for lr in plan.lrs],
        opts.out_dir / "tsne.png",
        "t-SNE of Fashion-MNIST test features",
    )


def run(opts: Options) -> Path:
    """Run the experiment and write its report; return the report's path."""
    start = time.perf_counter()
    plan = plan_for(opts)
    impls = implementations(opts)
    env = environment(opts, impls)
    ds = load_data(opts, plan)
    if opts.quick:
        print(f"[{NAME}] QUICK MODE: reduced grid and data, see the report header.")
    results = run_grid(opts, cells(plan, impls), lambda c: run_cell(ds, plan, opts, c), NAME)
    primary = primary_impl(impls)
    rows = comparison_rows(results, primary)
    cols = [
        "source",
        "cell",
        "paper",
        "paper_std",
        "ours",
        "ours_std",
        "runs",
        "diff",
        "tolerance",
        "agree",
        "ours_cnn",
    ]
    report.write_csv(opts.out_dir / "comparison.csv", rows, cols)
    drows = decay_rows(results, primary, plan)
    report.write_csv(opts.out_dir / "decay.csv", drows)
    sections = [
        (f"Table 1, paper vs ours ({primary}) — {report.agreement(rows)}", report.markdown(rows, cols, 1)),
        (
            "The paper's findings, checked",
            "\n".join(f"- {line}" for line in findings(results, primary, plan)),
        ),
        (
            f"LR decay at batch size {plan.decay_batch} (SVM accuracy %, ours)",
            report.markdown(drows, ["optimizer", "lr", "batch_size", "none", "step", "exp"], 1),
        ),
    ]
    if len(impls) > 1:
        fields = ["optimizer", "lr", "batch_size", "schedule"]
        heading = "fastopt vs torch.optim (SVM accuracy %, mean over seeds)"
        sections.append(report.implementation_section(opts, results, fields, "svm_acc", heading, 2))
    make_bubbles(results, primary, plan, opts.out_dir)
    make_tsne(ds, results, primary, plan, opts)
    sections.append(("Figures", "![bubble maps](bubbles.png)\n\n![t-SNE](tsne.png)"))
    return report.write_report(
        opts,
        f"becher-fashion: Becher & Ponti Table 1 ({opts.mode})",
        sections,
        env,
        time.perf_counter() - start,
        notes(plan, opts),
        results,
    )


def notes(plan: Plan, opts: Options) -> list[str]:
    """The choices behind the numbers (the first line is the --quick note)."""
    subset = f"{plan.train_subset or 60000} training / {plan.test_subset or 10000} test images"
    return [
        f"{plan.epochs} epoch(s) on {subset}, batch sizes {list(plan.batch_sizes)}, seeds {list(plan.seeds)}; "
        f"decay variants for {list(plan.decay_optimizers)} at lr {list(plan.decay_lrs)} with seeds "
        f"{list(plan.decay_seeds)}. The paper trains on "
        "all 60,000 images (epochs not stated) with 7 batch sizes x 5 seeds, so absolute numbers are not comparable.",
        "CNN (the paper gives none): conv3x3-16, max-pool, conv3x3-32, max-pool, FC-128 (ReLU; the SVM's features), "
        "FC-10; 206,922 parameters, PyTorch default initialization, cross-entropy loss, no augmentation.",
        f"Training length: {FULL.epochs} epochs in the full run (the paper does not state it).",
        "SVM: scikit-learn LinearSVC(C=1, primal) on the raw penultimate features of the training images, "
        "scored on the test images; a diverged network's non-finite features count as 0 (chance accuracy).",
        "Optimizers: torch.optim defaults except the learning rate (Adam/RAdam betas 0.9/0.999, eps 1e-8).",
        "Decay: x0.5 every 5 epochs (step) and x exp(-0.1) per epoch (exponential), stepped on the full run's "
        f"{DECAY_EPOCHS} epochs; a shorter run compresses the same lr trajectory onto its steps.",
        "Tolerance: the paper's +-2 std per cell (at least 0.05 for its rounding). ours_cnn: the CNN's own "
        "softmax test accuracy (not in the paper), showing how far training got.",
        f"t-SNE: {plan.tsne_points} test images, best batch size per optimizer, first seed, perplexity 30.",
    ]
