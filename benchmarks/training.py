"""Training speed on this CPU: tuneloop's dropout and bf16 products against plain PyTorch, interleaved.

A fine-tuning run's accuracy within the loop's time budget is set by how many steps fit in it, so a
step's cost is what this measures: `trainer.train.fit` itself, one epoch of a scenario's feedback
plus as many replayed rows (its lengths, grouped batches of 16, the 2 lower layers frozen as
`tuneloop train` runs them), in each setting, in rounds, so that every setting meets the same host:

- fp32, torch's dropout 0.1: the anchor, what a user would write (plain PyTorch, peft's `nn.Dropout`);
- fp32, dropout 0.1: tuneloop's defaults on a CPU without fast bf16 (`trainer.dropout`: the same masks,
  drawn 4 to a random number);
- bf16 autocast (`train.precision`), dropout 0.1: the defaults where the CPU multiplies bf16 fast;
- fp32, dropout 0 (`train.lora_dropout`, peft's default);
- bf16, dropout 0.

Reported: training samples/s of each (median and range over rounds) and each round's ratio to the
anchor of the same round (median and range), with `cpu_bf16_speedup()` (what `train.precision=auto`
decides on). Accuracy is not measured here: the scenario suite judges the defaults.

    .venv/bin/python benchmarks/training.py                  # banking77:1, clinc:1 and sentiment:1, 3 rounds
    .venv/bin/python benchmarks/training.py --rounds 5 --scenarios banking77:1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.spread import spread  # noqa: E402
from trainer import scenario as scenarios  # noqa: E402
from trainer import train  # noqa: E402
from trainer.data import concat  # noqa: E402
from trainer.model import add_lora, build_classifier, load_tokenizer, resolve_base  # noqa: E402
from trainer.train import cpu_bf16_speedup, fit  # noqa: E402
from tuneloop.config import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {  # name: (train.precision, train.lora_dropout, tuneloop's dropout); the first is the anchor
    "fp32, torch's dropout 0.1": ("fp32", 0.1, False),
    "fp32, dropout 0.1": ("fp32", 0.1, True),
    "bf16, dropout 0.1": ("bf16", 0.1, True),
    "fp32, dropout 0": ("fp32", 0.0, True),
    "bf16, dropout 0": ("bf16", 0.0, True),
}
ANCHOR = next(iter(SETTINGS))


def samples_per_second(scenario: scenarios.Scenario, precision: str, dropout: float, own_dropout: bool) -> float:
    settings = Settings()
    config = settings.train.model_copy(update={"precision": precision, "lora_dropout": dropout, "max_epochs": 1})
    base = resolve_base(settings.model)
    rows = concat([scenario.feedback, scenario.bootstrap.subset(list(range(len(scenario.feedback))))])
    model = add_lora(build_classifier(base, len(scenario.labels), settings.model), config)
    # The anchor keeps torch's nn.Dropout: fit's swap for tuneloop's is skipped.
    with contextlib.nullcontext() if own_dropout else mock.patch.object(train, "swap_dropout", lambda model: 0):
        result = fit(model, load_tokenizer(base), rows, scenario.test_old.subset(list(range(64))), scenario.labels,
                     config, settings.model.max_seq_length, progress=False,
                     frozen_layers=settings.train.finetune_frozen_layers)
    assert result.precision == precision
    return result.train_samples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="banking77:1,clinc:1,sentiment:1", help="NAME:SEED,...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "training.json")
    args = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "cpu_bf16_speedup": round(cpu_bf16_speedup(), 2), "rounds": args.rounds, "scenarios": []}
    for spec in args.scenarios.split(","):
        name, seed = spec.split(":")
        scenario = getattr(scenarios, name)(int(seed))
        measured: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        for round_ in range(args.rounds):
            for setting, options in SETTINGS.items():
                measured[setting].append(samples_per_second(scenario, *options))
                print(f"{spec} round {round_ + 1}: {setting}: {measured[setting][-1]:.1f} samples/s", flush=True)
        report["scenarios"].append({
            "scenario": spec, "rows": 2 * len(scenario.feedback),
            "settings": {
                setting: {"samples_per_second": spread(values),
                          "ratio_to_anchor": spread([v / a for v, a in zip(values, measured[ANCHOR], strict=True)])}
                for setting, values in measured.items()
            },
        })
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| scenario | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
    for row in report["scenarios"]:
        cells = []
        for setting in SETTINGS:
            figures = row["settings"][setting]
            speed, ratio = figures["samples_per_second"], figures["ratio_to_anchor"]
            cells.append(f"{speed['median']:.0f} samples/s" + ("" if setting == ANCHOR else
                         f", {ratio['median']:.2f}× ({ratio['min']:.2f}-{ratio['max']:.2f})"))
        lines.append(f"| `{row['scenario']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
