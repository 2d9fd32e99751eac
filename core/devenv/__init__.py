"""The embedded default: a real local control plane (etcd, kube-apiserver, kube-controller-manager) and
a real Prometheus, built and cached outside the repository, started on loopback, stopped without a trace."""

from agentkube.devenv.cluster import DevEnv, DevEnvError, sweep_abandoned, temporary_env

__all__ = ["DevEnv", "DevEnvError", "sweep_abandoned", "temporary_env"]
