"""The campaign's plots: optimization history, parameter importances, the Pareto front."""

from __future__ import annotations

import warnings
from pathlib import Path


def save_plots(study, objective_names: list[str], directory: Path) -> tuple[list[Path], list[str]]:
    """Optimization history, parameter importances and (multi-objective) the Pareto front as PNG files.

    Returns the files written and, for each plot that could not be drawn (too few
    complete trials, say), why.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    directory.mkdir(parents=True, exist_ok=True)
    multi = len(objective_names) > 1
    target = _accuracy_target(objective_names)
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target=target, target_name="val_accuracy"),
        "param_importances": lambda: vis.plot_param_importances(study, target=target, target_name="val_accuracy"),
    }
    if multi:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=objective_names)
    written, skipped = [], []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            path = directory / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped.append(f"{name}: {exc}")
    return written, skipped


def _accuracy_target(objective_names: list[str]):
    """What the history and the importances are of: val_accuracy (Optuna's own objective when it is the only one)."""
    acc = objective_names.index("val_accuracy")
    return (lambda t: t.values[acc]) if len(objective_names) > 1 else None


def campaign_data(study, objective_names: list[str]) -> dict:
    """report.json's search.trials (each complete trial's number and objective values: the history and the Pareto
    front's cloud) and search.param_importances (on val_accuracy; None when too few trials to tell, with why), so
    that a run's report draws them without opening the study."""
    import optuna
    from optuna.trial import TrialState

    out = {"trials": [{"number": t.number, "values": t.values} for t in study.get_trials(states=(TrialState.COMPLETE,))]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            importances = optuna.importance.get_param_importances(study, target=_accuracy_target(objective_names))
        out["param_importances"] = {name: float(value) for name, value in importances.items()}
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        out["param_importances"], out["param_importances_skipped"] = None, str(exc)
    return out
