"""`iotfuse federate server|site|simulate`: federated training (pipeline/learn/federated/).

iotfuse federate server --rounds 10 --min-sites 4 --out model/ [--init MODEL]
iotfuse federate site --server HOST:9091 --data site.iotrec [--name SITE]
iotfuse federate simulate --sites 4 --data REC... --split by-class-skew --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.commands.common import count, positive
from pipeline.commands.learn import dp_args, dp_options
from pipeline.errors import UserError
from pipeline.settings import Settings


def _settings_args(p: argparse.ArgumentParser) -> None:
    """--config/--set/--log-level after the subcommand too (SUPPRESS: absent ones do not
    hide those given before it)."""
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML settings file")
    p.add_argument(
        "--set",
        action="append",
        default=argparse.SUPPRESS,
        metavar="SECTION.FIELD=VALUE",
        help="override any setting (repeatable)",
    )
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--device", default=argparse.SUPPRESS, help="torch device: auto, cpu, cuda")


def _server_args(p: argparse.ArgumentParser, simulate: bool = False) -> None:
    p.add_argument("--rounds", type=count, default=10, help="federated averaging rounds")
    if not simulate:
        p.add_argument("--min-sites", type=count, required=True, help="sites every round needs")
        p.add_argument("--address", default="0.0.0.0:9091", metavar="HOST:PORT", help="listen here")
        p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA certificate (TLS)")
        p.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (TLS)")
        p.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key (TLS)")
        p.add_argument(
            "--wait-s", type=positive, default=600.0, help="how long a round waits for the sites"
        )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help=_OUT[simulate])
    p.add_argument("--init", type=Path, metavar="MODEL_DIR", help="start from this model")
    p.add_argument("--modalities", default="camera,audio,telemetry", help="comma-separated")
    p.add_argument("--metrics", help="telemetry metric names, comma-separated")
    p.add_argument("--name", default="", help="model name (default: federated)")
    p.add_argument("--local-epochs", type=count, default=1, help="site epochs per round")
    p.add_argument("--batch-size", type=count, default=32, help="windows per training step")
    p.add_argument("--lr", type=positive, default=1e-3, help="AdamW learning rate at the sites")
    p.add_argument("--seed", type=int, default=0, help="first weights, shuffling, split seed")
    p.add_argument("--modality-dropout", type=float, help="(default 0.25)")
    p.add_argument("--no-augment", action="store_true", help="no training-time variation")
    p.add_argument(
        "--conv-norm",
        choices=("batch", "group"),
        default="batch",
        help="the CNN trunks' norm (group: GroupNorm, no batch statistics to average; "
        "DP-SGD always uses group)",
    )
    p.add_argument(
        "--round-timeout-s", type=positive, help="leave a site slower than this out of a round"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    dp_args(p)


_OUT = {
    False: "model directory to write (the best round, rewritten as it improves)",
    True: "directory for the sites' recordings, logs, model/ and federation.json",
}


def federate_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="federate_command", required=True, metavar="ROLE")
    server = sub.add_parser("server", help="run the federation: FedAvg over the sites")
    _server_args(server)
    site = sub.add_parser("site", help="take part with this site's recordings")
    site.add_argument("--server", required=True, metavar="HOST:PORT", help="the server")
    site.add_argument("--data", type=Path, nargs="+", required=True, metavar="REC")
    site.add_argument("--name", default="", help="this site's name (default: host name)")
    site.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA of the server's certificate")
    site.add_argument(
        "--connect-s", type=positive, default=120.0, help="how long to try to reach the server"
    )
    dp_args(site)
    simulate = sub.add_parser("simulate", help="a whole federation on this machine")
    simulate.add_argument("--sites", type=count, default=4, help="site processes")
    simulate.add_argument("--data", type=Path, nargs="+", required=True, metavar="REC")
    simulate.add_argument("--split", choices=("by-device", "by-class-skew"), default="by-device")
    simulate.add_argument(
        "--alpha", type=positive, default=0.5, help="by-class-skew: Dirichlet concentration"
    )
    simulate.add_argument("--site-threads", type=count, default=1, help="torch threads per site")
    _server_args(simulate, simulate=True)
    for parser in (server, site, simulate):
        _settings_args(parser)


def server_options(args: argparse.Namespace, settings: Settings, out: Path) -> Any:
    from pipeline.learn.federated.federation import ServerOptions
    from pipeline.learn.federated.protocol import SiteRecipe
    from pipeline.learn.training import DEFAULT_METRICS, parse_modalities

    tls = None
    ca, cert, key = (getattr(args, k, None) for k in ("tls_ca", "tls_cert", "tls_key"))
    if ca or cert or key:
        if not (ca and cert and key):
            raise UserError("TLS needs all three of --tls-ca, --tls-cert and --tls-key")
        tls = (ca, cert, key)
    metrics = (
        tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        if args.metrics
        else DEFAULT_METRICS
    )
    recipe = SiteRecipe(
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        modality_dropout=-1.0 if args.modality_dropout is None else args.modality_dropout,
        augment=not args.no_augment,
    )
    return ServerOptions(
        rounds=args.rounds,
        min_sites=getattr(args, "min_sites", 1),
        out=out,
        init=args.init,
        address=getattr(args, "address", "127.0.0.1:0"),
        modalities=parse_modalities(args.modalities),
        metrics=metrics,
        name=args.name,
        recipe=recipe,
        dp=dp_options(args),
        conv_norm=args.conv_norm,
        tls=tls,
        round_timeout_s=args.round_timeout_s,
        wait_s=getattr(args, "wait_s", 600.0),
        overwrite=args.overwrite,
    )


def federate(args: argparse.Namespace, settings: Settings) -> int:
    role = args.federate_command
    if role == "site":
        from pipeline.learn.federated.site import SiteOptions, run_site

        site = SiteOptions(
            server=args.server,
            data=tuple(args.data),
            name=args.name,
            device=settings.runtime.device,
            tls_ca=args.tls_ca,
            dp=dp_options(args),
            connect_s=args.connect_s,
        )
        rounds = run_site(site, settings, sys.stderr)
        print(f"site {site.site_name}: took part in {rounds} round(s); its data stayed here")
        return 0
    if role == "server":
        from pipeline.learn.federated.server import run_server

        summary = run_server(server_options(args, settings, args.out), settings, sys.stderr)
    else:
        from pipeline.learn.federated.simulate import SimulateOptions, simulate

        if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
            raise UserError(
                f"--out {args.out} is not empty; choose a new directory or pass --overwrite"
            )
        options = SimulateOptions(
            server=server_options(args, settings, args.out / "model"),
            sites=args.sites,
            data=tuple(args.data),
            split=args.split,
            alpha=args.alpha,
            seed=args.seed,
            device=settings.runtime.device if settings.runtime.device != "auto" else "cpu",
            site_threads=args.site_threads,
        )
        summary = simulate(options, settings, sys.stderr)
    eps = (
        "" if summary.epsilon is None else f"; DP epsilon spent (worst site) {summary.epsilon:.3f}"
    )
    print(
        f"federated {summary.out} ({summary.version}): best round {summary.best_round} with "
        f"validation macro-F1 {summary.best_val_macro_f1:.3f} over {len(summary.sites)} sites; "
        f"{summary.seconds:.0f} s{eps}"
    )
    return 0
