"""HIPAA Safe Harbor de-identification of FHIR resources (45 CFR 164.514(b)(2)).

The 18 identifier kinds are removed or generalized:

- names, telecom (phone, fax, email, URL), identifiers (SSN, MRN, health plan, account, licence,
  NPI), device/vehicle identifiers (UDI, serial and lot numbers), photos and attachments, free text
  (narrative `text.div`, `note`, comments) and names in `display` of references to people:
  removed;
- addresses: reduced to state and country, ZIP to its first 3 digits (`000` for the restricted
  3-digit areas with 20,000 people or fewer); geolocation, birthPlace and mothersMaidenName
  extensions removed;
- dates: kept as the year only (`date_mode="year"`; FHIR instants such as `issued` cannot be a bare
  year and are removed), or shifted by a per-patient offset derived from the secret and a seed
  (`date_mode="shift"`; intervals within a patient stay exact);
- ages over 89: the birth date is replaced by the year making the patient 90 at the reference
  date, flagged with an `age-90-or-older` extension;
- resource ids: replaced by a keyed pseudonym (HMAC-SHA256 with the site's secret), applied to
  every reference too, so the records still link and the hospital (which holds the secret) can
  map a pseudonym back to its patient.

Organization names (the hospital itself) and coded data (`CodeableConcept.text`) are kept: they
identify the provider and the concept, not the individual.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlab.errors import FedlabError
from fedlab.io import atomic_open

RESTRICTED_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
                             "878", "879", "884", "890", "893"})
PERSON_TYPES = frozenset({"Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Person"})
# Elements removed wherever they occur.
DROPPED_ELEMENTS = frozenset({
    "identifier", "telecom", "photo", "note", "contact", "comment", "patientInstruction", "udiCarrier",
    "serialNumber", "lotNumber", "distinctIdentifier", "presentedForm", "signature", "implicitRules",
})
# Names are identifiers for people; an Organization's name is the provider's, kept.
NAMED_PERSON_ELEMENTS = frozenset({"name"})
DROPPED_EXTENSIONS = frozenset({
    "http://hl7.org/fhir/StructureDefinition/geolocation",
    "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
    "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
    "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
    "http://hl7.org/fhir/StructureDefinition/patient-nationality",
})
# Extension values that are identifiers whatever the extension's URL.
IDENTIFYING_VALUES = frozenset({"valueAddress", "valueHumanName", "valueContactPoint", "valueAttachment",
                                "valueIdentifier", "valueSignature"})
FREE_TEXT_BY_TYPE = {"Observation": {"valueString"}, "CarePlan": {"description"}, "Procedure": {"description"}}
INSTANT_ELEMENTS = frozenset({"issued", "lastUpdated", "recorded", "timestamp"})
AGE_90_URL = "https://fedlab.example.org/fhir/StructureDefinition/age-90-or-older"
DEID_SECURITY = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED"},
                 {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}]
_DATE = re.compile(r"^(\d{4})(-(\d{2})(-(\d{2})(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_LOCAL_REFERENCE = re.compile(r"^(?P<prefix>(?:.*/)?(?P<type>[A-Z][A-Za-z]+)/)(?P<id>[A-Za-z0-9\-.]{1,64})"
                              r"(?P<history>/_history/.*)?$")
_CONDITIONAL_REFERENCE = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)\?identifier=(?:[^|]*\|)?(?P<id>.+)$")


class DeidError(FedlabError, ValueError):
    """A resource or file cannot be de-identified; the message names the file, line or element."""


@dataclass(frozen=True)
class DeidPolicy:
    """How to de-identify: the site's secret (keys pseudonyms and date shifts) and the date mode."""

    secret: str | bytes
    date_mode: Literal["year", "shift"] = "year"
    shift_seed: int = 0
    max_shift_days: int = 365
    reference_date: dt.date | None = None  # "today" for the 90+ rule; None means the current date
    keep_zip3: bool = True
    _key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.date_mode not in ("year", "shift"):
            raise DeidError(f"date_mode must be 'year' or 'shift', not {self.date_mode!r}")
        if not self.secret:
            raise DeidError("the de-identification secret must not be empty")
        if self.max_shift_days < 1:
            raise DeidError("max_shift_days must be at least 1")
        key = self.secret.encode() if isinstance(self.secret, str) else bytes(self.secret)
        object.__setattr__(self, "_key", key)

    def pseudonym(self, resource_id: str) -> str:
        """The keyed pseudonym of a resource id (UUID-shaped, a valid FHIR id)."""
        digest = hmac.new(self._key, f"id:{resource_id}".encode(), hashlib.sha256).digest()
        return str(uuid.UUID(bytes=digest[:16]))

    def shift_days(self, patient_id: str | None) -> int:
        """The per-patient date offset in days, never zero, within +-max_shift_days."""
        digest = hmac.new(self._key, f"shift:{self.shift_seed}:{patient_id or '-'}".encode(), hashlib.sha256).digest()
        magnitude = int.from_bytes(digest[:4], "big") % self.max_shift_days + 1
        return magnitude if digest[4] & 1 else -magnitude

    @property
    def today(self) -> dt.date:
        return self.reference_date or dt.datetime.now(dt.UTC).date()


def generalize_zip(postal_code: str) -> str:
    """The first 3 digits of a US ZIP code, or `000` for restricted (low-population) areas."""
    digits = re.sub(r"\D", "", postal_code)[:3]
    if len(digits) < 3 or digits in RESTRICTED_ZIP3:
        return "000"
    return digits


PATIENT_LINKS = ("subject", "patient", "beneficiary")


def patient_id_of(resource: dict[str, Any]) -> str | None:
    """The id of the patient a resource belongs to (`Patient/<id>` or `urn:uuid:<id>` references)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for link in PATIENT_LINKS:
        value = resource.get(link)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str):
            for prefix in ("Patient/", "urn:uuid:"):
                if reference.startswith(prefix):
                    return reference[len(prefix):]
    return None


class _Deidentifier:
    """De-identifies one resource (a fresh instance per resource: it carries the patient's date offset)."""

    def __init__(self, policy: DeidPolicy, resource: dict[str, Any]) -> None:
        self.policy = policy
        self.resource_type = str(resource.get("resourceType", ""))
        self.offset = dt.timedelta(days=policy.shift_days(patient_id_of(resource)))

    # -- values
    def date(self, text: str) -> str:
        match = _DATE.match(text)
        if match is None:
            return text
        if self.policy.date_mode == "year":
            return match.group(1)
        return _shift(text, match, self.offset)

    def reference(self, text: str) -> str:
        if text.startswith("urn:uuid:"):
            return "urn:uuid:" + self.policy.pseudonym(text[len("urn:uuid:"):])
        conditional = _CONDITIONAL_REFERENCE.match(text)
        if conditional:
            return f"{conditional['type']}/{self.policy.pseudonym(conditional['id'])}"
        local = _LOCAL_REFERENCE.match(text)
        if local:
            return f"{local['type']}/{self.policy.pseudonym(local['id'])}"
        return text

    # -- structure
    def value(self, key: str, value: Any, owner_type: str) -> Any:
        if isinstance(value, dict):
            return self.element(value, owner_type)
        if isinstance(value, list):
            cleaned = [self.value(key, item, owner_type) for item in value]
            return [item for item in cleaned if item not in (None, {}, [])]
        if isinstance(value, str):
            return self.date(value)
        return value

    def element(self, element: dict[str, Any], owner_type: str, top: bool = False) -> dict[str, Any]:
        points_to_person = _reference_type(element.get("reference")) in PERSON_TYPES
        out: dict[str, Any] = {}
        for key, value in element.items():
            if self._drops(key, value, owner_type, top, points_to_person):
                continue
            cleaned = self._clean(key, value, owner_type, top)
            if cleaned not in (None, {}, []):
                out[key] = cleaned
        return out

    def _drops(self, key: str, value: Any, owner_type: str, top: bool, points_to_person: bool) -> bool:
        if key in DROPPED_ELEMENTS or key in IDENTIFYING_VALUES:
            return True
        if top and key in NAMED_PERSON_ELEMENTS and owner_type in PERSON_TYPES:
            return True
        if top and key in FREE_TEXT_BY_TYPE.get(owner_type, ()):
            return True
        if key == "text" and isinstance(value, dict) and "div" in value:
            return True
        if key == "display" and points_to_person:
            return True
        return key in INSTANT_ELEMENTS and self.policy.date_mode == "year"

    def _clean(self, key: str, value: Any, owner_type: str, top: bool) -> Any:
        if top and key == "id" and isinstance(value, str):
            return self.policy.pseudonym(value)
        if key == "reference" and isinstance(value, str):
            return self.reference(value)
        if key in ("extension", "modifierExtension") and isinstance(value, list):
            value = [ext for ext in value if isinstance(ext, dict) and ext.get("url") not in DROPPED_EXTENSIONS]
        if key == "address":
            return [self.address(a) for a in value] if isinstance(value, list) else self.address(value)
        if key == "meta" and isinstance(value, dict):
            return self.meta(value)
        if key == "url" and isinstance(value, str):  # canonical URLs (extension, system) are not identifiers
            return value
        return self.value(key, value, owner_type)

    def address(self, address: Any) -> dict[str, Any]:
        if not isinstance(address, dict):
            return {}
        kept: dict[str, Any] = {k: address[k] for k in ("use", "type", "state", "country") if k in address}
        if self.policy.keep_zip3 and isinstance(address.get("postalCode"), str):
            kept["postalCode"] = generalize_zip(address["postalCode"])
        return kept

    def meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        kept = {k: copy.deepcopy(v) for k, v in meta.items() if k in ("profile", "tag", "security", "lastUpdated")}
        if "lastUpdated" in kept:
            if self.policy.date_mode == "year":
                del kept["lastUpdated"]
            else:
                kept["lastUpdated"] = self.date(kept["lastUpdated"])
        kept["security"] = [*kept.get("security", []), *DEID_SECURITY]
        return kept


def _reference_type(reference: Any) -> str | None:
    if not isinstance(reference, str):
        return None
    local = _LOCAL_REFERENCE.match(reference) or _CONDITIONAL_REFERENCE.match(reference)
    return local["type"] if local else None


def _shift(text: str, match: re.Match[str], offset: dt.timedelta) -> str:
    year = int(match.group(1))
    if match.group(6):  # a dateTime with time: shift the calendar date, keep time and zone
        day = dt.date(year, int(match.group(3)), int(match.group(5))) + offset
        return day.isoformat() + match.group(6)
    if match.group(5):
        return (dt.date(year, int(match.group(3)), int(match.group(5))) + offset).isoformat()
    if match.group(3):
        return (dt.date(year, int(match.group(3)), 15) + offset).isoformat()[:7]
    return str((dt.date(year, 7, 1) + offset).year)


def _age_years(birth: dt.date, at: dt.date) -> int:
    return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))


def _parse_birth(text: Any) -> dt.date | None:
    match = _DATE.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    return dt.date(int(match.group(1)), int(match.group(3) or 1), int(match.group(5) or 1))


def _aggregate_over_89(original: dict[str, Any], cleaned: dict[str, Any], policy: DeidPolicy) -> None:
    """Patients older than 89 (at death, or at the reference date) get the birth year of a 90-year-old."""
    birth = _parse_birth(original.get("birthDate"))
    if birth is None:
        return
    death = _parse_birth(original.get("deceasedDateTime"))
    at = death or policy.today
    if _age_years(birth, at) <= 89:
        return
    cleaned["birthDate"] = str(at.year - 90)
    cleaned.setdefault("extension", []).append({"url": AGE_90_URL, "valueBoolean": True})
    if "deceasedDateTime" in cleaned and policy.date_mode == "year":
        cleaned.pop("deceasedDateTime")
        cleaned["deceasedBoolean"] = True


def deidentify_resource(resource: dict[str, Any], policy: DeidPolicy) -> dict[str, Any]:
    """A de-identified copy of one FHIR resource (the input is not modified)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise DeidError("expected a FHIR resource (a JSON object with a resourceType)")
    worker = _Deidentifier(policy, resource)
    cleaned = worker.element(resource, worker.resource_type, top=True)  # builds new containers throughout
    if worker.resource_type == "Patient":
        _aggregate_over_89(resource, cleaned, policy)
    cleaned.setdefault("meta", {"security": list(DEID_SECURITY)})
    for key in ("contained",):
        if key in cleaned:
            cleaned[key] = [deidentify_resource(r, policy) for r in resource[key] if isinstance(r, dict)]
    return cleaned


def deidentify_line(line: str, policy: DeidPolicy, where: str = "<line>") -> str:
    """One NDJSON line in, one de-identified compact NDJSON line (with newline) out."""
    try:
        resource = json.loads(line)
    except json.JSONDecodeError as err:
        raise DeidError(f"{where}: not valid JSON ({err.msg})") from None
    try:
        return json.dumps(deidentify_resource(resource, policy), separators=(",", ":")) + "\n"
    except (DeidError, ValueError) as err:
        raise DeidError(f"{where}: {err}") from None


def deidentify_ndjson_folder(src: str | Path, dst: str | Path, policy: DeidPolicy,
                             types: Iterable[str] | None = None) -> dict[str, int]:
    """De-identify every `*.ndjson` file of `src` into `dst` (same names, atomic); returns lines per file stem."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DeidError(f"{src}: folder not found")
    wanted = set(types) if types is not None else None
    counts: dict[str, int] = {}
    for path in sorted(src.glob("*.ndjson")):
        stem = path.name[: -len(".ndjson")]
        if wanted is not None and stem.split(".")[0] not in wanted:
            continue
        counts[stem] = _deidentify_file(path, dst / path.name, policy)
    return counts


def _deidentify_file(path: Path, target: Path, policy: DeidPolicy) -> int:
    count = 0
    with open(path, encoding="utf-8") as source, atomic_open(target, "w", encoding="utf-8") as out:
        for number, line in enumerate(source, start=1):
            if line.strip():
                out.write(deidentify_line(line, policy, f"{path}:{number}"))
                count += 1
    return count
