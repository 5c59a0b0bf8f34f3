"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse


def bootstrap_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        required=required,
        help="Kafka bootstrap servers (setting kafka.bootstrap_servers)",
    )


def positive(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def count(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value
