"""`edge-agent modbus-test`: read the agent's Modbus register map as a PLC would, at
commissioning: map version, heartbeat, state. Read-only: nothing is written or triggered."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.agent.config import load_config
from edge_agent.agent.preflight import modbus_module
from edge_agent.errors import UserError
from edge_agent.publish.modbus_config import ModbusModel


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ModbusModel()
    p.add_argument(
        "--config", type=Path, help="take host, port and unit id from its modbus section"
    )
    p.add_argument("--host", help=f"the agent's address (default: the config's, else {d.host})")
    p.add_argument("--port", type=int, help=f"(default: the config's, else {d.port})")
    p.add_argument("--unit", type=int, help=f"unit id (default: the config's, else {d.unit_id})")


def run(args: argparse.Namespace) -> int:
    settings = ModbusModel()
    if args.config is not None:
        config = load_config(args.config)
        if config.modbus is None:
            raise UserError(f"{args.config}: modbus.enabled is not true: no server to test")
        settings = config.modbus
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    unit = args.unit if args.unit is not None else settings.unit_id
    print(modbus_module().self_check(host, port, unit))
    return 0
