"""Offline checks of the Helm chart's rendered manifests.

Subcommands (each prints one line per check and exits non-zero on failure):

  validate MANIFESTS K8S_VERSION
      Core kinds against the Kubernetes JSON schemas (kubernetes-validate,
      strict: unknown fields are errors). The custom resources the core
      schemas do not know (ServiceMonitor, PrometheusRule, ScaledObject) are
      skipped there by name and checked here for apiVersion, kind, metadata
      and the fields the chart relies on. Then how the objects fit together:
      one workload (Deployment or StatefulSet) whose pods get POD_NAME from
      the downward API and whose startup probe waits for /readyz; the
      StatefulSet's headless Service; HPA, ScaledObject and PDB aimed at
      that workload; the ServiceMonitor selecting exactly one Service.

  check-config MANIFESTS BINARY EXPECT
      Builds a fake container filesystem from the rendered workload: every
      volume mount gets the files Kubernetes would project (the chart's
      Secret keys, the documented keys of an existing Secret, the TLS items,
      the ConfigMap's config.toml), with fake secret values. Rewrites the
      config's absolute paths into that root and runs
      `BINARY check-config --config ...` with the container's literal env.
      EXPECT is "ok" or "fail:<text the error must contain>". Also checks
      that no fake secret value appears in the command's output.

  secret-only MANIFESTS KEY=VALUE...
      The chart's Secret holds each VALUE under its KEY, and no other
      object (nor another key of the Secret) holds it, in clear or base64.

  schema-drift SCHEMA DEFAULT_TOML
      values.schema.json's `config` tree must list exactly the keys of
      config/default.toml, minus those the chart owns (secrets, *_file,
      server.listen).
"""

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}

# The keys of secrets.existingSecret documented in docs/deploy.md.
EXISTING_SECRET_KEYS = [
    "finbox-api-key",
    "finbox-server-hash",
    "credeau-auth-token",
    "kafka-sasl-password",
    "schema-registry-password",
]

CHART_OWNED_CONFIG_KEYS = {
    ("finbox", "api_key"),
    ("finbox", "api_key_file"),
    ("finbox", "server_hash"),
    ("finbox", "server_hash_file"),
    ("credeau", "auth_token"),
    ("credeau", "auth_token_file"),
    ("kafka", "sasl_password"),
    ("kafka", "sasl_password_file"),
    ("kafka", "ssl_key_password"),
    ("kafka", "ssl_key_password_file"),
    ("encoding", "schema_registry_password"),
    ("encoding", "schema_registry_password_file"),
    ("server", "listen"),
}


class Checks:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
            print(f"  ok   {what}")
        else:
            self.failed += 1
            print(f"  FAIL {what}")
        return ok

    def exit(self):
        print(f"  ({self.passed} ok, {self.failed} failed)")
        sys.exit(1 if self.failed else 0)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def check_custom_resource(checks, doc, docs):
    kind = doc["kind"]
    meta = doc.get("metadata") or {}
    checks.check(doc.get("apiVersion") == CUSTOM_KINDS[kind],
                 f"{name_of(doc)} apiVersion is {CUSTOM_KINDS[kind]}")
    name = meta.get("name", "")
    checks.check(isinstance(name, str) and 0 < len(name) <= 63,
                 f"{name_of(doc)} metadata.name is a valid name")
    checks.check(bool(meta.get("namespace")), f"{name_of(doc)} has a namespace")
    checks.check(isinstance(meta.get("labels"), dict) and meta["labels"],
                 f"{name_of(doc)} has labels")
    spec = doc.get("spec")
    if not checks.check(isinstance(spec, dict), f"{name_of(doc)} has a spec"):
        return
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    services = [d for d in docs if d.get("kind") == "Service"]
    if kind == "ServiceMonitor":
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        endpoints = spec.get("endpoints") or []
        checks.check(endpoints and all(e.get("port") in ports for e in endpoints),
                     f"{name_of(doc)} scrapes a named port of the Service")
        selected = [s["metadata"]["name"] for s in services
                     if selector_matches(spec.get("selector"), s["metadata"].get("labels"))]
        checks.check(len(selected) == 1,
                     f"{name_of(doc)} selects exactly one Service (selects {selected})")
    elif kind == "PrometheusRule":
        rules = [r for g in spec.get("groups", []) for r in g.get("rules", [])]
        checks.check(len(rules) > 0, f"{name_of(doc)} has rules")
        for r in rules:
            alert = r.get("alert", "")
            ann = r.get("annotations") or {}
            ok = (alert and r.get("expr", "").strip()
                  and (r.get("labels") or {}).get("severity")
                  and ann.get("summary") and ann.get("description")
                  and ann.get("runbook_url", "").endswith("#" + alert.lower()))
            checks.check(bool(ok), f"{name_of(doc)} {alert}: expr, severity, summary, "
                         f"description, runbook_url ending #{alert.lower()}")
            expr = r.get("expr", "")
            checks.check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"),
                         f"{name_of(doc)} {alert}: balanced brackets in expr")
    elif kind == "ScaledObject":
        checks.check(targets_workload(spec.get("scaleTargetRef"), workloads),
                     f"{name_of(doc)} scaleTargetRef is the chart's {kinds_of(workloads)}")
        checks.check(isinstance(spec.get("minReplicaCount"), int) and spec["minReplicaCount"] >= 1,
                     f"{name_of(doc)} never scales to zero (minReplicaCount {spec.get('minReplicaCount')})")
        triggers = spec.get("triggers") or []
        kafka = [t for t in triggers if t.get("type") == "kafka"]
        md = kafka[0].get("metadata", {}) if kafka else {}
        checks.check(all(md.get(k) for k in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold")),
                     f"{name_of(doc)} has a kafka trigger with servers, group, topic, lag threshold")
        checks.check(all(isinstance(v, str) for v in md.values()),
                     f"{name_of(doc)} trigger metadata values are strings")


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def kinds_of(workloads):
    return "/".join(w["kind"] for w in workloads) or "workload"


def targets_workload(ref, workloads):
    ref = ref or {}
    return any(ref.get("apiVersion") == w["apiVersion"] and ref.get("kind") == w["kind"]
               and ref.get("name") == w["metadata"]["name"] for w in workloads)


def selector_matches(selector, labels):
    """A Kubernetes LabelSelector (matchLabels and matchExpressions)."""
    labels = labels or {}
    selector = selector or {}
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_wiring(checks, docs):
    """How the rendered objects refer to each other."""
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    if not checks.check(len(workloads) == 1,
                        f"exactly one workload (Deployment or StatefulSet), got {len(workloads)}"):
        return
    w = workloads[0]
    wname = name_of(w)
    pod_labels = w["spec"]["template"]["metadata"]["labels"]
    checks.check(selector_matches(w["spec"]["selector"], pod_labels),
                 f"{wname} selector matches its pod template's labels")
    container = w["spec"]["template"]["spec"]["containers"][0]
    pod_name = [e for e in container.get("env", []) if e.get("name") == "POD_NAME"]
    checks.check(len(pod_name) == 1 and ((pod_name[0].get("valueFrom") or {}).get("fieldRef") or {})
                 .get("fieldPath") == "metadata.name",
                 f"{wname} sets POD_NAME from the downward API (metadata.name)")
    probes = {p: ((container.get(p) or {}).get("httpGet") or {}).get("path")
              for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    # /healthz passes from the process's first second; started means joined.
    checks.check(probes["startupProbe"] in (None, "/readyz"),
                 f"{wname} startup probe waits for /readyz, not /healthz (got {probes['startupProbe']})")
    checks.check(probes["livenessProbe"] in (None, "/healthz"),
                 f"{wname} liveness probe is /healthz (got {probes['livenessProbe']})")
    services = [d for d in docs if d.get("kind") == "Service"]
    if w["kind"] == "StatefulSet":
        governing = [s for s in services if s["metadata"]["name"] == w["spec"].get("serviceName")]
        checks.check(len(governing) == 1 and governing[0]["spec"].get("clusterIP") == "None"
                     and selector_matches({"matchLabels": governing[0]["spec"].get("selector")}, pod_labels),
                     f"{wname} serviceName is a headless Service selecting its pods")
        checks.check("strategy" not in w["spec"], f"{wname} has no Deployment strategy")
    else:
        checks.check(all(s["spec"].get("clusterIP") != "None" for s in services),
                     f"{wname}: no headless Service without a StatefulSet")
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        checks.check(targets_workload(hpa["spec"].get("scaleTargetRef"), workloads),
                     f"{name_of(hpa)} scaleTargetRef is the chart's {w['kind']}")
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget"):
        checks.check(selector_matches(pdb["spec"].get("selector"), pod_labels),
                     f"{name_of(pdb)} selects the {w['kind']}'s pods")


def cmd_validate(path, version):
    import kubernetes_validate

    checks = Checks()
    docs = load_docs(path)
    checks.check(len(docs) > 0, f"{path} has manifests")
    for doc in docs:
        kind = doc.get("kind")
        if kind in CUSTOM_KINDS:
            check_custom_resource(checks, doc, docs)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checks.check(True, f"{name_of(doc)} valid against Kubernetes {version} (strict)")
        except kubernetes_validate.ValidationError as e:
            path_s = ".".join(str(p) for p in e.path)
            checks.check(False, f"{name_of(doc)} at {path_s}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            checks.check(False, f"{name_of(doc)}: no Kubernetes {version} schema for this kind")
    check_wiring(checks, docs)
    checks.exit()


def cmd_check_config(path, binary, expect):
    checks = Checks()
    docs = load_docs(path)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workload = [d for d in docs if d["kind"] in WORKLOAD_KINDS][0]
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    fake_values = []

    root = tempfile.mkdtemp(prefix="helm-check-config-")
    mount_paths = []

    def put(rel_path, content):
        full = os.path.join(root, rel_path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(content)

    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        mount = m["mountPath"]
        mount_paths.append(mount)
        if "configMap" in vol:
            data = configmaps[vol["configMap"]["name"]]["data"]
            if "subPath" in m:
                put(mount, data[m["subPath"]])
            else:
                for k, v in data.items():
                    put(f"{mount}/{k}", v)
        elif "secret" in vol:
            name = vol["secret"]["secretName"]
            items = vol["secret"].get("items")
            if items:
                # A TLS Secret from outside the chart: the file must exist.
                for it in items:
                    put(f"{mount}/{it['path']}", "-----BEGIN FAKE-----\n-----END FAKE-----\n")
            elif name in secrets:
                for k, v in (secrets[name].get("data") or {}).items():
                    value = base64.b64decode(v).decode()
                    fake_values.append(value)
                    put(f"{mount}/{k}", value)
            else:
                for k in EXISTING_SECRET_KEYS:
                    value = f"fake-{k}-value"
                    fake_values.append(value)
                    put(f"{mount}/{k}", value)
        else:
            os.makedirs(os.path.join(root, mount.lstrip("/")), exist_ok=True)

    args = container.get("args", [])
    checks.check("--config" in args and args[args.index("--config") + 1] in mount_paths,
                 "the container's --config file is a mounted path")
    config_path = args[args.index("--config") + 1]
    config_file = os.path.join(root, config_path.lstrip("/"))
    with open(config_file) as f:
        text = f.read()
    # Every absolute path the chart put into config.toml must lie in a mount;
    # one pass, so a path is never rewritten twice (/tmp is a mount too).
    mounts = "|".join(re.escape(m) for m in sorted(mount_paths, key=len, reverse=True))
    text = re.sub(f'"(({mounts})[/"])', lambda m: f'"{root}{m.group(1)}', text)
    with open(config_file, "w") as f:
        f.write(text)

    env = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS")}
    # What the downward API would give a pod of this workload.
    pod_name = workload["metadata"]["name"] + (
        "-0" if workload["kind"] == "StatefulSet" else "-5d8f7c9b6-x2x7q")
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
    proc = subprocess.run([binary, "check-config", "--config", config_file],
                          capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if expect == "ok":
        checks.check(proc.returncode == 0,
                     f"check-config accepts the rendered config.toml (exit {proc.returncode})")
        if proc.returncode != 0:
            print(out)
    else:
        needle = expect.split(":", 1)[1]
        checks.check(proc.returncode != 0 and needle in out,
                     f"check-config rejects it naming {needle!r} (exit {proc.returncode}: {out.strip()[:160]})")
    leaked = [v for v in fake_values if v and v in out]
    checks.check(not leaked, "no secret value appears in check-config's output")
    checks.exit()


def cmd_schema_drift(schema_path, default_toml):
    checks = Checks()
    with open(schema_path) as f:
        schema = json.load(f)
    with open(default_toml, "rb") as f:
        defaults = tomllib.load(f)
    config = schema["properties"]["config"]["properties"]
    checks.check(set(config) == set(defaults),
                 f"schema config sections == default.toml sections ({sorted(set(config) ^ set(defaults))} differ)")
    for section, keys in defaults.items():
        want = {k for k in keys if (section, k) not in CHART_OWNED_CONFIG_KEYS}
        have = set(config.get(section, {}).get("properties", {}))
        checks.check(want == have,
                     f"schema config.{section} keys == default.toml [{section}] keys "
                     f"(missing {sorted(want - have)}, extra {sorted(have - want)})")
        checks.check(config.get(section, {}).get("additionalProperties") is False,
                     f"schema config.{section} rejects unknown keys")
    checks.exit()


def cmd_secret_only(path, *pairs):
    """Each KEY=VALUE: the chart's Secret holds VALUE under KEY, and no
    other object holds it, in clear or base64."""
    checks = Checks()
    docs = load_docs(path)
    secrets = [d for d in docs if d.get("kind") == "Secret"]
    for pair in pairs:
        key, value = pair.split("=", 1)
        encoded = base64.b64encode(value.encode()).decode()
        holders = [s for s in secrets
                   if base64.b64decode((s.get("data") or {}).get(key, "")).decode() == value]
        checks.check(len(holders) == 1, f"the chart's Secret holds {key}")
        for d in docs:
            data = dict(d.get("data") or {}) if d.get("kind") == "Secret" else {}
            data.pop(key, None)
            rest = yaml.safe_dump({**d, "data": data} if d.get("kind") == "Secret" else d)
            checks.check(value not in rest and encoded not in rest,
                         f"{name_of(d)} holds nothing of {key} elsewhere")
    checks.exit()


def main():
    cmd, *rest = sys.argv[1:]
    if cmd == "validate":
        cmd_validate(*rest)
    elif cmd == "check-config":
        cmd_check_config(*rest)
    elif cmd == "secret-only":
        cmd_secret_only(*rest)
    elif cmd == "schema-drift":
        cmd_schema_drift(*rest)
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
