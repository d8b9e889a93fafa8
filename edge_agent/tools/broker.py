"""A throwaway MQTT broker on a free loopback port, for the tools that run the real agent
(`demo`, `bench --agent`): Mosquitto when installed, else amqtt (`pip install 'edge-agent[demo]'`).

The broker runs as a child process with a generated config and is always stopped when the
`mqtt_broker` context ends, however it ends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UserError

# max_queued_messages 0 (no limit): a subscriber that falls behind a burst of QoS 1 verdicts
# must get them late rather than have the broker drop them past its default of 1000.
MOSQUITTO_CONF = (
    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
)
# Only anonymous auth: amqtt's default plugins also log every packet and publish $SYS topics.
AMQTT_CONF = """\
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""
START_TIMEOUT_S = 20.0  # amqtt imports for a few tenths of a second idle; a busy box is slower


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    # /usr/sbin is often not on a user's PATH, and that is where Debian puts it.
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )


def amqtt_version() -> str | None:
    """The installed amqtt version, or None; found without importing it."""
    if importlib.util.find_spec("amqtt") is None:
        return None
    try:
        return importlib.metadata.version("amqtt")
    except importlib.metadata.PackageNotFoundError:  # importable, e.g. from a source tree
        return "(version unknown)"


@dataclass(frozen=True)
class Broker:
    """How to start one kind of MQTT broker as a child process on a given loopback port."""

    name: str  # what the tool tells the user it runs
    argv: tuple[str, ...]  # the config file's path is appended
    config_name: str
    config_template: str  # formatted with `port`


def no_broker_message(needed_by: str) -> str:
    return (
        f"{needed_by} needs an MQTT broker and found none: install Mosquitto "
        "(sudo apt install mosquitto) or the Python one (pip install 'edge-agent[demo]')"
    )


def choose_broker(needed_by: str) -> Broker:
    """Mosquitto if installed, else amqtt (pure Python, the `demo` extra); else a UserError
    saying that `needed_by` (e.g. "the demo") needs one and how to install either."""
    binary = mosquitto_binary()
    if binary is not None:
        return Broker(f"Mosquitto ({binary})", (binary, "-c"), "mosquitto.conf", MOSQUITTO_CONF)
    version = amqtt_version()
    if version is not None:
        # `-m` with this interpreter, as for edge-agent itself: the venv's bin/ may not be on PATH.
        argv = (sys.executable, "-m", "amqtt.scripts.broker_script", "-c")
        name = f"amqtt {version} (Mosquitto not installed)"
        return Broker(name, argv, "amqtt.yaml", AMQTT_CONF)
    raise UserError(no_broker_message(needed_by))


# MQTT 3.1.1 CONNECT (clean session, keep-alive 10 s, empty client id), then DISCONNECT: ready
# means the broker answers CONNACK, and unlike a bare TCP connect-and-close it logs no error.
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00"
_CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
_DISCONNECT = b"\xe0\x00"


def answers_mqtt(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(_PROBE_CONNECT)
            ack = sock.recv(4)
            sock.sendall(_DISCONNECT)
    except OSError:
        return False
    return ack == _CONNACK_ACCEPTED


@contextmanager
def mqtt_broker(broker: Broker, workdir: Path, *, quiet: bool = False) -> Iterator[int]:
    """Run `broker` on a free loopback port (yielded); its output goes to workdir/broker.log.

    Prints which broker runs where unless `quiet`. A broker that does not answer MQTT within
    START_TIMEOUT_S is a UserError naming its log.
    """
    port = free_port()
    conf = workdir / broker.config_name
    conf.write_text(broker.config_template.format(port=port))
    log_path = workdir / "broker.log"
    with log_path.open("w") as log:
        # Own session: a Ctrl-C in the terminal reaches only the tool, which then stops the
        # broker itself, after the agent has flushed its last verdicts through it.
        proc = subprocess.Popen(
            [*broker.argv, str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_mqtt(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = _last_line(log_path)
                raise UserError(
                    f"{broker.name} did not start on port {port} (log: {log_path})"
                    + (f": {tail}" if tail else "")
                )
            time.sleep(0.05)
        if not quiet:
            print(f"MQTT: {broker.name} on 127.0.0.1:{port}", flush=True)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
