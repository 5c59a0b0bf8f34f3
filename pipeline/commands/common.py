"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse


def bootstrap_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--bootstrap-servers", metavar="HOST:PORT", required=required,
        help="Kafka bootstrap servers (setting kafka.bootstrap_servers)",
    )
