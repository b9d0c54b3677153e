"""report.html: one self-contained page (inline CSS, plots as data URIs)."""
from __future__ import annotations

import html
from typing import Any

from rexport.pipeline.reporting.details import _details, _facts
from rexport.pipeline.reporting.formatting import FORMATS


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.skipped td{color:#777;background:#fafafa} td.fail{color:#b00;font-weight:bold}
.warn{background:#fff4d6;border:1px solid #e0c060;padding:.5em 1em}
.skip{background:#f4f4f4;border:1px solid #ccc;padding:.5em 1em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto} figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figcaption{font-size:13px;max-width:640px} p.missing{border:1px dashed #aaa;padding:1em;color:#555;max-width:600px}
"""

# Marks each image as decoded (naturalWidth > 0) once the page has loaded: lets a headless browser check it.
_SCRIPT = """window.addEventListener('load',function(){var ok=0;document.querySelectorAll('img').forEach(function(i){
var d=i.complete&&i.naturalWidth>0;if(d)ok++;i.setAttribute('data-loaded',d?'yes':'no');
i.setAttribute('data-natural-width',String(i.naturalWidth));});
document.body.setAttribute('data-images-decoded',String(ok));});"""


def _h(s: Any) -> str:
    return html.escape(str(s))


def html_table(headers: list[str], rows: list[list[str]], *, numeric: set[int] = frozenset(),
                row_classes: list[str] | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in headers) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        tds = []
        for j, c in enumerate(r):
            kls = "num" if j in numeric and not (row_classes and row_classes[i]) else ""
            if c == "FAIL":
                kls = "fail"
            tds.append(f'<td class="{kls}">{_h(c)}</td>' if kls else f"<td>{_h(c)}</td>")
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_list(items: list[str], cls: str, empty: str) -> str:
    return f'<div class="{cls}"><ul>' + "".join(f"<li>{_h(i)}</li>" for i in items or [empty]) + "</ul></div>"


def render_html(report: dict, plots: list[tuple[str | None, str]]) -> str:
    keys = report["table"]["keys"]
    numeric = {i for i, k in enumerate(keys) if k in FORMATS}
    body = [f"<h1>rexport report: {_h(report['model'])}</h1>",
            "<p>Reproduce with:</p>", f"<pre><code>{_h(report['command'] or '(command not recorded)')}</code></pre>",
            "<ul>" + "".join(f"<li><b>{_h(k)}</b>: {_h(v)}</li>" for k, v in _facts(report)) + "</ul>",
            "<h2>Warnings</h2>", _html_list(report["warnings"], "warn", "none"),
            "<h2>Skipped</h2>", _html_list([s["text"] for s in report["skipped"]], "skip", "nothing"),
            "<h2>Summary</h2>",
            html_table(report["table"]["columns"], report["table"]["rows"], numeric=numeric,
                        row_classes=["skipped" if r["status"] != "ok" else "" for r in report["rows"]]),
            "<h2>Plots</h2>"]
    for png, caption in plots:
        if png is None:
            body.append(f'<p class="missing">{_h(caption)}</p>')
        else:
            body.append(f'<figure><img alt="{_h(caption)}" src="data:image/png;base64,{png}">'
                        f"<figcaption>{_h(caption)}</figcaption></figure>")
    for title, headers, rows, text in _details(report):
        body += [f"<h2>{_h(title)}</h2>", *(f"<p>{_h(p)}</p>" for p in text)]
        body += [html_table(headers, rows)] if headers else []
    body.append(f"<p>Built from: {_h(', '.join(report['sources']))}.</p>")
    return html_page(f"rexport report: {report['model']}", body)


def html_page(title: str, body: list[str]) -> str:
    """A self-contained page with the report's style (also used by other reports, e.g. a matrix)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_h(title)}</title><style>{_CSS}</style>"
            f"<script>{_SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")

