"""RBAC is on: a service account can do nothing until a Role is bound to it."""

import requests
from kubernetes.client import CoreV1Api, RbacAuthorizationV1Api


def _can_list_pods(kubectl, namespace: str, service_account: str) -> str:
    result = kubectl(
        "auth", "can-i", "list", "pods", "-n", namespace,
        f"--as=system:serviceaccount:{namespace}:{service_account}", check=False,
    )
    return result.stdout.strip()


def test_service_account_is_refused_until_a_role_is_bound(devenv, api_client, kubectl, namespace, eventually):
    core = CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "robot"}})
    token = kubectl("create", "token", "robot", "-n", namespace, "--duration=10m").stdout.strip()
    pods_url = f"{devenv.apiserver_url}/api/v1/namespaces/{namespace}/pods"
    ca = str(devenv.layout.cert("ca"))

    def list_pods_with_token() -> int:
        return requests.get(pods_url, headers={"Authorization": f"Bearer {token}"}, verify=ca, timeout=10).status_code

    assert _can_list_pods(kubectl, namespace, "robot") == "no"
    assert list_pods_with_token() == 403
    # A token that is not signed by the cluster is not a user at all.
    assert requests.get(pods_url, headers={"Authorization": "Bearer forged"}, verify=ca, timeout=10).status_code == 401

    rbac = RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "robot-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}],
        },
    )
    # The authorizer learns of new bindings through an informer: wait for it, not for a fixed time.
    eventually(lambda: _can_list_pods(kubectl, namespace, "robot") == "yes", timeout=30, message="binding not in effect")
    assert list_pods_with_token() == 200
    # The binding grants exactly what the role says, nothing more.
    assert kubectl("auth", "can-i", "delete", "pods", "-n", namespace,
                   f"--as=system:serviceaccount:{namespace}:robot", check=False).stdout.strip() == "no"
