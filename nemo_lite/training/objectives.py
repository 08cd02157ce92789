"""Training objectives: what a step's loss is, as a name-keyed table (``objective.name``).

The trainer asks an objective three things per step and knows nothing else about it:

- ``count(batch)``: the units the batch's loss sums over, from the CPU batch (label tokens for next-token
  prediction, preference pairs for DPO); the trainer divides the step's loss sum by the step's count, so
  gradient accumulation and data parallelism stay exact;
- ``loss(step, model, batch, mask, grad_scale)``: the summed loss of one micro-batch (a device scalar);
- ``metric_sums()``: device sums over the units since the last call (``rewards/chosen``, ...), which the
  trainer divides by the count and logs (TRL's metric names).

Built in (docs/preference.md):

- ``next_token`` (the default): the training step's own summed cross-entropy over the labels.
- ``dpo``: Direct Preference Optimization with the sigmoid loss, ``beta`` and optional ``label_smoothing``
  (the conservative DPO form), on packed preference pairs (``data.kind: preference``). The reference
  log-probabilities come from ``reference``: ``adapters_off`` (the same model with its LoRA adapters switched
  off: no extra memory, one extra forward without grad) or ``copy`` (a frozen copy of the starting model for
  full fine-tuning: one more set of weights, one extra forward); ``auto`` picks ``adapters_off`` when the
  model has LoRA adapters, else ``copy``.
- ``simpo``: SimPO, reference-free: the length-averaged log-probabilities of the answers with a target
  margin ``simpo_gamma`` (TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nemo_lite.errors import IGNORE_INDEX, ConfigError
from nemo_lite.registry import Registry
from nemo_lite.training.loss import forward_hidden

REFERENCES = ("auto", "adapters_off", "copy")


@dataclass
class ObjectiveSection:
    """The recipe's ``objective:`` group."""

    name: str = "next_token"  # next_token | dpo | simpo (or a registered objective)
    beta: float = 0.1  # dpo, simpo: the inverse temperature of the preference logit
    label_smoothing: float = 0.0  # dpo, simpo: the assumed share of flipped preferences, in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    reference: str = "auto"  # dpo: auto | adapters_off | copy (where the reference log-probabilities come from)


class UnknownObjectiveError(ConfigError):
    pass


OBJECTIVES: Registry[type[Objective]] = Registry("objective", attribute="name")


def register_objective(name: str):
    """Class decorator: make the objective selectable as ``objective.name: <name>``."""
    return OBJECTIVES.register(name)


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


class Objective:
    """Base class: the next-token loss of the training step. Subclasses override what differs."""

    name: ClassVar[str] = "base"
    needs_pairs: ClassVar[bool] = False  # trains on preference pairs (batches with "answer_ids")

    def __init__(self, section: ObjectiveSection, model: nn.Module) -> None:
        self.section = section
        # Models of the objective's own that run forward only (a DPO reference copy): the trainer compiles
        # them as it compiles the trained model.
        self.frozen_models: list[nn.Module] = []

    @classmethod
    def check(cls, section: ObjectiveSection) -> None:
        """Refuse bad values of the section in one line (ConfigError)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, step: Any, model: nn.Module, batch: dict[str, torch.Tensor], mask: Any, grad_scale: Any = None):
        return step.loss(model, batch, mask, grad_scale)

    def metric_sums(self) -> dict[str, torch.Tensor]:
        return {}


@register_objective("next_token")
class NextToken(Objective):
    """Cross-entropy of every label (the step's own loss, fused kernels included)."""


# ---- preference pairs -----------------------------------------------------------------------------------


def token_logps(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[label] per token, in float32 (float64 for float64 inputs)."""
    logits_TV = hidden_TH @ weight_VH.t()
    acc = torch.promote_types(logits_TV.dtype, torch.float32)
    return -F.cross_entropy(logits_TV.to(acc), labels_T, reduction="none")


def answer_logps(model: nn.Module, batch: dict[str, torch.Tensor], mask: Any) -> tuple[torch.Tensor, ...]:
    """``(chosen, rejected, chosen_tokens, rejected_tokens)``: each answer's summed token log-probability and
    its token count, one value per pair of the batch (rows in order, pairs in row order).

    Only the answer tokens' logits are computed: the prompt's hidden states never meet the output head."""
    answer_ids_BS = batch["answer_ids"]
    batch_size, seq_len = answer_ids_BS.shape
    hidden_BSH = forward_hidden(model, batch, mask)
    selected_BS = answer_ids_BS > 0
    logps_T = token_logps(hidden_BSH[selected_BS], model.output_weight, batch["labels"][selected_BS])
    slots = seq_len + seq_len % 2  # answer ids are < slots + 1 (a pair needs at least two label tokens)
    rows_BS = torch.arange(batch_size, device=answer_ids_BS.device)[:, None].expand(batch_size, seq_len)
    index_T = rows_BS[selected_BS] * slots + answer_ids_BS[selected_BS] - 1
    sums = logps_T.new_zeros(batch_size * slots).index_add_(0, index_T, logps_T)
    counts = logps_T.new_zeros(batch_size * slots).index_add_(0, index_T, torch.ones_like(logps_T))
    sums, counts = sums.view(-1, 2), counts.view(-1, 2)
    present = counts[:, 0] > 0  # a slot pair holds a pair where its chosen answer has tokens
    return sums[present, 0], sums[present, 1], counts[present, 0], counts[present, 1]


def preference_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per pair: -log sigmoid(logits), or with label smoothing e the conservative form
    -(1 - e) log sigmoid(logits) - e log sigmoid(-logits)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


class PairObjective(Objective):
    """Shared by the preference losses: the pair count, the metric sums, the section checks."""

    needs_pairs = True

    def __init__(self, section: ObjectiveSection, model: nn.Module) -> None:
        super().__init__(section, model)
        self._sums: dict[str, torch.Tensor] = {}

    @classmethod
    def check(cls, section: ObjectiveSection) -> None:
        if not (math.isfinite(section.beta) and section.beta > 0):
            raise ConfigError(f"objective.beta={section.beta!r} must be a finite number > 0")
        if not 0 <= section.label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing={section.label_smoothing!r} must be in [0, 0.5)")

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(((batch["answer_ids"].amax(dim=1) + 1) // 2).sum())

    def _record(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        values = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": chosen_logps.sum(),
            "logps/rejected": rejected_logps.sum(),
        }
        for key, value in values.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def metric_sums(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        return sums


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The model's PEFT LoRA layers (none when PEFT was never imported)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_off(layers: list[nn.Module]):
    """The base model: every LoRA layer's adapters switched off, then on again (PEFT's ``disable_adapter``)."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@register_objective("dpo")
class DPO(PairObjective):
    """Sigmoid DPO: ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` per pair, rewards ``beta * (x - x_ref)``."""

    @classmethod
    def check(cls, section: ObjectiveSection) -> None:
        super().check(section)
        if section.reference not in REFERENCES:
            raise ConfigError(f"objective.reference={section.reference!r} is not valid; choose one of: auto, "
                              "adapters_off, copy")  # fmt: skip

    def __init__(self, section: ObjectiveSection, model: nn.Module) -> None:
        super().__init__(section, model)
        self.lora = lora_layers(model)
        reference = section.reference
        if reference == "auto":
            reference = "adapters_off" if self.lora else "copy"
        if reference == "adapters_off" and not self.lora:
            raise ConfigError(
                "objective.reference=adapters_off needs LoRA adapters (peft=lora); for full fine-tuning use "
                "objective.reference=copy (or auto)"
            )
        self.reference = reference
        self.reference_model: nn.Module | None = None
        if reference == "copy":  # the starting weights, before any update (and before a resumed checkpoint)
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
            self.frozen_models.append(self.reference_model)

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], mask: Any):
        with torch.no_grad():
            if self.reference_model is not None:
                return answer_logps(self.reference_model, batch, mask)[:2]
            with adapters_off(self.lora):
                return answer_logps(model, batch, mask)[:2]

    def loss(self, step, model, batch, mask, grad_scale=None) -> torch.Tensor:
        s = self.section
        chosen, rejected, _, _ = answer_logps(model, batch, mask)
        ref_chosen, ref_rejected = self.reference_logps(model, batch, mask)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = preference_loss(s.beta * (chosen_ratio - rejected_ratio), s.label_smoothing)
        self._record(s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach(), chosen, rejected)
        return losses.sum()


@register_objective("simpo")
class SimPO(PairObjective):
    """SimPO: ``-log sigmoid(beta * (mean_c - mean_r) - simpo_gamma)`` per pair, where ``mean_x`` is the answer's
    log-probability per token; no reference model. Rewards ``beta * mean_x``; logps are the per-token means
    (as TRL's CPOTrainer logs them)."""

    @classmethod
    def check(cls, section: ObjectiveSection) -> None:
        super().check(section)
        if not math.isfinite(section.simpo_gamma):
            raise ConfigError(f"objective.simpo_gamma={section.simpo_gamma!r} must be a finite number")

    def loss(self, step, model, batch, mask, grad_scale=None) -> torch.Tensor:
        s = self.section
        chosen, rejected, chosen_tokens, rejected_tokens = answer_logps(model, batch, mask)
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
        losses = preference_loss(s.beta * (chosen - rejected) - s.simpo_gamma, s.label_smoothing)
        self._record(s.beta * chosen.detach(), s.beta * rejected.detach(), chosen, rejected)
        return losses.sum()


def check_objective(section: ObjectiveSection) -> None:
    """The section names a registered objective with valid values (ConfigError, one line)."""
    objective_cls = OBJECTIVES.get(section.name)
    if objective_cls is None:
        raise UnknownObjectiveError(
            f"unknown objective objective.name={section.name!r}; registered objectives: {', '.join(list_objectives())}"
        )
    objective_cls.check(section)


def build_objective(section: ObjectiveSection, model: nn.Module, *, pairs: bool) -> Objective:
    """The objective ``section.name`` names, for ``model`` (the plain model, after the converters, before any
    sharding). ``pairs``: whether the training batches are preference pairs."""
    check_objective(section)
    objective_cls = OBJECTIVES.get(section.name)
    if objective_cls.needs_pairs and not pairs:
        raise ConfigError(
            f"objective.name={section.name} trains on preference pairs; set data.kind=preference (and the prompt, "
            "chosen and rejected fields), e.g. data=preference"
        )
    return objective_cls(section, model)
