"""The validation as one self-contained HTML page, readable offline: the verdict, the counts per
split and class, and each expectation with pass/fail and its offending files.

Great Expectations' own Data Docs draw their index table and status icons with scripts and
styles from CDNs, so offline they are blank. This page has no script and fetches nothing (its
CSS is inline); the validate stage writes it at ``<validate.docs>/index.html`` on every run, and
GX's own index moves beside it as ``gx-index.html`` (see :func:`finetune.ingest.checks.build_docs`).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path

from finetune.core.errors import plain_error
from finetune.core.files import write_atomic
from finetune.ingest.checks import GX_INDEX, CheckResult
from finetune.ingest.index import SPLITS

PAGE = "index.html"
LISTED = 500  # offending entries written per expectation (reports/validate.json keeps 100)
# Pillow names the in-memory file it was given ("<_io.BytesIO object at 0x7f...>"): an address
# means nothing to a reader, so it is cut from the messages people see.

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:70em;
padding:0 1em;color:#1d2330}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.verdict{font-size:1.25em;font-weight:600;padding:.5em .8em;border-radius:6px;display:inline-block}
.pass{color:#116329} .fail{color:#b3261e} .warn{color:#8a5300}
.verdict.pass{background:#e6f4ea} .verdict.fail{background:#fce8e6}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #d0d7de;padding:.3em .6em;
text-align:left;vertical-align:top} th{background:#f3f5f7} td.n{text-align:right}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
ul.files{margin:.2em 0;padding-left:1.2em} .muted{color:#57606a;font-size:.9em}
"""


def write_page(folder: Path, report: dict, checks: Sequence[CheckResult], errors: dict[str, str],
               dataset: Path, run_name: str) -> Path:
    """Write the page for one validation into ``folder`` (atomically); its path."""
    path = folder / PAGE
    text = render(report, checks, errors, dataset, run_name, gx_pages(folder, run_name))
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def gx_pages(folder: Path, run_name: str) -> list[str]:
    """GX's own pages of this run (and its index), as links relative to ``folder``."""
    pages = sorted(p.relative_to(folder).as_posix() for p in folder.glob(f"validations/*/{run_name}*/*/*.html"))
    return ([GX_INDEX] if (folder / GX_INDEX).exists() else []) + pages


def render(report: dict, checks: Sequence[CheckResult], errors: dict[str, str], dataset: Path,
           run_name: str, links: Sequence[str] = ()) -> str:
    """The whole page as text (``report``: the JSON summary that validation writes)."""
    e = html.escape
    passed = report["passed"]
    verdict = "PASSED" if passed else "FAILED"
    failed = report["failed"]
    summary = (f"{report['used']} of {report['files']} files used, {report['quarantined']} quarantined"
               if passed else f"{len(failed)} critical expectation(s) not met ({', '.join(failed)}): "
               "nothing downstream runs")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Data validation {verdict}: {e(str(dataset))}</title><style>{STYLE}</style></head><body>",
        f"<h1>Data validation of <code>{e(str(dataset))}</code></h1>",
        f'<p class="muted">run {e(run_name)}, written {e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}; '
        f"policy <code>validate.on_failure: {e(report['on_failure'])}</code></p>",
        f'<p><span class="verdict {"pass" if passed else "fail"}">{"✔" if passed else "✘"} '
        f"{verdict}</span> {e(summary)}</p>",
        counts_table(report),
        checks_table(checks),
        *quarantine_section(report),
        "<h2>Offending files per expectation</h2>",
        *(offending_section(check, errors) for check in checks if check.offending),
        *links_section(links),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def counts_table(report: dict) -> str:
    """Images per class (rows) and split (columns): the files used (on failure, those found)."""
    counts: dict[str, dict[str, int]] = report["counts"]
    splits = sorted(counts, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    classes = sorted({name for per_class in counts.values() for name in per_class})
    head = "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f'<td class="n">{counts[s].get(name, 0)}</td>' for s in splits) + "</tr>"
        for name in classes)
    totals = "".join(f'<td class="n"><b>{sum(counts[s].values())}</b></td>' for s in splits)
    which = "files used" if report["passed"] else "files found"
    return (f"<h2>Images per split and class ({which})</h2><table><tr><th>class</th>{head}</tr>{rows}"
            f"<tr><td><b>total</b></td>{totals}</tr></table>")


def status(check: CheckResult) -> str:
    """The check's pass/fail cell: a warning that fails is marked as such, not as a failure."""
    if check.success:
        return '<td class="pass">✔ pass</td>'
    if check.severity == "critical":
        return '<td class="fail">✘ FAIL</td>'
    return '<td class="warn">⚠ warning</td>'


def checks_table(checks: Sequence[CheckResult]) -> str:
    """One row per expectation: name, table, what it checks, result, offending count."""
    e = html.escape
    rows = "".join(
        f"<tr><td><code>{e(c.check)}</code></td>{status(c)}<td>{e(c.description)}</td>"
        f'<td>{e(c.table)}</td><td>{e(c.severity)}</td><td class="n">{len(c.offending)}</td></tr>'
        for c in checks)
    return ("<h2>Expectations</h2><table><tr><th>expectation</th><th>result</th><th>checks that</th>"
            f"<th>table</th><th>severity</th><th>offending</th></tr>{rows}</table>")


def offending_section(check: CheckResult, errors: dict[str, str]) -> str:
    """The files (classes, splits) at fault in one expectation, each with its decoder error."""
    e = html.escape
    items = []
    for name in check.offending[:LISTED]:
        error = errors.get(name)
        items.append(f"<li><code>{e(name)}</code>" + (f" — {e(plain_error(error))}" if error else "") + "</li>")
    if len(check.offending) > LISTED:
        items.append(f"<li>… and {len(check.offending) - LISTED} more (the index parquet has them all)</li>")
    kind = "pass" if check.success else ("fail" if check.severity == "critical" else "warn")
    return (f'<h3 class="{kind}"><code>{e(check.check)}</code>: {len(check.offending)} offending</h3>'
            f'<ul class="files">{"".join(items)}</ul>')


def quarantine_section(report: dict) -> list[str]:
    """What quarantine left out, and which checks had failed before it (empty when nothing was)."""
    if not report["quarantined_files"]:
        return []
    e = html.escape
    before = ", ".join(f"<code>{e(name)}</code>" for name in report["failed_before_quarantine"])
    files = "".join(f"<li><code>{e(name)}</code></li>" for name in report["quarantined_files"][:LISTED])
    return [f"<h2>Quarantined: {len(report['quarantined_files'])} files left out</h2>",
            f"<p>Failed before quarantine: {before}. The dataset itself is unchanged.</p>",
            f'<ul class="files">{files}</ul>']


def links_section(links: Sequence[str]) -> list[str]:
    """Links to GX's own pages of this run (relative; they need the network for their styles)."""
    if not links:
        return []
    items = "".join(f'<li><a href="{html.escape(link)}">{html.escape(link)}</a></li>' for link in links)
    return ["<h2>Great Expectations' own Data Docs</h2>",
            '<p class="muted">These pages take their styles and scripts from the network; '
            "everything above is readable without it.</p>", f"<ul>{items}</ul>"]
