"""Code systems, codes and the small vocabularies the generator draws from.

The codes are the ones Synthea emits (see the project's reference notes); the features stage
selects on exactly these, so changing one here is a change to the data contract.
"""

from __future__ import annotations

from typing import NamedTuple

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CVX = "http://hl7.org/fhir/sid/cvx"
NPI = "http://hl7.org/fhir/sid/us-npi"
SYNTHEA_ID = "https://github.com/synthetichealth/synthea"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
OMB_RACE = "urn:oid:2.16.840.1.113883.6.238"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"


# ---- Synthea's GMF code-system names (what modules write in "system") -> FHIR system URIs ----
GMF_SYSTEMS: dict[str, str] = {
    "SNOMED-CT": SNOMED,
    "LOINC": LOINC,
    "RxNorm": RXNORM,
    "CVX": CVX,
    "ICD-10-CM": ICD10CM,
    "ICD-10": ICD10CM,
    "UCUM": UCUM,
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "NUCC": "http://nucc.org/provider-taxonomy",
    "NUBC": "http://www.nubc.org/patient-discharge",
    "DICOM-DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "DICOM-SOP": "urn:ietf:rfc:3986",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "HCPCS": "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
    "UNII": "http://fdasis.nlm.nih.gov",
}
_URI_PREFIXES = ("http://", "https://", "urn:")


def is_unknown_system(name: str) -> bool:
    """A plain code-system name `fhir_system` cannot map to a URI (kept as written in the output)."""
    return name not in GMF_SYSTEMS and not name.startswith(_URI_PREFIXES)


def fhir_system(name: str) -> str:
    """The FHIR system URI for a GMF code-system name. A URI passes unchanged; an unknown plain
    name is kept as written, never guessed (`gmf_life.unknown_code_systems` lists a module set's)."""
    return GMF_SYSTEMS.get(name, name)


class Concept(NamedTuple):
    code: str
    display: str


class Lab(NamedTuple):
    code: str
    display: str
    unit: str


# ---- encounters (SNOMED CT types, v3 ActCode classes) ----
ENCOUNTER_TYPES: dict[str, tuple[str, Concept]] = {
    "wellness": ("AMB", Concept("185349003", "Encounter for check up (procedure)")),
    "followup": ("AMB", Concept("390906007", "Follow-up encounter (procedure)")),
    "symptom": ("AMB", Concept("185345009", "Encounter for symptom (procedure)")),
    "emergency": ("EMER", Concept("50849002", "Emergency room admission (procedure)")),
    "inpatient": ("IMP", Concept("32485007", "Hospital admission (procedure)")),
}

# ---- conditions: concept name -> SNOMED CT and ICD-10-CM codings ----
CONDITIONS: dict[str, tuple[Concept, Concept]] = {
    "prediabetes": (Concept("714628002", "Prediabetes (finding)"),
                    Concept("R73.03", "Prediabetes")),
    "t2d": (Concept("44054006", "Diabetes mellitus type 2 (disorder)"),
            Concept("E11.9", "Type 2 diabetes mellitus without complications")),
    "hypertension": (Concept("59621000", "Essential hypertension (disorder)"),
                     Concept("I10", "Essential (primary) hypertension")),
    "hyperlipidemia": (Concept("55822004", "Hyperlipidemia (disorder)"),
                       Concept("E78.5", "Hyperlipidemia, unspecified")),
    "obesity": (Concept("162864005", "Body mass index 30+ - obesity (finding)"),
                Concept("E66.9", "Obesity, unspecified")),
    "ckd1": (Concept("431855005", "Chronic kidney disease stage 1 (disorder)"),
             Concept("N18.1", "Chronic kidney disease, stage 1")),
    "ckd2": (Concept("431856006", "Chronic kidney disease stage 2 (disorder)"),
             Concept("N18.2", "Chronic kidney disease, stage 2 (mild)")),
    "ckd3": (Concept("433144002", "Chronic kidney disease stage 3 (disorder)"),
             Concept("N18.30", "Chronic kidney disease, stage 3 unspecified")),
    "ckd4": (Concept("431857002", "Chronic kidney disease stage 4 (disorder)"),
             Concept("N18.4", "Chronic kidney disease, stage 4 (severe)")),
}

# ---- observations (LOINC, UCUM) ----
HEIGHT = Lab("8302-2", "Body Height", "cm")
WEIGHT = Lab("29463-7", "Body Weight", "kg")
BMI = Lab("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2")
BP_PANEL = Concept("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = Lab("8480-6", "Systolic Blood Pressure", "mm[Hg]")
DIASTOLIC = Lab("8462-4", "Diastolic Blood Pressure", "mm[Hg]")
HEART_RATE = Lab("8867-4", "Heart rate", "/min")
RESP_RATE = Lab("9279-1", "Respiratory rate", "/min")
GLUCOSE_MGDL = Lab("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL")
GLUCOSE_MMOL = Lab("15074-8", "Glucose [Moles/volume] in Blood", "mmol/L")
GLUCOSE_MG_PER_MMOL = 18.016
HBA1C = Lab("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%")
CHOLESTEROL = Lab("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL")
TRIGLYCERIDES = Lab("2571-8", "Triglycerides", "mg/dL")
LDL = Lab("18262-6", "Low Density Lipoprotein Cholesterol", "mg/dL")
HDL = Lab("2085-9", "High Density Lipoprotein Cholesterol", "mg/dL")
CREATININE = Lab("38483-4", "Creatinine", "mg/dL")
EGFR = Lab("33914-3", "Glomerular filtration rate/1.73 sq M.predicted", "mL/min/{1.73_m2}")
SMOKING = Concept("72166-2", "Tobacco smoking status")
SMOKING_VALUES = {
    "never": Concept("266919005", "Never smoked tobacco (finding)"),
    "former": Concept("8517006", "Ex-smoker (finding)"),
    "current": Concept("449868002", "Smokes tobacco daily (finding)"),
}
LIPID_PANEL = Concept("57698-3", "Lipid panel with direct LDL - Serum or Plasma")
METABOLIC_PANEL = Concept("51990-0", "Basic metabolic panel - Blood")

# ---- medications (RxNorm) ----
MEDICATIONS: dict[str, Concept] = {
    "metformin": Concept("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    "insulin": Concept("106892", "insulin isophane, human 70 UNT/ML / insulin, regular, human 30 UNT/ML "
                                 "Injectable Suspension [Humulin]"),
    "liraglutide": Concept("897122", "3 ML liraglutide 6 MG/ML Pen Injector"),
    "lisinopril": Concept("314076", "lisinopril 10 MG Oral Tablet"),
    "amlodipine": Concept("308136", "amLODIPine 2.5 MG Oral Tablet"),
    "hydrochlorothiazide": Concept("310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
}
ANTIHYPERTENSIVES = ("lisinopril", "amlodipine", "hydrochlorothiazide")

# ---- other clinical acts ----
MED_RECONCILIATION = Concept("430193006", "Medication reconciliation (procedure)")
A1C_MEASUREMENT = Concept("43396009", "Hemoglobin A1c measurement (procedure)")
FLU_VACCINE = Concept("140", "Influenza, seasonal, injectable, preservative free")
DIABETES_CAREPLAN = Concept("698360004", "Diabetes self management plan")
DIABETIC_DIET = Concept("160670007", "Diabetic diet")
EXERCISE_THERAPY = Concept("229065009", "Exercise therapy")

# ---- demographics (CDC race and ethnicity codes, OMB categories) ----
RACES: dict[str, Concept] = {
    "white": Concept("2106-3", "White"),
    "black": Concept("2054-5", "Black or African American"),
    "asian": Concept("2028-9", "Asian"),
    # Synthea exports its "hispanic" race as race "Other" with Hispanic ethnicity.
    "hispanic": Concept("2131-1", "Other"),
    "other": Concept("2131-1", "Other"),
}
HISPANIC = Concept("2135-2", "Hispanic or Latino")
NOT_HISPANIC = Concept("2186-5", "Not Hispanic or Latino")

GIVEN_MALE = (
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas", "Charles",
    "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew", "Joshua", "Kenneth",
    "Kevin", "Brian", "George", "Edward", "Ronald", "Luis", "Carlos", "Jose", "Wei", "Hiroshi",
)
GIVEN_FEMALE = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
    "Nancy", "Lisa", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly", "Emily", "Donna", "Michelle",
    "Dorothy", "Carol", "Amanda", "Melissa", "Deborah", "Maria", "Rosa", "Ana", "Mei", "Yuki",
)
FAMILY = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores",
    "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts",
)
STREET_SUFFIX = ("Street", "Avenue", "Road", "Lane", "Way", "Court", "Terrace", "Bypass", "Gardens")


class City(NamedTuple):
    name: str
    postal_code: str
    latitude: float
    longitude: float


CITIES = (
    City("Boston", "02108", 42.3601, -71.0589),
    City("Worcester", "01608", 42.2626, -71.8023),
    City("Springfield", "01103", 42.1015, -72.5898),
    City("Lowell", "01852", 42.6334, -71.3162),
    City("Cambridge", "02139", 42.3736, -71.1097),
    City("Brockton", "02301", 42.0834, -71.0184),
    City("Quincy", "02169", 42.2529, -71.0023),
    City("Lynn", "01901", 42.4668, -70.9495),
    City("New Bedford", "02740", 41.6362, -70.9342),
    City("Fall River", "02720", 41.7015, -71.1550),
    City("Taunton", "02780", 41.9001, -71.0898),
    City("Pittsfield", "01201", 42.4501, -73.2454),
)
STATE = "Massachusetts"
