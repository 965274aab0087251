"""Tests for report cleaning (clinvla_jax.data.text)."""

from clinvla_jax.data import text
from clinvla_jax.data import tokenizer as tokenizer_lib

_MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or PTX.  The
 cardiomediastinal silhouette is normal.  s/p CABG. ET tube 4.5 cm above the carina.

 IMPRESSION:

 1. No acute cardiopulmonary process.
 2. ILD may be present.
"""


def test_mimic_sections_and_cleaning():
  r = text.report_text(full_report=_MIMIC)
  assert r.source == "findings+impression"
  assert r.text == (
    "There is no focal consolidation, pleural effusion or pneumothorax. The "
    "cardiomediastinal silhouette is normal. Status post coronary artery bypass graft. "
    "Endotracheal tube 4.5 cm above the carina. No acute cardiopulmonary process. "
    "Interstitial lung disease is present."
  )
  assert "ascites" not in r.text  # indication dropped


def test_fallbacks():
  assert text.report_text(findings="", impression="No acute disease.").source == "impression"
  assert text.report_text(findings="Lungs clear.", impression=None).source == "findings"
  r = text.report_text(full_report="FINDINGS AND IMPRESSION: Normal chest.")
  assert (r.text, r.source) == ("Normal chest.", "findings_impression")
  r = text.report_text(full_report="INDICATION: cough\n\nHeart normal.\n\nLungs are clear.")
  assert r.text == "Lungs are clear."  # last paragraph when no findings/impression
  assert text.report_text(findings="XXXX XXXX.", impression="").text == ""


def test_iu_anonymisation_and_hedges():
  findings = (
    "There is XXXX increased opacity within the right upper lobe with possible mass. "
    "XXXX opacity in the left midlung may represent focal airspace disease. "
    "XXXX XXXX XXXX. No pneumothorax."
  )
  impression = "1. PA and lateral chest x-XXXX XXXX. 2. Less likely CHF."
  r = text.report_text(findings=findings, impression=impression)
  assert "XXXX" not in r.text
  assert r.text == (
    "There is increased opacity within the right upper lobe with mass. "
    "Opacity in the left midlung represents focal airspace disease. "
    "No pneumothorax. PA and lateral chest. Less likely congestive heart failure."
  )


def test_abbreviations_are_whole_words():
  assert text.expand_abbreviations("NG tube and RLL GGO") == (
    "nasogastric tube and right lower lobe ground-glass opacity"
  )
  assert text.expand_abbreviations("cholesterol tbsp") == "cholesterol tbsp"
  assert text.expand_abbreviations("the pt") == "the patient"
  assert text.expand_abbreviations("PT") == "PT"  # case-sensitive short forms
  assert set(text.ABBREVIATIONS) >= {"PTX", "ILD", "CHF", "COPD", "ET tube", "NG tube"}


def test_sentence_split_keeps_decimals_and_abbreviations():
  assert text.split_sentences("A 1.5 cm nodule. A 50 y.o. man. Dr. Smith saw it.") == [
    "A 1.5 cm nodule.",
    "A 50 y.o. man.",
    "Dr. Smith saw it.",
  ]


def test_truncation_at_sentence_boundary():
  tok = tokenizer_lib.Tokenizer()
  sentence = "The cardiomediastinal silhouette is within normal limits."
  long = " ".join([sentence] * 30)
  fitted = text.fit_text(long, tok)
  assert fitted.endswith(".") and fitted.count(".") == len(text.split_sentences(fitted))
  assert tok.num_tokens(fitted) <= 126 and tok.num_tokens(fitted + " " + sentence) > 126
  assert text.fit_text("Short.", tok) == "Short."


def test_real_iu_report(shared_data):
  import csv

  with open(shared_data / "iu_xray" / "images" / "manifest.csv", newline="") as f:
    row = next(r for r in csv.DictReader(f) if r["uid"] == "303")
  r = text.report_text(findings=row["findings"], impression=row["impression"])
  assert r.text.startswith("The heart is normal in size. The mediastinum is Stable.")
  assert r.text.endswith("Mild bilateral streaky opacities, atelectasis. No acute infiltrate.")
