"""Named pretraining objectives. Adding one = one module with a :class:`PretrainingObjective` subclass + one entry
here."""

from __future__ import annotations

from typing import Any

from caries_mim.errors import InvalidConfigError
from caries_mim.mim.hybrid import HybridCLMIM
from caries_mim.mim.mae import MaskedAutoencoder
from caries_mim.mim.moco import MoCoV3
from caries_mim.mim.objective import PretrainingObjective, options_from_dict
from caries_mim.mim.semantic_mim import SemanticMIM
from caries_mim.mim.simmim import SimMIM
from caries_mim.models.vit import VisionTransformer

OBJECTIVES: dict[str, type[PretrainingObjective]] = {
    MaskedAutoencoder.name: MaskedAutoencoder,
    SimMIM.name: SimMIM,
    MoCoV3.name: MoCoV3,
    HybridCLMIM.name: HybridCLMIM,
    SemanticMIM.name: SemanticMIM,
}


def objective_options(name: str, options: dict[str, Any] | None = None, origin: str | None = None) -> Any:
    """The ``Options`` of objective ``name`` from a config mapping; an unknown name, key or value is an
    :class:`InvalidConfigError` (``origin``, e.g. the config file, is named in it)."""
    if name not in OBJECTIVES:
        raise InvalidConfigError(f"objective.name: unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    context = f"objective options for {name!r}" + (f" ({origin})" if origin else "")
    return options_from_dict(OBJECTIVES[name].Options, options, context)


def build_objective(
    name: str, encoder: VisionTransformer, options: dict[str, Any] | None = None
) -> PretrainingObjective:
    """``build_objective("mae", encoder, {"mask_ratio": 0.75})``; unknown names and option keys are config errors."""
    parsed = objective_options(name, options)
    objective_type = OBJECTIVES[name]
    try:
        return objective_type(encoder, parsed)
    except ValueError as exc:
        raise InvalidConfigError(f"objective {name!r}: {exc}") from None
