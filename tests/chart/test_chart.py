"""Tests of the Helm chart in charts/lb-agent: Helm lint, rendering with several sets of
values, the values schema, and strict validation of every rendered object against the
Kubernetes API schemas.

Runs offline in a virtualenv holding tests/chart/requirements.txt (Helm v4 through
helm-python-sdk, no helm binary; kubernetes-validate with its bundled schemas):

    <venv>/bin/python tests/chart/test_chart.py [unittest arguments, e.g. -k Schema]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import unittest
from pathlib import Path
from typing import Any

try:
    import helm_python as helm
    import yaml
    from kubernetes_validate import utils as kubernetes_validate
except ImportError as err:
    sys.exit(f"{err}: run with a virtualenv holding tests/chart/requirements.txt")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lb-agent"
RELEASE = "lb-agent"
NAMESPACE = "kube-system"
# The oldest release the agent's k8s-openapi targets (v1_33) and the newest bundled schemas.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

DEFAULT_CAPABILITIES = {"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"}
# Exactly what the agent reads: (API group, resource, verb).
RBAC_RULES = {
    (group, resource, verb)
    for group, resource in (("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "nodes"))
    for verb in ("get", "list", "watch")
}
DEFAULT_ARGS = [
    "--pin-dir=/sys/fs/bpf/lb",
    "--log-format=text",
    "run",
    "--interface=eth0",
    "--no-backend=reject",
    "--hairpin-snat-address=169.254.42.1",
    "--health-addr=0.0.0.0:10256",
    "--metrics-addr=0.0.0.0:10249",
    "--kube-api-qps=5",
    "--kube-api-burst=10",
    "--min-sync-period=1s",
    "--sync-period=30s",
    "--conntrack-gc-interval=10s",
    "--conntrack-max=262144",
    "--max-services=65536",
    "--max-frontends=65536",
    "--max-backends=65536",
    "--maglev-table-size=16381",
    "--max-maglev-services=64",
]

# Values sets rendered, linted and validated besides the defaults.
VARIATIONS: dict[str, dict[str, Any]] = {
    "drop-json-interfaces-snat": {
        "agent": {
            "noBackend": "drop",
            "logFormat": "json",
            "logLevel": "info,lb_agent=debug",
            "interfaces": ["ens5", "ens6"],
            "nodePortAddresses": ["10.0.0.10", "10.0.0.11"],
            "snatAddress": "10.0.0.10",
            "hairpinSnatAddress": "169.254.7.7",
            "pinDir": "/sys/fs/bpf/lb-test",
            "kubeApiQps": 2.5,
            "kubeApiBurst": 20,
            "minSyncPeriod": "250ms",
            "syncPeriod": "2m",
            "conntrackGcInterval": "5s",
            # Above 2^20: Helm's numbers are floats and must not come out as 1.048576e+06.
            "conntrackMax": 1048576,
            "maxServices": 1000,
            "maxFrontends": 2000,
            "maxBackends": 4294967295,
            "extraArgs": ["--manifest-poll-interval=2s"],
            "metrics": {"bindAddress": "0.0.0.0", "port": 19249, "scrapeAnnotations": True},
        },
    },
    "no-bpffs-mount": {"bpffs": {"mount": {"enabled": False}}},
    "socket-lb": {"agent": {"socketLB": {"enabled": True, "hostCgroupRoot": "/sys/fs/cgroup"}}},
    "hybrid-cgroup-host": {"agent": {"socketLB": {"enabled": True, "hostCgroupRoot": "/sys/fs/cgroup/unified"}}},
    "resources-node-selector": {
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "nodeSelector": {"node-role.example.com/lb": "true"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "example.com/no-lb", "operator": "DoesNotExist"}]}
                    ]
                }
            }
        },
    },
    "ports-apiserver-extras": {
        "image": {"repository": "registry.example.com/lb-agent", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry"}],
        "agent": {
            "health": {"bindAddress": "127.0.0.1", "port": 20256},
            "metrics": {"bindAddress": "127.0.0.1", "port": 20249, "scrapeAnnotations": False},
            "capabilities": ["BPF", "NET_ADMIN", "PERFMON"],
            "seccompProfile": {"type": "Unconfined"},
            "appArmorProfile": None,
        },
        "bpffs": {"mount": {"enabled": True, "image": {"repository": "busybox", "tag": "1.37", "pullPolicy": "IfNotPresent"}}},
        "apiServer": {"host": "10.0.0.1", "port": 6443},
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
        "podAnnotations": {"example.com/note": "x"},
        "podLabels": {"example.com/team": "net"},
        "serviceAccount": {"create": False, "name": "lb-agent-existing"},
        "rbac": {"create": False},
        "priorityClassName": "system-cluster-critical",
        "updateStrategy": {"maxUnavailable": "10%"},
        "terminationGracePeriodSeconds": 5,
    },
}

# Values the schema must reject: (case, values, the path Helm's message must name).
BAD_VALUES = [
    ("duration without unit", {"agent": {"syncPeriod": "30"}}, "/agent/syncPeriod"),
    ("duration in hours", {"agent": {"minSyncPeriod": "1h"}}, "/agent/minSyncPeriod"),
    ("zero duration", {"agent": {"conntrackGcInterval": "0s"}}, "/agent/conntrackGcInterval"),
    ("octet over 255", {"agent": {"hairpinSnatAddress": "169.254.42.256"}}, "/agent/hairpinSnatAddress"),
    ("three octets", {"agent": {"snatAddress": "10.0.0"}}, "/agent/snatAddress"),
    ("IPv6 NodePort address", {"agent": {"nodePortAddresses": ["10.0.0.1", "fe80::1"]}}, "/agent/nodePortAddresses/1"),
    ("host name as bind address", {"agent": {"metrics": {"bindAddress": "localhost"}}}, "/agent/metrics/bindAddress"),
    ("unknown noBackend", {"agent": {"noBackend": "ignore"}}, "/agent/noBackend"),
    ("relative cgroup root", {"agent": {"socketLB": {"enabled": True, "hostCgroupRoot": "sys/fs/cgroup"}}}, "/agent/socketLB/hostCgroupRoot"),
    ("socketLB switch as a string", {"agent": {"socketLB": {"enabled": "yes"}}}, "/agent/socketLB/enabled"),
    ("unknown logFormat", {"agent": {"logFormat": "yaml"}}, "/agent/logFormat"),
    ("no interfaces", {"agent": {"interfaces": []}}, "/agent/interfaces"),
    ("interface name too long", {"agent": {"interfaces": ["a-very-long-interface"]}}, "/agent/interfaces/0"),
    ("comma inside an interface", {"agent": {"interfaces": ["eth0,eth1"]}}, "/agent/interfaces/0"),
    ("health port 70000", {"agent": {"health": {"port": 70000}}}, "/agent/health/port"),
    ("metrics port 0", {"agent": {"metrics": {"port": 0}}}, "/agent/metrics/port"),
    ("negative qps", {"agent": {"kubeApiQps": -1}}, "/agent/kubeApiQps"),
    ("qps as string", {"agent": {"kubeApiQps": "5"}}, "/agent/kubeApiQps"),
    ("fractional burst", {"agent": {"kubeApiBurst": 1.5}}, "/agent/kubeApiBurst"),
    ("capacity over u32", {"agent": {"conntrackMax": 4294967296}}, "/agent/conntrackMax"),
    ("capacity as string", {"agent": {"maxBackends": "many"}}, "/agent/maxBackends"),
    ("pin dir outside bpffs", {"agent": {"pinDir": "/var/run/lb"}}, "/agent/pinDir"),
    ("capability with CAP_ prefix", {"agent": {"capabilities": ["CAP_BPF"]}}, "/agent/capabilities/0"),
    ("misspelt agent key", {"agent": {"noBackends": "drop"}}, "noBackends"),
    ("unknown top-level key", {"agents": {}}, "agents"),
    ("interfaces not a list", {"agent": {"interfaces": "eth0"}}, "/agent/interfaces"),
    ("annotation not a string", {"podAnnotations": {"a": 1}}, "/podAnnotations/a"),
    ("maxUnavailable zero", {"updateStrategy": {"maxUnavailable": 0}}, "/updateStrategy/maxUnavailable"),
]


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for `values`, rendered offline (like `helm template`)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "DaemonSet")["spec"]["template"]["spec"]


def agent_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    assert [c["name"] for c in containers] == ["lb-agent"], containers
    return containers[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


class Lint(unittest.TestCase):
    def assert_clean(self, values: dict[str, Any] | None) -> None:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        # Severity 2 is a warning, 3 an error; strict lint fails on both.
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        self.assertEqual(report["errors"], [], report)
        self.assertEqual(problems, [], report)
        self.assertEqual(report["total_charts_linted"], 1)

    def test_default_values(self) -> None:
        self.assert_clean(None)

    def test_variations(self) -> None:
        for name, values in VARIATIONS.items():
            with self.subTest(name):
                self.assert_clean(values)

    def test_install_dry_run(self) -> None:
        # What `helm install --dry-run=client` does: also checks Chart.yaml's kubeVersion.
        with helm.Config(namespace=NAMESPACE, storage_driver="memory") as config:
            release = config.install(CHART, RELEASE, None, namespace=NAMESPACE, dry_run="client")
        kinds = sorted(d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d)
        self.assertEqual(kinds, ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"])


class DefaultValues(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.objects = render()
        cls.pod = pod_spec(cls.objects)
        cls.agent = agent_container(cls.objects)

    def test_objects(self) -> None:
        kinds = sorted(o["kind"] for o in self.objects)
        self.assertEqual(kinds, ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"])
        for o in self.objects:
            if o["kind"] in ("DaemonSet", "ServiceAccount"):
                self.assertEqual(o["metadata"]["namespace"], NAMESPACE, o["kind"])

    def test_rbac_is_read_only_on_three_resources(self) -> None:
        role = only(self.objects, "ClusterRole")
        granted = set()
        for rule in role["rules"]:
            self.assertEqual(set(rule) - {"apiGroups", "resources", "verbs"}, set(), rule)
            granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
        self.assertEqual(granted, RBAC_RULES)
        binding = only(self.objects, "ClusterRoleBinding")
        self.assertEqual(binding["roleRef"], {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"],
        })
        account = only(self.objects, "ServiceAccount")
        self.assertEqual(binding["subjects"], [{
            "kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE,
        }])
        self.assertEqual(self.pod["serviceAccountName"], account["metadata"]["name"])

    def test_host_network(self) -> None:
        self.assertIs(self.pod["hostNetwork"], True)
        self.assertEqual(self.pod["dnsPolicy"], "ClusterFirstWithHostNet")
        for field in ("hostPID", "hostIPC"):
            self.assertNotIn(field, self.pod)

    def test_agent_not_privileged_with_exact_capabilities(self) -> None:
        security = self.agent["securityContext"]
        self.assertIs(security["privileged"], False)
        self.assertIs(security["allowPrivilegeEscalation"], False)
        self.assertEqual(security["capabilities"]["drop"], ["ALL"])
        added = security["capabilities"]["add"]
        self.assertEqual(len(added), len(set(added)))
        self.assertEqual(set(added), DEFAULT_CAPABILITIES)
        self.assertEqual(security["appArmorProfile"], {"type": "Unconfined"})
        self.assertEqual(security["seccompProfile"], {"type": "RuntimeDefault"})
        self.assertNotIn("securityContext", self.pod)

    def test_only_the_bpffs_init_container_is_privileged(self) -> None:
        (init,) = self.pod["initContainers"]
        self.assertEqual(init["name"], "mount-bpffs")
        self.assertEqual(init["image"], self.agent["image"])
        self.assertIs(init["securityContext"]["privileged"], True)
        self.assertEqual(init["volumeMounts"], [
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
        ])
        script = init["command"][-1]
        self.assertIn("mount -t bpf bpf /sys/fs/bpf", script)
        self.assertIn("/proc/self/mounts", script)

    def test_bpffs_from_the_host(self) -> None:
        self.assertEqual(self.pod["volumes"], [
            {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
        ])
        self.assertEqual(self.agent["volumeMounts"], [
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
        ])
        self.assertFalse([a for a in self.agent["args"] if "socket-lb" in a])

    def test_socket_lb_on_and_on_a_hybrid_host(self) -> None:
        objects = render(VARIATIONS["socket-lb"])
        self.assertEqual(pod_spec(objects)["volumes"][1], {
            "name": "cgroup2", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"},
        })
        # The flag names the mount.
        self.assertEqual(agent_container(objects)["volumeMounts"][1], {
            "name": "cgroup2", "mountPath": "/run/lb-agent/cgroupv2", "readOnly": True,
        })
        self.assertEqual(agent_container(objects)["args"][-1], "--socket-lb-cgroup=/run/lb-agent/cgroupv2")
        objects = render(VARIATIONS["hybrid-cgroup-host"])
        volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
        self.assertEqual(volumes["cgroup2"]["hostPath"]["path"], "/sys/fs/cgroup/unified")
        self.assertIn("--socket-lb-cgroup=/run/lb-agent/cgroupv2", agent_container(objects)["args"])

    def test_args(self) -> None:
        self.assertNotIn("command", self.agent)  # the image's ENTRYPOINT is lb-agent
        self.assertEqual(self.agent["args"], DEFAULT_ARGS)

    def test_env(self) -> None:
        env = env_of(self.agent)
        self.assertEqual(env["NODE_NAME"], {
            "name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
        })
        self.assertEqual(env["RUST_LOG"], {"name": "RUST_LOG", "value": "info"})
        self.assertNotIn("KUBERNETES_SERVICE_HOST", env)

    def test_probes_on_the_health_port(self) -> None:
        for probe in ("livenessProbe", "readinessProbe"):
            with self.subTest(probe):
                get = self.agent[probe]["httpGet"]
                self.assertEqual(get, {"path": "/healthz", "port": 10256})
        self.assertGreaterEqual(self.agent["livenessProbe"]["failureThreshold"], 3)
        ports = {p["name"]: p["containerPort"] for p in self.agent["ports"]}
        self.assertEqual(ports, {"health": 10256, "metrics": 10249})

    def test_scheduling(self) -> None:
        self.assertEqual(self.pod["tolerations"], [{"operator": "Exists"}])
        self.assertEqual(self.pod["priorityClassName"], "system-node-critical")
        self.assertEqual(self.pod["nodeSelector"], {"kubernetes.io/os": "linux"})
        self.assertEqual(self.pod["terminationGracePeriodSeconds"], 10)
        strategy = only(self.objects, "DaemonSet")["spec"]["updateStrategy"]
        self.assertEqual(strategy, {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})

    def test_resources(self) -> None:
        self.assertEqual(self.agent["resources"]["requests"], {"cpu": "100m", "memory": "128Mi"})
        self.assertFalse(self.agent["resources"].get("limits"))

    def test_image_tag_is_app_version(self) -> None:
        with helm.Chart.load(CHART) as chart:
            app_version = chart.metadata["appVersion"]
        self.assertEqual(self.agent["image"], f"lb-agent:{app_version}")
        self.assertEqual(self.agent["imagePullPolicy"], "IfNotPresent")

    def test_scrape_annotations(self) -> None:
        annotations = only(self.objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations, {"prometheus.io/scrape": "true", "prometheus.io/port": "10249"})

    def test_selector_matches_pod_labels(self) -> None:
        daemonset = only(self.objects, "DaemonSet")
        selector = daemonset["spec"]["selector"]["matchLabels"]
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        self.assertLessEqual(selector.items(), labels.items())


class Variations(unittest.TestCase):
    def test_agent_flags_from_values(self) -> None:
        objects = render(VARIATIONS["drop-json-interfaces-snat"])
        agent = agent_container(objects)
        args = agent["args"]
        # Global flags go before the subcommand.
        self.assertEqual(args[:3], ["--pin-dir=/sys/fs/bpf/lb-test", "--log-format=json", "run"])
        for flag in (
            "--no-backend=drop",
            "--interface=ens5",
            "--interface=ens6",
            "--node-port-addresses=10.0.0.10,10.0.0.11",
            "--snat-address=10.0.0.10",
            "--hairpin-snat-address=169.254.7.7",
            "--kube-api-qps=2.5",
            "--kube-api-burst=20",
            "--min-sync-period=250ms",
            "--sync-period=2m",
            "--conntrack-gc-interval=5s",
            "--conntrack-max=1048576",
            "--max-services=1000",
            "--max-frontends=2000",
            "--max-backends=4294967295",
        ):
            self.assertIn(flag, args)
        self.assertEqual(args[-1], "--manifest-poll-interval=2s")
        self.assertNotIn("--no-backend=reject", args)
        self.assertEqual(env_of(agent)["RUST_LOG"]["value"], "info,lb_agent=debug")
        self.assertIn("--metrics-addr=0.0.0.0:19249", args)
        annotations = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/port"], "19249")

    def test_optional_flags_left_out_by_default(self) -> None:
        args = agent_container(render())["args"]
        for flag in ("--snat-address", "--node-port-addresses"):
            self.assertFalse([a for a in args if a.startswith(flag)], flag)

    def test_bpffs_mount_disabled(self) -> None:
        objects = render(VARIATIONS["no-bpffs-mount"])
        pod = pod_spec(objects)
        self.assertNotIn("initContainers", pod)
        # The agent still gets the host's bpffs.
        self.assertEqual(agent_container(objects)["volumeMounts"][0]["mountPath"], "/sys/fs/bpf")
        privileged = [c["name"] for c in pod["containers"] if c.get("securityContext", {}).get("privileged")]
        self.assertEqual(privileged, [])

    def test_resources_and_placement(self) -> None:
        objects = render(VARIATIONS["resources-node-selector"])
        agent = agent_container(objects)
        self.assertEqual(agent["resources"], VARIATIONS["resources-node-selector"]["resources"])
        pod = pod_spec(objects)
        # Helm merges maps with the defaults: the OS selector stays.
        self.assertEqual(pod["nodeSelector"], {"kubernetes.io/os": "linux", "node-role.example.com/lb": "true"})
        self.assertEqual(pod["affinity"], VARIATIONS["resources-node-selector"]["affinity"])

    def test_ports_api_server_and_extras(self) -> None:
        values = VARIATIONS["ports-apiserver-extras"]
        objects = render(values)
        pod = pod_spec(objects)
        agent = agent_container(objects)
        self.assertIn("--health-addr=127.0.0.1:20256", agent["args"])
        self.assertIn("--metrics-addr=127.0.0.1:20249", agent["args"])
        for probe in ("livenessProbe", "readinessProbe"):
            # Bound to loopback: the kubelet (host network) must probe loopback too.
            self.assertEqual(agent[probe]["httpGet"], {"path": "/healthz", "port": 20256, "host": "127.0.0.1"})
        self.assertEqual({p["name"]: p["containerPort"] for p in agent["ports"]}, {"health": 20256, "metrics": 20249})
        metadata = only(objects, "DaemonSet")["spec"]["template"]["metadata"]
        self.assertEqual(metadata["annotations"], {"example.com/note": "x"})
        self.assertEqual(metadata["labels"]["example.com/team"], "net")
        security = agent["securityContext"]
        self.assertEqual(security["capabilities"]["add"], ["BPF", "NET_ADMIN", "PERFMON"])
        self.assertEqual(security["seccompProfile"], {"type": "Unconfined"})
        self.assertNotIn("appArmorProfile", security)
        self.assertEqual(agent["image"], "registry.example.com/lb-agent:1.2.3")
        self.assertEqual(agent["imagePullPolicy"], "Always")
        self.assertEqual(pod["initContainers"][0]["image"], "busybox:1.37")
        self.assertEqual(pod["initContainers"][0]["imagePullPolicy"], "IfNotPresent")
        self.assertEqual(pod["imagePullSecrets"], [{"name": "registry"}])
        env = env_of(agent)
        self.assertEqual(env["KUBERNETES_SERVICE_HOST"]["value"], "10.0.0.1")
        self.assertEqual(env["KUBERNETES_SERVICE_PORT"]["value"], "6443")
        self.assertEqual(env["EXTRA"], {"name": "EXTRA", "value": "1"})
        self.assertIn("NODE_NAME", env)
        # No account or RBAC of the chart's own: an existing account is used.
        self.assertEqual(sorted(o["kind"] for o in objects), ["DaemonSet"])
        self.assertEqual(pod["serviceAccountName"], "lb-agent-existing")
        self.assertEqual(pod["priorityClassName"], "system-cluster-critical")
        self.assertEqual(pod["terminationGracePeriodSeconds"], 5)
        strategy = only(objects, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]
        self.assertEqual(strategy["maxUnavailable"], "10%")


class Schema(unittest.TestCase):
    def test_bad_values_fail_rendering(self) -> None:
        for case, values, field in BAD_VALUES:
            with self.subTest(case):
                with self.assertRaises(helm.HelmValuesError) as caught:
                    render(values)
                self.assertIn(field, str(caught.exception))

    def test_bad_values_fail_lint(self) -> None:
        for case, values, field in BAD_VALUES:
            with self.subTest(case):
                report = helm.lint(CHART, values, namespace=NAMESPACE)
                self.assertTrue(report["errors"], f"lint accepted {values}")
                self.assertIn(field, "\n".join(report["errors"]))

    def test_boundary_values_pass(self) -> None:
        values = {"agent": {
            "health": {"bindAddress": "255.255.255.255", "port": 65535},
            "metrics": {"bindAddress": "0.0.0.0", "port": 1, "scrapeAnnotations": True},
            "kubeApiQps": 0.001, "kubeApiBurst": 1,
            "minSyncPeriod": "1ms", "syncPeriod": "999999m", "conntrackGcInterval": "10s",
            "conntrackMax": 4294967295, "maxServices": 1,
            "interfaces": ["a", "veth0123456789a"],
            "snatAddress": "",
        }}
        agent = agent_container(render(values))
        self.assertIn("--kube-api-qps=0.001", agent["args"])
        self.assertIn("--conntrack-max=4294967295", agent["args"])


class AgentAcceptsArgs(unittest.TestCase):
    """The agent binary parses what the chart passes: clap checks every flag and value it
    meets before `--help` stops it, so a renamed flag or a format the agent does not take
    fails here, not in a crash-looping pod."""

    def test_rendered_args_parse(self) -> None:
        binary = os.environ.get("LB_AGENT_BINARY", str(ROOT / "target" / "debug" / "lb-agent"))
        if not Path(binary).is_file():
            self.fail(f"{binary} not built (cargo build --bins, or set LB_AGENT_BINARY)")
        for name, values in [("default", None), *VARIATIONS.items()]:
            with self.subTest(values=name):
                args = agent_container(render(values))["args"]
                done = subprocess.run(
                    [binary, *args, "--help"], capture_output=True, text=True, timeout=30
                )
                self.assertEqual(done.returncode, 0, f"{name}: {args}\n{done.stderr}")
                self.assertIn("Usage: lb-agent run", done.stdout)


class KubernetesSchemas(unittest.TestCase):
    def test_versions_are_bundled(self) -> None:
        # Validation must not need the network: the schemas ship inside the package.
        bundled = set(kubernetes_validate.all_versions())
        for version in KUBERNETES_VERSIONS:
            self.assertIn(version, bundled)

    def test_rendered_objects_are_valid(self) -> None:
        for name, values in {"default": None, **VARIATIONS}.items():
            objects = render(values)
            for version in KUBERNETES_VERSIONS:
                for obj in objects:
                    what = f"{name}: {obj['kind']}/{obj['metadata']['name']} against {version}"
                    with self.subTest(what):
                        problem = None
                        try:
                            kubernetes_validate.validate(obj, version, strict=True)
                        except kubernetes_validate.ValidationError as err:
                            problem = f"{'.'.join(str(p) for p in err.path)}: {err.message}"
                        except kubernetes_validate.SchemaNotFoundError as err:
                            problem = err.message
                        # Outside the handler: the schema dump in the traceback drowns the news.
                        if problem:
                            self.fail(f"{what}: {problem}")


def main() -> int:
    started = time.monotonic()
    print(f"Helm SDK {helm.helm_sdk_version()} (libhelm_c {helm.helm_c_version()}), chart {CHART}")
    # Results on stdout, in order with the lines above and below.
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2)
    program = unittest.main(argv=[sys.argv[0], *sys.argv[1:]], testRunner=runner, exit=False)
    result = program.result
    # A test with failing subtests is listed once per subtest: count tests. A failed class
    # set-up is listed too, though its tests never ran.
    listed = {getattr(test, "test_case", test) for test, _ in result.failures + result.errors}
    ran_and_failed = {t.id() for t in listed if isinstance(t, unittest.TestCase)}
    ran_and_failed |= {t.id() for t in result.unexpectedSuccesses}
    skipped = len(result.skipped)
    passed = result.testsRun - len(ran_and_failed) - skipped
    failed = len(ran_and_failed) + len(listed) - len([t for t in listed if isinstance(t, unittest.TestCase)])
    print(f"chart tests took {time.monotonic() - started:.1f}s")
    print(f"chart: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if result.wasSuccessful() and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
