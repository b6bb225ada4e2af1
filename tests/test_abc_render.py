"""The ABC checker's "complete" rule, the creative scenario's scoring, and rendering tunes as SVG sheet music and MIDI
(abcm2ps / abc2midi; those tests are skipped, with the reason, on a machine without the Debian packages)."""

from __future__ import annotations

import base64
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import mido
import pytest

from tunelab.abc import check_tune, first_tune, well_formed_rate
from tunelab.abc_render import missing_tools, render_samples
from tunelab.report import write_report
from tunelab.tasks.creative import CreativeTask
from tunelab.tasks.generative import Item

ROOT = Path(__file__).resolve().parents[1]
HEADER = "X:1\nT:Test\nM:6/8\nL:1/8\nK:D\n"
TUNE = HEADER + 'A|"D"d2d f2a|[df]2e d3|"A"c2e a2g|fed e2:|\n'
needs_tools = pytest.mark.skipif(bool(missing_tools()), reason=f"not installed: {missing_tools()} (abcm2ps, abcmidi)")


def test_every_bundled_validation_and_test_tune_is_complete() -> None:
    for split in ("validation", "test"):
        lines = (ROOT / f"data/creative/{split}.jsonl").open(encoding="utf-8")
        tunes = [first_tune(r["prompt"] + r["completion"]) for r in map(json.loads, lines)]
        assert well_formed_rate(tunes, complete=True) == 1.0, split


def test_complete_demands_a_final_bar_line() -> None:
    assert check_tune(TUNE, complete=True) is None
    assert check_tune(HEADER + "A|d2d f2a|[df]2e d3||\n", complete=True) is None
    assert check_tune(HEADER + "A|d2d f2a|[df]2e d3|]\nP:B\n", complete=True) is None  # a field after the end
    cut = HEADER + "A|d2d f2a|[df]2e d3|c2e a"
    assert check_tune(cut) is None  # well-formed so far ...
    assert "unfinished" in (check_tune(cut, complete=True) or "")  # ... but cut mid-bar
    continued = HEADER + "A|d2d f2a|\\\n"
    assert "unfinished" in (check_tune(continued, complete=True) or "")  # a line continued to nothing


def test_a_tune_ends_at_its_first_empty_line() -> None:
    assert first_tune(TUNE + "\nX:2\nT:Next\nrubbish") == TUNE
    assert first_tune(TUNE + "  \t\nmore") == TUNE
    assert check_tune(TUNE + "\nX:2\nT:Next\nrubbish") is not None  # without the cut, the next tune is noise


def test_creative_scores_complete_tunes_and_keeps_them() -> None:
    task = CreativeTask()
    items = [Item(None, HEADER), Item(None, HEADER), Item(None, HEADER)]  # type: ignore[arg-type]
    body = TUNE[len(HEADER) :]
    outputs = [body + "\nX:2\nT:Another", body[:-4], "K:G\nK:D\nM:6/8"]
    metrics, details = task.score(outputs, items, spec=None)  # type: ignore[arg-type]
    assert metrics == {"abc_well_formed": pytest.approx(1 / 3), "abc_syntax_ok": pytest.approx(2 / 3)}
    assert details["abc_tunes"][0] == TUNE
    assert any("unfinished" in p for p in details["abc_problems"])


@needs_tools
def test_render_writes_sheet_music_and_midi_of_complete_tunes(tmp_path: Path) -> None:
    unfinished = HEADER + "A|d2d f2a|[df]2e d3|c2e a"
    rendering = render_samples({"abc_tunes": [unfinished, TUNE]}, tmp_path / "samples")
    assert rendering.note == ""
    [tune] = rendering.tunes  # the unfinished tune is not rendered
    assert tune.abc == TUNE and tune.svg == tmp_path / "samples/tune-1.svg"
    svg = ET.parse(tune.svg).getroot()
    heads = [e for e in svg.iter() if e.tag.endswith("use") and e.get("{http://www.w3.org/1999/xlink}href") == "#hd"]
    assert len(heads) >= 12  # the tune's notes, drawn as note heads
    notes = [m for m in mido.MidiFile(tune.midi) if m.type == "note_on" and m.velocity > 0]
    assert len(notes) >= 16  # 16 notes, plus the repeat and the chord accompaniment
    assert {62, 74} & {m.note for m in notes}  # D4 / D5: the tonic of D major


def test_render_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda program: None)
    rendering = render_samples({"abc_tunes": [TUNE]}, tmp_path)
    assert rendering.tunes == []
    assert "apt-get install abcm2ps abcmidi" in rendering.note
    assert render_samples({"abc_tunes": ["not a tune"]}, tmp_path).note == "no well-formed, complete tune to render"


@needs_tools
def test_report_embeds_the_rendered_tunes(tmp_path: Path) -> None:
    # The report stays one file: the sheet music and the MIDI travel inside it, the ABC text escaped.
    tune = TUNE.replace("T:", "T:<script>alert(1)</script> ", 1)
    rendering = render_samples({"abc_tunes": [tune]}, tmp_path / "samples")
    assert len(rendering.tunes) == 1, rendering.note
    html = write_report(
        tmp_path, title="t", before={"loss": 2.0}, after={"loss": 1.0}, history=[], samples=[], info={},
        music=rendering,
    ).html.read_text()
    svg = base64.b64encode((tmp_path / "samples/tune-1.svg").read_bytes()).decode()
    midi = base64.b64encode((tmp_path / "samples/tune-1.mid").read_bytes()).decode()
    assert f'src="data:image/svg+xml;base64,{svg}"' in html
    assert f'href="data:audio/midi;base64,{midi}"' in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_says_why_no_tune_is_shown(tmp_path: Path) -> None:
    note = render_samples({"abc_tunes": ["not a tune"]}, tmp_path).note
    html = write_report(
        tmp_path, title="t", before={"loss": 2.0}, after=None, history=[], samples=[], info={},
        music=render_samples({"abc_tunes": ["not a tune"]}, tmp_path),
    ).html.read_text()
    assert "Generated tunes" in html and note in html
