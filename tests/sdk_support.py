"""Helpers that drive the official ``traffical`` Python SDK against a collector.

End-to-end tests use these to make the real SDK (not hand-written JSON) POST
``decision``, ``exposure`` and ``track`` events to ``{base_url}/v1/events/batch``,
so the collector is checked against the wire format clients actually send.
The config bundle is supplied inline, so the SDK makes no config request; the
only HTTP traffic is the events batch sent by ``client.flush_events()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from traffical import Decision, TrafficalClient, TrafficalClientOptions
from traffical.config.source import InlineConfigSource

LAYER_ID: Final = "layer_checkout"
POLICY_ID: Final = "pol_checkout_button"
POLICY_KEY: Final = "checkout-button"
PARAMETER_KEY: Final = "checkout.button_color"
PARAMETER_DEFAULT: Final = "gray"
UNIT_KEY_FIELD: Final = "userId"
BUCKET_COUNT: Final = 1000

# With the SHA-256 v2 hash and LAYER_ID above: "user-1" -> bucket 322
# (control, buckets 0-499), "user-2" -> bucket 540 (treatment, 500-999).
CONTROL_UNIT: Final = "user-1"
TREATMENT_UNIT: Final = "user-2"

PURCHASE_EVENT: Final = "purchase"
PAGE_VIEW_EVENT: Final = "page_view"

# Event types, in queue (and therefore batch) order, sent by drive_sdk().
EXPECTED_EVENT_TYPES: Final = ("decision", "decision", "exposure", "track", "track")

# Large batch and long interval: nothing is sent in the background, and one
# flush_events() call delivers every queued event in a single POST.
_BATCH_SIZE: Final = 100
_FLUSH_INTERVAL_SECONDS: Final = 3600.0
_READY_TIMEOUT_SECONDS: Final = 5.0


@dataclass(frozen=True)
class SdkRun:
    """What drive_sdk() did, for tests to match against collected events."""

    decisions: tuple[Decision, ...]
    flushed: bool

    @property
    def decision_ids(self) -> tuple[str, ...]:
        return tuple(decision.decision_id for decision in self.decisions)


def _allocation(name: str, start: int, end: int, color: str) -> dict[str, Any]:
    return {
        "id": f"alloc_{name}",
        "key": name,
        "name": name,
        "bucketRange": [start, end],
        "overrides": {PARAMETER_KEY: color},
    }


def _policy() -> dict[str, Any]:
    half = BUCKET_COUNT // 2
    return {
        "id": POLICY_ID,
        "key": POLICY_KEY,
        "state": "running",
        "kind": "static",
        "stateVersion": "sv_1",
        "conditions": [],
        "contextLogging": {"allowedFields": ["country"]},
        "allocations": [
            _allocation("control", 0, half - 1, "blue"),
            _allocation("treatment", half, BUCKET_COUNT - 1, "green"),
        ],
    }


def inline_bundle(
    *, org_id: str = "org_test", project_id: str = "proj_test", env: str = "production"
) -> dict[str, Any]:
    """A config bundle: one layer, one running 50/50 policy, one parameter.

    Valid for ``ConfigBundle.from_dict``. Units are hashed on the ``userId``
    context field into 1000 buckets; every bucket belongs to an allocation,
    so any decide() with a ``userId`` gets a real policy and allocation.
    The policy logs the ``country`` context field, so decision and exposure
    events also carry ``context``.
    """
    return {
        "version": "2024-01-01T00:00:00.000Z",
        "orgId": org_id,
        "projectId": project_id,
        "env": env,
        "hashing": {"unitKey": UNIT_KEY_FIELD, "bucketCount": BUCKET_COUNT},
        "parameters": [
            {
                "key": PARAMETER_KEY,
                "type": "string",
                "default": PARAMETER_DEFAULT,
                "layerId": LAYER_ID,
                "namespace": "checkout",
            }
        ],
        "layers": [{"id": LAYER_ID, "policies": [_policy()]}],
    }


def sdk_client(
    base_url: str,
    api_key: str,
    *,
    org_id: str = "org_test",
    project_id: str = "proj_test",
    env: str = "production",
) -> TrafficalClient:
    """A TrafficalClient that sends events only to ``base_url``, on demand.

    The bundle is inline (``local_config`` makes it available at once, the
    ``InlineConfigSource`` stops the SDK fetching it over HTTP), background
    refresh is off, and events leave only on ``flush_events()``/``close()``.
    Retries are off so an unreachable collector fails fast: the batch is then
    re-queued and ``flush_events()`` returns False. Close the client when done.
    """
    bundle = inline_bundle(org_id=org_id, project_id=project_id, env=env)
    options = TrafficalClientOptions(
        api_key=api_key,
        org_id=org_id,
        project_id=project_id,
        env=env,
        base_url=base_url,
        local_config=bundle,
        config_source=InlineConfigSource(bundle),
        refresh_interval_seconds=0,
        batch_size=_BATCH_SIZE,
        flush_interval_seconds=_FLUSH_INTERVAL_SECONDS,
        event_max_retries=0,
    )
    client = TrafficalClient(options)
    client.wait_for_ready(_READY_TIMEOUT_SECONDS)
    return client


def _decide(client: TrafficalClient, unit: str) -> Decision:
    context = {UNIT_KEY_FIELD: unit, "country": "DE", "plan": "pro"}
    return client.decide(context, {PARAMETER_KEY: PARAMETER_DEFAULT})


def drive_sdk(client: TrafficalClient) -> SdkRun:
    """Sends one of each SDK event kind, then flushes; returns the decisions.

    Five events go out, in this order, in one POST (see EXPECTED_EVENT_TYPES):

    1. ``decision`` for CONTROL_UNIT (layer allocationName "control").
    2. ``decision`` for TREATMENT_UNIT (allocationName "treatment").
    3. ``exposure`` for the first decision (same ``decisionId``).
    4. ``track`` PURCHASE_EVENT for CONTROL_UNIT with ``properties``,
       ``value``, ``values``, ``decisionId`` and the ``attribution`` the SDK
       derives from that decision.
    5. ``track`` PAGE_VIEW_EVENT for TREATMENT_UNIT: no decision link.

    The SDK deduplicates decisions and exposures per client, so calling this
    twice on one client sends only the two ``track`` events the second time.
    """
    first = _decide(client, CONTROL_UNIT)
    second = _decide(client, TREATMENT_UNIT)
    client.track_exposure(first)
    client.track(
        PURCHASE_EVENT,
        {"sku": "SKU-42", "quantity": 2, "coupon": None},
        decision_id=first.decision_id,
        unit_key=CONTROL_UNIT,
        value=49.99,
        values={"revenue": 49.99, "items": 2},
    )
    client.track(PAGE_VIEW_EVENT, {"path": "/checkout"}, unit_key=TREATMENT_UNIT)
    flushed = client.flush_events(timeout=10.0)
    return SdkRun(decisions=(first, second), flushed=flushed)
