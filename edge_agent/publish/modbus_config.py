"""The `modbus` config section: the PLC's Modbus TCP handshake server.

Kept apart from edge_agent.publish.modbus (the server) so that loading a config never imports
pymodbus: the section is validated even when the server is off. Field rules are the config's
shared ones (edge_agent/config/fields.py: strict types, errors naming the key).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from edge_agent.config.fields import Section, Text
from edge_agent.config.fields import problem as _problem
from edge_agent.config.fields import text as _text

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_HOST = "127.0.0.1"
# Not 502: binding below 1024 needs CAP_NET_BIND_SERVICE (systemd/edge-agent.service says how).
DEFAULT_PORT = 5020
# What an empty `allow` admits: this machine only.
LOOPBACK: tuple[IpNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _problem(
            f"{value!r} must be an IP address of this machine (127.0.0.1, 0.0.0.0 for every "
            "interface, or one interface's address)"
        ) from None
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        hint = ""
        if "host bits set" in str(exc):
            hint = f"; did you mean {ipaddress.ip_network(value, strict=False)}?"
        raise _problem(
            f"{value!r} must be an address or a network (10.0.0.5, 10.0.0.0/24){hint}"
        ) from None
    return value


Host = Annotated[str, AfterValidator(_text), AfterValidator(_host)]
Cidr = Annotated[str, AfterValidator(_text), AfterValidator(_cidr)]


class ModbusModel(Section):
    """The `modbus` section (config.example.yaml documents every key)."""

    enabled: bool = False
    host: Host = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    # 1..247: the unit addresses Modbus allows a server (0 is broadcast, 248..255 reserved).
    unit_id: int = Field(1, ge=1, le=247)
    allow: list[Cidr] = Field(default_factory=list)  # client networks; empty: loopback only
    heartbeat_ms: int = Field(500, ge=50, le=60_000)
    # None: every `mode: trigger` camera of the active recipe (the service resolves it).
    trigger_cameras: list[Text] | None = None

    @model_validator(mode="after")
    def _rules(self) -> ModbusModel:
        if self.trigger_cameras is not None:
            if not self.trigger_cameras:
                raise _problem(
                    "must not be empty (leave it out for every trigger-mode camera)",
                    "trigger_cameras",
                )
            if len(set(self.trigger_cameras)) != len(self.trigger_cameras):
                raise _problem("lists a camera twice", "trigger_cameras")
        if self.enabled and not self.allow and not ipaddress.ip_address(self.host).is_loopback:
            # Listening on the plant network while admitting only this machine is a config
            # that cannot work: say so at load, not as a PLC that cannot connect.
            raise _problem(
                f"host {self.host} listens beyond this machine, but an empty allow admits only "
                "loopback clients: list the PLC's address or network",
                "allow",
            )
        return self

    def networks(self) -> tuple[IpNetwork, ...]:
        """The client networks admitted: `allow`, or LOOPBACK when it is empty."""
        if not self.allow:
            return LOOPBACK
        return tuple(ipaddress.ip_network(cidr) for cidr in self.allow)


def admitted(peer: str, networks: tuple[IpNetwork, ...]) -> bool:
    """Whether a client at IP address `peer` is in one of `networks`. An IPv4 client that
    reaches an IPv6 socket arrives as ::ffff:a.b.c.d and is matched as a.b.c.d; anything that
    is not an IP address (a Unix socket) is refused."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
