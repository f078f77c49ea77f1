# The image of the controller and the trainer workers: the service's code plus training (torch, peft) and the
# PostgreSQL driver (a trainer runs `tuneloop train` in its pod). Build from the repository root:
#   docker build -f deploy/kubernetes/controller.Dockerfile -t tuneloop-controller:latest .
# PyPI's torch wheels for Linux carry CUDA, so the same image trains on GPU nodes (overlays/gpu) whose driver
# matches them. .dockerignore keeps the virtualenv, var/ and local settings out.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir ".[serve,train,postgres]"
ENV HF_HUB_OFFLINE=1
USER 1000
ENTRYPOINT []
CMD ["tuneloop", "controller"]
