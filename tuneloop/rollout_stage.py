"""The rollout stages a candidate goes through before it serves everyone, named once.

shadow: scored on live traffic, its answers not returned; canary: answers a share of the traffic.
A stage is stored as its name (the registry's rollout file, its history, model events, metric labels).
"""

from __future__ import annotations

from typing import Literal, get_args

RolloutStage = Literal["shadow", "canary"]

SHADOW: RolloutStage = "shadow"
CANARY: RolloutStage = "canary"
STAGES: tuple[RolloutStage, ...] = get_args(RolloutStage)  # in the order a candidate goes through them
