"""Bundled text: short fables generated from a small grammar, for text models' debug runs.

    gentrain data pack tinytales --out data/tinytales --seq-len 128
    data: {source: builtin:tinytales}      # packed into the cache on first use (128-byte samples)

Nothing is downloaded: the text is written here by a seeded random walk over the grammar
below (Python's `random.Random`, whose integer-seeded choices are stable across
versions), so every machine packs the same bytes. About 256 KB of ASCII: words, their
spellings, agreement of names and pronouns within a tale, dialogue and punctuation give a
byte model plenty to learn beyond letter frequencies (unigram entropy about 4.2 bits per
byte, the tales' own entropy far lower).
"""

from __future__ import annotations

import random

TINYTALES_BYTES = 256 * 1024
TINYTALES_SEQ_LEN = 128

_NAMES = {"she": ["Mira", "Lena", "Ada", "Rosa", "Nell", "Ivy", "Tess", "June"],
          "he": ["Tom", "Omar", "Finn", "Leo", "Sam", "Hugo", "Ben", "Otto"]}
_ANIMALS = ["fox", "crow", "hare", "owl", "goat", "wolf", "mouse", "bear", "frog", "heron"]
_PLACES = ["the old mill", "the river bank", "the dark wood", "the hill", "the market", "the orchard",
           "the lighthouse", "the little bridge", "the meadow", "the harbour"]
_OBJECTS = ["a silver key", "a red apple", "a wooden box", "a lantern", "a map", "a loaf of bread",
            "a blue feather", "a brass bell", "a basket of pears", "a letter"]
_ADJECTIVES = ["clever", "tired", "hungry", "kind", "proud", "quiet", "brave", "curious", "old", "young"]
_WEATHER = ["the rain fell softly", "the sun was warm", "a cold wind blew", "the fog was thick",
            "the snow lay deep", "the stars were bright"]
_TIMES = ["One morning", "Late in the evening", "On a grey afternoon", "Long ago", "At dawn",
          "One winter night", "In the spring"]
_FEELINGS = ["happy", "afraid", "angry", "sad", "surprised", "glad", "worried"]
_MORALS = ["Kindness is never wasted.", "Slow and steady wins the race.", "Look before you leap.",
           "A friend in need is a friend indeed.", "Pride comes before a fall.",
           "Many hands make light work.", "Honesty is the best policy."]
_SAYING = ["said", "asked", "whispered", "cried", "replied"]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _tale(rng: random.Random, number: int) -> str:
    pronoun = rng.choice(["she", "he"])
    name = rng.choice(_NAMES[pronoun])
    possessive = "her" if pronoun == "she" else "his"
    animal, other = rng.sample(_ANIMALS, 2)
    place, second_place = rng.sample(_PLACES, 2)
    thing = rng.choice(_OBJECTS)
    adjective = rng.choice(_ADJECTIVES)
    lines = [f"Tale {number}: {name} and the {adjective.capitalize()} {animal.capitalize()}", ""]
    lines.append(f"{rng.choice(_TIMES)}, {name} walked to {place}. {rng.choice(_WEATHER).capitalize()}, "
                 f"and {pronoun} carried {thing}.")
    lines.append(f"There {pronoun} met {_a(adjective)} {animal}. The {animal} looked at {thing} and "
                 f"felt {rng.choice(_FEELINGS)}.")
    lines.append(f"\"Where are you going, {name}?\" {rng.choice(_SAYING)} the {animal}.")
    lines.append(f"\"I am going to {second_place},\" {name} {rng.choice(_SAYING)}. \"Will you come with me?\"")
    for _ in range(rng.randint(1, 3)):
        event = rng.choice([
            f"On the way they met {_a(rng.choice(_ADJECTIVES))} {other}, who asked for {thing}.",
            f"The {animal} ran ahead, and {name} followed {possessive} friend.",
            f"{name} gave the {animal} half of {thing}, and the {animal} was {rng.choice(_FEELINGS)}.",
            f"At {second_place} they found {rng.choice(_OBJECTS)} under a stone.",
            f"The {other} laughed at the {animal}, but the {animal} said nothing.",
            f"{rng.choice(_WEATHER).capitalize()}, so they rested for a while.",
        ])
        lines.append(event)
    count = rng.randint(2, 9)
    lines.append(f"By the end of the day they had walked {count} miles, and {name} was "
                 f"{rng.choice(_FEELINGS)}.")
    lines.append(f"Moral: {rng.choice(_MORALS)}")
    return "\n".join(lines) + "\n\n"


def tinytales(size: int = TINYTALES_BYTES, seed: int = 0) -> bytes:
    """`size` bytes of ASCII fables (the last tale cut where the size ends)."""
    rng = random.Random(seed)
    parts, total, number = [], 0, 1
    while total < size:
        tale = _tale(rng, number)
        parts.append(tale)
        total += len(tale)
        number += 1
    return "".join(parts).encode("ascii")[:size]


# name -> (the text's bytes, the sample length `builtin:NAME` is packed with)
TEXT_SOURCES = {"tinytales": (tinytales, TINYTALES_SEQ_LEN)}
