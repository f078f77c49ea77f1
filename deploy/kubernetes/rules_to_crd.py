"""Write monitoring.yaml's PrometheusRule from deploy/prometheus/tuneloop.rules.yml (one source for the alerts).

    python deploy/kubernetes/rules_to_crd.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "tuneloop.rules.yml"
TARGET = HERE / "base" / "monitoring.yaml"
MARK = "# --- generated from deploy/prometheus/tuneloop.rules.yml below ---\n"


def prometheus_rule() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "tuneloop"},
            "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]}}


def main() -> None:
    text = TARGET.read_text()
    head = text[: text.index(MARK)] if MARK in text else text
    TARGET.write_text(head + MARK + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
