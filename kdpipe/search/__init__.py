"""Optuna search campaigns: the search space from the pipeline file, storages shared by workers, and the trials.

Workers in separate processes or machines cooperate on one study through
Optuna's storage: sqlite, PostgreSQL, or Optuna's journal file.

    space     which methods and parameters are searched (resolve_space)
    storage   RDB URLs, the schema lock, opening a study
    campaign  the trials one worker runs, their MLflow runs, sampler, pruner, summary
    plots     the campaign's PNG plots
"""

from kdpipe.search.campaign import (DIRECTIONS, Campaign, TrialRuns, best_trial, fail_orphans, make_pruner, make_sampler,
                                    summarize)
from kdpipe.search.plots import save_plots
from kdpipe.search.space import EXPORT, OPTIMIZER, Choice, SearchSpace, resolve_space, with_export
from kdpipe.search.storage import (check_storage_location, describe_storage, is_rdb_url, mask_credentials, open_study,
                                   schema_lock, sqlalchemy_url)

__all__ = ["DIRECTIONS", "EXPORT", "OPTIMIZER", "Campaign", "Choice", "SearchSpace", "TrialRuns", "best_trial",
           "check_storage_location", "describe_storage", "fail_orphans", "is_rdb_url", "make_pruner", "make_sampler",
           "mask_credentials", "open_study", "resolve_space", "save_plots", "schema_lock", "sqlalchemy_url", "summarize", "with_export"]
