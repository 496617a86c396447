"""The pure SandboxPool rules: the plan (stale pods replaced, shortfall, surplus), leaked workspace
claims, the claimed count and pod signatures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_operator.api.names import (
    CLAIMED_FROM_POOL_ANNOTATION,
    POD_SIGNATURE_ANNOTATION,
    POOL_LABEL,
    SANDBOX_LABEL,
    PoolReason,
)
from sandbox_operator.lifecycle.pool import (
    PoolPlan,
    count_claimed,
    is_claimable,
    is_offerable,
    is_pool_claim,
    is_stale,
    may_claim_warm_pod,
    orphaned_claims,
    plan_pool,
    pod_signature,
    pool_readiness,
    pool_status_patch,
    unusable_pods,
    warm_pod_selector,
)

SIG = "current"
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
GRACE = timedelta(seconds=10)
PHASES = ["Pending", "Running", "Failed", "Succeeded", "Unknown"]


def warm(
    name: str,
    phase: str = "Running",
    ready: bool = True,
    signature: str | None = SIG,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {POOL_LABEL: "warm"}}
    if signature is not None:
        metadata["annotations"] = {POD_SIGNATURE_ANNOTATION: signature}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": metadata, "status": {"phase": phase, "conditions": conditions}}


def pvc(
    name: str,
    labels: dict[str, str] | None = None,
    age: timedelta = timedelta(minutes=5),
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {POOL_LABEL: "warm"} if labels is None else labels,
        "creationTimestamp": (NOW - age).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": metadata}


def names(pods: list[dict[str, Any]]) -> set[str]:
    return {p["metadata"]["name"] for p in pods}


# --- is_claimable / is_stale ----------------------------------------------------------------------


def test_only_running_ready_live_pods_are_claimable() -> None:
    assert is_claimable(warm("a"))
    assert not is_claimable(warm("a", ready=False))
    assert not is_claimable(warm("a", phase="Pending"))
    assert not is_claimable(warm("a", deleting=True))
    assert not is_claimable(warm("a", phase="Failed"))


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_finished_pods_are_stale_even_without_a_known_signature(phase: str) -> None:
    assert is_stale(warm("a", phase=phase), SIG)
    assert is_stale(warm("a", phase=phase), None)


def test_pods_of_another_template_version_are_stale() -> None:
    assert is_stale(warm("a", signature="old"), SIG)
    assert is_stale(warm("a", signature=None), SIG)  # built before signatures existed
    assert not is_stale(warm("a"), SIG)
    assert not is_stale(warm("a", signature="old"), None)  # unknown template: cannot judge


# --- plan_pool: examples --------------------------------------------------------------------------


def test_an_empty_pool_creates_its_size() -> None:
    plan = plan_pool(3, [], SIG)
    assert (plan.ready, plan.to_create, plan.to_delete) == (0, 3, ())


def test_a_failed_warm_pod_is_deleted_and_replaced() -> None:
    plan = plan_pool(2, [warm("a"), warm("b", phase="Failed", ready=False)], SIG)
    assert plan.to_delete == ("b",) and plan.stale == ("b",)
    assert plan.to_create == 1
    assert plan.ready == 1


def test_a_template_change_replaces_every_outdated_pod() -> None:
    plan = plan_pool(2, [warm("a", signature="old"), warm("b", signature="old")], SIG)
    assert set(plan.to_delete) == {"a", "b"} and plan.to_create == 2 and plan.ready == 0


def test_pods_named_unusable_are_replaced() -> None:
    plan = plan_pool(2, [warm("a"), warm("b")], SIG, unusable={"b"})
    assert plan.to_delete == ("b",) and plan.to_create == 1 and plan.ready == 1


def test_pods_being_deleted_count_for_nothing_and_are_not_deleted_again() -> None:
    plan = plan_pool(1, [warm("a", deleting=True)], SIG)
    assert plan.to_create == 1 and plan.to_delete == () and plan.ready == 0


def test_surplus_goes_not_ready_first() -> None:
    plan = plan_pool(1, [warm("a"), warm("b", phase="Pending", ready=False)], SIG)
    assert plan.to_delete == ("b",) and plan.to_create == 0


def test_without_a_signature_only_finished_pods_are_replaced() -> None:
    plan = plan_pool(2, [warm("a", signature="whatever"), warm("b", phase="Succeeded")], None)
    assert plan.to_delete == ("b",) and plan.to_create == 1


# --- plan_pool: properties ------------------------------------------------------------------------

pod_lists = st.lists(
    st.builds(
        lambda phase, ready, current, deleting: (phase, ready, current, deleting),
        st.sampled_from(PHASES),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    max_size=12,
).map(
    lambda specs: [
        warm(f"p{i}", phase=phase, ready=ready, signature=SIG if current else "old", deleting=deleting)
        for i, (phase, ready, current, deleting) in enumerate(specs)
    ]
)


def remaining(pods: list[dict[str, Any]], plan: PoolPlan) -> list[dict[str, Any]]:
    """The live pods the plan keeps."""
    gone = set(plan.to_delete)
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and p["metadata"]["name"] not in gone]


@given(size=st.integers(0, 10), pods=pod_lists, known=st.booleans())
def test_the_plan_converges_to_size_current_live_pods(size: int, pods: list[dict[str, Any]], known: bool) -> None:
    signature = SIG if known else None
    plan = plan_pool(size, pods, signature)
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    kept = remaining(pods, plan)
    # After the plan: exactly `size` live pods, none of them stale.
    assert len(kept) + plan.to_create == size
    assert not any(is_stale(p, signature) for p in kept)
    # It deletes only live pods, each once, and every stale one.
    assert len(set(plan.to_delete)) == len(plan.to_delete)
    assert set(plan.to_delete) <= names(live)
    assert set(plan.stale) == {p["metadata"]["name"] for p in live if is_stale(p, signature)}
    assert set(plan.stale) <= set(plan.to_delete)
    # Never create and delete healthy pods at once.
    assert plan.to_create == 0 or set(plan.to_delete) == set(plan.stale)
    # Ready counts the claimable pods that stay in the pool (not the stale ones).
    healthy = [p for p in live if p["metadata"]["name"] not in plan.stale]
    assert plan.ready == sum(1 for p in healthy if is_claimable(p))


@given(size=st.integers(0, 10), pods=pod_lists)
def test_surplus_never_takes_a_ready_pod_while_a_not_ready_one_stays(size: int, pods: list[dict[str, Any]]) -> None:
    plan = plan_pool(size, pods, SIG)
    surplus = set(plan.to_delete) - set(plan.stale)
    by_name = {p["metadata"]["name"]: p for p in pods}
    kept = remaining(pods, plan)
    if any(is_claimable(by_name[n]) for n in surplus):
        assert all(is_claimable(p) for p in kept)


@given(size=st.integers(0, 10), pods=pod_lists)
def test_the_plan_is_a_fixed_point_once_carried_out(size: int, pods: list[dict[str, Any]]) -> None:
    plan = plan_pool(size, pods, SIG)
    after = remaining(pods, plan)
    after += [warm(f"new{i}", phase="Pending", ready=False) for i in range(plan.to_create)]
    again = plan_pool(size, after, SIG)
    assert (again.to_create, again.to_delete) == (0, ())


# --- orphaned_claims ------------------------------------------------------------------------------


def test_an_unused_pool_claim_is_deleted() -> None:
    sweep = orphaned_claims("warm", [pvc("a-ws"), pvc("b-ws")], {"b-ws"}, NOW, GRACE)
    assert sweep.to_delete == ("a-ws",) and sweep.recheck_at is None


def test_a_claim_handed_to_a_sandbox_is_never_deleted() -> None:
    claimed = pvc("a-ws", labels={SANDBOX_LABEL: "sb"})
    half_labelled = pvc("b-ws", labels={POOL_LABEL: "warm", SANDBOX_LABEL: "sb"})
    assert orphaned_claims("warm", [claimed, half_labelled], set(), NOW, GRACE).to_delete == ()


def test_claims_of_other_pools_and_claims_being_deleted_are_left_alone() -> None:
    other = pvc("a-ws", labels={POOL_LABEL: "other"})
    going = pvc("b-ws", deleting=True)
    assert orphaned_claims("warm", [other, going], set(), NOW, GRACE).to_delete == ()


def test_a_young_claim_waits_for_its_grace_and_says_when_to_look_again() -> None:
    young = pvc("a-ws", age=timedelta(seconds=3))
    younger = pvc("b-ws", age=timedelta(seconds=1))
    sweep = orphaned_claims("warm", [young, younger], set(), NOW, GRACE)
    assert sweep.to_delete == ()
    assert sweep.recheck_at == NOW + timedelta(seconds=7)


def test_a_released_claim_goes_at_once() -> None:
    young = pvc("a-ws", age=timedelta(seconds=1))
    assert orphaned_claims("warm", [young], set(), NOW, GRACE, released={"a-ws"}).to_delete == ("a-ws",)


def test_a_claim_without_creation_time_counts_as_old() -> None:
    claim = pvc("a-ws")
    del claim["metadata"]["creationTimestamp"]
    assert orphaned_claims("warm", [claim], set(), NOW, GRACE).to_delete == ("a-ws",)


claim_specs = st.lists(
    st.tuples(
        st.sampled_from(["pool", "other-pool", "sandbox", "both"]),
        st.integers(0, 30),  # age in seconds
        st.booleans(),  # mounted by a pod
        st.booleans(),  # being deleted
        st.booleans(),  # released by the caller
    ),
    max_size=10,
)
LABELS = {
    "pool": {POOL_LABEL: "warm"},
    "other-pool": {POOL_LABEL: "other"},
    "sandbox": {SANDBOX_LABEL: "sb"},
    "both": {POOL_LABEL: "warm", SANDBOX_LABEL: "sb"},
}


@given(specs=claim_specs)
def test_the_sweep_deletes_exactly_the_unused_pool_claims_past_grace(
    specs: list[tuple[str, int, bool, bool, bool]],
) -> None:
    claims = [
        pvc(f"c{i}", labels=LABELS[kind], age=timedelta(seconds=age), deleting=deleting)
        for i, (kind, age, _, deleting, _) in enumerate(specs)
    ]
    in_use = {f"c{i}" for i, spec in enumerate(specs) if spec[2]}
    released = {f"c{i}" for i, spec in enumerate(specs) if spec[4]}
    sweep = orphaned_claims("warm", claims, in_use, NOW, GRACE, released)
    expected = set()
    waiting = []
    for i, (kind, age, mounted, deleting, was_released) in enumerate(specs):
        if kind != "pool" or mounted or deleting:
            continue
        if was_released or age >= GRACE.total_seconds():
            expected.add(f"c{i}")
        else:
            waiting.append(NOW - timedelta(seconds=age) + GRACE)
    assert set(sweep.to_delete) == expected
    assert not set(sweep.to_delete) & in_use
    assert all(is_pool_claim("warm", c) for c in claims if c["metadata"]["name"] in sweep.to_delete)
    assert sweep.recheck_at == (min(waiting) if waiting else None)


# --- count_claimed --------------------------------------------------------------------------------


def claimed_pod(
    name: str, pool: str = "warm", phase: str = "Running", deleting: bool = False, sandbox: str | None = "sb"
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {SANDBOX_LABEL: sandbox} if sandbox else {},
        "annotations": {CLAIMED_FROM_POOL_ANNOTATION: pool},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": metadata, "status": {"phase": phase}}


def test_claimed_counts_live_sandbox_pods_taken_from_this_pool() -> None:
    pods = [
        claimed_pod("a"),
        claimed_pod("b"),
        claimed_pod("c", pool="other"),
        claimed_pod("d", deleting=True),
        claimed_pod("e", phase="Failed"),
        claimed_pod("f", sandbox=None),  # still a warm pod (no sandbox label)
        warm("g"),
        {"metadata": {"name": "h", "labels": {SANDBOX_LABEL: "cold"}}, "status": {"phase": "Running"}},
    ]
    assert count_claimed("warm", pods) == 2
    assert count_claimed("other", pods) == 1
    assert count_claimed("none", pods) == 0


# --- pod_signature --------------------------------------------------------------------------------


def spec_pod(sandbox_id: str, claim: str, hostname: str, image: str = "img:1") -> dict[str, Any]:
    return {
        "spec": {
            "hostname": hostname,
            "containers": [
                {
                    "name": "sandbox",
                    "image": image,
                    "env": [{"name": "SANDBOX_ID", "value": sandbox_id}, {"name": "MODE", "value": "x"}],
                }
            ],
            "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": claim}}],
        }
    }


def test_identity_does_not_enter_the_signature_but_the_spec_does() -> None:
    base = pod_signature(spec_pod("a", "sbx-a-workspace", "a"))
    assert pod_signature(spec_pod("b", "sbx-b-workspace", "b")) == base
    assert pod_signature(spec_pod("a", "sbx-a-workspace", "a", image="img:2")) != base


def test_the_signature_does_not_change_its_input() -> None:
    pod = spec_pod("a", "sbx-a-workspace", "a")
    before = repr(pod)
    pod_signature(pod)
    assert repr(pod) == before


# --- claims: when a sandbox may take a warm pod, and which -----------------------------------------


def with_claim(pod: dict[str, Any], claim: str) -> dict[str, Any]:
    return {**pod, "spec": {"volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": claim}}]}}


@pytest.mark.parametrize(
    ("status", "has_workspace", "creates_pod", "may"),
    [
        ({}, False, True, True),  # a first start
        ({"phase": "Creating"}, False, True, True),
        ({}, True, True, False),  # it has a workspace already (e.g. taken over after an interrupted claim)
        ({}, False, False, False),  # no pod wanted (created suspended)
        ({"phase": "Resuming"}, False, True, False),  # a resume keeps the sandbox's workspace
        ({"phase": "Running"}, False, True, False),  # a recreate too
        ({"phase": "Creating", "startedAt": "2026-01-01T00:00:00Z"}, False, True, False),  # an Error retry
    ],
)
def test_only_a_first_start_may_claim_a_warm_pod(
    status: dict[str, Any], has_workspace: bool, creates_pod: bool, may: bool
) -> None:
    assert may_claim_warm_pod(status, has_workspace=has_workspace, creates_pod=creates_pod) is may


def test_an_offerable_pod_matches_is_ready_and_its_claim_is_the_pools() -> None:
    claims = {"c1": pvc("c1")}
    assert is_offerable("warm", with_claim(warm("a"), "c1"), SIG, claims)
    assert is_offerable("warm", warm("no-claim"), SIG, {})  # an emptyDir workspace
    assert not is_offerable("warm", with_claim(warm("a"), "c1"), "other-signature", claims)
    assert not is_offerable("warm", with_claim(warm("a", ready=False), "c1"), SIG, claims)
    assert not is_offerable("warm", with_claim(warm("a"), "unknown"), SIG, claims)
    taken = {"c1": pvc("c1", labels={SANDBOX_LABEL: "sb"})}
    assert not is_offerable("warm", with_claim(warm("a"), "c1"), SIG, taken)
    assert not is_offerable("warm", with_claim(warm("a"), "c1"), SIG, {"c1": pvc("c1", deleting=True)})


def test_pods_whose_claim_was_taken_or_is_going_are_unusable() -> None:
    pods = [with_claim(warm("ok"), "c-ok"), with_claim(warm("taken"), "c-taken"), with_claim(warm("gone"), "c-gone")]
    claims = {
        "c-ok": pvc("c-ok"),
        "c-taken": pvc("c-taken", labels={SANDBOX_LABEL: "sb"}),
        "c-gone": pvc("c-gone", deleting=True),
    }
    assert unusable_pods("warm", pods, claims) == {"taken", "gone"}
    assert unusable_pods("warm", [with_claim(warm("unknown"), "c-x")], {}) == set()  # not in the store yet


# --- status ---------------------------------------------------------------------------------------


def test_readiness_reasons() -> None:
    assert pool_readiness(3, 3) == (PoolReason.FILLED, "3/3 warm pods ready")
    assert pool_readiness(3, 1) == (PoolReason.FILLING, "1/3 warm pods ready")
    assert pool_readiness(1, 3) == (PoolReason.DRAINING, "3/1 warm pods ready; deleting the surplus")
    assert pool_readiness(3, 3, "base") == (PoolReason.TEMPLATE_NOT_FOUND, 'SandboxTemplate "base" not found')
    assert pool_readiness(3, 3, None, "no") == (PoolReason.TEMPLATE_NOT_ALLOWED, "no")


def status(**fields: Any) -> dict[str, Any]:
    reason, message = pool_readiness(
        fields.get("size", 2), fields.get("ready", 2), fields.get("missing"), fields.get("refused")
    )
    return pool_status_patch(
        fields.get("current", {}),
        pool=fields.get("pool", "warm"),
        generation=fields.get("generation", 1),
        size=fields.get("size", 2),
        ready=fields.get("ready", 2),
        claimed=fields.get("claimed", 0),
        reason=reason,
        message=message,
        now=fields.get("now", NOW),
    )


def by_type(patch: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}


def test_a_full_pool_is_ready() -> None:
    patch = status()
    assert (patch["ready"], patch["claimed"], patch["observedGeneration"]) == (2, 0, 1)
    assert by_type(patch) == {
        "Ready": ("True", "Filled"),
        "Reconciling": ("False", "Filled"),
        "Stalled": ("False", "Filled"),
    }
    assert {c["lastTransitionTime"] for c in patch["conditions"]} == {"2026-01-01T12:00:00Z"}
    assert {c["observedGeneration"] for c in patch["conditions"]} == {1}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ready": 1}, {"Ready": "False", "Reconciling": "True", "Stalled": "False"}),  # filling
        ({"ready": 3}, {"Ready": "True", "Reconciling": "True", "Stalled": "False"}),  # draining
        ({"size": 0, "ready": 0}, {"Ready": "True", "Reconciling": "False", "Stalled": "False"}),
        ({"missing": "base"}, {"Ready": "False", "Reconciling": "False", "Stalled": "True"}),
        ({"refused": "not here", "ready": 0}, {"Ready": "False", "Reconciling": "False", "Stalled": "True"}),
    ],
)
def test_pool_conditions_follow_kstatus(fields: dict[str, Any], expected: dict[str, str]) -> None:
    assert {kind: state for kind, (state, _) in by_type(status(**fields)).items()} == expected


def test_a_filling_pool_or_one_without_template_is_not_ready() -> None:
    assert by_type(status(ready=1))["Ready"] == ("False", "Filling")
    assert by_type(status(missing="base"))["Stalled"] == ("True", "TemplateNotFound")
    assert by_type(status(refused="the template's allowedNamespaces exclude team-a"))["Stalled"] == (
        "True",
        "TemplateNotAllowed",
    )


def test_a_new_generation_rewrites_the_conditions() -> None:
    first = status()
    again = status(current={**first}, generation=2)
    assert again["observedGeneration"] == 2
    assert {c["observedGeneration"] for c in again["conditions"]} == {2}
    # Still True: the transition time stays.
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"2026-01-01T12:00:00Z"}


def test_conditions_of_other_types_are_kept() -> None:
    foreign = {"type": "Audited", "status": "True", "reason": "Checked", "message": ""}
    first = status()
    patch = status(current={**first, "conditions": [*first["conditions"], foreign]}, claimed=1)
    assert patch == {"claimed": 1}
    changed = status(current={**first, "conditions": [*first["conditions"], foreign]}, ready=1)
    assert changed["conditions"][-1] == foreign


def test_the_status_names_the_warm_pods_selector() -> None:
    assert warm_pod_selector("warm") == "app.kubernetes.io/managed-by=sandbox-operator,sandbox.dev/pool=warm"
    first = status(pool="warm")
    assert first["selector"] == warm_pod_selector("warm")
    assert "selector" not in status(current=first, pool="warm")  # written once, not on every pass
    assert status(current=first, pool="warm", ready=1)["conditions"]  # other changes still written


def test_nothing_changed_nothing_written() -> None:
    first = status()
    assert status(current=first, now=NOW + timedelta(hours=1)) == {}


def test_the_transition_time_moves_only_with_the_status() -> None:
    first = status(ready=1)
    still_filling = status(current=first, ready=0, now=NOW + timedelta(minutes=1))
    assert still_filling["ready"] == 0
    assert still_filling["conditions"][0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # False -> False
    assert still_filling["conditions"][1]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # Reconciling True
    filled = status(current=first, ready=2, now=NOW + timedelta(minutes=2))
    assert filled["conditions"][0]["lastTransitionTime"] == "2026-01-01T12:02:00Z"  # False -> True
    assert filled["conditions"][1]["lastTransitionTime"] == "2026-01-01T12:02:00Z"  # Reconciling True -> False
