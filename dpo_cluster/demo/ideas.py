"""The video ideas of the real-model demo: the prompts its model writes titles for.

Training ideas and held-out ideas come from disjoint topic lists, so the evaluation asks about
subjects the training never saw (new prompts, not recombinations of training prompts). Each idea
is a topic with an angle, phrased as a creator would ask for a title.
"""

from __future__ import annotations

import random
from pathlib import Path

from dpo_cluster.data.samples import write_jsonl

TRAIN_TOPICS = (
    "sourdough bread", "home espresso", "learning Rust", "container gardening", "budget travel in Japan",
    "fixing a bike chain", "Python decorators", "night photography", "marathon training",
    "saving for retirement", "beekeeping", "chess openings", "sketching portraits", "vegan meal prep",
    "restoring old furniture", "building a gaming PC", "learning Mandarin", "houseplant care",
    "time management", "street food in Mexico City", "3D printing", "winter camping", "bird watching",
    "public speaking", "fermenting kimchi", "data visualization", "electric guitar tone",
    "solar panels at home", "rock climbing", "writing a novel",
)  # fmt: skip
HELD_OUT_TOPICS = (
    "knitting a sweater", "training a puppy", "learning to surf", "home brewing beer", "origami animals",
    "repairing a laptop screen", "growing tomatoes indoors", "studying for the bar exam", "watercolor landscapes",
    "a road trip through Iceland", "baking croissants", "learning sign language", "composting at home",
    "speedcubing", "making candles", "a first triathlon", "tiny house living", "pottery on a wheel",
    "cooking Thai curry", "learning the violin",
)  # fmt: skip
ANGLES = (
    "a beginner's guide to {t}",
    "my first month of {t}",
    "five mistakes people make with {t}",
    "{t} on a tight budget",
    "what nobody tells you about {t}",
    "a day in my life doing {t}",
    "{t} explained in ten minutes",
    "how I got better at {t} in one year",
    "the tools I use for {t}",
    "{t} for complete beginners, step by step",
)
ASK = "Write a YouTube title for my video: {idea}. Reply with the title only."


def video_ideas(topics: tuple[str, ...], n: int, seed: int) -> list[str]:
    """`n` distinct ideas (topic x angle), in a seeded order; n <= len(topics) * len(ANGLES)."""
    ideas = [angle.format(t=topic) for topic in topics for angle in ANGLES]
    if n > len(ideas):
        raise ValueError(f"{n} ideas asked, {len(ideas)} exist for these topics")
    random.Random(seed).shuffle(ideas)
    return ideas[:n]


def write_idea_prompts(path: Path, topics: tuple[str, ...], n: int, seed: int) -> Path:
    """A prompt file (rows {"prompt": [a user message]}) of `n` title requests."""
    rows = [
        {"prompt": [{"role": "user", "content": ASK.format(idea=idea)}]}
        for idea in video_ideas(topics, n, seed)
    ]
    return write_jsonl(rows, path)
