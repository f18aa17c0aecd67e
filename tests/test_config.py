"""Configuration: defaults, files, environment overrides, and messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import DEFAULT_CONFIG_PATH, load_config
from supervisor.errors import ConfigError


def problems_for(
    tmp_path: Path, text: str = "", environ: dict[str, str] | None = None
) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, workspace=tmp_path, environ=environ or {})
    return info.value.problems


def test_embedded_default_is_valid_and_paths_resolve_under_the_workspace(tmp_path: Path) -> None:
    cfg = load_config(workspace=tmp_path, environ={})
    assert cfg.incoming_dir == tmp_path / "incoming"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'state' / 'contimg.sqlite3'}"
    assert cfg.ingest.subbands_per_group == 16


def test_file_overrides_only_the_keys_it_sets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\ngroup_deadline_s = 600\n[paths]\nincoming = "/data/incoming"\n')
    cfg = load_config(path, workspace=tmp_path, environ={})
    assert cfg.ingest.group_deadline_s == 600.0
    assert cfg.ingest.group_tolerance_s == 60.0
    assert cfg.incoming_dir == Path("/data/incoming")


def test_environment_overrides_win_and_are_typed(tmp_path: Path) -> None:
    env = {"CONTIMG_INGEST__GROUP_DEADLINE_S": "42", "CONTIMG_LOGGING__FORMAT": "console"}
    cfg = load_config(workspace=tmp_path, environ=env)
    assert cfg.ingest.group_deadline_s == 42.0
    assert cfg.logging.format == "console"


def test_workspace_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}).workspace == str(tmp_path)
    env = {"CONTIMG_WORKSPACE": str(tmp_path / "env")}
    assert load_config(environ=env).workspace == str(tmp_path / "env")
    assert load_config(workspace=tmp_path / "arg", environ=env).workspace == str(tmp_path / "arg")


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    (problem,) = problems_for(tmp_path, "[ingest]\ngroup_tolerence_s = 30\n")
    assert "ingest.group_tolerence_s: unknown key" in problem
    assert "did you mean ingest.group_tolerance_s" in problem


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    (problem,) = problems_for(tmp_path, "[ingset]\npoll_interval_s = 3\n")
    assert problem.startswith("ingset: unknown key") and "did you mean ingest" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[ingest]\ngroup_tolerance_s = -5", "ingest.group_tolerance_s = -5: must be > 0"),
        ("[ingest]\nsubbands_per_group = 17", "ingest.subbands_per_group = 17: must be <= 16"),
        ("[ingest]\nsubbands_per_group = 2.5", "ingest.subbands_per_group = 2.5: must be a whole"),
        ('[ingest]\npoll_interval_s = "fast"', "ingest.poll_interval_s = 'fast': must be a number"),
        ("[ingest]\npoll_interval_s = true", "must be a number, not a boolean"),
        ('[logging]\nformat = "xml"', "logging.format = 'xml': must be one of json, console"),
        ("[paths]\nincoming = 3", "paths.incoming = 3: must be a string"),
        ('ingest = "x"', "ingest: must be a table"),
    ],
)
def test_invalid_values_name_key_value_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    (problem,) = problems_for(tmp_path, text)
    assert expected in problem


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, "[ingest]\npoll_interval_s = 0\nbogus = 1\n")
    assert len(problems) == 2


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    env = {"CONTIMG_INGEST__POLL_INTERVAL_S": "soon"}
    (problem,) = problems_for(tmp_path, "", env)
    assert "CONTIMG_INGEST__POLL_INTERVAL_S" in problem and "must be a number" in problem


def test_environment_variables_the_program_never_reads_are_errors(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, "", {"CONTIMG_INCOMING": "/x", "CONTIMG_INGEST__NOPE": "1"})
    assert any("CONTIMG_INCOMING: not a setting" in p for p in problems)
    assert any("ingest.nope: unknown key" in p for p in problems)


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", environ={})
    assert "not valid TOML" in problems_for(tmp_path, "[ingest\n")[0]


def test_shipped_production_example_is_valid(tmp_path: Path) -> None:
    example = DEFAULT_CONFIG_PATH.parent / "production.example.toml"
    cfg = load_config(example, workspace=tmp_path, environ={})
    assert cfg.incoming_dir == Path("/data/incoming")
    assert str(cfg.path("products")).startswith("/stage/dsa110-contimg")
