"""Client-side load balancing of gRPC over several Trident replicas.

A gRPC channel sends every request over one HTTP/2 connection, so behind a Kubernetes ClusterIP Service all of
a client's requests reach the one pod that kube-proxy picked when the connection opened. Either put an L7
proxy in front (it balances each request), or let gRPC balance: a *name-resolver target* lists every replica
(the A records of a headless Service, or a fixed address list) and the `round_robin` policy keeps a
connection to each, rotates requests over those that are up, and re-resolves when a replica goes away.

    Client("dns:///trident-grpc-headless.trident.svc.cluster.local:8001")   # Kubernetes, headless Service
    Client("ipv4:10.0.0.5:8001,10.0.0.6:8001")                               # fixed replicas
"""
from __future__ import annotations

# gRPC's resolver schemes (https://github.com/grpc/grpc/blob/master/doc/naming.md).
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")
# tritonclient's own default: messages up to INT32_MAX bytes (a batch of images or audio is large).
_MAX_MESSAGE_BYTES = 2**31 - 1


def is_resolver_target(url: str) -> bool:
    """Whether `url` is a gRPC name-resolver target (balanced over every address it resolves to)."""
    return url.lower().startswith(RESOLVER_SCHEMES)


def headless_target(service: str, namespace: str = "trident", port: int = 8001,
                    cluster_domain: str = "cluster.local") -> str:
    """The DNS target of a headless Service, e.g. `dns:///trident-grpc-headless.trident.svc.cluster.local:8001`."""
    return f"dns:///{service}.{namespace}.svc.{cluster_domain}:{port}"


def static_target(addresses: list[str]) -> str:
    """An `ipv4:`/`ipv6:` target over fixed "host:port" addresses (IP literals; IPv6 as "[::1]:8001")."""
    if not addresses:
        raise ValueError("static_target needs at least one address")
    scheme = "ipv6" if any(a.startswith("[") for a in addresses) else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


def channel_args(policy: str = "round_robin", re_resolve_ms: int = 10_000) -> list[tuple[str, object]]:
    """gRPC channel arguments for a balanced channel.

    tritonclient uses these *instead of* its defaults, so they repeat its message-size limits. gRPC
    re-resolves the name when a connection drops (at most every `re_resolve_ms`), not on a timer: a replica
    that goes away is dropped at once, but pods added by a scale-up are only picked up at the next
    re-resolution or by a new client. With an autoscaled Deployment an L7 proxy balances new pods sooner.
    """
    return [
        ("grpc.lb_policy_name", policy),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.dns_min_time_between_resolutions_ms", re_resolve_ms),
    ]
