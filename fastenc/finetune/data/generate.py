"""Writes topics.jsonl: short English sentences in four topic classes, from templates and word lists.

Deterministic (a fixed seed): `python generate.py` rewrites the same file. Text and word lists are original
to fastenc and dedicated to the public domain (CC0 1.0, see README.md).
"""

from __future__ import annotations

import json
import os
import random

# Templates shared by every topic, so that a class is told by its topic words, not by the sentence's shape.
TEMPLATES = [
    "I read a long article about {a} and {b} this morning.",
    "My neighbour cannot stop talking about {a}.",
    "Yesterday we argued for an hour about {a} and {b}.",
    "The radio spent the whole evening on {a}.",
    "She wrote a short note about {a} for the school newsletter.",
    "Everyone at work seems worried about {a} lately.",
    "There was a {adj} story about {a} in the paper.",
    "He asked me what I think of {a} and {b}.",
    "Our group chat is full of news on {a}.",
    "I never expected {a} to be so {adj}.",
    "The report on {a} was {adj}, and {b} came up too.",
    "We watched a documentary about {a} last night.",
    "Nobody in my family agrees about {a}.",
    "A friend sent me a {adj} video about {b}.",
    "Today the main topic was {a}, followed by {b}.",
    "{A} again? That makes the third time this week.",
]

ADJECTIVES = ["surprising", "boring", "funny", "strange", "detailed", "short", "confusing", "exciting"]

TOPICS = {
    "sports": ["the football final", "the marathon runners", "the tennis match", "the new goalkeeper",
               "the swimming team", "the cycling race", "the basketball season", "the coach's tactics",
               "the penalty shootout", "the league table", "the injured striker", "the relay team"],
    "food": ["the new bakery", "grandma's soup recipe", "the spicy noodles", "the vegetable garden harvest",
             "the chocolate cake", "the cheese market", "the fresh bread", "the curry night",
             "the breakfast menu", "the apple pie", "the street food stalls", "the olive oil tasting"],
    "technology": ["the new smartphone", "the software update", "the laptop battery", "the home robot",
                   "the password leak", "the electric car charger", "the programming course",
                   "the faster processor", "the cloud storage outage", "the video game engine",
                   "the wireless earbuds", "the data centre"],
    "weather": ["the coming storm", "the heavy rain", "the heat wave", "the first snow", "the strong winds",
                "the foggy mornings", "the weekend forecast", "the thunder and lightning", "the long drought",
                "the icy roads", "the sunny spell", "the flood warning"],
}

PER_CLASS = 120


def sentences(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        seen = set()
        while len(seen) < PER_CLASS:
            a, b = rng.sample(words, 2)
            text = rng.choice(TEMPLATES).format(a=a, b=b, A=a[0].upper() + a[1:], adj=rng.choice(ADJECTIVES))
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "topics.jsonl"), "w") as f:
        for row in sentences():
            f.write(json.dumps(row) + "\n")
