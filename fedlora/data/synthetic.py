"""A synthetic clinical-notes triage corpus: note text -> receiving department.

Generated deterministically from a seed, so every process that asks for site k
gets the same rows without any file changing hands. It is built to be hard in
the ways real multi-hospital data is:
- sites differ in label mix (Dirichlet skew: some departments are rare at a site);
- sites differ in writing style (formal, abbreviated, narrative, EHR template),
  so the words a site never sees are the ones another site uses;
- symptoms overlap between departments, notes carry distractor and negated
  symptoms, and a share of labels is wrong (label noise).
A site training alone therefore misses departments and styles that the
federation covers; the central test set is balanced over both.

The drifted variant (`variant="drifted"`) is the same corpus some years on:
most symptoms are written in new jargon the original never uses, a new
telehealth service writes half the notes in its own template, and the label
mix moves towards neurology and pulmonology. The departments stay the same
five, so a model trained on the original can be scored, and retrained, on it.
"""

from __future__ import annotations

import random

import numpy as np

LABELS = ["cardiology", "neurology", "orthopedics", "gastroenterology", "pulmonology"]
LABEL_NOISE = 0.08
STYLES = ("formal", "abbreviated", "narrative", "ehr")

# (formal wording, abbreviated wording, lay wording) per symptom.
SYMPTOMS: dict[str, list[tuple[str, str, str]]] = {
    "cardiology": [
        ("chest pain radiating to the left arm", "CP radiating L arm", "a squeezing pain in the chest going down the arm"),
        ("palpitations", "palps", "a racing, pounding heartbeat"),
        ("exertional dyspnea", "DOE", "getting winded climbing stairs"),
        ("bilateral leg edema", "BLE edema", "swollen ankles"),
        ("syncope on exertion", "exertional syncope", "passing out while walking"),
        ("elevated troponin", "trop elevated", "a heart blood test that came back high"),
    ],
    "neurology": [
        ("sudden severe headache", "thunderclap HA", "the worst headache of their life"),
        ("unilateral facial droop", "facial droop", "one side of the face drooping"),
        ("slurred speech", "dysarthria", "words coming out slurred"),
        ("new onset seizure", "new sz", "a fit with shaking"),
        ("numbness of the right hand", "R hand paresthesia", "a numb, tingling right hand"),
        ("vertigo with ataxia", "vertigo + ataxia", "spinning dizziness and unsteady walking"),
    ],
    "orthopedics": [
        ("painful swollen knee after a fall", "knee effusion s/p fall", "a swollen knee after falling"),
        ("deformity of the forearm", "forearm deformity", "a bent-looking forearm"),
        ("low back pain after lifting", "LBP after lifting", "back pain after lifting boxes"),
        ("inability to bear weight on the ankle", "unable to WB ankle", "not being able to stand on the ankle"),
        ("shoulder dislocation", "shoulder dislocation", "a shoulder that popped out"),
        ("hip pain with shortened rotated leg", "shortened ext rotated leg", "hip pain and a leg that looks shorter"),
    ],
    "gastroenterology": [
        ("epigastric pain after meals", "epigastric pain postprandial", "stomach pain after eating"),
        ("hematemesis", "hematemesis", "vomiting blood"),
        ("melena", "melena", "black tarry stools"),
        ("burning retrosternal pain after meals", "heartburn/GERD sx", "burning chest pain after eating"),
        ("jaundice", "icterus", "yellow skin and eyes"),
        ("right lower quadrant pain", "RLQ pain", "pain low on the right side of the belly"),
    ],
    "pulmonology": [
        ("productive cough with fever", "prod cough + fever", "a wet cough and fever"),
        ("wheezing", "wheeze", "whistling breathing"),
        ("hypoxia on room air", "low SpO2 on RA", "low oxygen levels"),
        ("dyspnea at rest", "SOB at rest", "short of breath even sitting still"),
        ("hemoptysis", "hemoptysis", "coughing up blood"),
        ("pleuritic chest pain", "pleuritic CP", "sharp chest pain when breathing in"),
    ],
}

HISTORY = [("hypertension", "HTN", "high blood pressure"), ("diabetes", "DM2", "sugar diabetes"),
           ("smoking", "tobacco use", "smoking for years"), ("asthma", "asthma", "asthma as a child"),
           ("atrial fibrillation", "AFib", "an irregular heartbeat"), ("osteoporosis", "osteoporosis", "weak bones"),
           ("no significant history", "PMH neg", "nothing much in the past")]


def _phrase(entry: tuple[str, str, str], style: str) -> str:
    formal, abbreviated, lay = entry
    return {"formal": formal, "abbreviated": abbreviated, "narrative": lay, "ehr": formal}[style]


def _note(rng: random.Random, label: str, style: str, symptoms: dict = SYMPTOMS) -> str:
    age, sex = rng.randint(18, 92), rng.choice(["male", "female"])
    main = rng.sample(symptoms[label], k=rng.choice([1, 1, 2]))
    other = rng.choice([d for d in LABELS if d != label])
    distractor = rng.choice(symptoms[other]) if rng.random() < 0.45 else None
    negated = rng.choice(symptoms[rng.choice(LABELS)]) if rng.random() < 0.3 else None
    history = rng.choice(HISTORY)
    main_text = " and ".join(_phrase(s, style) for s in main)
    if style == "formal":
        text = f"Patient is a {age}-year-old {sex} presenting with {main_text}."
        if distractor:
            text += f" Also reports {_phrase(distractor, style)}."
        if negated:
            text += f" Denies {_phrase(negated, style)}."
        text += f" History of {_phrase(history, style)}."
    elif style == "abbreviated":
        text = f"{age}{sex[0].upper()} c/o {main_text}."
        if distractor:
            text += f" Also {_phrase(distractor, style)}."
        if negated:
            text += f" No {_phrase(negated, style)}."
        text += f" Hx {_phrase(history, style)}."
    elif style == "narrative":
        who = "man" if sex == "male" else "woman"
        text = f"Seen today, a {age} year old {who} who describes {main_text}."
        if distractor:
            text += f" Mentions {_phrase(distractor, style)} too."
        if negated:
            text += f" Has not had {_phrase(negated, style)}."
        text += f" Says there is {_phrase(history, style)}."
    else:
        text = f"CC: {main_text} | Age/Sex: {age}/{sex[0].upper()}"
        if distractor:
            text += f" | Assoc: {_phrase(distractor, style)}"
        if negated:
            text += f" | Neg: {_phrase(negated, style)}"
        text += f" | PMH: {_phrase(history, style)}"
    return text


def _noisy(rng: random.Random, label: str) -> str:
    return rng.choice([d for d in LABELS if d != label]) if rng.random() < LABEL_NOISE else label


def site_label_mix(num_sites: int, seed: int, alpha: float = 0.5) -> np.ndarray:
    """[num_sites, num_labels] label probabilities; the same for every caller."""
    rng = np.random.default_rng(seed)
    mix = rng.dirichlet([alpha] * len(LABELS), size=num_sites)
    return 0.97 * mix + 0.03 / len(LABELS)  # every department occurs, if rarely


def site_style(site: int) -> str:
    return STYLES[site % len(STYLES)]


def site_records(site: int, num_sites: int, n: int, seed: int = 0, alpha: float | None = 0.5) -> list[dict]:
    """Rows of site `site`: its own label mix (Dirichlet(alpha) over departments), mostly its own
    writing style. alpha=None: IID, every site draws labels and styles from the same distribution."""
    if not 0 <= site < num_sites:
        raise ValueError(f"site {site} not in [0, {num_sites})")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0 (or None for IID), got {alpha}")
    rng = random.Random(f"site:{seed}:{site}")
    mix = np.full(len(LABELS), 1 / len(LABELS)) if alpha is None else site_label_mix(num_sites, seed, alpha)[site]
    own = site_style(site)
    rows = []
    for _ in range(n):
        label = rng.choices(LABELS, weights=mix)[0]
        style = own if alpha is not None and rng.random() < 0.9 else rng.choice(STYLES)
        rows.append({"text": _note(rng, label, style), "label": _noisy(rng, label)})
    return rows


def central_test_records(n: int = 500, seed: int = 0) -> list[dict]:
    """A clean, balanced central test set over every department and style."""
    rng = random.Random(f"test:{seed}")
    return [{"text": _note(rng, LABELS[i % len(LABELS)], STYLES[(i // len(LABELS)) % len(STYLES)]),
             "label": LABELS[i % len(LABELS)]} for i in range(n)]


# -- the drifted variant -------------------------------------------------------
VARIANTS = ("original", "drifted")
NEW_WORDING = 0.75   # share of symptom mentions in the new jargon
TELEHEALTH = 0.5     # share of notes the new telehealth service writes
DRIFT_TILT = np.array([0.05, 0.4, 0.05, 0.1, 0.4])  # where the label mix moves (LABELS' order)
DRIFT_WEIGHT = 0.7   # how far it moves: drifted mix = (1 - w) * site's mix + w * tilt

# New wordings (formal, abbreviated, lay) for each department; none of their words occurs in SYMPTOMS.
NEW_SYMPTOMS: dict[str, list[tuple[str, str, str]]] = {
    "cardiology": [
        ("suspected NSTEMI", "NSTEMI r/o", "crushing tightness behind the breastbone"),
        ("tachyarrhythmia flagged by a wearable", "wearable AFL alert", "smartwatch warned about a fluttering pulse"),
        ("orthopnea with paroxysmal nocturnal dyspnoea", "orthopnoea + PND", "needs three pillows to sleep"),
        ("presyncope", "presyncope", "nearly blacking out"),
        ("anasarca in known HFrEF", "HFrEF anasarca", "puffy all over with a weak pump"),
    ],
    "neurology": [
        ("expressive aphasia", "aphasia", "cannot find words"),
        ("left hemiparesis", "L hemiparesis", "weakness down one whole side"),
        ("suspected LVO, code stroke called", "code stroke LVO", "stroke team called urgently"),
        ("postictal confusion", "postictal", "muddled and drowsy after convulsing"),
        ("binocular diplopia", "diplopia", "seeing double"),
    ],
    "orthopedics": [
        ("anatomic snuffbox tenderness", "scaphoid tenderness", "thumb base tender after tripping"),
        ("suspected ACL rupture", "ACL tear", "knee gave way with a pop during football"),
        ("sciatica radiating below the knee", "sciatica", "shooting buttock pain into the calf"),
        ("rotator cuff tear", "RC tear", "cannot lift the arm overhead"),
        ("tense calf, compartment syndrome suspected", "compartment sx", "rock-hard calf after a crush"),
    ],
    "gastroenterology": [
        ("coffee-ground emesis", "CGE", "throwing up dark grounds"),
        ("hematochezia", "BRBPR", "bright red bleeding from behind"),
        ("Charcot triad, cholangitis suspected", "?cholangitis", "rigors with a yellowish tinge"),
        ("tense ascites", "ascites", "distended abdomen full of fluid"),
        ("dyspepsia with early satiety", "dyspepsia", "bloated and full after a few bites"),
    ],
    "pulmonology": [
        ("COPD exacerbation", "AECOPD", "emphysema flare"),
        ("desaturation to 86 percent", "desat 86%", "pulse oximeter reading dropped"),
        ("suspected pneumothorax", "?PTX", "collapsed-lung feeling after a pop"),
        ("community-acquired pneumonia", "CAP", "chesty infection with rigors"),
        ("post-COVID breathlessness", "long COVID SOBOE", "puffed out since COVID"),
    ],
}


def drifted_label_mix(mix: np.ndarray) -> np.ndarray:
    """A site's label mix after the drift: moved towards DRIFT_TILT."""
    return (1 - DRIFT_WEIGHT) * np.asarray(mix) + DRIFT_WEIGHT * DRIFT_TILT


def _symptom(rng: random.Random, label: str) -> tuple[str, str, str]:
    return rng.choice(NEW_SYMPTOMS[label] if rng.random() < NEW_WORDING else SYMPTOMS[label])


def _telehealth_note(rng: random.Random, label: str) -> str:
    """The new telehealth service's template: its own words around the symptoms."""
    age, sex = rng.randint(18, 92), rng.choice(["M", "F"])
    style = rng.choice(("formal", "abbreviated", "narrative"))
    main = " plus ".join(_phrase(_symptom(rng, label), style) for _ in range(rng.choice([1, 1, 2])))
    text = f"Telehealth video consult ({age}{sex}). Chief concern: {main}."
    if rng.random() < 0.45:
        text += f" Incidentally: {_phrase(_symptom(rng, rng.choice([d for d in LABELS if d != label])), style)}."
    if rng.random() < 0.3:
        text += f" Negative for {_phrase(_symptom(rng, rng.choice(LABELS)), style)}."
    return text + f" Background: {_phrase(rng.choice(HISTORY), style)}. Disposition: in-person referral."


def _drifted_note(rng: random.Random, label: str, style: str) -> str:
    """A note in the new jargon: the telehealth template, or the site's own template where each
    department's symptoms are, for this note, mostly written in the new wordings."""
    if style == "telehealth":
        return _telehealth_note(rng, label)
    reworded = {d: NEW_SYMPTOMS[d] if rng.random() < NEW_WORDING else SYMPTOMS[d] for d in LABELS}
    return _note(rng, label, style, reworded)


def drifted_site_records(site: int, num_sites: int, n: int, seed: int = 0,
                         alpha: float | None = 0.5) -> list[dict]:
    """Rows of site `site` after the drift: its label mix moved (drifted_label_mix), half its notes from
    the telehealth service, most symptoms in new jargon. Deterministic from `seed`, like site_records."""
    if not 0 <= site < num_sites:
        raise ValueError(f"site {site} not in [0, {num_sites})")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0 (or None for IID), got {alpha}")
    rng = random.Random(f"drifted:{seed}:{site}")
    mix = np.full(len(LABELS), 1 / len(LABELS)) if alpha is None else site_label_mix(num_sites, seed, alpha)[site]
    mix = drifted_label_mix(mix)
    own = site_style(site)
    rows = []
    for _ in range(n):
        label = rng.choices(LABELS, weights=mix)[0]
        if rng.random() < TELEHEALTH:
            style = "telehealth"
        else:
            style = own if alpha is not None and rng.random() < 0.9 else rng.choice(STYLES)
        rows.append({"text": _drifted_note(rng, label, style), "label": _noisy(rng, label)})
    return rows


def drifted_test_records(n: int = 500, seed: int = 0) -> list[dict]:
    """A clean central test set of the drifted corpus, balanced over departments and over the four
    original templates and the telehealth one."""
    rng = random.Random(f"drifted-test:{seed}")
    styles = (*STYLES, "telehealth")
    return [{"text": _drifted_note(rng, LABELS[i % len(LABELS)], styles[(i // len(LABELS)) % len(styles)]),
             "label": LABELS[i % len(LABELS)]} for i in range(n)]


def records(variant: str, site: int, num_sites: int, n: int, seed: int = 0, alpha: float | None = 0.5) -> list[dict]:
    """Site `site`'s rows of the `variant` corpus ("original" or "drifted")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown corpus variant {variant!r}; one of {', '.join(VARIANTS)}")
    make = drifted_site_records if variant == "drifted" else site_records
    return make(site, num_sites, n, seed, alpha)


def variant_test_records(variant: str, n: int = 500, seed: int = 0) -> list[dict]:
    """The central test set of the `variant` corpus."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown corpus variant {variant!r}; one of {', '.join(VARIANTS)}")
    return drifted_test_records(n, seed) if variant == "drifted" else central_test_records(n, seed)
