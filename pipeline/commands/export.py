"""`iotfuse export`: a model as one ONNX graph, served on ONNX Runtime without torch.

iotfuse export --out model-onnx/                       # the shipped model
iotfuse export --model model/ --out model-int8/ --quantize int8
iotfuse run --model model-onnx/ ...                    # any command that takes --model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.settings import Settings


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="torch model directory (default: shipped)")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory for the exported model"
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8", "fp16"),
        default="none",
        help="none (float32, default); int8: the heads and fusion transformer's weights; "
        "fp16: every weight but the log-mel's",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def export(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.learn.export import ExportOptions, export_directory

    options = ExportOptions(
        model=Path(settings.runtime.model) if settings.runtime.model else None,
        out=args.out,
        quantize=args.quantize,
        overwrite=args.overwrite,
    )
    done = export_directory(options, settings)
    v = done.verified
    print(
        f"exported {done.out} ({done.version[:19]}..., {done.graph_bytes / 1e6:.1f} MB) from "
        f"{done.source[:19]}...; checked against torch on {v['windows']} simulated windows: "
        f"probabilities within {v['max_prob_diff']:.1g}, labels {v['label_agreement']:.1%} "
        f"the same, attributions within {v['max_attribution_diff']:.1g}"
    )
    return 0
