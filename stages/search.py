"""search: an Optuna campaign over the method's parameters (and the method itself); the best ones go to distill.

Skipped when the pipeline has no `search:` section. Every trial is a nested
MLflow run; the teacher's outputs are computed once and shared by all trials.
The best parameters go into the run's resolved pipeline file (the runner writes it), and
the best trial's student is handed to distill when this worker holds it.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from kdpipe.errors import InputError
from kdpipe.methods import get_method
from kdpipe.results import SearchResult, Stage, TeacherResult
from kdpipe.search import (DIRECTIONS, Campaign, TrialRuns, best_trial, fail_orphans, make_pruner, make_sampler,
                           open_study, resolve_space, save_plots, summarize, with_export)
from kdpipe.search.plots import campaign_data


class Search(Stage):
    name = "search"
    needs = (TeacherResult,)
    produces = SearchResult

    def applies(self, pipeline) -> bool:
        return pipeline.search is not None

    def run(self, ctx) -> SearchResult:
        return run_campaign(ctx)


def run_campaign(ctx) -> SearchResult:
    """Run the campaign's missing trials; the result names the best trial's method and parameters."""
    import optuna

    pipeline = ctx.pipeline
    search = pipeline.search
    if ctx.dist.enabled:
        raise InputError("search", "a campaign does not run under torchrun; start workers with `kdpipe search` instead")
    space = resolve_space(pipeline)
    _check_candidate_models(ctx, space)

    # The run's teacher-output cache (memory, and disk shared by workers on this machine): computed once for
    # every trial, and for distill after them. Trials keep no per-epoch checkpoints: they are never resumed.
    settings = dataclasses.replace(ctx.trainer_options("search"), checkpoint_dir=None)
    cache = settings.teacher_cache
    campaign = Campaign(pipeline=pipeline, space=space, data=ctx.data, teacher=ctx.teacher,
                        initial_student=copy.deepcopy(ctx.student), settings=settings,
                        runs=TrialRuns(ctx.tracker.client(), ctx.tracker.run_id), work_dir=ctx.run_dir / "search",
                        run_dir=ctx.run_dir, log=ctx.progress.info)
    storage = search.storage or f"sqlite:///{ctx.run_dir / 'search.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, search.study or pipeline.name, [DIRECTIONS[o] for o in search.objective],
                       pruner=make_pruner(search.pruner_name, pipeline.distill.epochs),
                       heartbeat_seconds=search.heartbeat_seconds)
    if ctx.resumed:
        _close_orphans(ctx, study, campaign)
    # A private study replays exactly from the seed; a resumed one continues past the trials it holds instead of
    # drawing their points again; workers sharing a study must not all draw the same points.
    seed = (pipeline.seed if search.seed is None else search.seed) + len(study.trials)
    if search.storage is not None:
        seed += os.getpid()
    study.sampler = make_sampler(search.sampler, space, seed)
    ctx.progress.info(f"  study '{study.study_name}': {search.trials} trials on {len(space.methods)} method(s), "
                      f"sampler {search.sampler}, pruner {search.pruner_name}")
    # A resumed run only runs the trials still missing: on a shared study, those this run has not finished yet.
    mine = [t for t in study.trials if search.storage is None or t.user_attrs.get("run_dir") == campaign.owner]
    trials = search.trials - sum(t.state.is_finished() for t in mine)
    study.optimize(campaign, n_trials=max(0, trials), timeout=search.timeout, catch=(Exception,),
                   callbacks=[campaign.trial_line])

    return _best(ctx, study, storage, space, campaign, cache)


def _close_orphans(ctx, study, campaign) -> None:
    """Trials the interrupted process left running fail, and their MLflow runs are closed."""
    orphans = fail_orphans(study, None if ctx.pipeline.search.storage is None else campaign.owner)
    reason = "its worker was killed; the run was resumed"
    closed = campaign.runs.close_running(reason) + campaign.runs.record_killed(study, orphans, reason)
    if orphans or closed:
        ctx.progress.info(f"  failed trial(s) {orphans} left running by the interrupted process; "
                          f"closed {len(closed)} MLflow trial run(s)")


def _best(ctx, study, storage: str, space, campaign, cache) -> SearchResult:
    """The campaign's summary and its best trial, which becomes the run's pipeline (`ctx.pipeline`)."""
    pipeline = ctx.pipeline
    search = pipeline.search
    summary = summarize(study, storage, search.objective)
    summary["teacher_forward_passes"] = cache.forward_passes
    summary["teacher_view_passes"] = cache.view_passes  # teacher views (augmented data): one pass per campaign
    summary.update(campaign_data(study, search.objective))  # what report.html draws
    _log_campaign(ctx, study, summary)
    best = best_trial(study, search.objective)
    if best is None:
        raise RuntimeError(f"no trial of study '{study.study_name}' completed ({summary['n_failed']} failed, "
                           f"{summary['n_pruned']} pruned); the trials' nested MLflow runs say why")

    choice = space.decode(best.params)
    method = choice.method
    # The best trial's export keys (quantize, qat_epochs) go to export and validate as its method does to distill.
    # The runner records it (RUN_DIR/pipeline.yaml and the ledger's digest) when this stage has finished.
    ctx.pipeline = pipeline = with_export(pipeline.with_method(method, choice.params, choice.optimizer), choice.export)
    params = pipeline.distill.params.model_dump(mode="json")
    checkpoint = campaign.local_checkpoint(best) if not search.retrain else None
    summary["reused_checkpoint"] = checkpoint is not None
    ctx.tracker.log_params({"search": {"best": {"method": method, **params, "optimizer": choice.optimizer,
                                                **({"export": choice.export} if choice.export else {})}}})
    ctx.tracker.set_tags({"kdpipe.method": method})
    return SearchResult(report={"search": summary}, method=method, params=params, student_checkpoint=checkpoint)


def _check_candidate_models(ctx, space) -> None:
    """Each candidate method must accept the models (taps, shapes) with its base parameters, and where a trial may
    draw qat, its loss must fine-tune the fake-quantized student, before any trial runs."""
    from kdpipe.qat import check_quantizable

    for name in space.methods:
        candidate = ctx.pipeline.with_method(name, space.base[name])
        own = name == ctx.pipeline.distill.method  # the pipeline's own method: checked in prepare, qat too
        if not own:
            get_method(name).check_models(candidate, student=ctx.student, teacher=ctx.teacher,
                                          input_shape=ctx.data.input_shape)
        if "qat" in space.quantizations() and not (own and ctx.pipeline.export.quantize == "qat"):
            try:
                check_quantizable(candidate, ctx.student, ctx.teacher, ctx.data.num_classes, ctx.data.input_shape)
            except InputError as exc:
                key = "search.space.export.quantize" if "quantize" in space.export else "search.space.method"
                raise InputError(key, f"qat with method '{name}': {exc.message}") from None


def _log_campaign(ctx, study, summary) -> None:
    metrics = {f"search/{k}": summary[k] for k in ("n_trials", "n_complete", "n_pruned", "n_failed")}
    if isinstance(summary["best_value"], float):
        metrics["search/best_value"] = summary["best_value"]
    ctx.tracker.log_metrics(metrics)
    written, skipped = save_plots(study, ctx.pipeline.search.objective, ctx.run_dir / "search" / "plots")
    for path in written:
        ctx.tracker.log_artifact(path, "search")
    for reason in skipped:
        ctx.progress.info(f"  plot skipped: {reason}")
