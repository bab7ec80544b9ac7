"""Where a search's storage may be and how it is recorded: passwords masked, file storages named by a pipeline file
kept in the cache directory."""

from __future__ import annotations

import pytest
import yaml

from conftest import PIPELINES, cli
from kdpipe.errors import InputError
from kdpipe.search.storage import check_storage_location, describe_storage, mask_credentials

SEARCH = PIPELINES / "digits-search.yaml"


@pytest.mark.parametrize("url, masked", [
    ("postgresql://kd:s3cret@db.example:5432/optuna", "postgresql://kd:****@db.example:5432/optuna"),
    ("postgresql+psycopg://kd:p%40ss/w@db/optuna?sslmode=require", "postgresql+psycopg://kd:****@db/optuna?sslmode=require"),
    ("postgresql://kd@db/optuna", "postgresql://kd@db/optuna"),
    ("sqlite:///runs/search.db", "sqlite:///runs/search.db"),
    ("study.journal", "study.journal"),
])
def test_mask_credentials(url, masked):
    assert mask_credentials(url) == masked


def test_pipeline_copy_and_report_mask_the_password(workdir):
    from kdpipe.pipeline import load_pipeline

    pipeline = load_pipeline(SEARCH, ["search.storage=postgresql://kd:s3cret@db/optuna"])
    assert pipeline.resolved()["search"]["storage"] == "postgresql://kd:****@db/optuna"
    assert pipeline.search.storage == "postgresql://kd:s3cret@db/optuna"  # the run itself connects with it
    assert describe_storage(pipeline.search.storage) == "postgresql://kd:****@db/optuna"


@pytest.mark.parametrize("storage", ["{outside}/study.journal", "sqlite:///{outside}/study.db", "../study.journal"])
def test_file_storage_named_by_the_pipeline_file_outside_the_cache_is_refused(workdir, tmp_path_factory, storage):
    outside = tmp_path_factory.mktemp("elsewhere")
    raw = yaml.safe_load(SEARCH.read_text())
    raw["search"]["storage"] = storage.format(outside=outside)
    path = workdir / "campaign.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli("run", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: search.storage: a file storage named in the pipeline "
                                                   "file must lie in the cache directory")
    assert not (workdir / "runs").exists() and not list(outside.iterdir())


def test_file_storage_in_the_cache_or_from_the_command_line_is_allowed(tmp_path):
    cache = tmp_path / "cache"
    check_storage_location(str(cache / "study.journal"), [], cache)
    check_storage_location(f"sqlite:///{cache / 'shared' / 'study.db'}", [], cache)
    check_storage_location("postgresql://kd:pw@db/optuna", [], cache)  # a server: no file
    elsewhere = str(tmp_path / "elsewhere" / "study.journal")
    check_storage_location(elsewhere, [f"search.storage={elsewhere}"], cache)
    with pytest.raises(InputError, match="must lie in the cache directory"):
        check_storage_location(elsewhere, ["search.trials=3"], cache)
