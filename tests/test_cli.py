"""The command line: every subcommand parses, settings flags land, errors are one line."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import build_parser, main


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"broker", "topics", "run", "record", "replay", "inspect", "demo", "config"} <= set(
        names
    )
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert name in capsys.readouterr().out


def test_flags_and_set_reach_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["config", "--set", "kafka.group_id=from-flag", "--set", "runtime.max_batch=7"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["kafka"]["group_id"] == "from-flag"
    assert shown["runtime"]["max_batch"] == 7


def test_bad_setting_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "runtime.max_batch=many"]) == 2
    err = capsys.readouterr().err
    assert "runtime.max_batch: expected int" in err and "Traceback" not in err


def test_run_without_a_model_says_what_to_do(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["run", "--model", str(tmp_path), "--metrics-port", "0"]) == 1
    assert "no iotfuse model" in capsys.readouterr().err


def test_streaming_commands_leave_cores_to_decoding_and_kafka() -> None:
    import os

    from pipeline.cli import torch_threads

    cores = len(os.sched_getaffinity(0))
    assert torch_threads(3, "run") == 3 and torch_threads(3, "train") == 3  # as set
    assert torch_threads(0, "train") is None  # training: torch's own default, every core
    for command in ("run", "replay", "demo"):
        got = torch_threads(0, command)
        assert got is not None and 1 <= got <= max(1, cores - 1 if cores > 1 else 1)


def test_config_prints_secrets_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTFUSE_KAFKA__SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("IOTFUSE_KAFKA__SASL_USERNAME", "worker")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2-secret" not in out
    kafka = json.loads(out)["kafka"]
    assert kafka["sasl_password"] == "***" and kafka["sasl_username"] == "worker"
