"""Built-in text: digit captions and a few plain English sentences (written here).

They seed the builtin tokenizer so that it covers every built-in caption with whole
words and ordinary English with short pieces (byte fallback covers the rest).
"""
from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")


def digit_caption(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def digit_captions() -> list[str]:
    return [digit_caption(d) for d in range(10)] * 20


_ENGLISH = """\
The model reads text and looks at pictures in the same sequence.
Each picture is cut into small patches that follow the words describing it.
A caption tells what is in the image: its shapes, colours and where they are.
Small shapes sit inside one cell of the grid, and large ones nearly fill it.
Training mixes plain text with pairs of images and captions in equal measure.
The data pipeline packs many short documents into one long row of tokens.
When a document is too long for a row, the text is split into several chunks.
Images are never cut in half, because the model must see every patch together.
We count every record we skip so that nothing disappears without a trace.
Numbers like 1, 2, 3 and 42 appear in text, and so do questions: why? how?
This is a simple sentence about the weather, which was cold and bright today.
She wrote a short letter to her friend, then walked to the station at noon.
"""


def english_sentences() -> list[str]:
    return [line for line in _ENGLISH.splitlines() if line] * 10
