"""From data to a served version: the trainer's run, then the exporter's build, gate and publish, then the rollout.

Above trainer/ and exporters/ (which must not import each other's side of the work: the trainer knows nothing of
ONNX), below cli/. It never imports services/ or monitoring/: it reaches the replicas through the registry and the
model topic.
"""
