"""The per-category pipeline, written once for every method.

For each category: split the normal training images (train / held out for
thresholds), fit the method's model (or restore it), score the held-out
normals and the test split, calibrate the thresholds, compute the metrics,
write the reports and `metrics.json`. The method is a module of `methods/`
with the same small surface; nothing here knows which one it is.

With `data.multiclass` (the unified protocol, spec recontrast.md 3.3) one
model is first fitted on the training images of every category together,
under the name `multiclass`, and each category is then evaluated with it.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from recontrast_jax import (
    checkpointing,
    config_checks,
    console,
    evaluate,
    parallel,
    reports,
    thresholds,
)
from recontrast_jax.data import sources
from recontrast_jax.methods import lookup


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir and checks that it is writable, naming it if not."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"Workdir {workdir!r} is not writable: {e.strerror or e}"
        ) from e


def test_names(files) -> list[str]:
    """'<defect>/<file name>' of every test image (heatmap and gallery names)."""
    return [f"{s.defect_type}/{os.path.basename(s.path)}" for s in files.test]


MULTICLASS = "multiclass"  # the name of the model every category shares


def model_name(config: ml_collections.ConfigDict, category: str) -> str:
    """The checkpoint name of `category`'s model."""
    return MULTICLASS if config.data.multiclass else category


def split_train(config: ml_collections.ConfigDict, files):
    """(training samples, held-out normals) of one category."""
    return thresholds.holdout_split(
        files.train, config.data.holdout_fraction, config.seed
    )


def fit_shared_model(config: ml_collections.ConfigDict, workdir: str, names, mesh):
    """One model fitted on the training images of every category in `names`.

    Evaluations during training report the mean of the per-category metrics.

    Returns:
      (model, what fitting reported, seconds).
    """
    method = lookup.get(config.method)
    files = {name: sources.category_files(config, name) for name in names}
    train = [s for f in files.values() for s in split_train(config, f)[0]]
    predict_fn = method.compile_predict(config, mesh)

    def mean_test_metrics(model):
        per_category = [
            evaluate.compute_metrics(
                evaluate.evaluate_split(predict_fn, model, f.test, config, mesh),
                config.eval.pixel_metrics,
            )
            for f in files.values()
        ]
        return {k: float(np.mean([m[k] for m in per_category]))
                for k in per_category[0]}  # fmt: skip

    writer = reports.MetricWriter(os.path.join(workdir, "tensorboard", MULTICLASS))
    start = time.perf_counter()
    model, info = method.fit(
        config, workdir, MULTICLASS, train, mesh, writer, mean_test_metrics
    )
    writer.close()
    return (
        model,
        {**info, "train_images": float(len(train))},
        time.perf_counter() - start,
    )


def run_category(
    config: ml_collections.ConfigDict,
    workdir: str,
    category: str,
    mesh,
    fit: bool,
    shared=None,
) -> dict[str, float]:
    """Fits (`fit`) or restores `category`'s model, evaluates it, writes its reports.

    Args:
      shared: `fit_shared_model`'s result for a multi-class run: the category
        is evaluated with that model instead of fitting its own.

    Returns:
      The test metrics, what fitting reported, and timings.
    """
    method = lookup.get(config.method)
    files = sources.category_files(config, category)
    train_samples, held_out = split_train(config, files)
    writer = reports.MetricWriter(os.path.join(workdir, "tensorboard", category))
    predict_fn = method.compile_predict(config, mesh)

    def score(model, samples, desc=None):
        return evaluate.evaluate_split(predict_fn, model, samples, config, mesh, desc)

    def test_metrics(model):
        return evaluate.compute_metrics(
            score(model, files.test, f"{category} evaluation"),
            config.eval.pixel_metrics,
        )

    if shared is not None:
        model, info, fit_seconds = shared[0], dict(shared[1]), shared[2]
    else:
        start = time.perf_counter()
        if fit:
            model, info = method.fit(
                config, workdir, category, train_samples, mesh, writer, test_metrics
            )
        else:
            name = model_name(config, category)
            model, info = method.restore(config, workdir, name, mesh), {}
            console.say(
                f"{category}: restored {restored_what(method, model)}, evaluating"
            )
        fit_seconds = time.perf_counter() - start
    # The normal images first: they compile predict_fn, so the test split's
    # time below is inference alone (input pipeline included).
    source = "held-out" if held_out else "training (in-sample)"
    normal = score(model, held_out or train_samples, f"{category} {source} normals")
    start = time.perf_counter()
    result = score(model, files.test, f"{category} test")
    test_seconds = time.perf_counter() - start
    metrics = evaluate.compute_metrics(result, config.eval.pixel_metrics)
    step = method.model_step(model)
    if step is not None:
        info.setdefault("steps", float(step))
    writer.scalars(step or 0, {f"eval/{k}": v for k, v in metrics.items()})
    start = time.perf_counter()
    calibration = thresholds.calibration(
        normal, source, result, config.eval.pixel_metrics
    )
    calibration["step"] = step
    chosen = thresholds.choose_or_fixed(calibration, config.threshold)
    metrics.update(flagged_rates(result, chosen["image"]))
    say_threshold(category, chosen)
    if jax.process_index() == 0:
        thresholds.save(workdir, category, calibration)
        report = reports.CategoryReport(
            category, result, test_names(files), chosen, step or 0
        )
        reports.write_category(report, workdir, config.report.num_heatmaps, writer)
    writer.close()
    console.say(f"{category}: " + reports.metrics_line(metrics))
    return {
        **metrics,
        "train_seconds": round(fit_seconds, 2),  # unless the method timed it itself
        **info,
        "test_seconds": round(test_seconds, 2),
        "test_images_per_second": round(len(files.test) / max(test_seconds, 1e-9), 2),
        "report_seconds": round(time.perf_counter() - start, 2),
    }


def restored_what(method, model) -> str:
    """'step N' of a trained model, else 'the fitted model' (memory banks)."""
    step = method.model_step(model)
    return f"step {step}" if step is not None else "the fitted model"


def flagged_rates(result: evaluate.SplitResult, image_threshold: float) -> dict:
    """Shares of the anomalous and of the normal test images at the threshold."""
    flagged = np.asarray(result.scores) >= image_threshold
    labels = np.asarray(result.labels).astype(bool)
    rates = {}
    if labels.any():
        rates["anomalous_flagged"] = float(flagged[labels].mean())
    if (~labels).any():
        rates["normal_flagged"] = float(flagged[~labels].mean())
    return rates


def say_threshold(category: str, chosen: dict) -> None:
    """The image threshold, its rule and any warning about it, on the console."""
    console.say(f"{category}: image threshold {chosen['image']:.4g} = {chosen['rule']}")
    if "note" in chosen:
        console.say_once("threshold note", f"{category}: note: {chosen['note']}")


def run(config: ml_collections.ConfigDict, workdir: str, fit: bool = True) -> dict:
    """Every category of the config through `run_category`; returns the summary.

    Args:
      config: run config.
      workdir: run directory (resumed when it holds checkpoints).
      fit: train (resuming) before evaluating; False evaluates saved models.
    """
    config_checks.validate(config)  # a bad value fails before any work
    console.start_run()
    if not fit and not os.path.isdir(workdir):
        raise checkpointing.NoCheckpointError(
            f"Workdir {workdir} does not exist: nothing to evaluate; train first "
            "(mode 'train')."
        )
    prepare_workdir(workdir)
    if jax.process_index() == 0:
        removed = reports.remove_stale_temporaries(workdir)
        if removed:
            console.say(f"removed {removed} temporary files of an interrupted run")
        reports.atomic_write_text(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
    mesh = parallel.make_mesh()
    names = sources.category_names(config)
    categories = "1 category" if len(names) == 1 else f"{len(names)} categories"
    console.say(
        f"{config.method}: {categories} of {sources.data_description(config)} "
        f"on {console.devices_description()}; results in {workdir}"
    )
    shared = None
    if config.data.multiclass and fit:
        shared = fit_shared_model(config, workdir, names, mesh)
    results = {}
    for category in names:
        results[category] = run_category(config, workdir, category, mesh, fit, shared)
        if jax.process_index() == 0:
            reports.write_results(
                workdir, results, config.report.title, results_notes(config)
            )
    return reports.summarize(results)


def results_notes(config: ml_collections.ConfigDict) -> list[str]:
    """What results.md says under its title: the data, the backbone, the threshold."""
    weights = {
        "": "random init",
        "imagenet": "ImageNet weights",
    }.get(config.model.pretrained, config.model.pretrained)
    return [
        f"Data: {sources.data_description(config)}. "
        f"Method: {config.method}, backbone {config.model.arch} ({weights}).",
        "anomalous_flagged / normal_flagged: shares of the anomalous / normal test "
        f"images at or above the image threshold ('{config.threshold.rule}' rule; "
        "each category's rule is in its gallery and on the console).",
    ]
