"""Use agentkube's local environment from Python: a real control plane for your own scripts and tests.

    .venv/bin/python examples/local_cluster.py

Starts etcd, kube-apiserver, kube-controller-manager and Prometheus in a temporary directory, creates a
namespace and a ConfigMap through the Kubernetes client, reads them back with kubectl, and tears
everything down (also if interrupted).
"""

import subprocess

import kubernetes

from agentkube.devenv import temporary_env
from agentkube.devenv.versions import bin_dir


def main() -> None:
    with temporary_env() as env:
        client = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({"metadata": {"name": "demo"}})
        core.create_namespaced_config_map("demo", {"metadata": {"name": "greeting"}, "data": {"hello": "world"}})
        print(f"apiserver {env.apiserver_url}, up in {sum(env.startup_seconds.values()):.1f}s")
        shown = subprocess.run(
            [str(bin_dir() / "kubectl"), "get", "configmap", "greeting", "-n", "demo", "-o", "jsonpath={.data.hello}"],
            env=env.environ(), capture_output=True, text=True, check=True,
        )
        print(f"kubectl says hello {shown.stdout}")


if __name__ == "__main__":
    main()
