"""The KubeRay manifests in k8s/: schema-valid against the real CRDs, and consistent with the repo.

Fast: no Kubernetes, no Ray started. Three layers:

1. Every YAML document under k8s/ is a ray.io/v1 RayJob, RayService or RayCluster that validates
   against its CRD's `openAPIV3Schema` (read from the KubeRay CRDs, never copied into the repo).
   `to_json_schema` rewrites the Kubernetes dialect into plain JSON Schema first, and tests show
   the validator rejects broken copies (so a pass means something).
2. Rules a schema cannot express (ttl needs shutdown, GPU limits and tolerations, head without
   GPUs, rayVersion == image tag == installed Ray, token auth on, shared storage mounted).
3. The manifests against the code: the RayJob's entrypoint script and config exist and the config
   loads with the entrypoint's overrides; the RayService's serveConfigV2 imports, passes only keys
   `app_builder` accepts, and builds a Serve Application once cluster paths are replaced by local
   stand-ins; both runtime envs install exactly pyproject.toml's dependencies (Ray excepted).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
GPU = "nvidia.com/gpu"
AUTH_SECRET = "dpo-cluster-ray-auth"

Manifest = tuple[str, dict[str, Any]]


def load_manifests() -> list[Manifest]:
    """(id, document) for every non-empty YAML document under k8s/, id = `file#index`."""
    found: list[Manifest] = []
    for path in sorted([*K8S_DIR.glob("**/*.yaml"), *K8S_DIR.glob("**/*.yml")]):
        with path.open(encoding="utf-8") as f:
            for index, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    found.append((f"{path.relative_to(K8S_DIR)}#{index}", doc))
    return found


MANIFESTS = load_manifests()
IDS = [name for name, _ in MANIFESTS]


def of_kind(kind: str) -> list[Manifest]:
    return [(name, doc) for name, doc in MANIFESTS if doc.get("kind") == kind]


# ----------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def crd_dir() -> Path:
    """DPO_CLUSTER_KUBERAY_CRDS if set, else the shared checkout next to the repository."""
    return Path(os.environ.get("DPO_CLUSTER_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay")


def to_json_schema(node: Any) -> Any:
    """Rewrite a Kubernetes structural schema (OpenAPI v3 dialect) into plain JSON Schema:

    - `x-kubernetes-int-or-string: true` becomes `{"type": ["integer", "string"]}` (its `anyOf`
      of the two types says the same; `pattern` is kept, JSON Schema applies it to strings only);
    - `nullable: true` adds "null" to the node's type;
    - every other `x-kubernetes-*` key is dropped (list/map merge hints, CEL validation rules
      that jsonschema cannot evaluate, embedded-resource markers);
    - an object with `properties` and no `additionalProperties` gets `additionalProperties: false`
      unless it has `x-kubernetes-preserve-unknown-fields: true`. The API server rejects unknown
      fields under strict field validation (kubectl's default) instead of pruning them silently;
      this makes a misspelled or misplaced field fail here too.

    `default` and `format` (int32, quantity, ...) are annotations for jsonschema's validators and
    are left as they are. Property names are never taken for keywords.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string"):
        out: dict[str, Any] = {"type": ["integer", "string"]}
        if "pattern" in node:
            out["pattern"] = node["pattern"]
        return out
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[str, jsonschema.Draft7Validator] = {}


def validator_for(kind: str) -> jsonschema.Draft7Validator:
    """A Draft 7 validator for the v1 schema of `kind`'s CRD; skips when the CRDs are absent."""
    if kind not in _VALIDATORS:
        path = crd_dir() / KINDS[kind]
        if not path.is_file():
            pytest.skip(
                f"KubeRay CRD {path} not found: put ray.io_rayclusters.yaml, ray.io_rayjobs.yaml and "
                "ray.io_rayservices.yaml (from KubeRay's ray-operator/config/crd/bases) in "
                f"{crd_dir()} or point DPO_CLUSTER_KUBERAY_CRDS at their directory"
            )
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = to_json_schema(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = validator_for(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------------------------
# Navigating a manifest


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three kinds."""
    spec = doc["spec"]
    return {"RayJob": lambda: spec["rayClusterSpec"], "RayService": lambda: spec["rayClusterConfig"]}.get(
        doc["kind"], lambda: spec
    )()


def groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("head", head group) then (groupName, worker group) for each worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def resource_names(container: dict[str, Any]) -> set[str]:
    """Resources a container requests or limits (cpu, memory, nvidia.com/gpu, ...)."""
    resources = container.get("resources", {})
    return set(resources.get("requests", {})) | set(resources.get("limits", {}))


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container (KubeRay's convention: the first one)."""
    return containers(group)[0]


def mount_paths(group: dict[str, Any], volume_kind: str) -> list[str]:
    """Mount paths in the Ray container of volumes of one kind (persistentVolumeClaim, secret)."""
    volumes = {v["name"] for v in group["template"]["spec"].get("volumes", []) if volume_kind in v}
    return [m["mountPath"] for m in ray_container(group).get("volumeMounts", []) if m["name"] in volumes]


def under_any(path: str, roots: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(root) for root in roots)


def entrypoint_parts(doc: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(script, config path, overrides) of a `python SCRIPT --config PATH k=v ...` entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python", f"entrypoint should run `python jobs/<name>.py`, got {argv[0]!r}"
    script, rest = argv[1], argv[2:]
    assert "--config" in rest, "entrypoint has no --config"
    at = rest.index("--config")
    config = rest[at + 1]
    overrides = rest[:at] + rest[at + 2 :]
    assert all("=" in item for item in overrides), f"not dotted.key=value overrides: {overrides}"
    return script, config, overrides


def override_value(overrides: list[str], key: str) -> str | None:
    values = [item.partition("=")[2] for item in overrides if item.partition("=")[0] == key]
    return values[-1] if values else None


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def pyproject_dependencies_without_ray(extras: tuple[str, ...] = ()) -> list[str]:
    """pyproject.toml's dependencies but Ray's (the image has it), then those of `extras`."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = [dep for dep in project["dependencies"] if not dep.replace(" ", "").startswith("ray")]
    return deps + [dep for extra in extras for dep in project["optional-dependencies"][extra]]


# ----------------------------------------------------------------------------------------------
# 1. Kinds and schemas


def test_manifests_exist() -> None:
    kinds = sorted(doc.get("kind", "") for _, doc in MANIFESTS)
    assert kinds == ["RayCluster", "RayJob", "RayService"], kinds


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_is_a_kuberay_v1_resource(name: str, doc: dict[str, Any]) -> None:
    assert doc.get("apiVersion") == "ray.io/v1", name
    assert doc.get("kind") in KINDS, f"{name}: kind {doc.get('kind')!r} is not one of {sorted(KINDS)}"
    assert doc.get("metadata", {}).get("name"), f"{name}: metadata.name is required"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_validates_against_crd(name: str, doc: dict[str, Any]) -> None:
    errors = schema_errors(doc)
    assert not errors, f"{name} does not match its CRD:\n" + "\n".join(errors)


def _broken_copies(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Copies of a valid manifest with one mistake each, as people make them."""
    unknown = copy.deepcopy(doc)
    cluster_spec(unknown)["headGroupSpec"]["replicas"] = 1  # worker-group field on the head
    yield "unknown field in headGroupSpec", unknown
    typo = copy.deepcopy(doc)
    cluster_spec(typo)["enableInTreeAutoScaling"] = True  # misspelt
    yield "misspelt top-level field", typo
    int_param = copy.deepcopy(doc)
    cluster_spec(int_param)["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    yield "integer rayStartParams value", int_param
    if cluster_spec(doc).get("workerGroupSpecs"):
        wrong_type = copy.deepcopy(doc)
        cluster_spec(wrong_type)["workerGroupSpecs"][0]["maxReplicas"] = "2"
        yield "string maxReplicas", wrong_type
    bad_enum = copy.deepcopy(doc)
    cluster_spec(bad_enum)["authOptions"] = {"mode": "on"}
    yield "authOptions.mode outside its enum", bad_enum


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_validator_rejects_broken_copies(name: str, doc: dict[str, Any]) -> None:
    for mistake, broken in _broken_copies(doc):
        assert schema_errors(broken), f"{name}: the validator accepted a copy with {mistake}"


def test_schema_rewrite_int_or_string_and_unknown_fields() -> None:
    crd_schema = {
        "type": "object",
        "properties": {
            "cpu": {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
                "pattern": "^[0-9]+m?$",
            },
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "x-kubernetes-validations": [{"rule": "self.cpu != ''"}],
    }
    validator = jsonschema.Draft7Validator(to_json_schema(crd_schema))
    for ok in ({"cpu": 4}, {"cpu": "500m"}, {"free": {"anything": [1]}}, {"labels": {"a": "b"}}):
        assert validator.is_valid(ok), ok
    for bad in ({"cpu": 1.5}, {"cpu": "four"}, {"cpu": [4]}, {"other": 1}, {"labels": {"a": 1}}):
        assert not validator.is_valid(bad), bad


# ----------------------------------------------------------------------------------------------
# 2. Rules beyond the schema


@pytest.mark.parametrize(("name", "doc"), of_kind("RayJob"), ids=[n for n, _ in of_kind("RayJob")])
def test_ttl_needs_shutdown_after_job_finishes(name: str, doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    if "ttlSecondsAfterFinished" in spec:
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{name}: ttlSecondsAfterFinished does nothing without shutdownAfterJobFinishes: true"
        )


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_groups_have_ray_start_params(name: str, doc: dict[str, Any]) -> None:
    for group_name, group in groups(doc):
        assert isinstance(group.get("rayStartParams"), dict), f"{name}: {group_name} has no rayStartParams"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_head_has_no_gpus(name: str, doc: dict[str, Any]) -> None:
    head = cluster_spec(doc)["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f'{name}: head needs rayStartParams num-gpus: "0"'
    for container in containers(head):
        assert GPU not in resource_names(container), f"{name}: the head container asks for GPUs"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_gpu_workers_have_limits_and_tolerations(name: str, doc: dict[str, Any]) -> None:
    gpu_groups = 0
    for group_name, group in list(groups(doc))[1:]:
        asks = [c for c in containers(group) if GPU in resource_names(c)]
        if not asks:
            continue
        gpu_groups += 1
        for container in asks:
            assert GPU in container["resources"].get("limits", {}), (
                f"{name}: {group_name}/{container['name']} must put {GPU} in limits"
            )
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(
            t.get("key") == GPU
            and t.get("operator", "Equal") in ("Exists", "Equal")
            and t.get("effect") in (None, "NoSchedule")
            for t in tolerations
        ), f"{name}: {group_name} requests GPUs but does not tolerate the {GPU} taint"
    assert gpu_groups >= 1, f"{name}: no GPU worker group"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_ray_version_matches_images_and_installed_ray(name: str, doc: dict[str, Any]) -> None:
    import ray

    spec = cluster_spec(doc)
    version = spec.get("rayVersion")
    assert version == ray.__version__, f"{name}: rayVersion {version!r} != installed Ray {ray.__version__}"
    images = [c["image"] for _, group in groups(doc) for c in containers(group)]
    images += [spec["autoscalerOptions"]["image"]] if spec.get("autoscalerOptions", {}).get("image") else []
    ray_images = [image for image in images if image.startswith("rayproject/ray:")]
    assert ray_images, f"{name}: no rayproject/ray image"
    for image in ray_images:
        tag_version = image.split(":", 1)[1].split("-", 1)[0]
        assert tag_version == version, f"{name}: image {image} does not match rayVersion {version}"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_token_auth_is_on(name: str, doc: dict[str, Any]) -> None:
    auth = cluster_spec(doc).get("authOptions", {})
    assert auth.get("mode") == "token", f"{name}: authOptions.mode must be token"
    assert auth.get("secretName") == AUTH_SECRET, f"{name}: authOptions.secretName should be {AUTH_SECRET}"
    for group_name, group in groups(doc):
        for container in containers(group):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE") in (None, "token"), f"{name}: {group_name} turns auth off"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_shared_volume_on_every_pod(name: str, doc: dict[str, Any]) -> None:
    claims = {group_name: mount_paths(group, "persistentVolumeClaim") for group_name, group in groups(doc)}
    assert all(claims.values()), f"{name}: every group must mount the shared volume, got {claims}"


# ----------------------------------------------------------------------------------------------
# 3. Manifests against the code


@pytest.mark.parametrize(("name", "doc"), of_kind("RayJob"), ids=[n for n, _ in of_kind("RayJob")])
def test_rayjob_entrypoint_runs_a_real_script_and_config(
    name: str, doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpo_cluster.config import load_config

    script, config_path, overrides = entrypoint_parts(doc)
    assert (REPO / script).is_file(), f"{name}: entrypoint script {script} is not in the repository"
    assert (REPO / config_path).is_file(), f"{name}: --config {config_path} is not in the repository"
    monkeypatch.chdir(REPO)  # the working_dir the job runs in
    config = load_config(config_path, overrides)
    # Everything the run writes must land on the volume every pod mounts.
    for group_name, group in groups(doc):
        roots = mount_paths(group, "persistentVolumeClaim")
        for key, value in (
            ("output_dir", config.output_dir),
            ("scaling.storage_path", config.scaling.storage_path),
        ):
            assert value and under_any(value, roots), (
                f"{name}: {key}={value} is not on {group_name}'s volume {roots}"
            )


def _runtime_envs() -> Iterator[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """(name, runtime env, the pyproject extras it must add): a serving app on GPUs adds vLLM."""
    for name, doc in of_kind("RayJob"):
        yield name, yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), ()
    for name, doc in of_kind("RayService"):
        for app in serve_config(doc)["applications"]:
            yield f"{name}/{app['name']}", app.get("runtime_env", {}), ("vllm",)


@pytest.mark.parametrize(
    ("name", "env", "extras"), list(_runtime_envs()), ids=[n for n, _, _ in _runtime_envs()]
)
def test_runtime_env_ships_code_and_pyproject_dependencies(
    name: str, env: dict[str, Any], extras: tuple[str, ...]
) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the runtime env fields
    assert str(env.get("working_dir", "")).endswith(".zip"), (
        f"{name}: working_dir should be a zip of the repo"
    )
    pip = env.get("pip", {})
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    assert packages == pyproject_dependencies_without_ray(extras), (
        f"{name}: the pip list drifted from pyproject.toml's dependencies (Ray excepted)"
    )


SERVICES = of_kind("RayService")
SERVICE_IDS = [n for n, _ in SERVICES]


@pytest.mark.parametrize(("name", "doc"), SERVICES, ids=SERVICE_IDS)
def test_serve_config_is_a_valid_serve_deploy_config(name: str, doc: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(doc)
    ServeDeploySchema.model_validate(config)
    assert config.get("http_options", {}).get("host") == "0.0.0.0", (
        f"{name}: the proxy must listen on 0.0.0.0"
    )


@pytest.mark.parametrize(("name", "doc"), SERVICES, ids=SERVICE_IDS)
def test_serve_args_are_builder_keys_and_paths_are_mounted(name: str, doc: dict[str, Any]) -> None:
    from dpo_cluster.config import ServeConfig

    valid = {"config", "overrides"} | {f.name for f in dataclasses.fields(ServeConfig)}
    for app in serve_config(doc)["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
        args = app.get("args", {})
        unknown = sorted(set(args) - valid)
        assert not unknown, f"{name}: app_builder does not take {unknown}; valid: {sorted(valid)}"
        for group_name, group in groups(doc):
            pvc = mount_paths(group, "persistentVolumeClaim")
            secrets = mount_paths(group, "secret")
            assert under_any(args["tuned"], pvc), f"{name}: tuned is not on {group_name}'s volume"
            assert under_any(args["arena_db"], pvc), f"{name}: arena_db is not on {group_name}'s volume"
            assert under_any(args["api_key_file"], secrets), f"{name}: api_key_file is not a mounted Secret"


def test_service_serves_what_the_job_trains() -> None:
    (_, job), (_, service) = of_kind("RayJob")[0], SERVICES[0]
    _, config_path, overrides = entrypoint_parts(job)
    output_dir = override_value(overrides, "output_dir")
    (app,) = serve_config(service)["applications"]
    assert app["args"]["tuned"] == f"{output_dir}/final"
    trained = yaml.safe_load((REPO / config_path).read_text(encoding="utf-8"))["model"]["name_or_path"]
    assert app["args"]["base"] == trained


@pytest.mark.parametrize(("name", "doc"), SERVICES, ids=SERVICE_IDS)
def test_serve_app_builds_with_local_stand_ins(
    name: str, doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real builder over the manifest's args, cluster paths swapped for local ones: tiny base,
    a LoRA adapter as tuned, a key file, a local arena db. Building does not start Ray."""
    from ray import serve

    from tests.serve_helpers import API_KEY, build_lora_final

    key_file = tmp_path / "api_key"
    key_file.write_text(API_KEY, encoding="utf-8")
    stand_ins = {
        "base": "builtin:tiny",
        "tuned": str(build_lora_final(tmp_path / "final")),
        "api_key_file": str(key_file),
        "arena_db": str(tmp_path / "arena" / "votes.sqlite"),
    }
    monkeypatch.chdir(REPO)
    for app in serve_config(doc)["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        args = {**app.get("args", {})}
        assert set(stand_ins) <= set(args), f"{name}: args lack {sorted(set(stand_ins) - set(args))}"
        built = builder({**args, **stand_ins})
        assert isinstance(built, serve.Application)
