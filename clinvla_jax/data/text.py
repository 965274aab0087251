"""Radiology report cleaning (paper section 4.1.1, text preprocessing).

Steps, each a small pure function:

1. ``extract_sections`` splits a free-text report (MIMIC-CXR style "FINDINGS:"
   headers) into sections; ``select_findings_impression`` keeps FINDINGS and
   IMPRESSION and falls back sensibly when one or both are missing.
2. ``clean_text`` removes anonymisation tokens (IU's "XXXX", MIMIC's "___") and
   the sentence fragments they break, list numbering and other formatting,
   drops hedges ("may have", "possibly", ...) and expands abbreviations from
   ``ABBREVIATIONS``.
3. ``truncate_to_sentences`` keeps whole sentences while they fit the token
   budget, so truncation lands on a sentence boundary where possible.

``report_text`` chains them; ``CleanedReport`` says which sections were used.
"""

import dataclasses
import re
from typing import Callable, Mapping, Optional

# Abbreviation -> expansion.  Chosen from the abbreviations that actually occur
# in chest X-ray reports (MIMIC-CXR, IU X-ray) and that have a single meaning
# there.  Ambiguous ones are left alone on purpose: "PE" (pleural effusion or
# pulmonary embolism), "CP" (chest pain / cardiopulmonary), "PA"/"AP" (views).
# Matching is on whole words, case-insensitive unless the key is listed in
# ``_CASE_SENSITIVE`` (short forms that are also ordinary words).
ABBREVIATIONS: dict[str, str] = {
  "PTX": "pneumothorax",
  "ILD": "interstitial lung disease",
  "CHF": "congestive heart failure",
  "COPD": "chronic obstructive pulmonary disease",
  "ARDS": "acute respiratory distress syndrome",
  "ETT": "endotracheal tube",
  "ET tube": "endotracheal tube",
  "ET-tube": "endotracheal tube",
  "NGT": "nasogastric tube",
  "NG tube": "nasogastric tube",
  "NG-tube": "nasogastric tube",
  "OGT": "orogastric tube",
  "OG tube": "orogastric tube",
  "PICC": "peripherally inserted central catheter",
  "IJ": "internal jugular",
  "SVC": "superior vena cava",
  "IVC": "inferior vena cava",
  "CABG": "coronary artery bypass graft",
  "AICD": "automatic implantable cardioverter defibrillator",
  "ICD": "implantable cardioverter defibrillator",
  "GGO": "ground-glass opacity",
  "GGOs": "ground-glass opacities",
  "PNA": "pneumonia",
  "TB": "tuberculosis",
  "CXR": "chest radiograph",
  "RUL": "right upper lobe",
  "RML": "right middle lobe",
  "RLL": "right lower lobe",
  "LUL": "left upper lobe",
  "LLL": "left lower lobe",
  "s/p": "status post",
  "w/": "with",
  "c/w": "consistent with",
  "b/l": "bilateral",
  "bilat": "bilateral",
  "pt": "patient",
  "cm2": "square centimetres",
}
_CASE_SENSITIVE = frozenset({"ICD", "TB", "IJ", "pt"})

# Hedge phrase -> replacement.  The paper removes "vague expressions like 'may
# have'"; where deleting the words would break the grammar, the hedge is
# replaced by the plain statement it qualifies.  "Cannot be excluded" and
# negations are kept: they carry findings, not vagueness.
HEDGES: dict[str, str] = {
  "may have": "has",
  "may be": "is",
  "may represent": "represents",
  "could represent": "represents",
  "might represent": "represents",
  "may reflect": "reflects",
  "could reflect": "reflects",
  "possibly": "",
  "possible": "",
  "probably": "",
  "probable": "",
  "presumably": "",
  "perhaps": "",
  "questionable": "",
  "likely": "",
  "potentially": "",
}

# Sections whose text is kept, in output order, and the headers that alias them.
_SECTION_ALIASES = {
  "findings": "findings",
  "finding": "findings",
  "impression": "impression",
  "impressions": "impression",
  "conclusion": "impression",
  "conclusions": "impression",
  "findings and impression": "findings_impression",
  "findings/impression": "findings_impression",
  "impression/findings": "findings_impression",
}

# Sections that are never report content (history, request, technique).
_DROPPED_SECTIONS = frozenset(
  {
    "indication",
    "history",
    "clinical history",
    "clinical information",
    "reason for exam",
    "reason for examination",
    "comparison",
    "comparisons",
    "technique",
    "examination",
    "exam",
    "procedure",
    "notification",
    "recommendation",
    "recommendations",
    "wet read",
  }
)

_HEADER_RE = re.compile(r"(?m)^[ \t]*([A-Z][A-Z /&()-]{2,40}):")
_ANON_RE = re.compile(r"X{3,}|_{2,}")


@dataclasses.dataclass(frozen=True)
class CleanedReport:
  text: str
  source: str  # which sections were used, e.g. "findings+impression"


def extract_sections(report: str) -> dict[str, str]:
  """Splits a report on upper-case "HEADER:" lines; keys are lower-case headers.

  Text before the first header is returned under "preamble".
  """
  sections: dict[str, str] = {}
  matches = list(_HEADER_RE.finditer(report))
  start = matches[0].start() if matches else len(report)
  sections["preamble"] = report[:start].strip()
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
    name = " ".join(m.group(1).lower().split())
    body = report[m.end() : end].strip()
    sections[name] = (sections[name] + " " + body).strip() if name in sections else body
  return sections


def _last_paragraph(text: str) -> str:
  paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
  return paragraphs[-1] if paragraphs else ""


def select_findings_impression(sections: Mapping[str, str], full_text: Optional[str] = None) -> CleanedReport:
  """Keeps FINDINGS + IMPRESSION; returns raw (uncleaned) text and its source.

  Fallbacks, in order: whichever of the two exists; a combined
  "FINDINGS AND IMPRESSION" section; the last paragraph of the report body
  (where MIMIC-CXR reports without headers put their conclusion).
  """
  kept: dict[str, str] = {}
  for name, body in sections.items():
    alias = _SECTION_ALIASES.get(name)
    if alias and body.strip():
      kept[alias] = (kept.get(alias, "") + " " + body).strip()
  parts, used = [], []
  for key in ("findings", "findings_impression", "impression"):
    if key in kept:
      parts.append(kept[key])
      used.append(key)
  if parts:
    return CleanedReport(" ".join(parts), "+".join(used))
  body = sections.get("preamble", "")
  if len(sections) == 1 and body:
    return CleanedReport(body, "whole_text")
  last = _last_paragraph(full_text if full_text is not None else body)
  header = _HEADER_RE.match(last)
  if header and header.group(1).strip().lower() in _DROPPED_SECTIONS:
    last = ""  # the last paragraph is history/indication: nothing usable
  elif header:
    last = last[header.end() :].strip()
  return CleanedReport(last, "last_paragraph" if last else "none")


# --- cleaning --------------------------------------------------------------


# Dotted short forms after which a full stop does not end the sentence
# (matched against the text before that full stop).
_NO_SPLIT_AFTER = re.compile(r"(?:\b[a-z]\.[a-z]|\b(?:dr|mr|mrs|ms|vs|approx|fig|cf|etc))$", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
  """Splits on ., ! or ? followed by space; keeps decimals and "y.o."/"Dr." intact."""
  sentences: list[str] = []
  for piece in re.split(r"(?<=[.!?])\s+(?=\S)", text.strip()):
    prev = sentences[-1] if sentences else ""
    if prev.endswith(".") and _NO_SPLIT_AFTER.search(prev[:-1]):
      sentences[-1] = prev + " " + piece
    else:
      sentences.append(piece)
  return [s.strip() for s in sentences if s.strip()]


def _remove_anonymised(sentence: str) -> str:
  """Drops words containing anonymisation tokens; drops the sentence if they dominate.

  IU reports replace dates, names and sometimes clinical words with "XXXX"
  ("There is XXXX increased opacity", "chest x-XXXX XXXX").  Removing the whole
  word (with any attached hyphenated fragment) keeps the rest readable; a
  sentence that was mostly anonymised carries no usable content.
  """
  words = sentence.split()
  if not words:
    return ""
  hit = [bool(_ANON_RE.search(w)) for w in words]
  if not any(hit):
    return sentence
  kept = [w for w, h in zip(words, hit) if not h]
  if sum(hit) * 2 >= len(words) or len(kept) < 2:
    return ""
  # Keep sentence-final punctuation that was attached to a removed word.
  tail = words[-1][-1] if hit[-1] and words[-1][-1] in ".!?" else ""
  return " ".join(kept) + tail


def _phrase_pattern(phrase: str, case_sensitive: bool) -> re.Pattern[str]:
  escaped = re.escape(phrase).replace(r"\ ", r"\s+")
  flags = 0 if case_sensitive else re.IGNORECASE
  return re.compile(rf"(?<![\w/-]){escaped}(?![\w-])", flags)


_ABBREV_PATTERNS = [
  (_phrase_pattern(k, k in _CASE_SENSITIVE), v)
  # Longest first so "ET tube" wins over any shorter key.
  for k, v in sorted(ABBREVIATIONS.items(), key=lambda kv: -len(kv[0]))
]


def _hedge_pattern(phrase: str) -> re.Pattern[str]:
  escaped = re.escape(phrase).replace(r"\ ", r"\s+")
  # "less/more/most likely" rank alternatives; they are not hedges. alternatives; they are not hedges.
  return re.compile(rf"(?<!\w)(?<!less )(?<!more )(?<!most ){escaped}(?!\w)", re.IGNORECASE)


_HEDGE_PATTERNS = [(_hedge_pattern(k), v) for k, v in sorted(HEDGES.items(), key=lambda kv: -len(kv[0]))]


def expand_abbreviations(text: str) -> str:
  for pattern, expansion in _ABBREV_PATTERNS:
    text = pattern.sub(expansion, text)
  return text


def remove_hedges(text: str) -> str:
  for pattern, replacement in _HEDGE_PATTERNS:
    text = pattern.sub(replacement, text)
  return text


def _strip_formatting(text: str) -> str:
  text = text.replace("\r", "\n")
  # List numbering at line/sentence start: "1.", "2)", "(3)", bullets.
  text = re.sub(r"(?m)(^|(?<=[.:;]))\s*(\(?\d{1,2}[.)](?!\d)|[-*\u2022])\s+", r"\1 ", text)
  text = re.sub(r"[=#*~_|<>\[\]{}]+", " ", text)
  text = re.sub(r"\s+", " ", text)
  return text.strip()


def _tidy_punctuation(text: str) -> str:
  text = re.sub(r"\s+([,.;:!?])", r"\1", text)
  text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
  text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)  # ", ." -> "."
  text = re.sub(r"\.{2,}", ".", text)
  text = re.sub(r"\(\s*\)", "", text)
  text = re.sub(r"\s+", " ", text).strip()
  text = re.sub(r"^[,;:.\s]+", "", text)
  return text


def _capitalise(sentence: str) -> str:
  return sentence[:1].upper() + sentence[1:] if sentence else sentence


def clean_text(text: str) -> str:
  """Cleans one section's text (or a whole note); see module docstring."""
  text = _strip_formatting(text)
  sentences = []
  for s in split_sentences(text):
    s = _remove_anonymised(s)
    s = remove_hedges(s)
    s = expand_abbreviations(s)
    s = _tidy_punctuation(s)
    if len(re.findall(r"[A-Za-z]{2,}", s)) == 0:
      continue  # nothing but numbers/punctuation left
    if s[-1] not in ".!?":
      s += "."
    sentences.append(_capitalise(s))
  return " ".join(sentences)


def truncate_to_sentences(text: str, num_tokens: Callable[[str], int], max_tokens: int) -> str:
  """Keeps leading whole sentences whose total token count fits ``max_tokens``.

  If even the first sentence is too long, it is returned whole and the
  tokenizer's own truncation cuts it (there is no sentence boundary to use).
  """
  kept, used = [], 0
  for s in split_sentences(text):
    n = num_tokens(s)
    if used + n > max_tokens:
      break
    kept.append(s)
    used += n
  if not kept:
    return text
  return " ".join(kept)


def report_text(
  *, findings: Optional[str] = None, impression: Optional[str] = None, full_report: Optional[str] = None
) -> CleanedReport:
  """Cleaned FINDINGS + IMPRESSION text of one report.

  Pass either the two sections (IU X-ray XML) or ``full_report`` (MIMIC-CXR .txt,
  clinical notes); an empty ``text`` means nothing usable was found.
  """
  if full_report is not None:
    chosen = select_findings_impression(extract_sections(full_report), full_report)
  else:
    chosen = select_findings_impression({"findings": findings or "", "impression": impression or ""})
  cleaned = clean_text(chosen.text)
  return CleanedReport(cleaned, chosen.source if cleaned else "none")


def fit_text(text: str, tokenizer, max_len: Optional[int] = None) -> str:
  """Truncates at a sentence boundary for ``tokenizer`` ([CLS]/[SEP] included)."""
  max_len = tokenizer.max_len if max_len is None else max_len
  return truncate_to_sentences(text, tokenizer.num_tokens, max_len - 2)
