"""The closed world of the synthetic benchmark: colours, shapes, textures, and every word it writes.

Every question, answer and caption is made of the words listed here, so a word-level tokenizer covers the
benchmark with no unknown token, and every answer is a single token (colour and shape names, digits,
yes / no, directions, event verbs).
"""

from __future__ import annotations

# Object colours: saturated, far apart, and far from the low-saturation backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 50, 185),
    "orange": (245, 135, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses",
}
TEXTURES: tuple[str, ...] = ("plain", "noisy", "striped", "checkered", "dotted")

DIGITS: tuple[str, ...] = tuple(str(i) for i in range(10))
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
EVENTS: tuple[str, ...] = ("moves", "changes", "appears", "disappears")
OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Special tokens, in id order: the tokenizer gives them ids 0..5.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE_TOKEN, VIDEO_TOKEN)

_FUNCTION_WORDS = """
what which how many is are there a an the of in on with and or to into at from its it this then
colour shape object objects box symbol symbols first last way does move turn happens
answer question yes no above below
background page text lines line blank margin region regions part empty nothing static still scene
holding holds containing contains frames frame video start end during later stays same
top bottom middle centre corner half moving moved turns turned changed appearing disappearing
ruled grid pattern dots
"""
_PUNCTUATION = ("?", ",", ".", ":")


def vocabulary() -> list[str]:
    """Every token of the benchmark, specials first; the order fixes the token ids."""
    words: list[str] = []
    groups = (
        _FUNCTION_WORDS.split(), COLOUR_NAMES, SHAPES, tuple(PLURALS.values()), TEXTURES, DIGITS, NUMBER_WORDS,
        DIRECTIONS, EVENTS, OPTION_LETTERS, _PUNCTUATION,
    )
    for group in groups:
        for word in group:
            if word not in words:
                words.append(word)
    return [*SPECIAL_TOKENS, *words]
