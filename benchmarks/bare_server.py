"""The anchor of the serving benchmark: the server a user could write instead of running tuneloop.

Starlette under uvicorn, ONNX Runtime and `tokenizers`, one text per run: no batching, no prediction
events, no metrics, no model swaps. It serves the same model file with the same threads per worker, and
answers `POST /predict {"texts": [...]}` with the label and score of each text. Inference runs in the
event loop, so each worker answers one request at a time: the fastest way for a CPU-bound handler on
one thread per worker (a thread pool would only add hand-offs). Deliberately short, and it imports
nothing from tuneloop (it must be what a user would write):

    BARE_MODEL_DIR=var/registry/versions/v1 BARE_THREADS=1 python benchmarks/bare_server.py 8000 2

Started as `uvicorn --workers 2` it answered one sequential client in 48 ms (p50; 3.3 ms with one worker):
uvicorn's multi-worker socket is opened without IPPROTO_TCP, so asyncio never sets TCP_NODELAY on its
connections and each response's second write waits for a delayed ACK. Hence the few lines at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from tokenizers import Tokenizer
from uvicorn.supervisors import Multiprocess

model: dict[str, object] = {}


def load() -> None:
    directory = Path(os.environ["BARE_MODEL_DIR"])
    manifest = json.loads((directory / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=int(manifest["export"]["max_seq_length"]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("BARE_THREADS", "1"))
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model.update(labels=manifest["labels"], tokenizer=tokenizer, session=session,
                 inputs={i.name for i in session.get_inputs()})


def classify(text: str) -> dict[str, object]:
    ids = np.array([model["tokenizer"].encode(text).ids], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    logits = model["session"].run(["logits"], {k: v for k, v in feeds.items() if k in model["inputs"]})[0][0]
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    best = int(scores.argmax())
    return {"label": model["labels"][best], "score": float(scores[best])}


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse([classify(text) for text in body["texts"]])


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    load()  # in each worker, never in the launcher below
    yield


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)], lifespan=lifespan)

if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    config = uvicorn.Config("bare_server:app", workers=workers, access_log=False, log_level="warning")
    Multiprocess(config, sockets=[sock]).run()
