"""Generated ABC tunes as sheet music (SVG, by abcm2ps) and as sound (MIDI, by abc2midi from abcMIDI).

Both are Debian packages (`apt-get install abcm2ps abcmidi`); the tools are run as programs on a file, never
through a shell, with a time limit. When they are missing, `render_samples` renders nothing and says how to install
them, so a report without sheet music still shows the tunes' text.

The report's hook is `render_samples(evaluation.details, run_dir / "samples")`: a creative evaluation keeps every
generated tune in `details["abc_tunes"]` (`tunelab.tasks.creative`), and the first few well-formed, complete ones
become `samples/tune-N.abc`, `tune-N.svg` and `tune-N.mid`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.abc import check_tune

TOOLS = {"abcm2ps": "abcm2ps", "abc2midi": "abcmidi"}  # program -> the Debian package that has it
INSTALL_HINT = "install them with `apt-get install abcm2ps abcmidi` (Debian/Ubuntu) to see and hear the tunes"
TIMEOUT_S = 20


@dataclass(frozen=True)
class RenderedTune:
    abc: str  # the tune's ABC text, as generated
    svg: Path  # its sheet music (one SVG page)
    midi: Path  # the tune played, a standard MIDI file


@dataclass(frozen=True)
class Rendering:
    tunes: list[RenderedTune] = field(default_factory=list)
    note: str = ""  # why fewer tunes than asked were rendered (missing tools, no well-formed tune), else ""


class RenderError(RuntimeError):
    """A renderer failed on a tune the checker accepted."""


def missing_tools() -> list[str]:
    return [program for program in TOOLS if shutil.which(program) is None]


def render_samples(details: dict[str, Any], folder: Path, count: int = 3) -> Rendering:
    """The first `count` well-formed, complete tunes of a creative evaluation's details, rendered into `folder`."""
    tunes = [t for t in details.get("abc_tunes", []) if check_tune(t, complete=True) is None][:count]
    if not tunes:
        return Rendering(note="no well-formed, complete tune to render" if "abc_tunes" in details else "")
    missing = missing_tools()
    if missing:
        packages = sorted({TOOLS[m] for m in missing})
        return Rendering(note=f"sheet music and MIDI need {', '.join(missing)} ({', '.join(packages)}): {INSTALL_HINT}")
    folder.mkdir(parents=True, exist_ok=True)
    rendered, failures = [], []
    for n, tune in enumerate(tunes, 1):
        try:
            rendered.append(render_tune(tune, folder / f"tune-{n}"))
        except RenderError as exc:  # one tune a renderer rejects must not cost the run its report
            failures.append(f"tune-{n}: {exc}")
    return Rendering(rendered, "; ".join(failures))


def rendering_line(rendering: Rendering, folder: Path) -> str:
    """One line for the console: where the sheet music and MIDI files are, or why there are none."""
    if rendering.tunes:
        shown = f"{len(rendering.tunes)} generated tune(s) as sheet music and MIDI in {folder}"
        return shown + (f" ({rendering.note})" if rendering.note else "")
    return f"no sheet music: {rendering.note}" if rendering.note else ""


def render_tune(abc: str, stem: Path) -> RenderedTune:
    """`stem`.abc, `stem`.svg (sheet music) and `stem`.mid (MIDI) of one tune."""
    source = stem.with_suffix(".abc")
    source.write_text(abc.strip() + "\n", encoding="utf-8")
    svg, midi = stem.with_suffix(".svg"), stem.with_suffix(".mid")
    with tempfile.TemporaryDirectory() as scratch:
        # abcm2ps -g writes one SVG per page, numbered (<name>001.svg); a tune of a few lines fits one page.
        _run(["abcm2ps", "-g", "-q", str(source.resolve()), "-O", "page.svg"], Path(scratch))
        pages = sorted(Path(scratch).glob("page*.svg"))
        if not pages:
            raise RenderError(f"abcm2ps wrote no SVG for {source}")
        shutil.move(str(pages[0]), svg)
    _run(["abc2midi", str(source.resolve()), "-o", str(midi.resolve()), "-quiet", "-silent"], stem.parent)
    if not midi.is_file():
        raise RenderError(f"abc2midi wrote no MIDI file for {source}")
    return RenderedTune(abc, svg, midi)


def _run(command: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"{command[0]} took more than {TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise RenderError(f"{command[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")
