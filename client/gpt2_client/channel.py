"""How a client reaches the servers: target, TLS credentials, load balancing and channel options.

A target is one address (``host:port``, or any gRPC target such as ``dns:///gpt2.svc:50051``)
or a list of ``ip:port`` addresses, which becomes an ``ipv4:``/``ipv6:`` target balanced
round-robin per request. ``dns:///`` targets are balanced round-robin over every address the
name resolves to when ``load_balancing="round_robin"`` (e.g. a Kubernetes headless service).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

ChannelOption = tuple[str, str | int]


def _split_address(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), port


def multi_address_target(addresses: Sequence[str]) -> str:
    """``["10.0.0.1:50051", "10.0.0.2:50051"]`` -> ``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``.

    gRPC's static address schemes take IP literals of one family; names go through ``dns:///``.
    """
    if not addresses:
        raise ValueError("no addresses given")
    versions: set[int] = set()
    parts: list[str] = []
    for address in addresses:
        host, port = _split_address(address)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: a list of addresses takes IP literals (ip:port or [ipv6]:port); "
                f"for a host name use one target such as 'dns:///{address}'"
            ) from None
        versions.add(ip.version)
        parts.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(versions) > 1:
        raise ValueError("a list of addresses must be all IPv4 or all IPv6")
    scheme = "ipv6" if versions == {6} else "ipv4"
    return f"{scheme}:{','.join(parts)}"


@dataclass(frozen=True)
class ChannelConfig:
    """Everything needed to open a channel, sync or asyncio."""

    target: str | Sequence[str] = DEFAULT_TARGET
    tls: bool = False  # implied by any of the three below; alone it uses the system's roots
    root_certificates: bytes | None = None  # PEM; None = the system's trust store
    private_key: bytes | None = None  # PEM client key (mutual TLS), with certificate_chain
    certificate_chain: bytes | None = None  # PEM client certificate chain (mutual TLS)
    server_name_override: str | None = None  # check the server certificate against this name
    load_balancing: str | None = None  # "round_robin", "pick_first"; None = round_robin for lists
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    options: tuple[ChannelOption, ...] = ()  # further raw gRPC channel arguments

    @property
    def grpc_target(self) -> str:
        return self.target if isinstance(self.target, str) else multi_address_target(self.target)

    @property
    def secure(self) -> bool:
        return self.tls or any(
            x is not None for x in (self.root_certificates, self.private_key, self.certificate_chain)
        )

    @property
    def lb_policy(self) -> str | None:
        if self.load_balancing is not None:
            return self.load_balancing
        return None if isinstance(self.target, str) else "round_robin"

    def channel_options(self) -> list[ChannelOption]:
        options: list[ChannelOption] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.lb_policy is not None:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{self.lb_policy: {}}]})))
        if self.server_name_override is not None:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        return options + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def open(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.grpc_target, self.credentials(), options=self.channel_options())
        return grpc.insecure_channel(self.grpc_target, options=self.channel_options())

    def open_aio(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.grpc_target, self.credentials(), options=self.channel_options())
        return grpc.aio.insecure_channel(self.grpc_target, options=self.channel_options())
