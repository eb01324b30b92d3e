"""Every environment variable AR-Seg reads, in one place (as nnU-Net's ``paths.py`` does for its own).

- ``nnUNet_ARSEG_NUM_SAMPLES``: N samples per image of the network's eval forward (the stock ``nnUNetv2_predict``);
  default: the model's stored N (16).
- ``nnUNet_ARSEG_SAMPLER``: how that sampling draws (``autoregressive``, ``head`` or ``anchored``, see
  ``segmentor/samplers``); default ``autoregressive`` (``anchored`` where the input carries anchor masks).
- ``nnUNet_ARSEG_SEED``: the seed of that sampling; default 0.
- ``nnUNet_ARSEG_TEMPERATURE``: the factor on that sampling's per-scale temperatures; default 1 (the reference's).
- ``nnUNet_ARSEG_PRESENCE_TEMPERATURE``: the divisor of that sampling's presence logit; default 1.
- ``nnUNet_ARSEG_OUTLINE_SPREAD``: how far the levels of that sampling's samples drawn around the U-Net head spread
  from 1/2, in [0, 0.5]; default 0.5.
- ``nnUNet_ARSEG_MIRROR_HEAD``: 0 turns off that sampling's test-time mirroring of the U-Net head (what
  ``nnUNetv2_arseg_predict --disable_tta`` does; ``nnUNetv2_predict``'s flag cannot reach it); default 1.
- ``nnUNet_ARSEG_TRAINING_SEED``: the seed of an AR-Seg or ProbUNet training (weights, batches, augmentation);
  default: the trainer's ``training_seed`` (0).
- ``nnUNet_ARSEG_BUDGET_MINUTES``: the wall-time budget of the ``*_budget`` trainers, in minutes.
- ``nnUNet_ARSEG_SNAPSHOT_MINUTES``: the ``*_budget`` trainers also keep ``checkpoint_<m>min.pth`` every this many
  minutes of the budget (learning curves).
- ``nnUNet_ARSEG_TOKENIZER``: a ``tokenizer.pth`` for ``nnUNetTrainerARSeg`` to use instead of training the dataset's.
- ``nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES``: a process training the dataset's tokenizer refreshes its lock every 1/20 of
  this while its training makes progress; a lock not refreshed for this long (its owner was killed, suspended or
  hung, on any host) is taken over; default 10.
- ``nnUNet_ARSEG_HOSTNAME``: the host name a process writes into that lock; default ``socket.gethostname()``.

nnU-Net's own variables read here too: ``nnUNet_npp`` / ``nnUNet_nps`` (default worker processes of
``nnUNetv2_arseg_predict``, as of ``nnUNetv2_predict``). ``nnUNet_extTrainer`` is set by our commands, see
``nnunet_arseg.nnunet_ext``.
"""
from __future__ import annotations

import math
import os
import socket

SAMPLER = "nnUNet_ARSEG_SAMPLER"
NUM_SAMPLES = "nnUNet_ARSEG_NUM_SAMPLES"
SEED = "nnUNet_ARSEG_SEED"
TEMPERATURE = "nnUNet_ARSEG_TEMPERATURE"
PRESENCE_TEMPERATURE = "nnUNet_ARSEG_PRESENCE_TEMPERATURE"
OUTLINE_SPREAD = "nnUNet_ARSEG_OUTLINE_SPREAD"
MIRROR_HEAD = "nnUNet_ARSEG_MIRROR_HEAD"
TRAINING_SEED = "nnUNet_ARSEG_TRAINING_SEED"
BUDGET_MINUTES = "nnUNet_ARSEG_BUDGET_MINUTES"
SNAPSHOT_MINUTES = "nnUNet_ARSEG_SNAPSHOT_MINUTES"
TOKENIZER = "nnUNet_ARSEG_TOKENIZER"
LOCK_TIMEOUT_MINUTES = "nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES"
HOSTNAME = "nnUNet_ARSEG_HOSTNAME"
PREPROCESSING_PROCESSES = "nnUNet_npp"
EXPORT_PROCESSES = "nnUNet_nps"


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_int(name: str, default: int, low: int = -2 ** 62) -> int:
    """An integer from the environment (``default`` when unset); a clear error when malformed or below ``low``."""
    value = _raw(name)
    if value is None:
        return default
    try:
        out = int(value)
    except ValueError:
        raise RuntimeError(f"the environment variable {name}={value!r} must be an integer") from None
    if out < low:
        raise RuntimeError(f"the environment variable {name}={value!r} must be >= {low}")
    return out


def env_float(name: str, what: str, default: float | None = None, low: float = 0.0, high: float = math.inf) -> float:
    """A float from the environment in ``(low, high]``; a clear error when unset (without default) or malformed."""
    value = _raw(name)
    if value is None:
        if default is not None:
            return default
        raise RuntimeError(f"{what} needs the environment variable {name}, which is not set; e.g. "
                           f"`{name}=20 nnUNetv2_train ...`")
    try:
        out = float(value)
    except ValueError:
        out = math.nan
    if not low < out <= high:
        raise RuntimeError(f"{what}: {name}={value!r} must be a number in ({low}, {high}]")
    return out


def num_samples(default: int) -> int:
    return env_int(NUM_SAMPLES, default, low=1)


def sampler() -> str | None:
    return _raw(SAMPLER)


def sampling_seed() -> int:
    return env_int(SEED, 0)


def mirror_head() -> bool:
    value = env_int(MIRROR_HEAD, 1, low=0)
    if value > 1:
        raise RuntimeError(f"the environment variable {MIRROR_HEAD}={value} must be 0 or 1")
    return bool(value)


def training_seed(default: int | None) -> int | None:
    return env_int(TRAINING_SEED, default)


def sampling_temperature() -> float:
    return env_float(TEMPERATURE, "AR-Seg sampling", default=1.0)


def presence_temperature() -> float:
    return env_float(PRESENCE_TEMPERATURE, "AR-Seg sampling", default=1.0)


def outline_spread(default: float) -> float:
    value = env_float(OUTLINE_SPREAD, "AR-Seg sampling", default=default, low=-math.inf, high=0.5)
    if not value >= 0:
        raise RuntimeError(f"AR-Seg sampling: {OUTLINE_SPREAD}={_raw(OUTLINE_SPREAD)!r} must be a number in [0, 0.5]")
    return value


def tokenizer_file() -> str | None:
    return _raw(TOKENIZER)


def lock_timeout_s() -> float:
    return 60 * env_float(LOCK_TIMEOUT_MINUTES, "the tokenizer lock", default=10.0)


def hostname() -> str:
    return _raw(HOSTNAME) or socket.gethostname()


def prediction_processes() -> tuple[int, int]:
    """Default (preprocessing, export) worker processes of a prediction: ``nnUNet_npp``, ``nnUNet_nps`` or 3."""
    return env_int(PREPROCESSING_PROCESSES, 3, low=0), env_int(EXPORT_PROCESSES, 3, low=0)
