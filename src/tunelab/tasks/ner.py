"""Named-entity recognition, generatively: the model lists the entities of a sentence, one `type: words` per line
(or `none`). Answers are projected back onto the sentence's tokens as BIO tags and scored at entity level with
seqeval, so the numbers are comparable with a tagging model's."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from tunelab.data.mixing import draw
from tunelab.metrics import entity_metrics
from tunelab.tasks.generative import GenerativeTask, Item, instructed
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec

NONE = "none"


class NerTask(GenerativeTask):
    name = "ner"
    max_new_tokens = 48
    required = ("tokens", "tags")

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        tokens, tags = row["tokens"], row["tags"]
        if not (isinstance(tokens, list) and isinstance(tags, list) and all(isinstance(t, str) for t in tokens + tags)):
            raise ValueError("`tokens` and `tags` must be lists of strings")
        if len(tokens) != len(tags) or not tokens:
            raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags: give one tag per token")
        check_bio(tags)
        system = spec.task.instruction or (
            "List the named entities in the text, one per line as `type: words`, with type one of person, "
            "location, group, creative-work, corporation, product. Answer `none` if there is none."
        )
        return Item(instructed(line, system, " ".join(tokens), entities_text(tokens, tags)), (tokens, tags))

    def split(self, spec: JobSpec) -> tuple[list[Item], list[Item]]:
        """The training items with `task.entity_oversample` applied (validation is never resampled)."""
        train, val = super().split(spec)
        factor = spec.task.entity_oversample
        if factor == 1:
            return train, val
        train, rich = oversampled(train, factor, spec.train.seed)
        note = f"sentences with entities x{factor:g}: {rich} -> {round(factor * rich)} rows"
        self.sources = "; ".join(filter(None, [note, self.sources]))
        return train, val

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        gold = [list(i.reference[1]) for i in items]
        predicted = [to_tags(o, list(i.reference[0])) for o, i in zip(outputs, items, strict=True)]
        return entity_metrics(predicted, gold), {}


def oversampled(items: list[Item], factor: float, seed: int) -> tuple[list[Item], int]:
    """The items with those that hold an entity repeated `factor` times (every one used once more before any twice
    more: `mixing.draw`), shuffled from `seed`; and how many held an entity. Most WNUT-17 sentences have none, and a
    model that meets mostly those learns to answer `none` (or O) everywhere."""
    rich = [i for i in items if any(tag != "O" for tag in i.reference[1])]
    plain = [i for i in items if all(tag == "O" for tag in i.reference[1])]
    rng = random.Random(seed)
    mixed = plain + draw(rich, round(factor * len(rich)), rng)
    rng.shuffle(mixed)
    return mixed, len(rich)


def check_bio(tags: list[str]) -> None:
    """IOB2: each tag is O, B-type or I-type, and an I-type continues a B-type or I-type of the same type."""
    previous = "O"
    for index, tag in enumerate(tags):
        if tag != "O" and (tag[:2] not in ("B-", "I-") or len(tag) < 3):
            raise ValueError(f"tag {index + 1} {tag!r} is not O, B-<type> or I-<type>")
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            raise ValueError(f"tag {index + 1} {tag!r} follows {previous!r}: an I- tag needs its B- first")
        previous = tag


def entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """(type, words) of each entity span."""
    spans: list[tuple[str, list[str]]] = []
    for token, tag in zip(tokens, tags, strict=True):
        if tag.startswith("B-"):
            spans.append((tag[2:], [token]))
        elif tag.startswith("I-") and spans:
            spans[-1][1].append(token)
    return [(kind, " ".join(words)) for kind, words in spans]


def entities_text(tokens: list[str], tags: list[str]) -> str:
    found = entities(tokens, tags)
    return "\n".join(f"{kind}: {words}" for kind, words in found) if found else NONE


def to_tags(answer: str, tokens: list[str]) -> list[str]:
    """BIO tags for `tokens` from a generated answer: each `type: words` line tags the first free match."""
    tags = ["O"] * len(tokens)
    for line in answer.splitlines():
        kind, _, words = line.partition(":")
        span = words.split()
        if not span or not kind.strip() or " " in kind.strip():
            continue  # not an entity line (a malformed answer scores as missed entities)
        for start in range(len(tokens) - len(span) + 1):
            if tokens[start : start + len(span)] == span and all(t == "O" for t in tags[start : start + len(span)]):
                tags[start : start + len(span)] = [f"B-{kind.strip()}"] + [f"I-{kind.strip()}"] * (len(span) - 1)
                break
    return tags


register_scenario(ScenarioInfo(NerTask.name, NerTask))
