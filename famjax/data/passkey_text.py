"""The fixed texts of the PassKey task (paper section 4.3), with no dependencies.

Both the PassKey dataset (`passkey.py`) and the word tokenizer's built-in vocabulary (`tokenizers.py`) are
built from these texts; keeping them here lets each of those modules import them without importing the other.
"""
from __future__ import annotations

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
KEY_BEFORE = " The pass key is"
KEY_MIDDLE = ". Remember it."
KEY_AFTER = " is the pass key."
QUESTION = " What is the pass key? The pass key is"
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again.")


def template_texts() -> list[str]:
    """Returns every fixed text of the task (for building a word vocabulary that covers it)."""
    return [INTRO, KEY_BEFORE, KEY_MIDDLE, KEY_AFTER, QUESTION, *FILLER]
