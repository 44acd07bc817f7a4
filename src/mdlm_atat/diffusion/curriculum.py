"""The easy -> medium -> hard curriculum (DESIGN 3.4): beta as a function of training progress.

Easy: beta = -beta0 (the tilt masks easy tokens more: the model practises them); medium: beta = 0 (MDLM);
hard: beta = +beta0. `variant: none` keeps beta = +beta0 throughout. No adaptive masking (beta = 0) before the
estimator's warm-up ends. `inverse` masking flips the sign; `uniform` masking is beta = 0 always. The state is a
pure function of the step, so a resumed run continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdlm_atat.config import AtatConfig, CurriculumConfig

STAGES = ("easy", "medium", "hard")
STAGE_INDEX = {"warmup": -1, "easy": 0, "medium": 1, "hard": 2, "fixed": 3, "uniform": 4}


@dataclass(frozen=True)
class CurriculumState:
    stage: str  # warmup | easy | medium | hard | fixed | uniform
    beta: float


class Curriculum:
    def __init__(self, cfg: CurriculumConfig, atat: AtatConfig, total_steps: int):
        self.cfg = cfg
        self.beta0 = atat.beta0
        self.sign = -1.0 if atat.masking == "inverse" else 1.0
        self.uniform = atat.masking == "uniform" or atat.importance_mode == "none"
        self.warmup_steps = atat.estimator_warmup_steps
        self.total_steps = total_steps

    def state(self, step: int) -> CurriculumState:
        if self.uniform:
            return CurriculumState("uniform", 0.0)
        if step < self.warmup_steps:
            return CurriculumState("warmup", 0.0)
        if self.cfg.variant == "none":
            return CurriculumState("fixed", self.sign * self.beta0)
        progress = step / self.total_steps
        ends = (self.cfg.stage_1_end, self.cfg.stage_2_end)
        stage = STAGES[sum(progress >= end for end in ends)]
        return CurriculumState(stage, self.sign * self.beta0 * self._level(progress, ends))

    def _level(self, progress: float, ends: tuple[float, float]) -> float:
        """-1 (easy), 0 (medium), +1 (hard), linearly ramped over `ramp` around each boundary."""
        half = self.cfg.ramp / 2
        level = -1.0
        for end in ends:
            if half > 0:
                level += min(1.0, max(0.0, (progress - (end - half)) / (2 * half)))
            else:
                level += 1.0 if progress >= end else 0.0
        return level
