"""What the broker can provision: engines, versions, size tiers and prices, with documented defaults.

The catalog is configuration (``broker serve --config FILE``, see ``broker.config``); the defaults
below are what a broker without a config file offers:

- engines: database = postgresql (port 5432), mysql (3306); cache = redis (6379); topic = kafka.
- versions: a desired version may float (``"15"``); provisioning resolves it to the newest concrete
  tag the catalog lists for it (``15`` -> ``15.2``), so a running ``15.2`` is expected drift.
- size tiers: per-replica cpu/memory requests and limits and storage (table ``DEFAULT_SIZES``).
- prices: per cpu core-month, GiB-month of memory and GiB-month of storage (``DEFAULT_PRICES``).
"""

from __future__ import annotations

import dataclasses
import re

from broker.domain import model

_VERSION = re.compile(r"^(0|[1-9]\d{0,3})(\.(0|[1-9]\d{0,3})){0,2}$")


@dataclasses.dataclass(frozen=True)
class Engine:
    """One engine: which resource type it serves, its container image and port, and its versions.

    ``versions`` lists the concrete versions the catalog knows, oldest first; floating versions
    resolve to the newest one they prefix.
    """

    name: str
    resource_type: model.ResourceType
    image: str
    port: int
    versions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Prices:
    """Monthly prices used for cost estimates, in one currency."""

    cpu_core_month: float
    memory_gib_month: float
    storage_gib_month: float


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Everything that configures what can be provisioned and what it costs."""

    engines: dict[str, Engine]
    sizes: dict[str, model.ComputeResources]
    prices: Prices
    max_replicas: int = 9

    def engines_for(self, resource_type: model.ResourceType) -> list[str]:
        """The names of the engines that serve a resource type, in a stable order."""
        return sorted(e.name for e in self.engines.values() if e.resource_type is resource_type)

    def resolve_version(self, engine: str, version: str) -> str:
        """The concrete version a (possibly floating) version resolves to.

        ``15`` resolves to the newest known ``15.x``; a version the catalog does not know is used
        as given, so a manager can ask for a tag newer than the catalog.
        """
        known = self.engines[engine].versions
        matches = [v for v in known if v == version or v.startswith(version + ".")]
        return max(matches, key=version_key) if matches else version


def is_valid_version(version: str) -> bool:
    """Whether ``version`` is ``MAJOR``, ``MAJOR.MINOR`` or ``MAJOR.MINOR.PATCH`` in plain digits."""
    return bool(_VERSION.match(version))


def version_key(version: str) -> tuple[int, ...]:
    """A sort key that orders versions numerically (``15.10`` after ``15.9``)."""
    return tuple(int(part) for part in version.split("."))


DEFAULT_ENGINES: dict[str, Engine] = {
    "postgresql": Engine(
        name="postgresql",
        resource_type=model.ResourceType.DATABASE,
        image="postgres",
        port=5432,
        versions=("14.11", "15.2", "16.2"),
    ),
    "mysql": Engine(
        name="mysql",
        resource_type=model.ResourceType.DATABASE,
        image="mysql",
        port=3306,
        versions=("8.0.36", "8.4.0"),
    ),
    "redis": Engine(
        name="redis",
        resource_type=model.ResourceType.CACHE,
        image="redis",
        port=6379,
        versions=("7.2.4",),
    ),
    "kafka": Engine(
        name="kafka",
        resource_type=model.ResourceType.TOPIC,
        image="",
        port=9092,
        versions=("3.7.0",),
    ),
}

DEFAULT_SIZES: dict[str, model.ComputeResources] = {
    "small": model.ComputeResources(
        cpu_request="250m", cpu_limit="500m", memory_request="512Mi", memory_limit="1Gi", storage="5Gi"
    ),
    "medium": model.ComputeResources(
        cpu_request="500m", cpu_limit="1", memory_request="1Gi", memory_limit="2Gi", storage="20Gi"
    ),
    "large": model.ComputeResources(
        cpu_request="1", cpu_limit="2", memory_request="4Gi", memory_limit="8Gi", storage="100Gi"
    ),
    "xlarge": model.ComputeResources(
        cpu_request="2", cpu_limit="4", memory_request="8Gi", memory_limit="16Gi", storage="500Gi"
    ),
}

# With these prices one medium replica (0.5 core, 1 GiB, 20 GiB) costs 45.50 a month, the seed's figure.
DEFAULT_PRICES = Prices(cpu_core_month=56.0, memory_gib_month=9.5, storage_gib_month=0.40)

DEFAULT_CATALOG = Catalog(engines=DEFAULT_ENGINES, sizes=DEFAULT_SIZES, prices=DEFAULT_PRICES)
