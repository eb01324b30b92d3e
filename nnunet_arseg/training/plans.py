"""Plans rewriting: the configuration's ``architecture`` becomes AR-Seg's, so the ``plans.json`` that nnU-Net copies to
the results folder names ``nnunet_arseg.network.ARSegNetwork`` with all its arguments (and the predictor can rebuild
the network from the plans alone)."""
from __future__ import annotations

from copy import deepcopy
from typing import Callable

import numpy as np
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_arseg.config import preset
from nnunet_arseg.network import NETWORK_CLASS_NAME, build_arseg_architecture


def is_arseg_architecture(architecture: dict) -> bool:
    return architecture.get("network_class_name") == NETWORK_CLASS_NAME


def tokenizer_widths(overrides: dict) -> dict:
    """The tokenizer kwargs a trainer variant asks for (its preset's, updated by its overrides), before the latent
    stride is chosen from the data."""
    return preset(overrides.get("preset", "reference"),
                  **{k: v for k, v in overrides.items() if k != "preset"}).tokenizer


def arseg_architecture(stock_architecture: dict, patch_size, overrides: dict, label_manager=None) -> dict:
    """AR-Seg's ``architecture`` block for a configuration (kept as is when it already is AR-Seg's).

    ``label_manager`` (of dataset.json) sets ``has_regions`` and ``regions``; None leaves them to
    ``build_arseg_architecture``'s defaults (only for callers without dataset.json).
    ``overrides`` go to ``build_arseg_architecture`` (``preset`` selects the preset).
    """
    if is_arseg_architecture(stock_architecture):
        return deepcopy(stock_architecture)
    kwargs = {k: v for k, v in overrides.items() if k != "preset"}
    if label_manager is not None:
        kwargs["has_regions"] = bool(label_manager.has_regions)
        kwargs["regions"] = [[int(i) for i in np.atleast_1d(r)] for r in label_manager.foreground_regions] \
            if label_manager.has_regions else None
    arch = build_arseg_architecture(deepcopy(stock_architecture), tuple(patch_size),
                                    overrides.get("preset", "reference"), **kwargs)
    return arch


def rewrite_plans_architecture(plans: dict, configuration: str, dataset_json: dict,
                               architecture_of: Callable[[ConfigurationManager, LabelManager], dict]) -> dict:
    """A copy of ``plans`` whose ``configuration`` (inherited fields resolved by nnU-Net) has the architecture
    ``architecture_of(configuration manager, label manager of dataset.json)``.

    Only ``plans['configurations'][configuration]['architecture']`` changes; everything else (plans name, data
    identifier, other configurations, ``continue_training``) is kept, so preprocessing is shared with stock nnU-Net.
    """
    plans = deepcopy(plans)
    if configuration not in plans["configurations"]:
        raise KeyError(f"configuration {configuration!r} is not in the plans {plans.get('plans_name')} "
                       f"(available: {sorted(plans['configurations'])})")
    manager = PlansManager(plans)
    plans["configurations"][configuration]["architecture"] = architecture_of(
        manager.get_configuration(configuration), manager.get_label_manager(dataset_json))
    return plans


def rewrite_plans_for_arseg(plans: dict, configuration: str, dataset_json: dict, overrides: dict) -> dict:
    """A copy of ``plans`` whose ``configuration`` uses AR-Seg's network (``rewrite_plans_architecture``)."""
    return rewrite_plans_architecture(plans, configuration, dataset_json, lambda cfg, lm: arseg_architecture(
        cfg.configuration["architecture"], cfg.patch_size, overrides, lm))
