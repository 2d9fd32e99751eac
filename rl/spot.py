"""Spot and on-demand capacity: prices, interruptions and where new replicas go."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpotConfig", "place_new_pods", "pods_to_remove"]


@dataclass(frozen=True)
class SpotConfig:
    """One model-server pod per GPU node. Prices are per node-hour (defaults: an AWS g5.xlarge-class node,
    spot about 65% cheaper; spot discounts run 60–90%). Interruptions arrive as a Poisson process per
    spot node-hour, each announced `notice_s` before the node goes (AWS gives 2 minutes); Karpenter
    starts a replacement at once, ready after `replacement_delay_s` plus the pod's own cold start.
    With `drain_on_notice`, the noticed pod takes no new requests and finishes its in-flight ones;
    requests still running when the node goes fail."""

    on_demand_price_per_hour: float = 1.006
    spot_price_per_hour: float = 0.35
    interruptions_per_node_hour: float = 0.05
    notice_s: float = 120.0
    replacement_delay_s: float = 60.0
    drain_on_notice: bool = True

    def price_per_second(self, on_demand_pods: float, spot_pods: float) -> float:
        return (on_demand_pods * self.on_demand_price_per_hour + spot_pods * self.spot_price_per_hour) / 3600.0


def place_new_pods(count: int, on_demand: int, spot: int, spot_share: float) -> int:
    """How many of `count` new pods go on spot so that the spot share of all pods approaches
    `spot_share` (rounded to the nearest pod)."""
    total = on_demand + spot + count
    wanted_spot = int(round(spot_share * total))
    return min(count, max(0, wanted_spot - spot))


def pods_to_remove(count: int, on_demand: int, spot: int, spot_share: float) -> int:
    """How many of `count` pods to remove come off spot, to approach `spot_share` of what remains."""
    remaining = on_demand + spot - count
    wanted_spot = int(round(spot_share * remaining))
    from_spot = min(count, max(0, spot - wanted_spot))
    # Never remove more on-demand pods than exist.
    return max(from_spot, count - on_demand)
