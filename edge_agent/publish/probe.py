"""Is `mqtt.tls` wrong for this port? A broker's listener that gets the other protocol just
closes the connection, which looks exactly like a broker that is restarting: without a probe
the agent would spool for ever instead of saying which setting is wrong.

Each probe opens one short connection, speaks the protocol the config did NOT ask for, and
reports whether the port answered in it. Used only after an ambiguous failure.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PROBE_TIMEOUT_S = 2.0
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", None}


def speaks_tls(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when the port completes a TLS handshake (certificates not checked: only the
    protocol matters here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return False  # hung up on the ClientHello: not a TLS listener
    except ssl.SSLError as err:
        # Bytes that are not a TLS record came back: not TLS. Any other failure is a TLS
        # server answering (an alert such as "certificate required").
        return err.reason not in _NOT_TLS
    except OSError:
        return False


def speaks_plain_mqtt(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when the port answers an unencrypted MQTT CONNECT with a CONNACK (any reason
    code: a refusal is still plain MQTT)."""
    answered: list[bool] = []
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-probe-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv311,
    )
    client.on_connect = lambda *_args: answered.append(True)
    try:
        client.connect(host, port, keepalive=5)
        deadline = time.monotonic() + timeout_s
        while not answered and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        sock = client.socket()
        if sock is not None:  # paho leaves a never-accepted socket open
            sock.close()
    return bool(answered)
