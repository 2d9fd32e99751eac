"""kube-controller-manager runs: the garbage collector and the namespace controller do their work."""

import kubernetes
from kubernetes.client import CoreV1Api, V1ConfigMap, V1ObjectMeta, V1OwnerReference


def _exists(read) -> bool:
    try:
        read()
        return True
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return False
        raise


def test_deleting_an_owner_collects_what_it_owns(api_client, namespace, eventually):
    core = CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, V1ConfigMap(metadata=V1ObjectMeta(name="owner")))
    reference = V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, V1ConfigMap(metadata=V1ObjectMeta(name="owned", owner_references=[reference]), data={"k": "v"})
    )
    bystander = core.create_namespaced_config_map(namespace, V1ConfigMap(metadata=V1ObjectMeta(name="bystander")))

    core.delete_namespaced_config_map("owner", namespace)
    eventually(
        lambda: not _exists(lambda: core.read_namespaced_config_map("owned", namespace)),
        message="the owned ConfigMap was not garbage-collected",
    )
    assert core.read_namespaced_config_map("bystander", namespace).metadata.uid == bystander.metadata.uid


def test_deleting_a_namespace_removes_its_objects(api_client, eventually):
    core = CoreV1Api(api_client)
    name = "doomed"
    core.create_namespace(kubernetes.client.V1Namespace(metadata=V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(name, V1ConfigMap(metadata=V1ObjectMeta(name="inside")))
    core.create_namespaced_service_account(name, {"metadata": {"name": "someone"}})

    core.delete_namespace(name)
    eventually(lambda: not _exists(lambda: core.read_namespace(name)), message="the namespace was not removed")
    assert core.list_namespaced_config_map(name).items == []
    assert core.list_namespaced_service_account(name).items == []
