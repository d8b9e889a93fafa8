"""Real Mosquitto brokers for tests: throwaway TLS certificates, a TCP gate, a subscriber.

Plain module plus pytest fixtures ``broker``, ``secure_broker`` and ``tls_certs``; import the
fixture functions (``*_fixture``, registered under the short names) into a test module::

    from tests.brokers import Broker, Gate, Subscriber
    from tests.brokers import broker_fixture, secure_broker_fixture, tls_certs_fixture  # noqa: F401

* ``Broker``: ``/usr/sbin/mosquitto`` on free loopback ports with a generated config: an
  anonymous listener (``port``), optionally a password listener (``auth_port``), a TLS +
  password listener (``tls_port``) and a TLS client-certificate listener (``mtls_port``).
  ``stop()``, ``kill()`` (SIGKILL, a crash) and ``restart()`` on the same ports. No persistence:
  a restarted broker has forgotten sessions and retained messages.
* ``Gate``: a TCP forwarder in front of a broker port that can refuse connections. Tests use it
  to decide *when* a client under test can reach the broker again (e.g. only after a
  ``Subscriber`` has re-subscribed to a restarted broker).
* ``Subscriber``: collects messages on a topic filter (QoS 1, re-subscribes after reconnects).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import unavailable

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
USERS = {"agent": "s3cret-pass", "plc": "plc-pass"}


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_mosquitto() -> None:
    if not MOSQUITTO.exists():
        unavailable(f"{MOSQUITTO} not installed (scripts/setup.sh installs it)")


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost signed by it, a client
    certificate signed by it, and an unrelated CA (for "wrong CA" tests)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return key, cert


def _make_leaf(folder: Path, name: str, ca_key: Path, ca: Path, ext: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext_file = folder / f"{name}.ext"
    ext_file.write_text(
        ext + "\nbasicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext_file, cwd=folder,
    )  # fmt: skip
    return key, cert


def make_certs(folder: Path) -> Certs:
    """Generate all test certificates with the ``openssl`` CLI (EC keys: fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _make_ca(folder, "edge-agent-test-ca")
    server_key, server_cert = _make_leaf(
        folder, "127.0.0.1", ca_key, ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment",
    )  # fmt: skip
    client_key, client_cert = _make_leaf(
        folder, "edge-agent-client", ca_key, ca,
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature",
    )  # fmt: skip
    _, other_ca = _make_ca(folder, "unrelated-ca")
    return Certs(ca, server_cert, server_key, client_cert, client_key, other_ca)


# ------------------------------------------------------------------------------ broker


@dataclass
class Broker:
    """A real Mosquitto 2 broker on free loopback ports (see module docstring)."""

    workdir: Path
    users: dict[str, str] | None = None
    certs: Certs | None = None
    port: int = field(default_factory=free_port)
    auth_port: int | None = None
    tls_port: int | None = None
    mtls_port: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        require_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.users:
            self.auth_port = free_port()
        if self.certs:
            self.tls_port = free_port()
            self.mtls_port = free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path.write_text(self._config())

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.auth_port, self.tls_port, self.mtls_port) if p]

    def _config(self) -> str:
        user = pwd.getpwuid(os.getuid()).pw_name  # as root, mosquitto would switch users
        lines = [
            f"user {user}",
            "persistence false",
            "per_listener_settings true",
            "max_inflight_messages 0",  # hand everything to subscribers at once: nothing
            "max_queued_messages 0",  # acknowledged is held back only inside the broker
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
        ]
        passwd = self.workdir / "passwd"
        if self.users:
            passwd.unlink(missing_ok=True)
            for name, password in self.users.items():
                flags = ["-b"] if passwd.exists() else ["-c", "-b"]
                subprocess.run(
                    [MOSQUITTO_PASSWD, *flags, str(passwd), name, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            passwd.chmod(0o600)
            lines += [
                "",
                f"listener {self.auth_port} 127.0.0.1",
                "allow_anonymous false",
                f"password_file {passwd}",
            ]
        if self.certs:
            tls = [
                f"cafile {self.certs.ca}",
                f"certfile {self.certs.server_cert}",
                f"keyfile {self.certs.server_key}",
            ]
            lines += ["", f"listener {self.tls_port} 127.0.0.1", *tls, "allow_anonymous false"]
            if self.users:
                lines.append(f"password_file {passwd}")
            lines += [
                "require_certificate false",
                "",
                f"listener {self.mtls_port} 127.0.0.1",
                *tls,
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> Broker:
        """Start and wait until every listener accepts TCP connections."""
        if self.running:
            return self
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        waiting = list(self.ports)
        while waiting:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on {waiting}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.2).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM: a clean broker shutdown."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the broker crashes; clients see their connections drop."""
        self._end(signal.SIGKILL)

    def restart(self, timeout_s: float = 10.0) -> Broker:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        return self.start(timeout_s)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ------------------------------------------------------------------------------ gate


class Gate:
    """A TCP forwarder 127.0.0.1:``port`` -> 127.0.0.1:``target_port`` that can be closed.

    Closed: nothing listens on ``port`` (connection refused, like a broker that is down) and
    open connections are cut. Opened again on the same port.
    """

    def __init__(self, target_port: int, *, is_open: bool = True) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._sel = selectors.DefaultSelector()
        self._commands: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._listener: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._thread = threading.Thread(target=self._loop, name="gate", daemon=True)
        self._thread.start()
        if is_open:
            self.open()

    def open(self) -> None:
        self._call("open")

    def close(self) -> None:
        self._call("close")

    def shutdown(self) -> None:
        self._call("shutdown")
        self._thread.join(5)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _call(self, command: str) -> None:
        done = threading.Event()
        self._commands.put((command, done))
        self._wake_w.send(b"x")
        if not done.wait(5):
            raise RuntimeError(f"gate did not {command}")

    def _loop(self) -> None:
        while True:
            for key, _ in self._sel.select(0.5):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    if not self._run_commands():
                        return
                elif sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)  # type: ignore[arg-type]

    def _run_commands(self) -> bool:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command == "open" and self._listener is None:
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(16)
                self._listener = listener
                self._sel.register(listener, selectors.EVENT_READ)
            elif command in ("close", "shutdown"):
                if self._listener is not None:
                    self._sel.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
                for sock in list(self._peers):
                    self._drop(sock)
            done.set()
            if command == "shutdown":
                self._sel.close()
                self._wake_r.close()
                self._wake_w.close()
                return False

    def _accept(self) -> None:
        assert self._listener is not None
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
        except OSError:
            client.close()  # the broker is down: the client sees its connection closed
            return
        for a, b in ((client, upstream), (upstream, client)):
            self._peers[a] = b
            self._sel.register(a, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()


# ------------------------------------------------------------------------------ subscriber


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """Collects messages on ``topic`` (QoS 1); re-subscribes after each reconnect."""

    def __init__(
        self,
        port: int,
        topic: str = "#",
        *,
        qos: int = 1,
        host: str = "127.0.0.1",
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.topic = topic
        self.qos = qos
        self._received: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{os.getpid()}-{id(self):x}",
            clean_session=True,
        )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        self.wait_subscribed(timeout_s)

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(self, *_args: object) -> None:
        self._subscribed.set()

    def _on_disconnect(self, *_args: object) -> None:
        self._subscribed.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._received.append(Received(msg.topic, bytes(msg.payload), msg.retain, msg.qos))
            self._cond.notify_all()

    def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError(f"subscriber not subscribed to {self.topic} in {timeout_s} s")

    def wait_disconnected(self, timeout_s: float = 5.0) -> None:
        """Wait until the subscriber noticed that its connection is gone."""
        deadline = time.monotonic() + timeout_s
        while self._subscribed.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("subscriber still connected")
            time.sleep(0.01)

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def on(self, topic: str) -> list[Received]:
        """Messages received on exactly ``topic``."""
        return [m for m in self.messages if m.topic == topic]

    def json(self, topic: str) -> list[Any]:
        """The JSON payloads received on exactly ``topic``, in order."""
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float = 5.0) -> bool:
        """Wait until ``predicate(messages)`` is true; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._received):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session", name="tls_certs")
def tls_certs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Throwaway CA, server and client certificates (generated once per session)."""
    if not shutil.which("openssl"):
        unavailable("openssl CLI not installed (scripts/setup.sh installs it)")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[Broker]:
    """A running anonymous broker; killed after the test."""
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture(name="secure_broker")
def secure_broker_fixture(tmp_path: Path, tls_certs: Certs) -> Iterator[Broker]:
    """A running broker with anonymous, password, TLS+password and TLS client-cert
    listeners (users: ``USERS``)."""
    with Broker(tmp_path / "secure-broker", users=dict(USERS), certs=tls_certs) as b:
        yield b
