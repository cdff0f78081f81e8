"""The project's own preference data: video-title pairs in the spirit of the YouTube-titles recipe.

The user asks for a title for a video on some topic; the chosen title is 30-75 characters, the
rejected one falls outside that range (a terse label or a rambling sentence), so the preference is
checkable by a program. Rows are generated deterministically from a seed, in the conversational
format (prompt/chosen/rejected message lists) unless `conversational=False`.

`python -m dpo_cluster.data.samples` rewrites the small file shipped in the package
(dpo_cluster/data/sample/title_preferences.jsonl).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SAMPLE_FILE = Path(__file__).parent / "sample" / "title_preferences.jsonl"
SAMPLE_ROWS = 400
TITLE_MIN, TITLE_MAX = 30, 75

_TOPICS = [
    "sourdough bread",
    "home espresso",
    "learning Rust",
    "container gardening",
    "budget travel in Japan",
    "fixing a bike chain",
    "Python decorators",
    "night photography",
    "marathon training",
    "saving for retirement",
    "beekeeping",
    "chess openings",
    "sketching portraits",
    "vegan meal prep",
    "restoring old furniture",
    "building a gaming PC",
    "learning Mandarin",
    "houseplant care",
    "time management",
    "street food in Mexico City",
    "3D printing",
    "winter camping",
    "bird watching",
    "public speaking",
    "fermenting kimchi",
    "data visualization",
    "electric guitar tone",
    "solar panels at home",
    "rock climbing",
    "writing a novel",
]
_TOPICS_ZH = ["手冲咖啡", "学习编程", "家庭园艺", "马拉松训练", "中国书法", "川菜做法"]
_HOOKS = [
    "A Beginner's Guide to {t}",
    "{t}: What I Wish I Knew Sooner",
    "I Tried {t} for 30 Days",
    "The Truth About {t}",
    "{t} Explained in 10 Minutes",
    "5 Mistakes Everyone Makes with {t}",
    "How I Finally Got Good at {t}",
    "{t} on a Budget: Practical Tips",
]
_SHORT = ["{t}", "{t} video", "About {t}", "{t}!!", "My {t}"]
_LONG = [
    "In this video I am going to talk about {t} and everything related to it so please watch until the end",
    "{t} - a very long and detailed video where we go through absolutely every single thing you need to know",
    "Everything you ever wanted to know about {t} but were afraid to ask, plus a few things you did not",
]
_ASKS = [
    "Write a YouTube title for my video about {t}.",
    "Give me a catchy title for a video on {t}.",
    "I made a video about {t}. What should I call it?",
    "Suggest a title for a YouTube video covering {t}.",
]
_DETAILS = [
    "",
    " It is aimed at beginners.",
    " Keep it friendly.",
    " The video is about twelve minutes long.",
    " My audience is mostly students.",
]


def _title(rng: random.Random, topic: str) -> str:
    for _ in range(20):
        title = rng.choice(_HOOKS).format(t=topic.title() if topic.isascii() else topic)
        if TITLE_MIN <= len(title) <= TITLE_MAX:
            return title
    return f"A Practical Guide to {topic}, Step by Step"[:TITLE_MAX]


def _bad_title(rng: random.Random, topic: str) -> str:
    text = rng.choice(_SHORT if rng.random() < 0.5 else _LONG).format(t=topic)
    if TITLE_MIN <= len(text) <= TITLE_MAX:
        # A short template can land inside the good range for a long topic; the first long
        # template always overshoots it (and draws no random number, so later rows are unchanged).
        text = _LONG[0].format(t=topic)
    return text


def is_good_title(text: str) -> bool:
    """The checkable preference: a title is good when 30-75 characters, on one line."""
    text = text.strip()
    return TITLE_MIN <= len(text) <= TITLE_MAX and "\n" not in text


QUOTES = "\"'“”‘’«»"


def is_plain_title(text: str) -> bool:
    """A stricter title: a good title (`is_good_title`) not wrapped in quotation marks."""
    text = text.strip()
    return is_good_title(text) and not (text[0] in QUOTES and text[-1] in QUOTES)


def generate_title_pairs(n: int, seed: int = 0, *, conversational: bool = True) -> list[dict[str, Any]]:
    """`n` preference rows; about 1 in 10 prompts is in Chinese."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.1:
            topic = rng.choice(_TOPICS_ZH)
            ask = f"请为我关于{topic}的视频写一个标题。"
        else:
            topic = rng.choice(_TOPICS)
            ask = rng.choice(_ASKS).format(t=topic) + rng.choice(_DETAILS)
        chosen, rejected = _title(rng, topic), _bad_title(rng, topic)
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": ask}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": f"User: {ask}\nAssistant: ", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    print(write_jsonl(generate_title_pairs(SAMPLE_ROWS, seed=0), SAMPLE_FILE))
