"""deploy/ cannot drift from the app: every manifest parses, every LEDGER_* setting it names is a
setting the app has, every secret and config map it reads is defined, the plans it ships parse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from actors.plans import parse_plans
from gateway.settings import Settings

DEPLOY = Path(__file__).parents[3] / "deploy"
SETTING_NAMES = {f"LEDGER_{name.upper()}" for name in Settings.model_fields}
# Names the app reads that are not Settings fields (the test suites' and benchmarks' own).
NOT_SETTINGS = {
    "LEDGER_TEST_DATABASE_URL",
    "LEDGER_BENCH_DATABASE_URL",
    "LEDGER_SOAK_S",
    "LEDGER_TOKEN",
    "LEDGER_URL",
}


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), path
            assert document.get("apiVersion") and document.get("kind"), path
            found.append(document)
    return found


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container in a Deployment or a RayCluster (head and worker groups)."""
    spec = document.get("spec", {})
    templates = []
    if document["kind"] == "Deployment":
        templates.append(spec["template"])
    if document["kind"] == "RayCluster":
        templates.append(spec["headGroupSpec"]["template"])
        templates.extend(group["template"] for group in spec["workerGroupSpecs"])
    return [container for template in templates for container in template["spec"]["containers"]]


def test_every_manifest_parses_and_there_are_the_expected_kinds() -> None:
    kinds = sorted(document["kind"] for document in documents())
    assert kinds == ["ConfigMap", "Deployment", "RayCluster", "Secret", "Service", "Service"]


def test_manifests_and_scripts_name_only_settings_the_app_has() -> None:
    named: set[str] = set()
    for document in documents():
        for container in containers(document):
            named |= {env["name"] for env in container.get("env", []) if env["name"].startswith("LEDGER_")}
    assert len(named) >= 10
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".sh", ".py", ".md", ".yaml"}:
            named |= set(re.findall(r"\bLEDGER_[A-Z0-9_]+\b", path.read_text()))
    unknown = sorted(named - SETTING_NAMES - NOT_SETTINGS)
    assert not unknown, f"deploy/ names settings the app does not have: {unknown}"


def test_every_secret_and_config_map_read_is_defined() -> None:
    docs = documents()
    secrets = {
        doc["metadata"]["name"]: set(doc.get("stringData", {})) for doc in docs if doc["kind"] == "Secret"
    }
    maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}

    def refs(node: Any) -> list[dict[str, str]]:
        if isinstance(node, dict):
            here = [node["secretKeyRef"]] if "secretKeyRef" in node else []
            return here + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in refs(value)]
        return []

    used = [ref for doc in docs for ref in refs(doc)]
    assert used
    for ref in used:
        if ref.get("optional") is True:
            assert ref["name"] in secrets, ref  # the key may be left out, the Secret may not
            continue
        assert ref["key"] in secrets.get(ref["name"], set()), ref
    for doc in docs:
        if doc["kind"] == "Deployment":
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in maps
    plans = parse_plans(maps["usage-ledger-plans"]["plans.toml"], source="deploy ConfigMap")
    assert plans.billing.plan_for("stripe", "price_pro_monthly") == "pro"


def test_services_and_probes_point_at_the_listeners_the_gateway_opens() -> None:
    docs = documents()
    [deployment] = [doc for doc in docs if doc["kind"] == "Deployment"]
    [gateway] = containers(deployment)
    env = {item["name"]: item.get("value") for item in gateway["env"]}
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {"public": int(env["LEDGER_PORT"]), "internal": int(env["LEDGER_INTERNAL_PORT"])}
    for doc in docs:
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in ports, doc["metadata"]["name"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["internal"]  # /metrics answers on both
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Settings the manifest sets must be valid values for the app, secrets aside.
    literal = {
        name.removeprefix("LEDGER_").lower(): value
        for name, value in env.items()
        if name.startswith("LEDGER_") and value is not None and name != "LEDGER_ENV"
    }
    assert Settings(**literal).internal_port == ports["internal"]
