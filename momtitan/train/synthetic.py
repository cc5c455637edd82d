"""A deterministic, English-like synthetic corpus: the default training data, made with no download.

Document i is a pure function of (seed, i), so the corpus is infinite, identical on every
machine and resumable from a document index alone. Documents mix four kinds of text, chosen so
that a small model's loss falls quickly and a memory model has something to remember:
- short stories from templates over made-up names, places and things;
- key-value facts stated early in a document and recalled later (associative recall);
- small sums written in words;
- counting runs.
"""

from __future__ import annotations

import random

_ONSETS = ["b", "br", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd"]

ADJECTIVES = (
    "small large old young quiet loud bright dark warm cold happy sad clever brave gentle wild calm busy "
    "green blue red golden silver wooden heavy light strange famous hidden ancient tiny huge"
).split()
VERBS = (
    "found lost built painted carried opened closed watched followed helped visited cleaned fixed sold "
    "bought borrowed hid discovered remembered forgot shared wrote read"
).split()
THINGS = (
    "book lamp boat garden river bridge house window door letter map key coin bell drum basket kettle "
    "clock ladder rope lantern mirror stone feather apple bread cup chair table road hill forest"
).split()
PLACES_SUFFIX = ["ton", "ville", "burg", "ford", "port", "field", "wood", "dale"]
NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
TIMES = ["In the morning", "At noon", "In the evening", "One day", "Later", "After a while", "That night"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _lexicon(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    names = sorted({_word(rng, rng.choice((1, 2, 2, 3))).capitalize() for _ in range(600)})
    places = sorted({_word(rng, rng.choice((1, 2))).capitalize() + rng.choice(PLACES_SUFFIX) for _ in range(300)})
    return names, places


class SyntheticCorpus:
    """`corpus[i]` is document i (a string); `len` is unbounded, so iterate by index."""

    VERSION = 1  # bump when the text changes: tokenizer caches are keyed on it

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.names, self.places = _lexicon(1234)  # the lexicon is fixed; `seed` picks the documents

    def __getitem__(self, index: int) -> str:
        if index < 0:
            raise IndexError(index)
        rng = random.Random(f"momtitan-synthetic-{self.seed}-{index}")
        kind = rng.random()
        if kind < 0.5:
            return self._story(rng)
        if kind < 0.8:
            return self._recall(rng)
        if kind < 0.92:
            return self._sums(rng)
        return self._counting(rng)

    def _story(self, rng: random.Random) -> str:
        cast = rng.sample(self.names, 3)
        home = rng.choice(self.places)
        out = [f"{cast[0]} lived in {home} with a {rng.choice(ADJECTIVES)} {rng.choice(THINGS)}."]
        for _ in range(rng.randint(4, 12)):
            who, other = rng.sample(cast, 2)
            thing = f"the {rng.choice(ADJECTIVES)} {rng.choice(THINGS)}"
            template = rng.randrange(4)
            if template == 0:
                out.append(f"{rng.choice(TIMES)}, {who} {rng.choice(VERBS)} {thing}.")
            elif template == 1:
                out.append(f"{who} and {other} {rng.choice(VERBS)} {thing} near {rng.choice(self.places)}.")
            elif template == 2:
                out.append(f"{who} said that {thing} was very {rng.choice(ADJECTIVES)}.")
            else:
                out.append(f"Then {who} gave {other} {thing}, and {other} was {rng.choice(ADJECTIVES)}.")
        out.append(f"In the end, {cast[0]} stayed in {home}.")
        return " ".join(out)

    def _recall(self, rng: random.Random) -> str:
        keys = rng.sample(self.names, rng.randint(3, 8))
        values = {k: rng.choice(THINGS) for k in keys}
        facts = [f"The {('secret', 'favourite', 'lucky')[i % 3]} word of {k} is {values[k]}." for i, k in enumerate(keys)]
        questions = []
        for k in rng.sample(keys, len(keys)):
            kind = ("secret", "favourite", "lucky")[keys.index(k) % 3]
            questions.append(f"What is the {kind} word of {k}? It is {values[k]}.")
        return " ".join(facts) + " " + " ".join(questions)

    def _sums(self, rng: random.Random) -> str:
        out = []
        for _ in range(rng.randint(4, 10)):
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            out.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        return " ".join(out)

    def _counting(self, rng: random.Random) -> str:
        start = rng.randint(0, 8)
        stop = rng.randint(start + 4, 20)
        return f"{rng.choice(self.names)} counted: " + ", ".join(NUMBERS[start : stop + 1]) + "."
