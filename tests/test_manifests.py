"""The deployment artefacts, validated offline: kustomize renders, Kubernetes schemas, the InferenceService
field by field, every manifest argument against the predictor's own parser, and the Dockerfile."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from predictor.config import parse_settings
from predictor.server import ANSWER_MARGIN_S

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE_DIRS = [
    "manifests/kserve/base",
    "manifests/kserve/overlays/gpu",
    "manifests/kserve/overlays/cpu",
    "manifests/kserve/overlays/sdxl-base",
    "manifests/kserve/overlays/sdxl-turbo",
    "manifests/kserve/overlays/flux-schnell",
    "manifests/kserve/overlays/sd35-medium",
    "manifests/kserve/overlays/zimage-turbo",
    "manifests/kserve/overlays/flux2-klein-4b",
    "manifests/kserve/overlays/flux2-dev",
    "manifests/kserve/overlays/qwen-image",
    "manifests/kserve/overlays/qwen-image-edit",
    "manifests/kserve/overlays/modelcar",
    "manifests/kserve/overlays/hf-allow-patterns",
    "manifests/kserve/overlays/kserve-0.15",
    "manifests/kserve/overlays/loras",
    "manifests/kubernetes/base",
]
STORAGE_DIR = "manifests/kserve/storage"
# The ClusterStorageContainers there, by name: fp16 variants of the SD/SDXL repos, and the diffusers folders of the
# flow-matching repos, whose weights are bfloat16 with no fp16 variant.
FP16_CONTAINER = "hf-diffusers-fp16"
FOLDERS_CONTAINER = "hf-diffusers-folders"
# The overlays that serve on one GPU: the gpu overlay and the ones built on it (a model each, or a weight path).
GPU_DIRS = [
    "manifests/kserve/overlays/gpu",
    "manifests/kserve/overlays/sdxl-base",
    "manifests/kserve/overlays/sdxl-turbo",
    "manifests/kserve/overlays/flux-schnell",
    "manifests/kserve/overlays/sd35-medium",
    "manifests/kserve/overlays/zimage-turbo",
    "manifests/kserve/overlays/flux2-klein-4b",
    "manifests/kserve/overlays/flux2-dev",
    "manifests/kserve/overlays/qwen-image",
    "manifests/kserve/overlays/qwen-image-edit",
    "manifests/kserve/overlays/modelcar",
    "manifests/kserve/overlays/hf-allow-patterns",
]
KUBERNETES_VERSION = "1.32.0"
ISVC_SCHEMA = ROOT.parent / "shared" / "reference" / "kserve-inferenceservice-v1beta1.schema.json"


def render(directory: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: CI must render the kustomizations")
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {directory: render(directory) for directory in [*KUSTOMIZE_DIRS, STORAGE_DIR]}


_API_KEY_FILE = "--api_key_file="


def parse_manifest_args(args: list[str]):
    """``parse_settings`` on a container's args; an API key file (a Secret mounted in the pod) is replaced by a local
    one, since the flags check that the file holds keys."""
    with tempfile.TemporaryDirectory() as directory:
        keys = Path(directory) / "keys"
        keys.write_text("k-0123456789abcdef\n")
        local = [f"{_API_KEY_FILE}{keys}" if arg.startswith(_API_KEY_FILE) else arg for arg in args]
        return parse_settings(local)


def containers_of(doc: dict) -> list[dict]:
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]["containers"]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def test_every_kustomization_renders(rendered) -> None:
    kinds = {directory: sorted(doc["kind"] for doc in docs) for directory, docs in rendered.items()}
    for directory in KUSTOMIZE_DIRS:
        if "kserve" in directory:
            assert kinds[directory] == ["InferenceService"], directory
    assert kinds["manifests/kubernetes/base"] == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
    ]


def test_core_kinds_pass_strict_schema_validation(rendered, tmp_path: Path, require_tool) -> None:
    validate = require_tool("kubernetes-validate")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump_all(rendered["manifests/kubernetes/base"]))
    result = subprocess.run(
        [validate, "--strict", "-k", KUBERNETES_VERSION, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 6


def _check_against_schema(value, schema: dict, path: str, problems: list[str]) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return
    expected = schema.get("type")
    if expected == "object" or "properties" in schema:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object")
            return
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                _check_against_schema(item, properties[key], f"{path}.{key}", problems)
            elif isinstance(additional, dict):
                _check_against_schema(item, additional, f"{path}.{key}", problems)
            elif properties is not None:
                problems.append(f"{path}.{key}: unknown field")
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}.{key}: required field missing")
    elif expected == "array":
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return
        for index, item in enumerate(value):
            _check_against_schema(item, schema.get("items", {}), f"{path}[{index}]", problems)
    elif expected == "string" and not isinstance(value, str):
        problems.append(f"{path}: expected a string")
    elif expected == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        problems.append(f"{path}: expected an integer")
    elif expected == "boolean" and not isinstance(value, bool):
        problems.append(f"{path}: expected a boolean")


def _check_against_sdk(value, model_name: str, path: str, problems: list[str]) -> None:
    """Walk the kserve SDK's typed models (and the kubernetes client's) when no CRD schema is at hand."""
    import kserve.models
    import kubernetes.client.models

    match = re.fullmatch(r"list\[(.+)\]", model_name) or re.fullmatch(r"dict\(str, (.+)\)", model_name)
    if match:
        items = value if model_name.startswith("list") else list(value.values())
        for index, item in enumerate(items):
            _check_against_sdk(item, match.group(1), f"{path}[{index}]", problems)
        return
    cls = getattr(kserve.models, model_name, None) or getattr(kubernetes.client.models, model_name, None)
    if cls is None:
        return  # a primitive (str, int, object): nothing to walk
    json_to_attr = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in json_to_attr:
            problems.append(f"{path}.{key}: unknown field")
            continue
        _check_against_sdk(item, cls.openapi_types[json_to_attr[key]], f"{path}.{key}", problems)


@pytest.mark.parametrize("directory", [d for d in KUSTOMIZE_DIRS if "kserve" in d])
def test_inference_service_has_no_unknown_fields(rendered, directory: str) -> None:
    (isvc,) = rendered[directory]
    problems: list[str] = []
    if ISVC_SCHEMA.exists():
        schema = json.loads(ISVC_SCHEMA.read_text())
        _check_against_schema(isvc["spec"], schema["properties"]["spec"], "spec", problems)
    elif os.environ.get("CI"):
        pytest.fail(f"KServe's CRD schema is missing at {ISVC_SCHEMA}: CI must check against it")
    _check_against_sdk(isvc["spec"], "V1beta1InferenceServiceSpec", "spec", problems)
    assert not problems, problems
    # The sanity of the checker itself: a misspelt field is caught.
    bad = json.loads(json.dumps(isvc["spec"]))
    bad["predictor"]["minReplica"] = 0
    caught: list[str] = []
    _check_against_sdk(bad, "V1beta1InferenceServiceSpec", "spec", caught)
    assert caught == ["spec.predictor.minReplica: unknown field"]


@pytest.mark.parametrize("directory", GPU_DIRS)
def test_inference_service_scales_to_zero_on_one_gpu(rendered, directory: str) -> None:
    (isvc,) = rendered[directory]
    annotations = isvc["metadata"]["annotations"]
    predictor = isvc["spec"]["predictor"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Knative"
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] >= 1
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["containerConcurrency"] > 1, "a pod that sees one request at a time can never batch"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["storageUris"][0]["mountPath"] == "/mnt/models"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert predictor["tolerations"] and predictor["nodeSelector"]
    settings = parse_manifest_args(container["args"])[1]
    # The Knative timeout must outlast the predictor's own deadline.
    assert predictor["timeout"] > settings.engine.request_timeout_s
    assert predictor["containerConcurrency"] <= settings.engine.max_batch_size + settings.engine.max_queue


def test_cpu_overlay_serves_builtin_tiny_without_gpu(rendered) -> None:
    (isvc,) = rendered["manifests/kserve/overlays/cpu"]
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "storageUris" not in isvc["spec"]["predictor"]
    assert parse_manifest_args(container["args"])[1].source.model_id == "builtin:tiny"


class ModelOverlay(NamedTuple):
    """What a model overlay promises."""

    repo: str  # on the Hub
    name: str  # the service's and the model's
    flags: dict[str, object]  # parsed settings, by field name, whichever group holds them
    memory: tuple[str, str]  # host memory request and limit
    size_multiple: int  # the family's: --max_image_size must be one


MODEL_OVERLAYS = {
    "manifests/kserve/overlays/sdxl-base": ModelOverlay(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "stable-diffusion-sdxl",
        {
            "variant": "fp16",
            "max_batch_size": 4,
            "default_steps": 30,
            "default_scheduler": "euler",
            "default_guidance_scale": 5.0,
            "max_image_size": 1024,
        },
        ("16Gi", "24Gi"),
        8,
    ),
    "manifests/kserve/overlays/sdxl-turbo": ModelOverlay(
        "stabilityai/sdxl-turbo",
        "stable-diffusion-sdxl-turbo",
        {
            "variant": "fp16",
            "max_batch_size": 8,
            "default_steps": 1,
            "max_steps": 8,
            "default_scheduler": "euler_a",
            "default_guidance_scale": 0.0,
            "max_image_size": 1024,
        },
        ("16Gi", "24Gi"),
        8,
    ),
    # Distilled: 4 steps, no guidance. bfloat16, as FLUX overflows in float16; its files have no fp16 variant.
    "manifests/kserve/overlays/flux-schnell": ModelOverlay(
        "black-forest-labs/FLUX.1-schnell",
        "stable-diffusion-flux-schnell",
        {
            "variant": "auto",
            "dtype": "bfloat16",
            "max_batch_size": 4,
            "max_queue": 16,
            "default_steps": 4,
            "max_steps": 8,
            "default_scheduler": "euler",
            "default_guidance_scale": 0.0,
            "max_image_size": 1024,
            "max_sequence_length": 256,
        },
        ("32Gi", "48Gi"),
        16,
    ),
    "manifests/kserve/overlays/sd35-medium": ModelOverlay(
        "stabilityai/stable-diffusion-3.5-medium",
        "stable-diffusion-sd35-medium",
        {
            "variant": "auto",
            "dtype": "bfloat16",
            "max_batch_size": 4,
            "max_queue": 16,
            "default_steps": 40,
            "max_steps": 100,
            "default_scheduler": "euler",
            "default_guidance_scale": 4.5,
            "max_image_size": 1440,
            "max_sequence_length": 256,
        },
        ("16Gi", "24Gi"),
        16,
    ),
    # Distilled: 9 steps, no guidance row; bfloat16, its files' dtype.
    "manifests/kserve/overlays/zimage-turbo": ModelOverlay(
        "Tongyi-MAI/Z-Image-Turbo",
        "stable-diffusion-zimage-turbo",
        {
            "dtype": "bfloat16",
            "max_batch_size": 4,
            "max_queue": 16,
            "default_steps": 9,
            "max_steps": 16,
            "default_scheduler": "euler",
            "default_guidance_scale": 0.0,
            "max_image_size": 1024,
        },
        ("24Gi", "32Gi"),
        16,
    ),
    # 50 steps, true CFG at the pipeline's default with a negative prompt; 57.7 GB of bfloat16 weights on 80 GB.
    "manifests/kserve/overlays/qwen-image": ModelOverlay(
        "Qwen/Qwen-Image",
        "stable-diffusion-qwen-image",
        {
            "dtype": "bfloat16",
            "max_batch_size": 2,
            "max_queue": 8,
            "default_steps": 50,
            "max_steps": 100,
            "default_scheduler": "euler",
            "max_image_size": 1328,
        },
        ("32Gi", "48Gi"),
        16,
    ),
    # Edit-only, 40 steps; the output's default size reaches 1440 for inputs that are not square.
    "manifests/kserve/overlays/qwen-image-edit": ModelOverlay(
        "Qwen/Qwen-Image-Edit-2511",
        "stable-diffusion-qwen-image-edit",
        {
            "dtype": "bfloat16",
            "max_batch_size": 2,
            "max_queue": 8,
            "default_steps": 40,
            "max_steps": 100,
            "default_scheduler": "euler",
            "max_image_size": 1440,
        },
        ("32Gi", "48Gi"),
        16,
    ),
    # Distilled: 4 steps, no guidance; bfloat16.
    "manifests/kserve/overlays/flux2-klein-4b": ModelOverlay(
        "black-forest-labs/FLUX.2-klein-4B",
        "stable-diffusion-flux2-klein-4b",
        {
            "dtype": "bfloat16",
            "max_batch_size": 4,
            "max_queue": 16,
            "default_steps": 4,
            "max_steps": 8,
            "default_scheduler": "euler",
            "max_image_size": 1024,
        },
        ("24Gi", "32Gi"),
        16,
    ),
    # 32B: the transformer in float8 and the text encoder in host memory fit an 80 GB GPU; the load goes through
    # host memory (112.6 GB in bfloat16).
    "manifests/kserve/overlays/flux2-dev": ModelOverlay(
        "black-forest-labs/FLUX.2-dev",
        "stable-diffusion-flux2-dev",
        {
            "dtype": "bfloat16",
            "storage_dtype": "float8_e4m3fn",
            "offload_text_encoders": True,
            "max_batch_size": 4,
            "default_steps": 50,
            "max_image_size": 1024,
        },
        ("128Gi", "160Gi"),
        16,
    ),
}


def setting(settings, name: str):
    """A parsed setting by its field name, from whichever group (source, limits, engine, server) holds it."""
    (value,) = [
        getattr(group, name)
        for group in (settings.source, settings.limits, settings.engine, settings.server)
        if name in {f.name for f in fields(group)}
    ]
    return value


@pytest.mark.parametrize("directory", sorted(MODEL_OVERLAYS))
def test_model_overlay_serves_its_checkpoint_on_one_gpu(rendered, directory: str) -> None:
    overlay = MODEL_OVERLAYS[directory]
    (isvc,) = rendered[directory]
    predictor = isvc["spec"]["predictor"]
    # Its own name, so it can run beside the base service and the other model overlays.
    assert isvc["metadata"]["name"] == overlay.name
    assert predictor["storageUris"] == [{"uri": f"hf://{overlay.repo}", "mountPath": "/mnt/models"}]
    # A cold start downloads tens of GB (the whole repository, or the allow patterns' share): an hour to become ready.
    assert isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "3600s"
    (container,) = predictor["containers"]
    settings = parse_manifest_args(container["args"])[1]
    assert settings.model_name == overlay.name
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{overlay.name}"
    assert settings.source.model_dir == "/mnt/models"
    assert {name: setting(settings, name) for name in overlay.flags} == overlay.flags
    assert settings.limits.default_steps <= settings.limits.max_steps
    assert settings.limits.max_image_size % overlay.size_multiple == 0
    # One GPU, on the nodes the gpu overlay selects.
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert (resources["requests"]["memory"], resources["limits"]["memory"]) == overlay.memory
    (gpu_isvc,) = rendered["manifests/kserve/overlays/gpu"]
    assert (
        predictor["nodeSelector"] == gpu_isvc["spec"]["predictor"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    )
    assert predictor["tolerations"] == gpu_isvc["spec"]["predictor"]["tolerations"]
    # The base's batching arithmetic: one full batch in flight plus one waiting per pod.
    batch_size = settings.engine.max_batch_size
    assert predictor["scaleTarget"] == batch_size
    assert predictor["containerConcurrency"] == 2 * batch_size


def test_every_manifest_argument_is_a_predictor_flag(rendered) -> None:
    checked = 0
    for docs in rendered.values():
        for doc in docs:
            for container in containers_of(doc):
                parse_manifest_args(container["args"])  # exits (SystemExit) on any flag the predictor lacks
                checked += 1
    assert checked == len(KUSTOMIZE_DIRS)


def test_plain_kubernetes_requires_api_keys_from_a_secret(rendered) -> None:
    """Its LoadBalancer reaches the GPU from outside the cluster: the generation routes need keys, read from a
    Secret mounted read-only (the README says how to create it)."""
    (deployment,) = [doc for doc in rendered["manifests/kubernetes/base"] if doc["kind"] == "Deployment"]
    (container,) = containers_of(deployment)
    (key_file,) = [arg.removeprefix(_API_KEY_FILE) for arg in container["args"] if arg.startswith(_API_KEY_FILE)]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [name for name, mount in mounts.items() if key_file.startswith(mount["mountPath"] + "/")]
    assert mounts[name]["readOnly"] is True
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "stable-diffusion-api-keys"
    assert key_file.removeprefix(mounts[name]["mountPath"] + "/") == "keys"
    assert parse_manifest_args(container["args"])[1].server.api_key_file is not None


def _of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def _storage_containers(rendered) -> dict[str, dict]:
    """The ClusterStorageContainers, by name."""
    containers = _of_kind(rendered[STORAGE_DIR], "ClusterStorageContainer")
    by_name = {doc["metadata"]["name"]: doc for doc in containers}
    assert len(by_name) == len(containers), "two ClusterStorageContainers share a name"
    return by_name


def _allow_patterns(csc: dict) -> list[str]:
    (env,) = [e for e in csc["spec"]["container"]["env"] if e["name"] == "STORAGE_ALLOW_PATTERNS"]
    patterns = json.loads(env["value"])
    assert isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns), patterns
    return patterns


def _hub_fetches(name: str, patterns: list[str]) -> bool:
    """Whether an allow list takes a repo-relative path, as kserve-storage applies STORAGE_ALLOW_PATTERNS: it hands
    them to huggingface_hub's snapshot_download, which matches with fnmatch.fnmatchcase after turning a pattern that
    ends in "/" into "<dir>/*". fnmatch's `*` matches "/" as well: "transformer/*" takes the folder's whole tree."""
    return any(fnmatch.fnmatchcase(name, p + "*" if p.endswith("/") else p) for p in patterns)


def _uri_formats_take(csc: dict, uri: str) -> bool:
    return any(re.fullmatch(f["regex"], uri) for f in csc["spec"]["supportedUriFormats"])


def test_storage_containers_are_storage_initializers(rendered) -> None:
    containers = _storage_containers(rendered)
    assert set(containers) == {FP16_CONTAINER, FOLDERS_CONTAINER}
    for name, csc in containers.items():
        container = csc["spec"]["container"]
        # The name KServe recognises, and an image whose kserve-storage reads STORAGE_ALLOW_PATTERNS (0.17 on).
        assert container["name"] == "storage-initializer", name
        image, tag = container["image"].split(":")
        assert image == "kserve/storage-initializer", name
        assert tuple(int(part) for part in tag.removeprefix("v").split(".")[:2]) >= (0, 17), name
        assert _allow_patterns(csc)
        formats = csc["spec"]["supportedUriFormats"]
        assert formats and all(set(f) == {"regex"} for f in formats), name
        for f in formats:
            re.compile(f["regex"])
        # Kept to the repositories served here, so other hf:// models keep the default initializer.
        assert not _uri_formats_take(csc, "hf://meta-llama/Llama-3.1-8B"), name
    # No URI is taken by both: KServe does not say which of two matching containers it picks.
    for directory in KUSTOMIZE_DIRS:
        for doc in rendered[directory]:
            for storage in doc.get("spec", {}).get("predictor", {}).get("storageUris", []):
                taking = [name for name, csc in containers.items() if _uri_formats_take(csc, storage["uri"])]
                assert len(taking) <= 1, (directory, storage["uri"], taking)


def test_storage_objects_have_no_unknown_fields(rendered) -> None:
    """The ISVC schema check covers InferenceServices only: the storage objects are walked through the kserve SDK's
    typed models (V1alpha1ClusterStorageContainer, V1alpha1LocalModelCache, ...) and the kubernetes client's."""
    import kserve.models

    for doc in rendered[STORAGE_DIR]:
        model = f"V1alpha1{doc['kind']}"
        assert hasattr(kserve.models, model), model
        problems: list[str] = []
        _check_against_sdk(doc, model, doc["kind"], problems)
        assert not problems, problems
    # The sanity of the checker itself: a misspelt field is caught.
    csc = json.loads(json.dumps(_storage_containers(rendered)[FOLDERS_CONTAINER]))
    csc["spec"]["supportedUriFormat"] = csc["spec"].pop("supportedUriFormats")
    caught: list[str] = []
    _check_against_sdk(csc, "V1alpha1ClusterStorageContainer", "csc", caught)
    assert caught == ["csc.spec.supportedUriFormat: unknown field"]


def test_allow_patterns_fetch_exactly_the_files_the_server_reads(rendered, tmp_path: Path) -> None:
    """The fp16 ClusterStorageContainer's STORAGE_ALLOW_PATTERNS, matched as huggingface_hub matches them (fnmatch),
    select from a Hub-like repository the files predictor.weights says the server reads, and nothing else."""
    from predictor.testing import save_hub_like_repository
    from predictor.weights import needed_files

    patterns = _allow_patterns(_storage_containers(rendered)[FP16_CONTAINER])
    repository = save_hub_like_repository(tmp_path)
    files = [str(p.relative_to(repository)) for p in repository.rglob("*") if p.is_file()]
    fetched = {name for name in files if _hub_fetches(name, patterns)}
    assert fetched == {str(path) for path in needed_files(repository, "auto")}
    assert len(fetched) < len(files)


class FolderRepo(NamedTuple):
    """A flow-matching repository on the Hub, as its file list stands: what the loader reads, and what it never
    does (single-file checkpoints and their encoders, model-card files)."""

    uri: str
    reads: list[str]
    skips: list[str]


_CLIP_TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
_T5_TOKENIZER = ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
_T5_SHARDS = [
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
]
_ONE_FILE = ["config.json", "diffusion_pytorch_model.safetensors"]


def _in(folder: str, names: list[str]) -> list[str]:
    return [f"{folder}/{name}" for name in names]


FOLDER_OVERLAYS = {
    "manifests/kserve/overlays/flux-schnell": FolderRepo(
        "hf://black-forest-labs/FLUX.1-schnell",
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            *_in("tokenizer", _CLIP_TOKENIZER),
            *_in("tokenizer_2", _T5_TOKENIZER),
            *_in("text_encoder", ["config.json", "model.safetensors"]),
            *_in("text_encoder_2", _T5_SHARDS),
            *_in(
                "transformer",
                [
                    "config.json",
                    "diffusion_pytorch_model-00001-of-00003.safetensors",
                    "diffusion_pytorch_model-00002-of-00003.safetensors",
                    "diffusion_pytorch_model-00003-of-00003.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json",
                ],
            ),
            *_in("vae", _ONE_FILE),
        ],
        [
            ".gitattributes",
            "LICENSE.md",
            "README.md",
            "ae.safetensors",
            "flux1-schnell.safetensors",
            "schnell_grid.jpeg",
        ],
    ),
    "manifests/kserve/overlays/sd35-medium": FolderRepo(
        "hf://stabilityai/stable-diffusion-3.5-medium",
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            *_in("tokenizer", _CLIP_TOKENIZER),
            *_in("tokenizer_2", _CLIP_TOKENIZER),
            *_in("tokenizer_3", _T5_TOKENIZER),
            *_in("text_encoder", ["config.json", "model.safetensors"]),
            *_in("text_encoder_2", ["config.json", "model.safetensors"]),
            *_in("text_encoder_3", _T5_SHARDS),
            *_in("transformer", _ONE_FILE),
            *_in("vae", _ONE_FILE),
        ],
        [
            ".gitattributes",
            "LICENSE.md",
            "README.md",
            "sd3.5_medium.safetensors",
            *_in(
                "text_encoders",
                ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"],
            ),
        ],
    ),
}


def _documented_patterns(directory: str) -> list[str]:
    """The allow-pattern list an overlay's header comment spells out (a JSON list over indented comment lines)."""
    text = (ROOT / directory / "kustomization.yaml").read_text()
    match = re.search(r"^#   (\[.*?\])$", text, re.M | re.S)
    assert match, f"{directory}: no allow-pattern list in the header comment"
    return json.loads(re.sub(r"^#\s*", "", match.group(1), flags=re.M))


@pytest.mark.parametrize("directory", sorted(FOLDER_OVERLAYS))
def test_folder_overlays_fetch_only_the_diffusers_folders(rendered, directory: str) -> None:
    from huggingface_hub.utils import filter_repo_objects

    repo = FOLDER_OVERLAYS[directory]
    csc = _storage_containers(rendered)[FOLDERS_CONTAINER]
    (isvc,) = rendered[directory]
    predictor = isvc["spec"]["predictor"]
    # The service names the container, whose URI formats take its URI, with or without a revision; the fp16
    # container's do not, so KServe would pick this one even for a service that named none.
    assert predictor["storageContainerName"] == FOLDERS_CONTAINER
    (storage,) = predictor["storageUris"]
    assert storage["uri"] == repo.uri
    assert _uri_formats_take(csc, repo.uri) and _uri_formats_take(csc, f"{repo.uri}:0123abc")
    assert not _uri_formats_take(csc, f"{repo.uri}-extra")
    assert not _uri_formats_take(_storage_containers(rendered)[FP16_CONTAINER], repo.uri)
    # The patterns take every file the loader reads and none of the single-file checkpoints beside them.
    patterns = _allow_patterns(csc)
    files = repo.reads + repo.skips
    fetched = [name for name in files if _hub_fetches(name, patterns)]
    assert fetched == repo.reads, sorted(set(files) ^ set(fetched))
    # The helper agrees with the function snapshot_download filters by.
    assert list(filter_repo_objects(files, allow_patterns=patterns)) == fetched
    # The list in the overlay's header comment fetches the same files.
    documented = _documented_patterns(directory)
    assert set(documented) <= set(patterns)
    assert [name for name in files if _hub_fetches(name, documented)] == fetched
    # Without SD3's two T5 patterns (the storage file's comment says so) the T5 encoder stays on the Hub, and
    # only it.
    without_t5 = [p for p in patterns if p not in ("tokenizer_3/*", "text_encoder_3/*")]
    assert len(without_t5) == len(patterns) - 2
    assert [name for name in files if _hub_fetches(name, without_t5)] == [
        name for name in fetched if name.split("/")[0] not in ("tokenizer_3", "text_encoder_3")
    ]


def test_folder_patterns_fetch_the_edit_pipelines_processor(rendered) -> None:
    """Qwen-Image-Edit's processor folder (a Qwen2VLProcessor: the tokenizer and the image processor the encoder
    sees the input images through) is fetched with the other component folders."""
    from huggingface_hub.utils import filter_repo_objects

    patterns = _allow_patterns(_storage_containers(rendered)[FOLDERS_CONTAINER])
    wanted = ["processor/preprocessor_config.json", "processor/tokenizer.json", "processor/chat_template.json"]
    assert list(filter_repo_objects(wanted, allow_patterns=patterns)) == wanted


def test_weight_paths_point_at_each_other_and_keep_the_base_model(rendered) -> None:
    (base,) = rendered["manifests/kserve/base"]
    uri = base["spec"]["predictor"]["storageUris"][0]["uri"]
    storage = rendered[STORAGE_DIR]
    # Allow patterns: the service names the storage container, whose URI formats take the service's URI.
    (patterned,) = rendered["manifests/kserve/overlays/hf-allow-patterns"]
    predictor = patterned["spec"]["predictor"]
    csc = _storage_containers(rendered)[FP16_CONTAINER]
    assert predictor["storageContainerName"] == csc["metadata"]["name"]
    assert predictor["storageUris"][0]["uri"] == uri
    assert _uri_formats_take(csc, uri)
    assert not _uri_formats_take(csc, "hf://meta-llama/Llama-3.1-8B")
    # kserve-storage takes a revision after a colon.
    assert _uri_formats_take(csc, f"{uri}:0123abc")
    # Node-local cache: matched by the URI, character for character; its node group exists.
    (cache,) = _of_kind(storage, "LocalModelCache")
    (group,) = _of_kind(storage, "LocalModelNodeGroup")
    assert cache["spec"]["sourceModelUri"] == uri
    assert cache["spec"]["nodeGroups"] == [group["metadata"]["name"]]
    # Modelcar: an OCI image, at the same mount path.
    (modelcar,) = rendered["manifests/kserve/overlays/modelcar"]
    (image,) = modelcar["spec"]["predictor"]["storageUris"]
    assert image["uri"].startswith("oci://") and image["mountPath"] == "/mnt/models"
    # KServe 0.15: no storageUris list; the URI in kserve-container's STORAGE_URI, and 0.15's name for the mode.
    (old,) = rendered["manifests/kserve/overlays/kserve-0.15"]
    assert "storageUris" not in old["spec"]["predictor"]
    assert old["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    (container,) = old["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": uri} in container["env"]
    assert parse_manifest_args(container["args"])[1].source.model_dir == "/mnt/models"


def test_modelcar_dockerfile_stages_with_the_weights_tool() -> None:
    text = (ROOT / "docker" / "model.Dockerfile").read_text()
    assert "COPY predictor/weights.py /weights.py" in text
    assert "python /weights.py stage /src /models" in text
    assert "COPY --from=stage /models /models" in text


def test_probes_let_a_long_load_and_compile_finish(rendered) -> None:
    """The listener answers /livez within about a second and while the model loads and compiles (a real-process
    test shows it), so liveness never restarts a loading pod and the liveness budget only has to cover the
    imports; readiness is the model's own path. The InferenceServices carry no startup probe, which Knative
    accepts only from 1.15; the plain Deployment keeps one."""
    checked = 0
    for docs in rendered.values():
        for doc in docs:
            for container in containers_of(doc):
                name = parse_manifest_args(container["args"])[1].model_name
                liveness = container["livenessProbe"]
                assert liveness["httpGet"]["path"] == "/livez"
                assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
                assert container["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{name}"
                if doc["kind"] == "InferenceService":
                    assert "startupProbe" not in container
                else:
                    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
                checked += 1
    assert checked == len(KUSTOMIZE_DIRS)


def test_readiness_probe_paths_exist(rendered, client) -> None:
    for docs in rendered.values():
        for doc in docs:
            for container in containers_of(doc):
                name = parse_manifest_args(container["args"])[1].model_name
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in container:
                        path = container[probe]["httpGet"]["path"].replace(name, "sd")
                        assert client.get(path).status_code == 200, (probe, path)


def test_dockerfile_entrypoint_starts_the_server() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["python", "-m", "predictor"]
    parse_settings(command)
    result = subprocess.run([sys.executable, "-m", "predictor", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--model_dir" in result.stdout
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M), "the runtime user must be numeric"


def test_lock_file_pins_every_dependency() -> None:
    from packaging.requirements import Requirement

    lock = (ROOT / "docker" / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    for line in re.findall(r'^\s*"([^"]+)"', block, re.M):
        requirement = Requirement(line)
        name = requirement.name.lower()
        assert name in pins, f"{name} is not in docker/requirements.lock: run docker/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert "--hash=sha256:" in lock


def test_hadolint_reports_nothing(require_tool) -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [
            hadolint,
            "--failure-threshold",
            "warning",
            "Dockerfile",
            "docker/baked.Dockerfile",
            "docker/model.Dockerfile",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes_plain_manifests_and_dockerfile(rendered, tmp_path: Path, require_tool) -> None:
    checkov = require_tool("checkov")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump_all(rendered["manifests/kubernetes/base"]))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    result = subprocess.run(
        [
            checkov,
            "--skip-download",
            "--quiet",
            "--compact",
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--output",
            "cli",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_lora_overlay_mounts_the_adapters_beside_the_weights(rendered) -> None:
    (isvc,) = rendered["manifests/kserve/overlays/loras"]
    predictor = isvc["spec"]["predictor"]
    mounts = {storage["mountPath"] for storage in predictor["storageUris"]}
    (container,) = predictor["containers"]
    settings = parse_manifest_args(container["args"])[1]
    assert mounts == {settings.source.model_dir, settings.source.lora_dir}
    assert not settings.engine.compile  # the server refuses adapters with --compile
    assert isvc["metadata"]["name"] == "stable-diffusion-loras"


def test_pods_are_given_time_for_the_servers_whole_shutdown(rendered) -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM (Knative gives it the revision's
    timeout): that must cover --grace_period_s, the server's margin to answer what is left, and its exit."""
    exit_s = 10  # writing the 503s, unloading, the interpreter's exit: measured at under 4 s on 2 CPU cores
    checked = 0
    for docs in rendered.values():
        for doc in docs:
            for container in containers_of(doc):
                grace = setting(parse_manifest_args(container["args"])[1], "grace_period_s")
                if doc["kind"] == "Deployment":
                    allowed = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                else:
                    allowed = doc["spec"]["predictor"].get("timeout", 300)  # Knative's default revision timeout
                assert allowed >= grace + ANSWER_MARGIN_S + exit_s, (doc["metadata"]["name"], allowed, grace)
                checked += 1
    assert checked == len(KUSTOMIZE_DIRS)
