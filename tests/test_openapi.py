"""Both HTTP APIs keep to their OpenAPI documents: the documents say what the code takes and answers, and
schemathesis, generating valid and invalid requests from them against the real processes, finds no 5xx,
no undocumented status and no response outside its schema."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from services.settings import limits
from tests.support.processes import BIN, Server, bus_env, running_controller

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
TOKEN = "schemathesis-token"


def schemathesis(url: str, workdir: Path, *options: str) -> None:
    """Run schemathesis against `url` (an OpenAPI document), its cache in `workdir`; fails the test with its report."""
    result = subprocess.run(
        [str(BIN / "schemathesis"), "run", url, "--checks", CHECKS, "--max-examples", "25", "--seed", "20261129",
         "--generation-database", "none", "--no-color", "--request-timeout", "30", *options],
        capture_output=True, text=True, timeout=600, cwd=workdir,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    operations = sum(len(item) for item in httpx.get(url, timeout=30).json()["paths"].values())
    tested, generated = (int(re.search(pattern, result.stdout).group(1)) for pattern in (r"Tested:\s+(\d+)",
                                                                                        r"(\d+) generated"))
    assert tested == operations and generated >= 10 * operations, result.stdout[-3000:]  # every operation, and hard


def test_the_service_document_states_the_limits_and_answers(service: Server) -> None:
    spec = httpx.get(service.url + "/docs.json", timeout=30).json()
    components = spec["components"]["schemas"]
    predict = spec["paths"]["/predict"]["post"]
    texts = components["predict__Input"]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, limits.max_texts_per_request)
    assert texts["items"]["maxLength"] == limits.max_chars_per_text
    assert set(predict["responses"]) == {"200", "400", "413", "415", "503"}
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert set(components["Prediction"]["required"]) == {
        "request_id", "label", "top_label", "abstained", "scores", "model_version"}
    for path in ("/feedback", "/feedback/batch"):
        answers = spec["paths"][path]["post"]["responses"]
        assert set(answers) == {"202", "400", "401", "413", "415", "503"}, path
        assert answers["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    body = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/FeedbackEvent"}
    assert {"label", "request_id", "text", "feedback_id", "source", "timestamp"} == set(
        components["FeedbackEvent"]["properties"]
    )
    assert set(spec["paths"]["/model"]["get"]["responses"]) == {"200", "503"}


def test_schemathesis_finds_nothing_in_the_service(service: Server, tmp_path: Path) -> None:
    schemathesis(service.url + "/docs.json", tmp_path)


@pytest.mark.parametrize("token", [TOKEN, None], ids=["with-token", "without-token"])
def test_schemathesis_finds_nothing_in_the_admin_api(
    token: str | None, registry_path: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(registry_path, registry)  # a rollback it finds must not move the session's registry
    env = bus_env("embedded", tmp_path) | {
        "TUNELOOP_CONTROLLER__ADMIN_TOKEN": TOKEN,
        "TUNELOOP_TRIGGER__COMMAND": '["true"]',  # a manual run that ends at once: the API is tested, not training
    }
    with running_controller(registry, tmp_path, env):
        url = f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}"
        schemathesis(url + "/openapi.json", tmp_path, *(["--header", f"Authorization: Bearer {token}"] if token else []))
        status = httpx.get(url + "/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert status.status_code == 200, status.text  # the controller survived the run
