"""What a ServedModel becomes: a Knative Service with Knative's autoscaling annotations."""

from agentkube.operator import api, servedmodel

BODY = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": "llm", "namespace": "ml", "uid": "u-2"}}
A = servedmodel.AUTOSCALING


def _spec(**autoscaling) -> api.ServedModelSpec:
    return api.ServedModelSpec.model_validate({
        "model": {"name": "llama", "uri": "pvc://m"}, "image": "vllm", "port": 8000, "autoscaling": autoscaling,
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "24Gi"}},
    })


def test_kpa_annotations_follow_the_spec():
    spec = _spec(target=8, targetUtilization=80, minScale=1, maxScale=10, initialScale=2)
    service = servedmodel.knative_service_manifest(BODY, spec, 8)
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        f"{A}/class": "kpa.autoscaling.knative.dev", f"{A}/metric": "concurrency", f"{A}/target": "8",
        f"{A}/target-utilization-percentage": "80", f"{A}/min-scale": "1", f"{A}/max-scale": "10", f"{A}/initial-scale": "2",
    }
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "24Gi"}
    assert container["ports"] == [{"containerPort": 8000}]
    assert {"name": "MODEL_URI", "value": "pvc://m"} in container["env"]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "u-2"


def test_defaults_are_knatives():
    annotations = servedmodel.autoscaling_annotations(api.Autoscaling(), 100)
    assert annotations[f"{A}/target"] == "100" and annotations[f"{A}/target-utilization-percentage"] == "70"
    assert annotations[f"{A}/min-scale"] == "0" and annotations[f"{A}/max-scale"] == "0"


def test_scale_to_zero_off_keeps_one_replica():
    annotations = servedmodel.autoscaling_annotations(api.Autoscaling(scale_to_zero=False), 100)
    assert annotations[f"{A}/min-scale"] == "1"


def test_fixed_pins_the_replica_count():
    annotations = servedmodel.autoscaling_annotations(api.Autoscaling(policy="fixed", min_scale=3, max_scale=3), 100)
    assert annotations[f"{A}/min-scale"] == annotations[f"{A}/max-scale"] == "3" and f"{A}/target" not in annotations


def test_ppo_runs_the_last_decision_and_others_the_spec():
    status = api.ServedModelStatus(concurrency_target=17)
    assert servedmodel.concurrency_target(_spec(policy="ppo", target=8), status) == 17
    assert servedmodel.concurrency_target(_spec(policy="ppo", target=8), api.ServedModelStatus()) == 8
    assert servedmodel.concurrency_target(_spec(policy="kpa", target=8), status) == 8


def test_readiness_and_url_come_from_knative_status():
    ready = {"status": {"url": "http://llm.ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert servedmodel.knative_readiness(ready) == (True, "http://llm.ml.example.com")
    assert servedmodel.knative_readiness(None) == (False, None)


def test_the_template_keeps_the_specs_target_whatever_the_policy_decided():
    # A decision must never change the template: Knative stamps a new Revision for any template change.
    assert servedmodel.template_target(_spec(policy="ppo", target=8)) == 8


def test_the_target_and_floor_in_force_go_onto_every_pod_autoscaler_that_differs():
    def pa(name, target=None, min_scale=None, deleting=False):
        annotations = ({f"{A}/target": target} if target else {}) | ({f"{A}/min-scale": min_scale} if min_scale else {})
        metadata = {"name": name, "annotations": annotations}
        if deleting:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": metadata}

    patches = servedmodel.pod_autoscaler_patches(
        [pa("llm-00001", "8", "3"), pa("llm-00002", "12", "3"), pa("llm-00003"), pa("llm-00004", "8", deleting=True),
         pa("llm-00005", "12", "0")], 12, 3)
    # Only what differs is written: a floor change alone patches min-scale alone.
    assert patches == [("llm-00001", {"metadata": {"annotations": {f"{A}/target": "12"}}}),
                       ("llm-00003", {"metadata": {"annotations": {f"{A}/target": "12", f"{A}/min-scale": "3"}}}),
                       ("llm-00005", {"metadata": {"annotations": {f"{A}/min-scale": "3"}}})]
    assert servedmodel.pod_autoscaler_patches([pa("llm-00002", "12", "3")], 12, 3) == []


def test_an_interruptions_raised_floor_is_never_lowered_by_the_policy_and_returns_to_its_latest_floor():
    from agentkube.operator import interruptions

    before = {"metadata": {"name": "llm-00001", "annotations": {f"{A}/target": "8", f"{A}/min-scale": "2"}}}
    raised = interruptions.raised_floor(before, "spot-1", revision_pods=4, on_node=2)
    during = {"metadata": {"name": "llm-00001",
                           "annotations": before["metadata"]["annotations"] | raised["metadata"]["annotations"]}}
    assert during["metadata"]["annotations"][f"{A}/min-scale"] == "6"
    # The policy lowers its floor to 1 mid-interruption: the raised 6 stays, 1 is what comes back after.
    [(_, patch)] = servedmodel.pod_autoscaler_patches([during], 8, 1)
    assert patch == {"metadata": {"annotations": {interruptions.FLOOR_BEFORE: "1"}}}
    during["metadata"]["annotations"] |= patch["metadata"]["annotations"]
    # A floor above the raised one goes into force at once.
    [(_, patch)] = servedmodel.pod_autoscaler_patches([during], 8, 9)
    assert patch == {"metadata": {"annotations": {f"{A}/min-scale": "9", interruptions.FLOOR_BEFORE: "9"}}}
    during["metadata"]["annotations"] |= patch["metadata"]["annotations"]
    restored = interruptions.restored_floor(during, existing_nodes=set())
    assert restored["metadata"]["annotations"][f"{A}/min-scale"] == "9"


def test_the_floor_in_force_keeps_within_the_specs_scale_bounds():
    # Never under the template's own min-scale (1 without scale to zero), never above a non-zero max-scale,
    # which Knative's webhook would refuse on the PodAutoscaler.
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo"), 0) == 0
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo"), 7) == 7
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo", scale_to_zero=False), 0) == 1
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo", min_scale=2, max_scale=5), 0) == 2
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo", min_scale=2, max_scale=5), 9) == 5
    assert servedmodel.floor_in_force(api.Autoscaling(policy="ppo", min_scale=2, max_scale=0), 9) == 9


def test_the_min_scale_in_force_is_the_loops_under_ppo_and_the_templates_otherwise():
    spec = _spec(policy="ppo", minScale=1)
    assert servedmodel.min_scale_in_force(spec, api.ServedModelStatus()) == 1
    assert servedmodel.min_scale_in_force(spec, api.ServedModelStatus(min_scale=6)) == 6
    # Leaving ppo puts the template's back, whatever the loop last applied.
    assert servedmodel.min_scale_in_force(_spec(policy="kpa", minScale=1), api.ServedModelStatus(min_scale=6)) == 1


def test_the_refusal_message_is_the_status_message_of_the_answer():
    body = ('{"kind":"Status","apiVersion":"v1","status":"Failure","message":"admission webhook \\"validation.webhook.'
            'serving.knative.dev\\" denied the request: validation failed: expected 1 <= 0 <= 2147483647: '
            'spec.template.metadata.annotations.autoscaling.knative.dev/target","reason":"BadRequest","code":400}')
    assert servedmodel.refusal_message(body).startswith('admission webhook "validation.webhook.serving.knative.dev" denied')
    assert servedmodel.refusal_message(b"not json") == "not json"
    assert servedmodel.refusal_message(None) == ""
