"""The anchor of the serving benchmark: the server a user could write instead of running tuneloop.

Starlette under uvicorn, ONNX Runtime and `tokenizers`, one text per run: no batching, no prediction
events, no metrics, no model swaps. It serves the same model file with the same threads per worker, and
answers `POST /predict {"texts": [...]}` with the label and score of each text. Inference runs in the
event loop, so each worker answers one request at a time: the fastest way for a CPU-bound handler on
one thread per worker (a thread pool would only add hand-offs). Deliberately short, and it imports
nothing from tuneloop (it must be what a user would write):

    BARE_MODEL_DIR=var/registry/versions/v1 BARE_THREADS=1 uvicorn benchmarks.bare_server:app --workers 2
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from tokenizers import Tokenizer

directory = Path(os.environ["BARE_MODEL_DIR"])
manifest = json.loads((directory / "manifest.json").read_text())
labels = manifest["labels"]
tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
tokenizer.enable_truncation(max_length=int(manifest["export"]["max_seq_length"]))
tokenizer.no_padding()
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("BARE_THREADS", "1"))
session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
inputs = {i.name for i in session.get_inputs()}


def classify(text: str) -> dict[str, object]:
    ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in inputs})[0][0]
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    best = int(scores.argmax())
    return {"label": labels[best], "score": float(scores[best])}


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse([classify(text) for text in body["texts"]])


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)])
