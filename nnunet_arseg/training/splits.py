"""Cross-validation folds grouped by patient, so that one patient's slices never straddle train and validation."""
from __future__ import annotations

from nnunetv2.utilities.crossval_split import generate_crossval_split


def patient_grouped_splits(identifiers: list[str], patient_of_case: dict[str, str], n_splits: int = 5,
                           seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's seeded KFold applied to patients, then expanded to their cases (``[{'train': [...], 'val': [...]}]``).

    With fewer patients than ``n_splits`` there is one fold per patient. Raises if a case has no patient.
    """
    missing = sorted(set(identifiers) - set(patient_of_case))
    if missing:
        raise KeyError(f"dataset.json['arseg']['patient_of_case'] has no patient for {len(missing)} cases, e.g. "
                       f"{missing[:3]}; re-run the converter or write splits_final.json yourself")
    patients = sorted({patient_of_case[k] for k in identifiers})
    if len(patients) < 2:
        raise ValueError(f"cannot split {len(identifiers)} cases of a single patient into train and validation")
    patient_splits = generate_crossval_split(patients, seed=seed, n_splits=min(n_splits, len(patients)))
    ids = sorted(identifiers)
    splits = []
    for fold in patient_splits:
        val_patients = set(fold["val"])
        splits.append({"train": [k for k in ids if patient_of_case[k] not in val_patients],
                       "val": [k for k in ids if patient_of_case[k] in val_patients]})
    return splits


