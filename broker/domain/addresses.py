"""Which network addresses a callback may reach: the SSRF table, and how hosts are read.

Pure code, used by both stages of the callback check: at Provision time on the URL's literal host
(``broker.domain.validation`` and ``broker.callbacks.CallbackPolicy.check_literal``), and at every
delivery attempt on each address the host resolved to (``broker.callbacks.GuardedResolver``).

Why a table: an allow-list decided by ``ipaddress``'s ``is_loopback``/``is_link_local`` flags missed
every IPv6 spelling of a forbidden IPv4 address (``::ffff:127.0.0.1`` is not "loopback" to Python
3.11, yet connecting to it reaches 127.0.0.1). So every address is first *normalised*: the IPv4
addresses embedded in it (``EMBEDDINGS``) are extracted, and the address and each embedded address
are checked against ``RULES``. An address is refused when any row matches it whose setting is not
on; the first such row names the refusal. The README's table is rendered from ``RULES`` and
``EMBEDDINGS`` (``markdown_tables``) and a test keeps the two equal.

Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) are deliberately *not* refused:
managers run in the cluster and are called on pod and Service IPs.

Hosts are read strictly (``host_problem``): an IPv4 address must be written as a plain dotted quad,
because resolvers accept octal, hex, short and integer forms (``0177.1``, ``0x7f000001``,
``2130706433``) that different parsers read differently; IPv6 zone ids, non-ASCII and characters
outside host-name syntax are refused for the same reason.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Permit(enum.Enum):
    """A ``CallbackPolicy`` setting that lets a refused category through."""

    ALLOW_LOOPBACK = "allow_loopback"
    ALLOW_LINK_LOCAL = "allow_link_local"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One refused category: its networks, why it is refused and which setting permits it.

    ``permitted_by`` is None for categories no setting opens: nothing legitimate listens there.
    """

    category: str
    networks: tuple[IpNetwork, ...]
    phrase: str
    why: str
    permitted_by: Permit | None

    def matches(self, address: IpAddress) -> bool:
        """Whether ``address`` lies in one of this row's networks."""
        return any(address.version == net.version and address in net for net in self.networks)


def _nets(*texts: str) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


# Ordered: the first refusing row names the refusal, so the specific rows (metadata) come before the
# general ones that also contain them (link-local).
RULES: tuple[Rule, ...] = (
    Rule(
        category="cloud metadata",
        networks=_nets("169.254.169.254/32", "169.254.170.2/32", "fd00:ec2::254/128", "100.100.100.200/32"),
        phrase="a cloud metadata endpoint (link-local or provider-internal)",
        why="instance and task metadata services (AWS, GCP, Azure, Oracle, AWS ECS, AWS IPv6 IMDS, "
        "Alibaba) hand out credentials to whoever asks from the node",
        permitted_by=None,
    ),
    Rule(
        category="unspecified / this network",
        networks=_nets("0.0.0.0/8", "::/128"),
        phrase="an unspecified ('this network') address",
        why="connecting to 0.0.0.0 or :: reaches the broker's own host on Linux",
        permitted_by=None,
    ),
    Rule(
        category="loopback",
        networks=_nets("127.0.0.0/8", "::1/128"),
        phrase="a loopback address",
        why="the broker's own host: its admin ports, sidecars and local services",
        permitted_by=Permit.ALLOW_LOOPBACK,
    ),
    Rule(
        category="link-local",
        networks=_nets("169.254.0.0/16", "fe80::/10"),
        phrase="link-local (cloud metadata lives there)",
        why="node-local services and cloud metadata; never a manager's pod address",
        permitted_by=Permit.ALLOW_LINK_LOCAL,
    ),
    Rule(
        category="multicast",
        networks=_nets("224.0.0.0/4", "ff00::/8"),
        phrase="a multicast address",
        why="a group address, not one host; HTTP cannot be delivered there",
        permitted_by=None,
    ),
    Rule(
        category="limited broadcast",
        networks=_nets("255.255.255.255/32"),
        phrase="the broadcast address",
        why="every host on the local link",
        permitted_by=None,
    ),
    Rule(
        category="reserved",
        networks=_nets("240.0.0.0/4"),
        phrase="a reserved address",
        why="class E, reserved for future use; nothing legitimate answers there",
        permitted_by=None,
    ),
)


def _last32(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)


def _compatible(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    # :: and ::1 are themselves unspecified and loopback, not the IPv4 addresses 0.0.0.0 and 0.0.0.1.
    return () if int(address) <= 1 else _last32(address)


def _rfc6052(value: int, prefix: int) -> ipaddress.IPv4Address | None:
    """The IPv4 address at an RFC 6052 (section 2.2) position, or None if that reading is invalid.

    Below /96 the address skips bits 64..71 (the "u" octet), which must be zero, as must the
    suffix after it; a reading that breaks either is not an address of that format.
    """
    if prefix == 96:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    bits = f"{value:0128b}"
    rest = bits[prefix:64] + bits[72:]
    if "1" in bits[64:72] or "1" in rest[32:]:
        return None
    return ipaddress.IPv4Address(int(rest[:32], 2))


def _local_nat64(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    # The operator chooses the prefix length inside the /48, and the broker cannot know it: every
    # valid reading is checked. The common /96 deployments stay usable: their other readings are
    # invalid unless the address ends in zero bits.
    readings = (_rfc6052(int(address), prefix) for prefix in (48, 56, 64, 96))
    return tuple(ip for ip in readings if ip is not None)


def _sixtofour(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return () if address.sixtofour is None else (address.sixtofour,)


def _teredo(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return () if address.teredo is None else address.teredo


@dataclasses.dataclass(frozen=True)
class Embedding:
    """An IPv6 range whose addresses carry IPv4 addresses that traffic may end up at."""

    name: str
    network: ipaddress.IPv6Network
    where: str
    extract: Callable[[ipaddress.IPv6Address], tuple[ipaddress.IPv4Address, ...]]


# The IPv6 address itself is checked too, and before what it embeds.
EMBEDDINGS: tuple[Embedding, ...] = (
    Embedding(
        name="IPv4-mapped",
        network=ipaddress.IPv6Network("::ffff:0:0/96"),
        where="last 32 bits",
        extract=_last32,
    ),
    Embedding(
        name="IPv4-translated",
        network=ipaddress.IPv6Network("::ffff:0:0:0/96"),
        where="last 32 bits",
        extract=_last32,
    ),
    Embedding(
        name="IPv4-compatible",
        network=ipaddress.IPv6Network("::/96"),
        where="last 32 bits (not `::` and `::1`)",
        extract=_compatible,
    ),
    Embedding(
        name="NAT64", network=ipaddress.IPv6Network("64:ff9b::/96"), where="last 32 bits", extract=_last32
    ),
    Embedding(
        name="local-use NAT64",
        network=ipaddress.IPv6Network("64:ff9b:1::/48"),
        where="every valid RFC 6052 position for a /48, /56, /64 or /96 prefix (the operator picks it)",
        extract=_local_nat64,
    ),
    Embedding(
        name="6to4", network=ipaddress.IPv6Network("2002::/16"), where="bits 16 to 48", extract=_sixtofour
    ),
    Embedding(
        name="Teredo",
        network=ipaddress.IPv6Network("2001::/32"),
        where="server (bits 32 to 64) and client (last 32, inverted)",
        extract=_teredo,
    ),
)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why an address is refused: the row it matched, and through which embedding if any."""

    address: IpAddress
    matched: IpAddress
    embedding: str
    rule: Rule

    @property
    def message(self) -> str:
        """A sentence for the caller, naming the setting that would permit it, if any."""
        if self.embedding:
            text = (
                f"callback address {self.address} embeds the IPv4 address {self.matched} "
                f"({self.embedding}), which is {self.rule.phrase}"
            )
        else:
            text = f"callback address {self.address} is {self.rule.phrase}"
        if self.rule.permitted_by is not None:
            text += f"; it is allowed only with {self.rule.permitted_by.value}"
        return text


def parse(text: str) -> IpAddress:
    """An address from resolver output or a URL host, without its IPv6 zone id (``fe80::1%eth0``).

    The zone only picks an interface; the checks are about the address. ValueError if not an address.
    """
    return ipaddress.ip_address(text.split("%", 1)[0])


def embedded(address: IpAddress) -> tuple[tuple[str, ipaddress.IPv4Address], ...]:
    """Every IPv4 address ``address`` carries, each with the name of its embedding."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    return tuple(
        (embedding.name, ip)
        for embedding in EMBEDDINGS
        if address in embedding.network
        for ip in embedding.extract(address)
    )


def refusal(
    address: IpAddress, *, allow_loopback: bool = False, allow_link_local: bool = False
) -> Refusal | None:
    """Why ``address`` may not be called, or None when it may.

    The address and every IPv4 address embedded in it are checked; any refusing row refuses.
    """
    granted = {Permit.ALLOW_LOOPBACK: allow_loopback, Permit.ALLOW_LINK_LOCAL: allow_link_local}
    candidates: list[tuple[str, IpAddress]] = [("", address), *embedded(address)]
    for name, candidate in candidates:
        for rule in RULES:
            if rule.matches(candidate) and not (rule.permitted_by and granted[rule.permitted_by]):
                return Refusal(address=address, matched=candidate, embedding=name, rule=rule)
    return None


def all_forms(address: IpAddress) -> tuple[IpAddress, ...]:
    """The address and every IPv4 address embedded in it: what a deny-list must be checked against."""
    return (address, *(ip for _, ip in embedded(address)))


LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_localhost_name(host: str) -> bool:
    """Names that mean this host without asking DNS (RFC 6761 ``.localhost``, /etc/hosts defaults)."""
    name = host.lower().removesuffix(".")
    return name in LOCALHOST_NAMES or name.endswith(".localhost")


_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
# WHATWG's "ends in a number": a last label that is all digits or 0x-hex makes the host an IPv4
# address to browsers and inet_aton, in whatever base it is written.
_NUMERIC_LABEL = re.compile(r"^([0-9]+|0x[0-9a-f]*)$", re.IGNORECASE)


def literal(host: str) -> IpAddress | None:
    """The address a URL host (as ``urllib.parse`` reports it: lower-case, unbracketed) names, if any.

    Only canonical forms count: call ``host_problem`` first to refuse the ambiguous ones.
    """
    try:
        return parse(host) if ":" in host else ipaddress.IPv4Address(host)
    except ValueError:
        return None


def host_problem(host: str, *, bracketed: bool) -> str | None:
    """What is wrong with a URL host, independent of any policy; None if it is well-formed.

    ``host`` is ``urllib.parse.urlsplit(url).hostname``: lower-cased, without the brackets, so the
    caller says whether there were any (``[v1.x]``, an "IPvFuture" literal, would otherwise pass as
    the name ``v1.x``).
    """
    if bracketed and ":" not in host:
        return f"[{host}] is not an IPv6 address: brackets are for IPv6 addresses only"
    if ":" in host:
        if "%" in host:
            return (
                f"{host!r} has an IPv6 zone id: scoped (link-local) addresses cannot be callback destinations"
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"[{host}] is not a valid IPv6 address"
        return None
    if not host.isascii():
        return f"{host!r} is not ASCII: write internationalised names in their xn-- (punycode) form"
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return (
            f"{host[:80]!r} is not a valid host name: use letters, digits, '-' and '_' in dot-separated "
            "labels of at most 63 characters"
        )
    if _NUMERIC_LABEL.match(labels[-1]) and not _is_dotted_quad(host):
        return (
            f"{host!r} is an ambiguous IPv4 address: write IPv4 addresses as four decimal numbers "
            "a.b.c.d (no octal, hexadecimal, integer, short or trailing-dot forms)"
        )
    return None


def _is_dotted_quad(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def markdown_tables() -> str:
    """The README's tables of refused categories and IPv6 embeddings, rendered from the code."""
    lines = [
        "| category | networks | why | permitted by |",
        "| --- | --- | --- | --- |",
    ]
    for rule in RULES:
        networks = ", ".join(f"`{net}`" for net in rule.networks)
        permit = f"`{rule.permitted_by.value}`" if rule.permitted_by else "never"
        lines.append(f"| {rule.category} | {networks} | {rule.why} | {permit} |")
    lines += [
        "",
        "| IPv6 embedding | network | embedded IPv4 address |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {e.name} | `{e.network}` | {e.where} |" for e in EMBEDDINGS]
    return "\n".join(lines) + "\n"
