"""The finding catalog: which findings a model predicts, in which order, in which category.

The catalog is a CSV (default ``Resources/findings.csv``: the 75 findings of the MoLRE paper's Table 1)
with the columns ``id, name, category, description, code``. Its row order is the order of a model's
output vector, so a model bundle records :attr:`FindingCatalog.version` (a hash of every field of every
row, in order: relabelling, renaming, rewording or reordering a finding gives another version) and embeds
the catalog itself with :meth:`FindingCatalog.to_dict`; :meth:`FindingCatalog.from_dict` requires the
stored version and checks it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .resources import resource_path

CATEGORIES: tuple[str, ...] = (
    "Hemorrhage",
    "Vascular",
    "Trauma",
    "Mass/Lesion",
    "Structural",
    "Chronic/Other",
)

#: Findings per category in the MoLRE paper's Table 1 (75 in all).
PAPER_CATEGORY_COUNTS: dict[str, int] = {
    "Hemorrhage": 12,
    "Vascular": 8,
    "Trauma": 6,
    "Mass/Lesion": 9,
    "Structural": 11,
    "Chronic/Other": 29,
}

COLUMNS: tuple[str, ...] = ("id", "name", "category", "description", "code")
DEFAULT_FILENAME = "findings.csv"
_ID_PATTERN = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


class CatalogError(ValueError):
    """A finding catalog (CSV or embedded dict) that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Finding:
    """One finding: ``id`` (stable snake_case key), display ``name``, one of :data:`CATEGORIES`,
    a one-sentence ``description`` of its non-contrast CT appearance and an optional ontology ``code``
    (empty string when none is recorded)."""

    id: str
    name: str
    category: str
    description: str = ""
    code: str = ""


def _catalog_version(findings: tuple[Finding, ...]) -> str:
    """sha256 of the ordered rows, every column of each (JSON lists: no separator can be forged)."""
    canonical = json.dumps([[getattr(f, column) for column in COLUMNS] for f in findings], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class FindingCatalog:
    """An immutable, ordered list of :class:`Finding`.

    ``catalog.ids[i]`` names output ``i`` of a model trained on this catalog. ``version`` is the
    sha256 hex digest of the ordered rows (id, name, category, description, code).
    """

    __slots__ = ("_findings", "_index", "_source", "_version")

    def __init__(self, findings: tuple[Finding, ...] | list[Finding], source: str | Path | None = None):
        findings = tuple(findings)
        where = str(source) if source is not None else "<in-memory catalog>"
        _validate_findings(findings, where)
        self._findings = findings
        self._index = {f.id: i for i, f in enumerate(findings)}
        self._source = Path(source) if source is not None else None
        self._version = _catalog_version(findings)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self._findings

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(f.id for f in self._findings)

    @property
    def version(self) -> str:
        return self._version

    @property
    def source(self) -> Path | None:
        """The CSV this catalog was read from; None when built from a dict or a list."""
        return self._source

    def __len__(self) -> int:
        return len(self._findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self._findings)

    def __contains__(self, finding_id: object) -> bool:
        return finding_id in self._index

    def __getitem__(self, finding_id: str) -> Finding:
        return self._findings[self.index_of(finding_id)]

    def index_of(self, finding_id: str) -> int:
        """Position of ``finding_id`` in the catalog (= model output index); KeyError if unknown."""
        try:
            return self._index[finding_id]
        except KeyError:
            raise KeyError(
                f"Unknown finding id {finding_id!r}: not in the catalog "
                f"({self._source or 'in-memory'}, {len(self)} findings)."
            ) from None

    def by_category(self) -> dict[str, tuple[Finding, ...]]:
        """Findings grouped by category, categories in :data:`CATEGORIES` order (all six keys)."""
        return {c: tuple(f for f in self._findings if f.category == c) for c in CATEGORIES}

    def category_counts(self) -> dict[str, int]:
        return {c: len(fs) for c, fs in self.by_category().items()}

    def to_dict(self) -> dict:
        """JSON-able form, embeddable in a model bundle manifest."""
        return {
            "version": self._version,
            "columns": list(COLUMNS),
            "findings": [asdict(f) for f in self._findings],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> FindingCatalog:
        """Inverse of :meth:`to_dict`; the stored version is required and must match the rows."""
        where = "<embedded catalog>"
        if not isinstance(data, Mapping) or not isinstance(data.get("findings"), list):
            raise CatalogError(f"{where}: expected a mapping with a 'findings' list, got {type(data).__name__}.")
        rows = []
        for number, row in enumerate(data["findings"], start=1):
            if not isinstance(row, Mapping):
                raise CatalogError(f"{where}, finding {number}: expected a mapping, got {type(row).__name__}.")
            missing = [c for c in ("id", "name", "category") if c not in row]
            if missing:
                raise CatalogError(f"{where}, finding {number}: missing key(s) {', '.join(missing)}.")
            not_text = [c for c in COLUMNS if row.get(c) is not None and not isinstance(row.get(c), str)]
            if not_text:
                raise CatalogError(f"{where}, finding {number}: {', '.join(not_text)} must be text.")
            rows.append(Finding(**{c: (row.get(c) or "").strip() for c in COLUMNS}))
        catalog = cls(rows)
        stored = data.get("version")
        if not isinstance(stored, str) or not stored:
            raise CatalogError(f"{where}: no version hash is stored, so edits to the catalog cannot be detected.")
        if stored != catalog.version:
            raise CatalogError(
                f"{where}: stored version {stored} does not match its rows ({catalog.version}); "
                "the embedded catalog was edited or corrupted."
            )
        return catalog

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FindingCatalog) and self._findings == other._findings

    def __hash__(self) -> int:
        return hash(self._findings)

    def __repr__(self) -> str:
        return f"FindingCatalog({len(self)} findings, version={self._version[:12]}, source={self._source})"


def _validate_findings(findings: tuple[Finding, ...], where: str, rows: list[int] | None = None) -> None:
    """Check ids, names and categories; ``rows[i]`` is the file row number of ``findings[i]``."""
    if not findings:
        raise CatalogError(f"{where}: the catalog has no findings.")
    rows = rows or list(range(1, len(findings) + 1))
    seen: dict[str, int] = {}
    for f, row in zip(findings, rows):
        if not f.id:
            raise CatalogError(f"{where}, row {row}: empty id. Give every finding a snake_case id.")
        if not _ID_PATTERN.match(f.id):
            raise CatalogError(
                f"{where}, row {row}: id {f.id!r} is not snake_case (lower-case letters, digits and single "
                "underscores, starting with a letter)."
            )
        if f.id in seen:
            raise CatalogError(f"{where}, row {row}: duplicate id {f.id!r} (first used on row {seen[f.id]}).")
        seen[f.id] = row
        if not f.name:
            raise CatalogError(f"{where}, row {row}: empty name for id {f.id!r}.")
        if f.category not in CATEGORIES:
            raise CatalogError(
                f"{where}, row {row}: unknown category {f.category!r} for id {f.id!r}; "
                f"use one of: {', '.join(CATEGORIES)}."
            )


def _check_paper_counts(catalog: FindingCatalog, where: str) -> None:
    counts = catalog.category_counts()
    wrong = [f"{c}: {counts[c]} (expected {n})" for c, n in PAPER_CATEGORY_COUNTS.items() if counts[c] != n]
    if wrong:
        raise CatalogError(
            f"{where}: findings per category do not match the MoLRE paper's Table 1 ({'; '.join(wrong)}). "
            "Fix the file, or load it with require_paper_counts=False for a custom catalog."
        )


def _read_rows(path: Path) -> tuple[list[Finding], list[int]]:
    """Findings and their row numbers in the file (row 1 is the header)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerates a BOM
    except FileNotFoundError:
        raise CatalogError(f"Finding catalog not found: {path}. Pass the path of an existing CSV.") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc}). Save the catalog as UTF-8 CSV.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="" lets csv accept CRLF
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ("id", "name", "category") if c not in header]
    if missing:
        raise CatalogError(
            f"{path}, row 1 (header): missing column(s) {', '.join(missing)}; "
            f"found {header or 'no header'}. Expected columns: {', '.join(COLUMNS)}."
        )
    reader.fieldnames = header
    findings, row_numbers = [], []
    for record in reader:
        if not any((v or "").strip() for k, v in record.items() if k is not None):
            continue  # blank line
        findings.append(Finding(**{c: (record.get(c) or "").strip() for c in COLUMNS}))
        row_numbers.append(reader.line_num)
    return findings, row_numbers


def load_catalog(path: str | Path | None = None, *, require_paper_counts: bool | None = None) -> FindingCatalog:
    """Read and validate a finding catalog CSV.

    ``path`` defaults to the extension's ``Resources/findings.csv``. ``require_paper_counts`` (default:
    True for the default file, False for a user's own file) enforces :data:`PAPER_CATEGORY_COUNTS`.
    Raises :class:`CatalogError` naming the file, the row and the problem.
    """
    is_default = path is None
    csv_path = Path(resource_path(DEFAULT_FILENAME) if is_default else path).expanduser()
    findings, row_numbers = _read_rows(csv_path)
    _validate_findings(tuple(findings), str(csv_path), row_numbers)  # names the file's own row numbers
    catalog = FindingCatalog(findings, source=csv_path)
    if require_paper_counts is None:
        require_paper_counts = is_default
    if require_paper_counts:
        _check_paper_counts(catalog, str(csv_path))
    return catalog


@lru_cache(maxsize=1)
def default_catalog() -> FindingCatalog:
    """The bundled 75-finding catalog (read once, then cached)."""
    return load_catalog()
