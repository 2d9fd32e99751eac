"""The local node's volume provisioner: its identity, configuration, helper pod and command line, decided
without a cluster; and `agentkube dev restart-apiserver` wiring."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from agentkube.cli import app
from agentkube.devenv import config, images, localpath
from agentkube.devenv.cluster import LOCAL_PATH, NETWORK_POLICY, NODE_COMPONENTS_AFTER_READY
from agentkube.devenv.config import Layout, Ports
from agentkube.devenv.versions import GO_PROGRAMS, LOCAL_PATH_PROVISIONER, program_path

LAYOUT = Layout(Path("/state"))
PORTS = Ports(*range(1, 12))


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in argv[1:] if arg.startswith("--"))


def test_built_from_its_module_without_its_incomplete_vendor_directory():
    assert GO_PROGRAMS["local-path-provisioner"] == LOCAL_PATH_PROVISIONER
    assert LOCAL_PATH_PROVISIONER.pin == "github.com/rancher/local-path-provisioner@v0.0.30"
    assert LOCAL_PATH_PROVISIONER.drop_vendor and not GO_PROGRAMS["coredns"].drop_vendor
    assert program_path("local-path-provisioner").parent.name == "local-path-provisioner-v0.0.30"


def test_it_starts_once_the_node_is_ready():
    assert NODE_COMPONENTS_AFTER_READY == (NETWORK_POLICY, LOCAL_PATH)
    assert LOCAL_PATH.name == "local-path-provisioner" and LOCAL_PATH.health_probe is not None


def test_command_line_reads_its_config_and_helper_pod_from_files_as_its_own_identity():
    argv = config.local_path_provisioner_command(Path("lpp"), LAYOUT, PORTS)
    assert argv[:2] == ["lpp", "start"]
    flags = _flags(argv[1:])
    assert flags["kubeconfig"] == str(LAYOUT.client_kubeconfig("local-path-provisioner-client"))
    assert flags["config"] == str(config.local_path_config_dir(LAYOUT) / "config.json")
    assert flags["helper-pod-file"] == str(config.local_path_config_dir(LAYOUT) / "helperPod.yaml")
    assert flags["namespace"] == localpath.NAMESPACE and flags["provisioner-name"] == localpath.PROVISIONER_NAME
    assert config.CLIENT_CERTIFICATES["local-path-provisioner-client"] == config.LOCAL_PATH_PROVISIONER
    assert not config.LOCAL_PATH_PROVISIONER.groups


def test_volumes_live_under_the_environment_and_helper_pods_use_the_local_sandbox_image():
    files = localpath.config_files(localpath.data_dir(LAYOUT.node.root), images.SANDBOX_IMAGE)
    settings = json.loads(files["config.json"])
    assert settings["nodePathMap"] == [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["/state/node/local-path"]}]
    pod = yaml.safe_load(files["helperPod.yaml"])
    container = pod["spec"]["containers"][0]
    assert container["name"] == "helper-pod"  # the provisioner looks the container up by this name
    assert container["image"] == images.SANDBOX_IMAGE and container["imagePullPolicy"] == "Never"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_rbac_is_what_the_provisioner_does_and_pods_only_in_its_namespace():
    cluster_role, cluster_binding, role, binding = localpath.provisioner_rbac("agentkube:local-path-provisioner")
    granted = {(resource, verb) for rule in cluster_role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert ("nodes", "get") in granted and ("nodes", "list") not in granted
    assert ("persistentvolumes", "create") in granted and ("persistentvolumes", "delete") in granted
    assert ("persistentvolumeclaims", "update") in granted and ("persistentvolumeclaims", "delete") not in granted
    assert not any(resource in ("pods", "secrets", "configmaps") for resource, _ in granted)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == localpath.NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "create", "delete"]}]
    for each in (cluster_binding, binding):
        assert each["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                     "name": "agentkube:local-path-provisioner"}]


def test_the_default_storage_class_waits_for_the_first_consumer():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in localpath.objects("u")}
    storage_class = objects[("StorageClass", localpath.STORAGE_CLASS)]
    assert storage_class["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer" and storage_class["reclaimPolicy"] == "Delete"
    scripts = objects[("ConfigMap", localpath.SCRIPTS_CONFIGMAP)]["data"]
    assert 'mkdir -m 0777 -p "$VOL_DIR"' in scripts["setup"] and 'rm -rf "$VOL_DIR"' in scripts["teardown"]
    assert objects[("ServiceAccount", localpath.HELPER_SERVICE_ACCOUNT)]["automountServiceAccountToken"] is False


def test_restart_apiserver_without_an_environment_says_how_to_start_one(tmp_path):
    result = CliRunner().invoke(app, ["dev", "restart-apiserver", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "agentkube dev up" in result.output
