"""`edge-agent run --check`: everything the run will need, checked without running it.

Beyond the config and the bundle (config.py), a check must catch what would otherwise fail
only at start or, worse, hours later: a camera folder or video that is not there, a TLS file
that is not PEM, a metrics port another process holds, a spool or archive folder the service
user cannot write. Each problem is one UserError line naming the config key.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edge_agent.agent.config import Config
from edge_agent.errors import UserError
from edge_agent.images import list_images
from edge_agent.ops.liveview import Access
from edge_agent.publish.publisher import build_ssl_context


def preflight(config: Config) -> None:
    """Raise UserError for the first resource the run could not use."""
    where = config.path
    for i, camera in enumerate(config.cameras):
        kind = camera.resolved_kind()
        key = f"{where}: cameras[{i}].source"
        if kind == "folder":
            try:
                list_images(camera.source)  # raises for a missing or an empty folder
            except UserError as exc:
                raise UserError(f"{key}: {exc}") from None
        elif kind == "file" and not Path(str(camera.source)).is_file():
            raise UserError(f"{key}: {camera.source}: no such video file")
        elif kind == "genicam":
            try:
                genicam_module()
            except UserError as exc:
                raise UserError(f"{key}: {exc}") from None
    if config.mqtt.tls:
        try:
            build_ssl_context(config.mqtt)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    _writable(config.mqtt.spool_dir, f"{where}: mqtt.spool_dir")
    if config.audit is not None:
        # A model change that cannot be audited is refused: find that out now, not at the
        # first promote.
        _writable(config.audit.parent, f"{where}: audit.path")
    lv = config.liveview
    if lv is not None and lv.tokens_file is not None:
        try:
            Access(tokens_file=lv.tokens_file)  # read and parsed as the live view will
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if config.archive is not None:
        _writable(config.archive.dir, f"{where}: archive.dir")
    m = config.metrics
    if m.port:  # 0 takes any free port: nothing to check
        _can_listen(m.host, m.port, f"{where}: metrics.port")
    if config.opcua is not None:
        try:
            # Password file, certificate, key and trusted client certificates (asyncua only
            # if enabled).
            server_module().check_settings(config.opcua)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        url = urlparse(config.opcua.endpoint)
        _can_listen(url.hostname or "0.0.0.0", url.port or 4840, f"{where}: opcua.endpoint")
    if config.modbus is not None:
        modbus_module()  # pymodbus installed (the `modbus` extra)
        _can_listen(config.modbus.host, config.modbus.port, f"{where}: modbus.port")


def _writable(folder: Path, key: str) -> None:
    """The folder, or the nearest existing folder above it (the run creates the rest), must be
    a writable folder."""
    path = Path(folder)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key}: {probe} is not writable by this user")


def _can_listen(host: str, port: int, key: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"{key}: cannot listen on {host}:{port} ({exc.strerror})") from None


def server_module() -> Any:
    """edge_agent.publish.opcua, imported only when a config enables it (asyncua is the
    optional `opcua` extra); its absence is one line, not a traceback."""
    try:
        from edge_agent.publish import opcua
    except ModuleNotFoundError as exc:
        if exc.name not in ("asyncua", "cryptography"):
            raise
        raise UserError(
            f"opcua.enabled: needs {exc.name}: pip install 'edge-agent[opcua]'"
        ) from None
    return opcua


def modbus_module() -> Any:
    """edge_agent.publish.modbus, imported only when a config enables it (pymodbus is the
    optional `modbus` extra); its absence is one line, not a traceback."""
    try:
        from edge_agent.publish import modbus
    except ModuleNotFoundError as exc:
        if exc.name != "pymodbus":
            raise
        raise UserError(
            "modbus.enabled: needs pymodbus: pip install 'edge-agent[modbus]'"
        ) from None
    return modbus


def genicam_module() -> Any:
    """Aravis 0.8 through gi, imported only when a config has a GenICam camera (Debian
    packages, not a pip extra); its absence is one line with the install command."""
    from edge_agent.capture import genicam

    return genicam.aravis()
