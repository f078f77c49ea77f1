# The controller's image: the service's code plus training (torch, peft) and the PostgreSQL driver, since the
# controller runs `tuneloop train` in its pod. Build from the repository root:
#   docker build -f deploy/kubernetes/controller.Dockerfile -t tuneloop-controller:latest .
# For GPU nodes, start from an image with CUDA and install torch's CUDA wheels first.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir ".[serve,train,postgres]"
ENV HF_HUB_OFFLINE=1
USER 1000
ENTRYPOINT []
CMD ["tuneloop", "controller"]
