"""The pi0.5 family (vlarl/models/family.py): pi0's folder handling (vlarl/models/pi0/family.py: both
layouts, the same settings, export in the source layout) with pi0.5's model (vlarl/models/pi05/modeling.py).
"""

from __future__ import annotations

from vlarl.models.family import Supervised
from vlarl.models.pi0.family import Pi0
from vlarl.models.pi05.modeling import Pi05Policy
from vlarl.models.tiny_flow.family import flow_matching


class Pi05(Pi0):
    name = "pi05"
    policy = Pi05Policy
    supervised = Supervised(flow_matching, 2.5e-5)  # LeRobot configuration_pi05.py optimizer_lr

    def policy_args(self, tokenizer) -> dict:
        return {"tokenizer": tokenizer}  # its prompt carries the state, tokenised per call
