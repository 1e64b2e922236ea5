"""Fetch or recompute: how much of a prompt's stored chain to take from the lower tiers, per call, from
costs this process measured: the model's prefill time and each tier's round trip and bandwidth.

- **Prefill** of ``n`` tokens after ``a`` cached ones costs ``c + s * F(a, n)``, where ``F`` counts the
  FLOPs (``2 x parameters`` per token plus attention, ``4 x layers x hidden`` per token and context
  position) and ``c`` (a forward's fixed cost: reading the weights) and ``s`` (seconds per FLOP) are
  fitted by least squares to the calls' own timings, grouped by size (``observe_prefill``).
- **A tier** fetch of ``b`` bytes in ``k`` batches costs ``rtt * (1 + k) + b / bandwidth``: ``rtt`` is
  the time of the tier's lookup (one round trip for a server), ``bandwidth`` what its fetches achieved,
  verification and the copy into the pool included (``observe_lookup``, ``observe_transfer``).
- **Cold start**: until a call was timed, ``s`` is one over a prior device speed (``PRIOR_FLOPS``:
  100 GFLOP/s on CPU, 100 TFLOP/s on CUDA), ``c`` the weights' bytes over a prior memory bandwidth
  (``PRIOR_MEMORY_BW``: 20 GB/s on CPU, 2 TB/s on CUDA), and each tier has a prior round trip and
  bandwidth (``PRIOR_TIERS``: a server 0.5 ms and 0.5 GB/s). Calls of one size fit ``c`` with ``s``
  kept at the prior; a second size fits both; a tier's first measurement replaces its prior.
- **Decision**: a stored chain continues device -> host -> disk -> remote, and only a prefix of it can
  be used, so the candidates are the cuts between tier segments. Recomputing a later token costs more
  (its attention spans more context) while every fetched block costs the same, so within one tier's
  segment the cheapest cut is at one of its ends. The cheapest candidate wins. A tier that is not
  ``cost_decided`` (host RAM, a local disk) is always used; a tier's ``min_tokens`` (``remote_min_tokens=``)
  replaces the decision with a fixed threshold. A skipped tier is re-measured with a one-block probe when
  that costs at most ``PROBE_SHARE`` of the call, so a link that got faster is noticed. The probed block
  is fetched, verified and timed, then dropped: loading it would turn a from-scratch prefill into one
  after a 16-token prefix, which needs an explicit attention mask and was measured ~20% slower (SmolLM2,
  2032 tokens, CPU: 5.0-5.3 s against 4.1-4.3 s).

The model only chooses how long a hit to use; every block used is still verified, so output stays exact.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PRIOR_FLOPS = {"cpu": 100e9, "cuda": 100e12, "mps": 5e12, "xpu": 50e12}  # effective FLOP/s of a device
DEFAULT_FLOPS = 1e12
PRIOR_MEMORY_BW = {
    "cpu": 20e9,
    "cuda": 2e12,
    "mps": 200e9,
    "xpu": 1e12,
}  # bytes/s: a forward reads the weights
DEFAULT_MEMORY_BW = 100e9
PRIOR_TIERS = {  # (round trip s, bandwidth bytes/s) until measured
    "host": (0.0, 5e9),
    "disk": (1e-4, 1e9),
    "remote": (5e-4, 5e8),
}
DEFAULT_TIER = (1e-3, 1e8)
SPAN = 8.0  # the prefill fit takes a rate from calls only when their FLOPs span this factor
LINK_DECAY = 0.5  # weight of a tier's earlier measurements: two fetches should notice a changed link
PROBE_SHARE = 0.02  # the most of a call's estimated cost a probe of a skipped tier may take


@dataclass
class Segment:
    """A run of the chain that one tier holds: ``blocks`` blocks of ``block_bytes`` from ``start``."""

    tier: str
    start: int
    blocks: int
    cost_decided: bool = True
    min_tokens: int | None = None  # the tier's fixed threshold, overriding the decision


@dataclass
class FetchPlan:
    """What one lookup took from the tiers and what it left to recompute, and why (estimated seconds)."""

    device_tokens: int = 0  # the chain already in the device pool
    available: dict[str, int] = field(default_factory=dict)  # tokens each lower tier holds beyond it
    fetch: dict[str, int] = field(default_factory=dict)  # tokens decided to fetch from each tier
    recompute_tokens: int = 0  # prompt tokens left to compute once the fetch is placed
    reason: str = ""
    estimates: dict[str, float] = field(default_factory=dict)  # seconds: each candidate's, and the chosen
    probe: str | None = None  # a tier fetched one block from only to measure it (the call does not use it)

    def as_dict(self) -> dict:
        return {
            "device_tokens": self.device_tokens,
            "available": dict(self.available),
            "fetch": dict(self.fetch),
            "recompute_tokens": self.recompute_tokens,
            "reason": self.reason,
            "estimates": dict(self.estimates),
            "probe": self.probe,
        }


class TierRate:
    """A tier's measured round trip and bandwidth (priors until measured)."""

    def __init__(self, name: str):
        self.rtt_s, self.bytes_per_s = PRIOR_TIERS.get(name, DEFAULT_TIER)
        self.measured = self.looked_up = False

    def seconds(self, nbytes: int, batches: int) -> float:
        return self.rtt_s * (1 + batches) + nbytes / self.bytes_per_s

    def observe_lookup(self, seconds: float) -> None:
        self.rtt_s = seconds if not self.looked_up else LINK_DECAY * self.rtt_s + (1 - LINK_DECAY) * seconds
        self.looked_up = True

    def observe_transfer(self, nbytes: int, seconds: float, batches: int) -> None:
        """Average seconds per byte (not bytes per second: one slow fetch must weigh as much as it cost)."""
        if nbytes <= 0 or seconds <= 0:
            return
        per_byte = max(seconds - self.rtt_s * batches, seconds * 0.1, 1e-9) / nbytes
        if self.measured:
            per_byte = LINK_DECAY / self.bytes_per_s + (1 - LINK_DECAY) * per_byte
        self.bytes_per_s = 1.0 / per_byte
        self.measured = True


class PrefillModel:
    """Prefill seconds ``c + s * F(a, n)``, fitted to timed calls grouped by size (a power of two of the
    tokens computed; each group an average with weight 0.5 for the newest call), so that many short
    calls do not erase what one long prefill showed. With calls of one size only, ``s`` stays the prior
    and ``c`` absorbs the rest: a short forward is bound by reading the weights, not by FLOPs."""

    def __init__(self, flops_per_token: float, attention_flops: float, device_type: str, weight_bytes=0.0):
        self.flops_per_token = flops_per_token
        self.attention_flops = attention_flops  # per token and context position
        self.prior_s = 1.0 / PRIOR_FLOPS.get(device_type, DEFAULT_FLOPS)
        self.prior_fixed_s = weight_bytes / PRIOR_MEMORY_BW.get(device_type, DEFAULT_MEMORY_BW)
        self.fixed_s, self.per_flop_s = self.prior_fixed_s, self.prior_s
        self._groups: dict[int, list[float]] = {}  # log2(tokens) -> [mean F, mean seconds]
        self.observations = 0

    def flops(self, start: int, tokens: int) -> float:
        return tokens * self.flops_per_token + self.attention_flops * tokens * (start + tokens / 2)

    def seconds(self, start: int, tokens: int) -> float:
        return self.fixed_s + self.per_flop_s * self.flops(start, tokens)

    def observe(self, start: int, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        f = self.flops(start, tokens)
        group = self._groups.get(tokens.bit_length())
        if group is None:
            self._groups[tokens.bit_length()] = [f, seconds]
        else:
            group[0], group[1] = (group[0] + f) / 2, (group[1] + seconds) / 2
        self.observations += 1
        self._fit()

    def _fit(self) -> None:
        points = list(self._groups.values())
        if max(f for f, _ in points) < SPAN * min(f for f, _ in points):
            # sizes too close to tell a rate from noise (16 and 32 new tokens, say): one point, their mean
            points = [[sum(f for f, _ in points) / len(points), sum(t for _, t in points) / len(points)]]
        if len(points) == 1:
            f, t = points[0]
            self.per_flop_s = self.prior_s if t > self.prior_s * f else t / f
            self.fixed_s = t - self.per_flop_s * f
            return
        n = len(points)
        sf, st = sum(f for f, _ in points), sum(t for _, t in points)
        sff, sft = sum(f * f for f, _ in points), sum(f * t for f, t in points)
        spread = n * sff - sf * sf
        slope = (n * sft - sf * st) / spread if spread > 0 else 0.0
        intercept = (st - slope * sf) / n
        if slope <= 0:  # noise: one rate through the origin
            slope, intercept = st / sf, 0.0
        elif intercept < 0:
            slope, intercept = sft / sff, 0.0
        self.fixed_s, self.per_flop_s = intercept, slope


class CostModel:
    """The measured costs of one store (one model on one device) and its tiers; thread-safe."""

    def __init__(
        self,
        flops_per_token: float,
        attention_flops: float,
        device_type: str = "cpu",
        weight_bytes: float = 0.0,
    ):
        self.prefill = PrefillModel(flops_per_token, attention_flops, device_type, weight_bytes)
        self.tiers: dict[str, TierRate] = {}
        self._lock = threading.Lock()

    def rate(self, tier: str) -> TierRate:
        with self._lock:
            return self.rate_locked(tier)

    def set_model(
        self, flops_per_token: float, attention_flops: float, device_type: str, weight_bytes: float = 0.0
    ) -> None:
        """The prior of a real model (``PrefixCache`` knows its parameters and device); keeps timings."""
        with self._lock:
            if self.prefill.observations == 0:
                self.prefill = PrefillModel(flops_per_token, attention_flops, device_type, weight_bytes)

    def observe_prefill(self, start: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.prefill.observe(start, tokens, seconds)

    def observe_lookup(self, tier: str, seconds: float) -> None:
        rate = self.rate(tier)
        with self._lock:
            rate.observe_lookup(seconds)

    def observe_transfer(self, tier: str, nbytes: int, seconds: float, batches: int) -> None:
        rate = self.rate(tier)
        with self._lock:
            rate.observe_transfer(nbytes, seconds, batches)

    def choose(
        self,
        device_blocks: int,
        total_tokens: int,
        segments: list[Segment],
        block_size: int,
        block_bytes: int,
        batch: int,
    ) -> tuple[int, FetchPlan]:
        """How many blocks of ``segments`` to fetch (a prefix of them), and the plan that says why."""
        start = device_blocks * block_size
        plan = FetchPlan(device_tokens=start)
        plan.available = {s.tier: s.blocks * block_size for s in segments}
        with self._lock:
            # candidate k: fetch segments[:k]; allowed where the next segment may be skipped
            cuts: list[tuple[int, float, str]] = []
            fetched, fetch_s, reachable = 0, 0.0, True
            for k in range(len(segments) + 1):
                following = segments[k] if k < len(segments) else None
                skip_ok = following is None or (following.cost_decided and following.min_tokens is None)
                if following is not None and following.min_tokens is not None:
                    skip_ok = following.blocks * block_size < following.min_tokens
                if reachable and skip_ok:
                    cost = fetch_s + self.prefill.seconds(
                        start + fetched * block_size, total_tokens - start - fetched * block_size
                    )
                    name = "recompute" if k == 0 else f"fetch {'+'.join(s.tier for s in segments[:k])}"
                    cuts.append((fetched, cost, name))
                if following is None:
                    break
                if following.min_tokens is not None and following.blocks * block_size < following.min_tokens:
                    reachable = False  # below the fixed threshold: the chain ends before it
                fetched += following.blocks
                fetch_s += self.rate_locked(following.tier).seconds(
                    following.blocks * block_bytes, -(-following.blocks // batch)
                )
            best = min(cuts, key=lambda cut: cut[1])
            plan.estimates = {name: round(cost, 6) for _, cost, name in cuts}
            blocks = best[0]
            plan.reason = self._reason(best, cuts, segments, blocks)
            skipped = self._first_skipped(segments, blocks)
            if skipped is not None and skipped.cost_decided and skipped.min_tokens is None:
                probe_s = self.rate_locked(skipped.tier).seconds(block_bytes, 1)
                if probe_s <= PROBE_SHARE * best[1]:
                    plan.probe = skipped.tier
        plan.fetch = self._per_tier(segments, blocks, block_size)
        plan.recompute_tokens = total_tokens - start - blocks * block_size
        return blocks, plan

    def rate_locked(self, tier: str) -> TierRate:
        return self.tiers.setdefault(tier, TierRate(tier))

    @staticmethod
    def _first_skipped(segments: list[Segment], blocks: int) -> Segment | None:
        """The segment whose first block is the first one not fetched, if the cut falls between two."""
        position = 0
        for segment in segments:
            if position == blocks:
                return segment
            position += segment.blocks
            if position > blocks:
                return None
        return None

    @staticmethod
    def _per_tier(segments: list[Segment], blocks: int, block_size: int) -> dict[str, int]:
        fetch: dict[str, int] = {}
        left = blocks
        for segment in segments:
            take = min(left, segment.blocks)
            if take > 0:
                fetch[segment.tier] = fetch.get(segment.tier, 0) + take * block_size
            left -= take
        return fetch

    def _reason(self, best, cuts, segments, blocks) -> str:
        below = [s.tier for s in segments if s.min_tokens is not None]
        others = ", ".join(f"{name} {cost * 1000:.1f} ms" for _, cost, name in cuts if name != best[2])
        text = f"{best[2]}: estimated {best[1] * 1000:.1f} ms" + (f" (vs {others})" if others else "")
        if below:
            text += f"; fixed threshold for {', '.join(below)}"
        if not self.prefill.observations:
            text += "; prefill not measured yet (prior)"
        return text


def model_costs(model) -> tuple[float, float, str, float]:
    """(FLOPs per token, attention FLOPs per token and context position, device type, weight bytes) of
    ``model``."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config.get_text_config(decoder=True)
    layers = getattr(config, "num_hidden_layers", 1) or 1
    heads = getattr(config, "num_attention_heads", 1) or 1
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads
    device = next(model.parameters()).device.type
    return 2.0 * params, 4.0 * layers * heads * head_dim, device, float(weight_bytes)


def layout_costs(layouts) -> tuple[float, float, str]:
    """A prior from the K/V layout alone (a store without a model): a hidden size four times the K/V
    width, 12 hidden^2 parameters per layer."""
    hidden = max(4 * layouts[0].num_heads * layouts[0].head_dim, 1) if layouts else 64
    layers = len(layouts) or 1
    return (
        2.0 * 12 * layers * hidden * hidden,
        4.0 * layers * hidden,
        layouts[0].device.type if layouts else "cpu",
    )
