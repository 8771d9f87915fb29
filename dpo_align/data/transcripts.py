"""hh-rlhf transcripts: split into turns, and render a dialogue context as one instruction.

The rules here are exact because training, scoring and the tests all rely on them:

* a transcript is split at the markers ``"\\n\\nHuman: "`` and ``"\\n\\nAssistant: "``,
  and each turn's text is stripped;
* a context of exactly one Human turn renders as its text alone; otherwise every turn
  renders as ``Human: {text}`` or ``Assistant: {text}``, joined by ``"\\n"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HUMAN = "Human"
ASSISTANT = "Assistant"
_MARKER = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class Turn:
    role: str  # HUMAN or ASSISTANT
    text: str


def split_transcript(transcript: str) -> tuple[str, list[Turn]]:
    """Split a transcript into (text before the first marker, turns).

    Text before the first marker is returned (stripped) so callers can decide whether a
    transcript that does not open with a marker is acceptable; hh-rlhf rows always open
    with ``"\\n\\nHuman: "``, so it is normally empty.
    """
    parts = _MARKER.split(transcript)
    # re.split with one capturing group gives [lead, role, text, role, text, ...]
    lead = parts[0].strip()
    turns = [Turn(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    return lead, turns


def render_instruction(context: list[Turn]) -> str:
    """Render the dialogue before the final Assistant turn as one instruction string."""
    if len(context) == 1 and context[0].role == HUMAN:
        return context[0].text
    return "\n".join(f"{turn.role}: {turn.text}" for turn in context)


def normalise_role(role: str) -> str:
    """Map the role names used by other formats (PKU's ``human``/``assistant``, chat
    ``user``) onto ours; anything unknown is returned unchanged so it can be reported."""
    lowered = role.strip().lower()
    if lowered in ("human", "user"):
        return HUMAN
    if lowered in ("assistant", "gpt", "bot"):
        return ASSISTANT
    return role
