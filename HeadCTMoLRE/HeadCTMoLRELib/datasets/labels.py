"""Dataset labels -> finding ids: the mapping tables of ``Resources/datasets/*.csv`` and reader majorities.

A table has the columns ``dataset_label, finding_id, if_positive, if_negative, note``; each row is one
rule: when the dataset's label is positive, the finding gets ``if_positive`` (1, 0 or blank = says
nothing); when negative, ``if_negative``. One dataset label may drive several findings (RSNA ``any`` = 0
makes every hemorrhage location negative) and one finding may hear several labels. A row with an empty
``finding_id`` documents a dataset label that maps to no finding. Users replace a table with
``--labels FILE`` (same columns).

Applying the rules to one case: each finding collects the values its rules give; all 1 -> 1, all 0 -> 0,
none -> blank (the dataset does not label it), both 1 and 0 -> blank and a reported conflict (the
dataset's labels contradict each other, e.g. ``any`` 0 with ``subdural`` 1).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

TABLE_COLUMNS = ("dataset_label", "finding_id", "if_positive", "if_negative", "note")


class LabelTableError(ValueError):
    """A mapping table that cannot be used; the message names the file, row and fix."""


@dataclass(frozen=True)
class LabelRule:
    dataset_label: str
    finding_id: str
    if_positive: float | None  # 1.0, 0.0 or None (no statement)
    if_negative: float | None
    note: str = ""


@dataclass(frozen=True)
class LabelTable:
    """The rules of one mapping table; ``path`` and ``sha256`` of the file they came from."""

    rules: tuple[LabelRule, ...]
    path: Path
    sha256: str

    @property
    def dataset_labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rule.dataset_label for rule in self.rules))

    @property
    def finding_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rule.finding_id for rule in self.rules if rule.finding_id))

    def apply(self, labels: Mapping[str, float | None]) -> tuple[dict[str, float], list[str]]:
        """``labels``: dataset label -> 1/0/None (unknown). Returns (finding id -> 1.0/0.0 for the findings
        the rules decide, conflicts as "finding: reason" strings)."""
        votes: dict[str, list[tuple[float, str]]] = {}
        for rule in self.rules:
            value = labels.get(rule.dataset_label)
            if not rule.finding_id or value is None:
                continue
            outcome = rule.if_positive if value >= 0.5 else rule.if_negative
            if outcome is not None:
                votes.setdefault(rule.finding_id, []).append((outcome, f"{rule.dataset_label}={int(value)}"))
        decided, conflicts = {}, []
        for finding, given in votes.items():
            values = {v for v, _ in given}
            if len(values) == 1:
                decided[finding] = values.pop()
            else:
                conflicts.append(f"{finding}: {', '.join(why for _, why in given)} disagree; left blank")
        return decided, conflicts


def _cell_value(text: str, where: str) -> float | None:
    text = (text or "").strip()
    if text == "":
        return None
    if text in ("0", "1"):
        return float(text)
    raise LabelTableError(f"{where}: value {text!r} must be 1, 0 or blank.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_label_table(path: str | os.PathLike, catalog, dataset_labels: tuple[str, ...] | None = None) -> LabelTable:
    """Read and check a mapping table against ``catalog`` (every finding id must exist) and, when given,
    the dataset's known labels (every ``dataset_label`` must be one of them). Raises LabelTableError."""
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"{path}: no such label mapping table.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TABLE_COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelTableError(f"{path}: missing column(s) {', '.join(missing)}; a mapping table has the columns "
                                  f"{', '.join(TABLE_COLUMNS)}.")
        rules = []
        for line, row in enumerate(reader, start=2):
            where = f"{path.name}, row {line}"
            label, finding = (row.get("dataset_label") or "").strip(), (row.get("finding_id") or "").strip()
            if not label:
                continue
            if dataset_labels is not None and label not in dataset_labels:
                raise LabelTableError(f"{where}: dataset label {label!r} is not one this dataset has "
                                      f"({', '.join(dataset_labels)}).")
            if finding and finding not in catalog:
                raise LabelTableError(f"{where}: {finding!r} is not a finding id of the catalog "
                                      "(Resources/findings.csv).")
            rules.append(LabelRule(label, finding, _cell_value(row.get("if_positive"), where),
                                   _cell_value(row.get("if_negative"), where), (row.get("note") or "").strip()))
    if not any(rule.finding_id for rule in rules):
        raise LabelTableError(f"{path}: no rule maps a dataset label to a finding id.")
    return LabelTable(rules=tuple(rules), path=path.resolve(), sha256=_sha256(path))


def default_table_path(dataset: str) -> Path:
    """``Resources/datasets/<dataset>_labels.csv`` (dataset: rsna_ich, cq500, ct_ich)."""
    from ..resources import resource_path

    return resource_path("datasets", f"{dataset}_labels.csv")


def majority(votes: list[float | None]) -> float | None:
    """Majority of reader labels (1/0/None): 1 when more than half of the readers say 1, 0 when more than
    half say 0, otherwise (a tie among readers with a missing read) None."""
    needed = len(votes) // 2 + 1
    positives = sum(1 for v in votes if v == 1)
    negatives = sum(1 for v in votes if v == 0)
    if positives >= needed:
        return 1.0
    if negatives >= needed:
        return 0.0
    return None
