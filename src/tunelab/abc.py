"""A checker for ABC music notation (abcnotation.com, standard v2.1), strict enough to tell a tune from noise.

A tune is well-formed when:
- its header starts with `X:<number>`, has `T:` and `M:` (a metre like 6/8, C or C|), and ends with `K:<key>`
  (a tonic A-G with optional #/b and a mode such as m, min, maj, dor, mix, or `none`);
- its body has at least one note and one bar line, and every body line is made only of ABC elements: notes
  (accidentals, octave marks, lengths), rests, bar lines and repeats, chord symbols in quotes, chords in
  brackets, ties, slurs, tuplets, broken rhythm, grace notes, decorations, or inline fields like `[K:G]`;
- quotes, brackets and braces are balanced on every line.
It is complete when, besides, its last line of music ends with a bar line (`|`, `||`, `|]`, `:|`...): how every
tune of the bundled data ends, and what a generation cut off by a token limit mostly fails.
A tune ends at its first empty line (standard 2.1, section 2.2): `first_tune` keeps that much of a generation, so a
model that goes on to write the next tune is judged on the one it finished.
This is a syntax check (what a parser would accept), not a judgement of the music.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"^(none|[A-G][#b]?\s*(m|min|maj|major|minor|ion|dor|phr|lyd|mix|aeo|loc)?[a-z]*)(\s.*)?$", re.I)
_METRE = re.compile(r"^(C\|?|\d+/\d+|none)$")
_ELEMENT = re.compile(
    r"""
      "[^"]*"                                  # chord symbol or annotation
    | \[[KMLPQ]:[^\]]*\]                       # inline field
    | \[\d                                     # first/second ending
    | [_=^]*[A-Ga-gzZx][,']*\d*/*\d*           # note or rest with accidentals, octave and length
    | \[\+?([_=^]*[A-Ga-g][,']*\d*/*\d*-?\s*)+\+?\]\d*/*\d*  # chord (notes may be tied or spaced)
    | \{[^}]*\}                                # grace notes
    | ![^!]*!                                  # decoration
    | \(\d(:\d?)*                              # tuplet
    | :*\|+[\]:]*|:+|\[\|                      # bar lines and repeats
    | [()\-~.<>\\\sHLMOPSTuv]                  # slurs, ties, broken rhythm, short decorations, spaces
    """,
    re.X,
)
_BODY_FIELD = re.compile(r"^[KMLPQWwNR]:")
_FIELD = re.compile(r"^[A-Za-z+]:")
_FINAL_BAR = re.compile(r"[|\]:]\s*$")  # the music line's last element is a bar line or a repeat


def first_tune(text: str) -> str:
    """`text` up to its first empty line: the end of a tune in ABC 2.1."""
    return re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0] + "\n"


def check_tune(tune: str, complete: bool = False) -> str | None:
    """None when `tune` is well-formed ABC (and, with `complete`, ends with a bar line), else the first reason it
    is not."""
    lines = [line.rstrip() for line in tune.strip().splitlines()]
    k_index = next((i for i, line in enumerate(lines) if line.startswith("K:")), None)
    if not lines or not re.match(r"^X:\s*\d+$", lines[0]):
        return "the tune must start with X:<number>"
    if k_index is None:
        return "no K: (key) field ends the header"
    header, body = lines[: k_index + 1], [line for line in lines[k_index + 1 :] if line]
    problem = _check_header(header)
    if problem:
        return problem
    if not body:
        return "no body after the K: field"
    for line in body:
        problem = _check_body_line(line)
        if problem:
            return problem
    notes = "".join(body)
    if not re.search(r"[A-Ga-g]", re.sub(r'"[^"]*"', "", notes)) or "|" not in notes:
        return "the body needs notes and bar lines"
    if complete:
        return _check_ending(body)
    return None


def _check_ending(body: list[str]) -> str | None:
    music = [line for line in body if not _FIELD.match(line) and not line.startswith("%")]
    last = music[-1] if music else ""
    if last.endswith("\\") or not _FINAL_BAR.search(last) or "|" not in last:
        return f"unfinished: the last line {last[-12:]!r} does not end with a bar line"
    return None


def _check_header(header: list[str]) -> str | None:
    fields = {line[0]: line[2:].strip() for line in header if len(line) > 1 and line[1] == ":"}
    if "T" not in fields:
        return "no T: (title) field"
    if "M" not in fields or not _METRE.match(fields["M"]):
        return f"M: (metre) missing or invalid: {fields.get('M')!r}"
    if not _KEY.match(fields["K"]):
        return f"K: (key) invalid: {fields['K']!r}"
    return None


def _check_body_line(line: str) -> str | None:
    if _BODY_FIELD.match(line) or line.startswith("%"):
        return None  # a field such as a key change, or a comment
    position = 0
    while position < len(line):
        match = _ELEMENT.match(line, position)
        if match is None or match.end() == position:
            return f"not ABC at {line[position : position + 12]!r}"
        position = match.end()
    return None


def well_formed_rate(tunes: list[str], complete: bool = False) -> float:
    return sum(check_tune(t, complete) is None for t in tunes) / max(len(tunes), 1)
