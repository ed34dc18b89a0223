"""`${VAR}` in `jobs.store_url` and `jobs.results_url` comes from the environment
when the config validates, so secrets stay out of config files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig


def app_args(**jobs) -> dict:
    return {"segmentation": {"classic": {"engine": "classic"}}, "default_model": "classic", "jobs": jobs}


def test_store_url_reads_a_variable_from_the_environment(monkeypatch):
    monkeypatch.setenv("STRATA_JOB_STORE_URL", "postgresql+psycopg://strata:pw@db:5432/strata")
    config = AppConfig.model_validate(app_args(store_url="${STRATA_JOB_STORE_URL}"))
    assert config.jobs.store_url == "postgresql+psycopg://strata:pw@db:5432/strata"
    assert config.jobs.url == "postgresql+psycopg://strata:pw@db:5432/strata"


def test_results_url_reads_variables_inside_a_longer_url(monkeypatch):
    monkeypatch.setenv("BUCKET", "media")
    monkeypatch.setenv("ENV_NAME", "prod")
    config = AppConfig.model_validate(app_args(results_url="s3://${BUCKET}/strata/${ENV_NAME}"))
    assert config.jobs.results_url == "s3://media/strata/prod"


def test_a_missing_variable_is_a_validation_error_naming_it_and_the_field(monkeypatch):
    monkeypatch.delenv("STRATA_NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate(app_args(store_url="${STRATA_NOT_SET_ANYWHERE}"))
    message = str(caught.value)
    assert "STRATA_NOT_SET_ANYWHERE is not set" in message
    assert "jobs.store_url" in message


def test_an_empty_variable_is_a_validation_error(monkeypatch):
    monkeypatch.setenv("STRATA_RESULTS", "")
    with pytest.raises(ValidationError, match="STRATA_RESULTS is empty") as caught:
        AppConfig.model_validate(app_args(results_url="${STRATA_RESULTS}"))
    assert "jobs.results_url" in str(caught.value)


def test_dollar_signs_outside_braces_are_kept_as_written(monkeypatch):
    monkeypatch.delenv("pw", raising=False)
    url = "postgresql+psycopg://strata:pa$$w0rd$pw@db/strata"
    assert AppConfig.model_validate(app_args(store_url=url)).jobs.store_url == url


def test_without_results_url_results_stay_in_the_data_dir():
    config = AppConfig.model_validate(app_args(data_dir="/srv/strata"))
    assert config.jobs.results_url is None
    assert config.jobs.url == "sqlite:////srv/strata/jobs.db"
