"""A real `bentoml serve` on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.data import validation_split
from tests.support.processes import Server, running_service
from trainer import scenario
from tuneloop.registry import Registry

pytestmark = pytest.mark.slow

# v1 measures 0.92-0.95 on these 200 rows; the binomial standard error there is about 0.018, so 0.85 sits
# more than three standard errors below anything a healthy pipeline produces, yet far above chance (0.5)
# and above what a broken tokenizer, label order or export gives (measured: near 0.5).
ACCURACY_FLOOR = 0.85


def predict(client: httpx.Client, texts: list[str]) -> list[dict]:
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_endpoints(service: Server) -> None:
    with service.client() as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_prediction_shape(service: Server) -> None:
    with service.client() as client:
        predictions = predict(client, ["A triumph of a film.", "Dull, lifeless and far too long."])
    assert [p["label"] for p in predictions] == ["positive", "negative"]
    for prediction in predictions:
        assert re.fullmatch(r"[0-9a-f]{32}", prediction["request_id"])
        assert set(prediction["scores"]) == {"negative", "positive"}
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["model_version"] == 1
    assert predictions[0]["request_id"] != predictions[1]["request_id"]


def test_http_predictions_agree_with_pytorch_and_clear_the_accuracy_floor(
    service: Server,
    torch_reference: np.ndarray,
) -> None:
    val = validation_split()
    with service.client() as client:
        predictions = [p for i in range(0, len(val), 25) for p in predict(client, val.texts[i : i + 25])]
    labels = ["negative", "positive"]
    served = np.array([labels.index(p["label"]) for p in predictions])
    agreement = float(np.mean(served == torch_reference.argmax(-1)))
    accuracy = float(np.mean(served == np.array([labels.index(label) for label in val.labels])))
    print(f"HTTP vs PyTorch agreement {agreement:.4f}; HTTP accuracy {accuracy:.4f} on {len(val)} rows")
    assert agreement >= 0.99
    assert accuracy >= ACCURACY_FLOOR


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(service: Server) -> None:
    texts = validation_split().texts[:64]
    with service.client() as client:
        alone = {text: predict(client, [text])[0]["scores"] for text in texts}

        def one(text: str) -> tuple[str, dict]:
            return text, predict(client, [text])[0]["scores"]

        with ThreadPoolExecutor(max_workers=32) as pool:
            together = dict(pool.map(one, texts))
        metrics = client.get("/metrics").text
    # Same answer whoever shares the batch: static int8 scales fix each row's arithmetic; only the
    # float sums' order may differ with the padded width.
    for text in texts:
        assert max(together[text], key=together[text].get) == max(alone[text], key=alone[text].get)
        assert together[text] == pytest.approx(alone[text], abs=1e-4)
    batches = float(re.search(r"^tuneloop_inference_batch_texts_count (\S+)", metrics, re.M).group(1))
    texts_seen = float(re.search(r"^tuneloop_inference_batch_texts_sum (\S+)", metrics, re.M).group(1))
    assert texts_seen / batches > 1.0  # requests that queued did share batches


BAD_REQUESTS = [
    ("empty list", {"json": {"texts": []}}, 400, "at least 1"),
    ("too many texts", {"json": {"texts": ["ok"] * 65}}, 400, "at most 64"),
    ("too long a text", {"json": {"texts": ["x" * 2001]}}, 400, "at most 2000 characters"),
    ("empty text", {"json": {"texts": [""]}}, 400, "at least 1 character"),
    ("blank text", {"json": {"texts": ["ok", "\u2028 "]}}, 400, "only whitespace"),
    ("texts not a list", {"json": {"texts": "just a string"}}, 400, "texts"),
    ("numbers for texts", {"json": {"texts": [1, 2]}}, 400, "string"),
    ("missing field", {"json": {"text": ["hello"]}}, 400, "texts"),
    ("not JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "json"),
    ("invalid UTF-8", {"content": b'{"texts": ["\xff\xfe bad"]}', "headers": {"content-type": "application/json"}}, 400, "invalid unicode"),
    ("oversized body", {"content": json.dumps({"texts": ["y" * 1_100_000]}).encode(), "headers": {"content-type": "application/json"}}, 413, "max_body_bytes"),
    # schemathesis found these answered 500: BentoML parsed the body as the multipart it claimed to be.
    ("multipart without a boundary", {"content": b'{"texts": ["ok"]}', "headers": {"content-type": "multipart/form-data"}}, 415, "content-type: application/json"),
    ("a form", {"data": {"texts": "ok"}}, 415, "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize(("case", "request_kwargs", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_problem(
    service: Server, case: str, request_kwargs: dict, status: int, message: str
) -> None:
    with service.client() as client:
        response = client.post("/predict", **request_kwargs)
        assert response.status_code == status, response.text
        assert message.lower() in response.text.lower(), response.text
        # and the service is unharmed
        assert client.get("/readyz").status_code == 200
        assert predict(client, ["still working?"])[0]["model_version"] == 1


def test_chunked_oversized_body_is_refused(service: Server) -> None:
    def chunks():
        for _ in range(40):
            yield b"z" * 65536

    with service.client() as client:
        response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_model_endpoint_describes_the_served_version(service: Server, registry_path: Path) -> None:
    manifest = Registry(registry_path).manifest(1)
    with service.client() as client:
        info = client.get("/model").json()
    assert info["version"] == 1
    assert info["backend"] == "onnx"
    assert info["labels"] == manifest.labels
    assert info["quantization"] == manifest.export["quantization"]
    assert info["metrics"]["parity"]["argmax_agreement"] >= 0.99
    assert "CPUExecutionProvider" in info["providers"]


def test_metrics_count_requests_by_endpoint_and_status(service: Server) -> None:
    with service.client() as client:
        before = client.get("/metrics").text
        predict(client, ["counting"])
        client.post("/predict", json={"texts": []})
        after = client.get("/metrics").text

    def value(text: str, series: str) -> float:
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    ok = 'tuneloop_http_requests_total{endpoint="/predict",status="200"}'
    bad = 'tuneloop_http_requests_total{endpoint="/predict",status="400"}'
    assert value(after, ok) - value(before, ok) == 1
    assert value(after, bad) - value(before, bad) == 1
    assert value(after, "tuneloop_model_version") == 1
    assert value(after, "tuneloop_model_loaded") == 1
    assert 'tuneloop_http_request_duration_seconds_bucket{endpoint="/predict"' in after


def test_a_service_abstains_on_texts_below_the_versions_threshold(clinc_registry: Path, tmp_path: Path) -> None:
    """`serve.abstain_below: version`: out-of-scope queries, which no intent covers, are answered `label: null`
    far more often than in-scope ones; an abstained answer keeps its top label and scores, and is counted."""
    manifest, _ = Registry(clinc_registry).resolve()
    threshold = manifest.abstain_below
    assert threshold is not None and 0 < threshold < 1
    in_scope = scenario.sample(scenario.OLD_DOMAINS, "test", 2, seed=3).texts  # 90 texts of v1's own intents
    out_of_scope = scenario.out_of_scope("test", 90, seed=3).texts
    with running_service(clinc_registry, tmp_path, TUNELOOP_SERVE__ABSTAIN_BELOW="version") as server, \
            server.client() as client:
        answers = {name: [p for chunk in range(0, 90, 30) for p in predict(client, texts[chunk:chunk + 30])]
                   for name, texts in (("in", in_scope), ("out", out_of_scope))}
        metrics = client.get("/metrics").text
        openapi = client.get("/docs.json").json()
    for prediction in answers["in"] + answers["out"]:
        top = prediction["top_label"]
        assert prediction["scores"][top] == max(prediction["scores"].values())
        if abs(prediction["scores"][top] - threshold) > 1e-5:  # scores are answered rounded to 6 decimals
            assert prediction["abstained"] == (prediction["scores"][top] < threshold)
        assert prediction["label"] == (None if prediction["abstained"] else top)
    rate = {name: np.mean([p["abstained"] for p in answers[name]]) for name in answers}
    # The threshold is chosen to cost v1 at most 2 points of in-scope accuracy, so how many out-of-scope queries fall
    # under it depends on the bootstrapped model (CI saw 26 of 90 once, 0 in-scope): assert the gap, not a recall.
    assert rate["out"] >= rate["in"] + 0.15 and rate["out"] > 2 * rate["in"], rate
    abstained = sum(p["abstained"] for p in answers["in"] + answers["out"])
    counted = re.search(r'^tuneloop_abstentions_total\{version="1"\} (\S+)$', metrics, re.M)
    assert counted and float(counted.group(1)) == abstained
    prediction_schema = openapi["components"]["schemas"]["Prediction"]["properties"]
    assert {"abstained", "top_label"} <= set(prediction_schema)
