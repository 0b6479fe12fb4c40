"""User choices checked against a card (the ``--modality`` selection) and the help texts that say
what ``--from`` expects and how to get a dataset that cannot be downloaded automatically.
"""

from __future__ import annotations

from mrivq.datasets.catalog import Card
from mrivq.utils.errors import MrivqError


def check_modalities(card: Card, modalities: list[str] | None) -> list[str] | None:
    if modalities is None:
        return None
    by_lower = {m.lower(): m for m in card.modalities}
    out = []
    for m in modalities:
        if m in card.modalities:
            out.append(m)
        elif m.lower() in by_lower:
            out.append(by_lower[m.lower()])
        else:
            choices = ", ".join(card.modalities) or "(this card lists none)"
            raise MrivqError(f"dataset '{card.name}' has no modality '{m}'; choose from {choices}")
    return list(dict.fromkeys(out))


def from_expectation(card: Card) -> str:
    names = [f.filename for f in card.files]
    if card.access == "manual":
        return "expected the archive (.tar, .tar.gz, .tgz, .zip) or folder downloaded as the card says: " \
               + instructions_summary(card)
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"expected one of the card's files ({shown}) or a folder holding them"


def manual_help(card: Card) -> str:
    return (f"dataset '{card.name}' cannot be downloaded automatically: {instructions_summary(card)} — "
            f"then pass the downloaded file with --from PATH (see `mrivq datasets show {card.name}`)")


def instructions_summary(card: Card) -> str:
    text = card.instructions.strip().split("\n\n", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."
