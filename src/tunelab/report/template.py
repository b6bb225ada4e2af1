"""The report page's Jinja template (autoescaped: model output and data can hold any markup)."""

from __future__ import annotations

import jinja2

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1140px;
       padding: 0 1em; color: #1f2933; line-height: 1.45; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #d9e2ec; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d9e2ec; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #1b7f3b; font-weight: 600; }
.worse { color: #c62828; font-weight: 600; }
.missing { color: #9aa5b1; }
.meta { color: #52606d; }
.columns { display: flex; gap: 2em; flex-wrap: wrap; }
.columns > div { flex: 1 1 320px; }
.sample { border: 1px solid #d9e2ec; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.sample h3 { margin: 0 0 0.5em 0; font-size: 1em; color: #52606d; }
.turn { margin: 0.4em 0; padding: 0.4em 0.7em; border-radius: 4px; background: #f5f7fa; }
.turn.user { background: #eef4fb; }
.turn.system { background: #f7f3e8; }
.turn.assistant { background: #eef8f0; }
.role { font-weight: 600; font-size: 0.85em; text-transform: uppercase; letter-spacing: 0.04em; color: #52606d; }
.text { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace; font-size: 0.9em; }
.answers { display: grid; grid-template-columns: repeat(3, 1fr); gap: 0.8em; }
.score { font-size: 0.85em; color: #52606d; }
pre.snippet { background: #f5f7fa; padding: 0.8em 1em; border-radius: 4px; overflow-x: auto; }
img { max-width: 100%; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ details.date }} · tunelab {{ details.versions.get("tunelab", missing) }}</p>

<h2>Run</h2>
<div class="columns">
<div><table class="info">
{% for key, value in info.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table></div>
{% if details.hyperparameters %}<div><h3>Hyperparameters</h3><table class="hyperparameters">
{% for key, value in details.hyperparameters.items() %}<tr data-hp="{{ key }}"><th>{{ key }}</th>\
<td>{{ value }}</td></tr>
{% endfor %}</table></div>
{% endif %}{% if details.data %}<div><h3>Data</h3><table class="data">
{% for key, value in details.data.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table></div>
{% endif %}</div>

<h2>Metrics</h2>
{% if metrics %}<table class="metrics">
<tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>
{% for row in metrics %}<tr data-metric="{{ row.name }}"><td>{{ row.name }}</td><td class="num">{{ row.before }}</td>\
<td class="num">{{ row.after }}</td>\
<td class="change {{ row.verdict }}">{{ row.change }}{% if row.verdict %} ({{ row.verdict }}){% endif %}</td></tr>
{% endfor %}</table>
{% else %}<p class="missing">no metrics (evaluation was disabled)</p>
{% endif %}{% if not has_after %}<p class="missing">no values after training</p>
{% endif %}
<img alt="{{ png_alt }}" src="data:image/png;base64,{{ png_b64 }}">

{% if trained %}<h2>Validation loss during training</h2>
{% if validation %}<table class="validation">
<tr><th>step</th><th>validation loss</th><th>training loss (smoothed)</th><th>validation rows</th></tr>
{% for v in validation %}<tr data-step="{{ v.step }}"><td class="num">{{ v.step }}</td>\
<td class="num">{{ v.loss }}</td><td class="num">{{ v.training }}</td><td class="num">{{ v.rows }}</td></tr>
{% endfor %}</table>
{% else %}<p class="missing">not measured during training (train.eval_every: 0, evaluation disabled, a preference \
objective or several processes)</p>
{% endif %}{% endif %}
{% for name, data in figures.items() %}<h2>{{ name }}</h2>
<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">
{% endfor %}
{% if music or music_note %}<h2>Generated tunes</h2>
{% if music_note %}<p class="missing">{{ music_note }}</p>
{% endif %}{% for t in music %}<div class="tune"><h3>tune {{ loop.index }}</h3>
<img alt="tune {{ loop.index }} as sheet music" src="data:image/svg+xml;base64,{{ t.svg }}">
<p><a download="tune-{{ loop.index }}.mid" href="data:audio/midi;base64,{{ t.midi }}">tune-{{ loop.index }}.mid</a> \
(MIDI: open it in any player)</p>
<pre>{{ t.abc }}</pre></div>
{% endfor %}{% endif %}
<h2>Samples</h2>
{% if samples %}{% for s in samples %}<div class="sample">
<h3>sample {{ loop.index }}</h3>
{% for t in s.turns %}<div class="turn {{ t.role }}"><div class="role">{{ t.role }}</div>\
<div class="text">{{ t.content }}</div></div>
{% endfor %}<div class="answers">
<div class="turn assistant reference"><div class="role">reference</div><div class="text">{{ s.reference }}</div></div>
<div class="turn assistant before"><div class="role">assistant · before</div><div class="text">{{ s.before }}</div>\
{% if s.before_score %}<div class="score">{{ s.before_score }}</div>{% endif %}</div>
<div class="turn assistant after"><div class="role">assistant · after</div>\
{% if s.after is none %}<div class="text missing">{{ missing }}</div>{% else %}<div class="text">{{ s.after }}</div>\
{% endif %}{% if s.after_score %}<div class="score">{{ s.after_score }}</div>{% endif %}</div>
</div></div>
{% endfor %}{% else %}<p class="missing">no samples</p>
{% endif %}
{% if details.artefacts %}<h2>Artefacts</h2>
<table class="artefacts">
{% for name, path in details.artefacts.items() %}<tr><th>{{ name }}</th><td><code>{{ path }}</code></td></tr>
{% endfor %}</table>
{% if details.snippet %}<pre class="snippet"><code>{{ details.snippet }}</code></pre>
{% endif %}{% endif %}
<h2>Versions</h2>
<table class="versions">
{% for name, version in details.versions.items() %}<tr><th>{{ name }}</th><td>{{ version }}</td></tr>
{% endfor %}<tr><th>date</th><td>{{ details.date }}</td></tr>
</table>
</body>
</html>
"""

TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(_PAGE)
