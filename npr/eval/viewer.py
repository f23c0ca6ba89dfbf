"""The trajectory viewer: sample records → one self-contained HTML page (no network).

Records are the lines of ``samples.jsonl`` (see ``npr.eval.metrics`` for the fields) or any
trace file that ``npr view`` reads: JSONL/JSON records with an ``output``/``text``/``response``/
``completion`` field, JSON strings, or a plain text file holding one trace. A record without a
parsed ``trace`` gets one from its text: NPR text through ``parse(strict=False)``, Multiverse
and Parallel-R1 text through their converters (format auto-detected with ``detect_format``).

The page embeds the records as JSON in a ``<script type="application/json">`` tag, escaped so
that no output text can close the tag, and renders only the selected sample, so that it stays
usable with thousands of samples.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from npr.errors import NprError
from npr.schema import detect_format, from_multiverse, from_parallel_r1, parse

OUTPUT_KEYS = ("output", "text", "response", "completion")
FORMATS = ("auto", "npr", "multiverse", "parallel-r1")
# record fields the viewer shows on their own; the rest is listed under "other fields"
KNOWN_KEYS = {
    "benchmark",
    "problem_id",
    "sample",
    "problem",
    "prompt",
    "answer",
    "output",
    "pred",
    "correct",
    "reward",
    "mode",
    "finish_reason",
    "diagnostic",
    "format_valid",
    "format_errors",
    "trace",
    "parallel_blocks",
    "branches_per_block",
    "tokens",
    "critical_path_tokens",
    "forward_passes",
    "wall_time_s",
    *OUTPUT_KEYS,
}


class TraceFileError(NprError, ValueError):
    """A trace file ``npr view`` cannot read; the message names the file, line and field."""


# -- records --------------------------------------------------------------------------------


def trace_from_text(text: str, fmt: str = "auto") -> tuple[dict, list[str] | None]:
    """(``ParallelTrace.to_dict()``, NPR format-error messages) of a response text.

    The error list is None for Multiverse and Parallel-R1 text, which the NPR schema does not judge.
    """
    fmt = detect_format(text) if fmt == "auto" else fmt
    if fmt == "multiverse":
        return from_multiverse(text).to_dict(), None
    if fmt == "parallel-r1":
        return from_parallel_r1(text).to_dict(), None
    trace = parse(text, strict=False)
    return trace.to_dict(), [str(e) for e in trace.errors]


def block_execution(record: dict, n_blocks: int) -> list[str]:
    """How each block of a record's trace was decoded: ``"parallel"``, ``"not_parallel"``,
    ``"sequential"`` (the whole sample was decoded as one sequence) or ``"text"`` (no engine record).

    The engine executes blocks in order, so the first ``parallel_blocks`` blocks are the parallel ones.
    """
    if record.get("mode") == "sequential":
        return ["sequential"] * n_blocks
    executed = record.get("parallel_blocks")
    if not isinstance(executed, int) and isinstance(record.get("branches_per_block"), list):
        executed = len(record["branches_per_block"])
    if not isinstance(executed, int):
        return ["text"] * n_blocks
    return ["parallel" if i < executed else "not_parallel" for i in range(n_blocks)]


SCALAR_FIELDS = ("benchmark", "problem_id", "sample", "mode", "finish_reason", "pred", "answer")
NUMBER_FIELDS = ("reward", "tokens", "critical_path_tokens", "forward_passes", "wall_time_s", "parallel_blocks")
BOOL_FIELDS = ("correct", "format_valid")
TEXT_FIELDS = ("problem", "prompt", "output")


def _kind(value) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
            type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
        )
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trace_shape_problem(trace: dict) -> str | None:
    """What in a ``ParallelTrace.to_dict()``-shaped ``trace`` the viewer cannot render (None: nothing)."""
    blocks = trace.get("blocks", [])
    if not isinstance(blocks, list):
        return f"trace.blocks is {_kind(blocks)}, not a list of blocks"
    for name in ("final", "answer", "source_format"):
        if not isinstance(trace.get(name), (str, type(None))):
            return f"trace.{name} is {_kind(trace[name])}, not a string"
    for b, block in enumerate(blocks):
        if not isinstance(block, dict):
            return f"trace.blocks[{b}] is {_kind(block)}, not an object"
        for name in ("preamble", "takeaway"):
            if not isinstance(block.get(name), (str, type(None))):
                return f"trace.blocks[{b}].{name} is {_kind(block[name])}, not a string"
        for name in ("plans", "steps"):
            items = block.get(name, [])
            if not isinstance(items, list):
                return f"trace.blocks[{b}].{name} is {_kind(items)}, not a list of {{label, text}} objects"
            for i, item in enumerate(items):
                if (
                    not isinstance(item, dict)
                    or not isinstance(item.get("text", ""), (str, type(None)))
                    or not isinstance(item.get("label"), (str, int, type(None)))
                ):
                    return f"trace.blocks[{b}].{name}[{i}] is {_kind(item)}, not a {{label, text}} object"
    return None


def record_shape_problem(record: dict) -> str | None:
    """What in a normalised record the viewer cannot render, naming the field (None: nothing). A
    number may be NaN or infinite (``script_json`` encodes it); a wrong type is a problem."""
    problem = trace_shape_problem(record["trace"])
    if problem:
        return problem
    for name in SCALAR_FIELDS:
        if isinstance(record.get(name), (dict, list)):
            return f"field {name} is {_kind(record[name])}, not a string or number"
    for name in NUMBER_FIELDS:
        if record.get(name) is not None and not _is_number(record[name]):
            return f"field {name} is {_kind(record[name])}, not a number"
    for name in BOOL_FIELDS:
        if not isinstance(record.get(name), (bool, type(None))):
            return f"field {name} is {_kind(record[name])}, not true/false"
    for name in TEXT_FIELDS:
        if not isinstance(record.get(name), (str, type(None))):
            return f"field {name} is {_kind(record[name])}, not a string"
    branches = record.get("branches_per_block")
    if branches is not None and not (isinstance(branches, list) and all(_is_number(n) for n in branches)):
        return f"field branches_per_block is {_kind(branches)}, not a list of numbers"
    errors = record.get("format_errors")
    if not (isinstance(errors, list) and all(isinstance(e, str) for e in errors)):
        return f"field format_errors is {_kind(errors)}, not a list of strings"
    if not isinstance(record.get("diagnostic"), (str, dict, type(None))):
        return f"field diagnostic is {_kind(record['diagnostic'])}, not a string"
    return None


def normalize_record(raw: dict | str, fmt: str = "auto") -> dict:
    """A sample record with everything the viewer and the metrics read filled in.

    ``raw`` is a sample record, a record with a text field (``OUTPUT_KEYS``) or a bare trace
    string. Adds ``output``, ``trace`` (parsed when missing), ``format_valid`` and
    ``format_errors`` (for NPR text, when missing), ``pred`` (the trace's answer when missing),
    ``block_exec`` (see ``block_execution``) and ``extra`` (unknown keys, passed through).
    Raises ValueError when there is neither a trace nor a text field, or when a field has a shape the
    viewer cannot render (``record_shape_problem``).
    """
    record = {"output": raw} if isinstance(raw, str) else dict(raw)
    text = next((record[k] for k in OUTPUT_KEYS if isinstance(record.get(k), str)), None)
    trace = record.get("trace") if isinstance(record.get("trace"), dict) else None
    if text is None and trace is None:
        raise ValueError(f"no trace and no text field (one of {', '.join(OUTPUT_KEYS)})")
    record["output"] = text
    if trace is None:
        trace, errors = trace_from_text(text, fmt)
        if errors is not None:
            if record.get("format_valid") is None:
                record["format_valid"] = not errors
            if not record.get("format_errors"):
                record["format_errors"] = errors
    record["trace"] = trace
    record.setdefault("format_valid", None)  # None: not judged (another format, or a runner that did not say)
    record.setdefault("format_errors", [])
    if "pred" not in record:  # a runner's pred (even null) is the authority; text-only traces use the trace's
        record["pred"] = trace.get("answer")
    problem = record_shape_problem(record)
    if problem:
        raise ValueError(problem)
    record["block_exec"] = block_execution(record, len(trace.get("blocks", [])))
    record["extra"] = {k: v for k, v in record.items() if k not in KNOWN_KEYS and k not in ("block_exec", "extra")}
    return record


def _records_from_json(value, path: str) -> list:
    if isinstance(value, dict) and isinstance(value.get("samples"), list):
        return value["samples"]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise TraceFileError(f"{path}: a JSON {type(value).__name__}; expected a list of records, a record or a string")


def read_records(path: str | Path, fmt: str = "auto", skipped: list[str] | None = None) -> list[dict]:
    """Normalised records of a ``.jsonl``, ``.json`` or text file of traces (see the module docstring).

    A record of a shape the viewer cannot render (no text, ``trace.blocks: null``, a string where a
    number belongs) is left out and described, with its ``file:line``, in ``skipped``; without a
    ``skipped`` list, or when no record is left, that is a ``TraceFileError``. So is a file that
    cannot be read (not UTF-8, invalid JSON, invalid Unicode), naming the file and line.
    """
    from npr.data.jsonl import decode_utf8
    from npr.validate import invalid_text_field

    path = Path(path)
    if not path.is_file():
        raise TraceFileError(f"{path}: no such file; give a samples.jsonl, a .json or a .txt trace file")
    if fmt not in FORMATS:
        raise TraceFileError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    text = decode_utf8(path.read_bytes(), str(path))
    items: list[tuple[int, object]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TraceFileError(
                        f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); write one JSON record per line"
                    ) from e
    elif path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
        items = [(0, v) for v in _records_from_json(value, str(path))]
    else:
        items = [(0, text)]
    records, problems = [], []
    for n, (lineno, item) in enumerate(items):
        where = f"{path}:{lineno}" if lineno else f"{path} record {n}"
        if not isinstance(item, (dict, str)):
            raise TraceFileError(f"{where}: a JSON {type(item).__name__}; expected a record object or a trace string")
        bad_text = invalid_text_field(item)
        if bad_text:
            raise TraceFileError(f"{where}: field {bad_text[0]} {bad_text[1]}; write valid Unicode text")
        try:
            records.append(normalize_record(item, fmt))
        except ValueError as e:
            fix = "add an 'output' field with the response text" if "no trace" in str(e) else "fix or remove the record"
            problems.append(f"{where}: {e}; {fix}")
    if problems and (skipped is None or not records):
        more = f" (and {len(problems) - 1} more record(s) like it)" if len(problems) > 1 else ""
        raise TraceFileError(problems[0] + more)
    if not records:
        raise TraceFileError(f"{path} holds no traces")
    if skipped is not None:
        skipped.extend(problems)
    return records


# -- page -----------------------------------------------------------------------------------


def _json_safe(value):
    """``value`` with NaN and infinities as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``: JSON has no
    such numbers, and a page whose data holds one would not parse (every sample would vanish)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def script_json(value) -> str:
    """JSON for a ``<script type="application/json">`` body: ``<``, ``>``, ``&`` and U+2028/9 are
    written as ``\\uXXXX`` escapes, so no string (e.g. ``</script>``) can end the tag early; numbers
    that JSON cannot hold are written as strings (``_json_safe``), so the body always parses."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


_VIEW_FIELDS = (
    "benchmark",
    "problem_id",
    "sample",
    "answer",
    "pred",
    "correct",
    "reward",
    "mode",
    "finish_reason",
    "diagnostic",
    "format_valid",
    "format_errors",
    "parallel_blocks",
    "branches_per_block",
    "tokens",
    "critical_path_tokens",
    "forward_passes",
    "wall_time_s",
    "output",
    "trace",
    "block_exec",
    "extra",
)


MAX_EXTRA_CHARS = 2000


def _shorten(value):
    """A pass-through field as embedded: values whose JSON exceeds MAX_EXTRA_CHARS (e.g. token
    ids) are replaced by a note, so that they do not bloat the page."""
    size = len(json.dumps(value, default=str))
    return value if size <= MAX_EXTRA_CHARS else f"<{type(value).__name__} of {size} JSON characters, not embedded>"


def viewer_payload(records: list[dict]) -> dict:
    """The JSON the page embeds: per-sample fields, with problem and prompt texts stored once
    in ``strings`` (k samples of a problem share them) and referenced by index."""
    strings: list[str] = []
    index: dict[str, int] = {}

    def ref(text):
        if not isinstance(text, str) or not text:
            return None
        if text not in index:
            index[text] = len(strings)
            strings.append(text)
        return index[text]

    samples = []
    for r in records:
        item = {k: r.get(k) for k in _VIEW_FIELDS}
        item["extra"] = {k: _shorten(v) for k, v in (r.get("extra") or {}).items()}
        item["problem_ref"], item["prompt_ref"] = ref(r.get("problem")), ref(r.get("prompt"))
        samples.append(item)
    return {"strings": strings, "samples": samples}


def viewer_section(records: list[dict]) -> str:
    """The viewer's HTML (list + detail pane), its embedded data and its script."""
    return (
        '<section id="viewer"><h2>Trajectories</h2>'
        '<div id="v-errors" class="v-errors" hidden></div>'
        '<div class="v-wrap"><aside class="v-side">'
        '<div class="v-filters">'
        '<select id="f-bench" aria-label="benchmark"><option value="">all benchmarks</option></select>'
        '<select id="f-correct" aria-label="correctness"><option value="">correct + wrong</option>'
        '<option value="1">correct</option><option value="0">wrong</option></select>'
        '<select id="f-kind" aria-label="kind"><option value="">any structure</option>'
        '<option value="par">parallel triggered</option><option value="multi">≥2 branches</option>'
        '<option value="nopar">no parallel block</option><option value="invalid">format invalid</option></select>'
        '<input id="f-text" type="search" placeholder="filter: id or text" aria-label="text filter">'
        '</div><div id="v-count" class="v-count"></div><ol id="v-list" class="v-list"></ol></aside>'
        '<main id="v-main" class="v-main"></main></div></section>\n'
        f'<script type="application/json" id="npr-samples">{script_json(viewer_payload(records))}</script>\n'
        f"<script>{VIEWER_JS}</script>"
    )


def page(title: str, body: str, extra_css: str = "") -> str:
    """A complete HTML document with the shared style sheet."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}{extra_css}</style></head>"
        f'<body><header class="top"><h1>{html.escape(title)}</h1></header>{body}</body></html>\n'
    )


def render_viewer_page(records: list[dict], title: str = "npr trajectories") -> str:
    """The standalone viewer page (``npr view``) of normalised records."""
    return page(title, viewer_section(records))


PAGE_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--mut:#57606a;--line:#d0d7de;--bg2:#f6f8fa;--acc:#0969da}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328}
header.top{padding:10px 18px;border-bottom:1px solid var(--line);background:var(--bg2)}h1{margin:0;font-size:20px}
h2{font-size:17px;margin:18px 18px 8px}section{margin-bottom:8px}
pre,.txt{white-space:pre-wrap;word-break:break-word;font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;margin:0}
.v-errors{margin:8px 18px;padding:8px;border:2px solid var(--bad);color:var(--bad)}
.v-wrap{display:flex;gap:12px;margin:0 18px;min-height:520px}
.v-side{width:300px;flex:none;display:flex;flex-direction:column;border:1px solid var(--line);border-radius:6px}
.v-filters{display:grid;grid-template-columns:minmax(0,1fr);gap:4px;padding:6px;border-bottom:1px solid var(--line)}
.v-filters select,.v-filters input{font:inherit;padding:3px;width:100%;min-width:0}
.v-count{padding:4px 8px;color:var(--mut);font-size:12px}
.v-list{list-style:none;margin:0;padding:0;overflow-y:auto;max-height:75vh}
.v-list li{padding:4px 8px;border-left:4px solid transparent;cursor:pointer;font-size:12.5px;border-bottom:1px solid #eee}
.v-list li.ok{border-left-color:var(--ok)}.v-list li.bad{border-left-color:var(--bad)}
.v-list li.sel{background:#ddf4ff}.v-list li:hover{background:var(--bg2)}
.v-list .more{color:var(--mut);cursor:default}
.v-main{flex:1;min-width:0}
.s-head{padding:8px 10px;border-radius:6px;border:1px solid var(--line);border-left:6px solid var(--mut)}
.s-head.ok{border-left-color:var(--ok)}.s-head.bad{border-left-color:var(--bad)}
.s-title{font-weight:600;font-size:15px}.badge{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;
 color:#fff;background:var(--mut);margin-right:4px}.badge.ok{background:var(--ok)}.badge.bad{background:var(--bad)}
.chips span{display:inline-block;font-size:12px;margin:4px 6px 0 0;padding:0 6px;border:1px solid var(--line);border-radius:4px;background:var(--bg2)}
details{margin:8px 0;border:1px solid var(--line);border-radius:6px;padding:4px 8px}summary{cursor:pointer;color:var(--mut)}
.warn{margin:8px 0;padding:6px 8px;border:1px solid #d4a72c;background:#fff8c5;border-radius:6px}
.block{margin:10px 0;border:2px solid var(--acc);border-radius:8px;padding:6px 8px}
.block.np{border-style:dashed;border-color:var(--mut)}
.b-label{font-size:12px;font-weight:600;color:var(--acc);margin-bottom:4px}.block.np .b-label{color:var(--mut)}
.guide{background:#eef6ff;border-radius:6px;padding:4px 8px}.guide ol{margin:2px 0;padding-left:22px}
.branches{display:grid;gap:8px;margin:8px 0;overflow-x:auto}
.branch{border:1px solid var(--line);border-radius:6px;background:#fff;min-width:0}
.branch>.bh{background:var(--bg2);padding:3px 8px;font-size:12px;border-bottom:1px solid var(--line)}
.branch>.bh b{color:var(--acc)}.branch>pre{padding:6px 8px}
.take{background:#f1f8e9;border-radius:6px;padding:4px 8px}.seq{color:#444;padding:4px 8px;border-left:3px solid var(--line)}
.final{margin:10px 0;padding:6px 8px;border-radius:6px;border:1px solid var(--line)}
.lbl{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--mut)}
mark.ans{background:#fff3b0;padding:0 2px}
"""

# The app reads only the embedded JSON and writes only through textContent (never innerHTML
# with data), so output text cannot inject markup.
VIEWER_JS = r"""
(function(){
"use strict";
var errBox=document.getElementById("v-errors");
window.addEventListener("error",function(e){errBox.hidden=false;errBox.textContent="viewer error: "+e.message;});
var data=JSON.parse(document.getElementById("npr-samples").textContent);
var S=data.samples,STR=data.strings,LIMIT=400,shown=[],cur=-1;
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=String(text);return e;}
function str(ref){return ref==null?"":STR[ref];}
function verdict(s){return s.correct===true?"ok":(s.correct===false?"bad":"");}
function fmt(v){if(v==null)return"–";if(typeof v==="number")return Number.isInteger(v)?String(v):v.toFixed(2);return String(v);}
function nblocks(s){return s.trace&&s.trace.blocks?s.trace.blocks.length:0;}
function triggered(s){return s.block_exec.indexOf("parallel")>=0||(s.block_exec.indexOf("text")>=0);}
function multi(s){var b=s.branches_per_block;if(b&&b.length)return b.some(function(c){return c>=2;});
 return (s.trace.blocks||[]).some(function(x,i){return s.block_exec[i]!=="sequential"&&s.block_exec[i]!=="not_parallel"&&x.steps.length>=2;});}
function label(s){return (s.benchmark?s.benchmark+" · ":"")+(s.problem_id!=null?s.problem_id:"#"+s._i)+(s.sample!=null?" · s"+s.sample:"");}
S.forEach(function(s,i){s._i=i;s._search=(label(s)+"\n"+str(s.problem_ref)).toLowerCase();});
var fb=document.getElementById("f-bench"),fc=document.getElementById("f-correct"),fk=document.getElementById("f-kind"),ft=document.getElementById("f-text");
var benches=[];S.forEach(function(s){if(s.benchmark&&benches.indexOf(s.benchmark)<0)benches.push(s.benchmark);});
benches.forEach(function(b){var o=el("option",null,b);o.value=b;fb.appendChild(o);});
function keep(s){
 if(fb.value&&s.benchmark!==fb.value)return false;
 if(fc.value==="1"&&s.correct!==true)return false;if(fc.value==="0"&&s.correct!==false)return false;
 var k=fk.value;
 if(k==="par"&&!triggered(s))return false;if(k==="multi"&&!multi(s))return false;
 if(k==="nopar"&&triggered(s))return false;if(k==="invalid"&&s.format_valid!==false)return false;
 var t=ft.value.trim().toLowerCase();if(t&&s._search.indexOf(t)<0)return false;return true;}
function refresh(){
 shown=S.filter(keep);var list=document.getElementById("v-list");list.textContent="";
 shown.slice(0,LIMIT).forEach(function(s){var li=el("li",verdict(s),label(s));li.dataset.i=s._i;if(s._i===cur)li.className+=" sel";
  li.addEventListener("click",function(){select(s._i);});list.appendChild(li);});
 if(shown.length>LIMIT)list.appendChild(el("li","more","… "+(shown.length-LIMIT)+" more: narrow the filter"));
 document.getElementById("v-count").textContent=shown.length+" of "+S.length+" samples";
 if(shown.length&&!shown.some(function(s){return s._i===cur;}))select(shown[0]._i);}
function box(parent,cls,lbl,text){var d=el("div",cls);if(lbl)d.appendChild(el("div","lbl",lbl));d.appendChild(el("pre","txt",text));parent.appendChild(d);return d;}
function details(parent,title,text,open){var d=el("details");d.open=!!open;d.appendChild(el("summary",null,title));d.appendChild(el("pre","txt",text));parent.appendChild(d);}
var EXEC={parallel:"executed in parallel by the engine",not_parallel:"NOT executed in parallel (decoded as plain text)",
 sequential:"sequential decoding (not forked)",text:"parsed from text (no engine record)"};
function renderBlock(main,s,b,n){
 if(b.preamble&&b.preamble.trim())box(main,"seq","text before block "+(n+1),b.preamble);
 var ex=s.block_exec[n]||"text",k=b.steps.length,blk=el("div","block"+(ex==="parallel"||ex==="text"?"":" np"));
 blk.dataset.exec=ex;
 var bpb=s.branches_per_block&&ex==="parallel"?s.branches_per_block[n]:null;
 blk.appendChild(el("div","b-label","Block "+(n+1)+" · "+k+" step"+(k===1?"":"s")+(bpb!=null&&bpb!==k?" ("+bpb+" branches forked)":"")+" · "+EXEC[ex]));
 if(b.plans.length){var g=el("div","guide");g.appendChild(el("div","lbl","guideline"));var ol=el("ol");
  b.plans.forEach(function(p){var li=el("li",null,p.text);if(p.label!=null)li.value=p.label;ol.appendChild(li);});g.appendChild(ol);blk.appendChild(g);}
 var cols=el("div","branches");cols.style.gridTemplateColumns="repeat("+Math.max(k,1)+",minmax(220px,1fr))";
 b.steps.forEach(function(st,j){var c=el("div","branch");c.dataset.branch=j+1;var h=el("div","bh");
  h.appendChild(el("b",null,(ex==="parallel"?"branch ":"step ")+(st.label!=null?st.label:j+1)));
  var plan=b.plans[j];if(plan)h.appendChild(document.createTextNode(" · "+plan.text));
  c.appendChild(h);c.appendChild(el("pre","txt step-text",st.text));cols.appendChild(c);});
 blk.appendChild(cols);box(blk,"take","takeaway",b.takeaway);main.appendChild(blk);}
function renderFinal(main,s){
 var f=el("div","final");f.appendChild(el("div","lbl","final answer text"));var pre=el("pre","txt"),t=s.trace.final||"",a=s.trace.answer;
 var at=a!=null?t.lastIndexOf("\\boxed{"+a+"}"):-1;
 if(at>=0){var whole="\\boxed{"+a+"}";pre.appendChild(document.createTextNode(t.slice(0,at)));pre.appendChild(el("mark","ans",whole));pre.appendChild(document.createTextNode(t.slice(at+whole.length)));}
 else pre.textContent=t;f.appendChild(pre);main.appendChild(f);}
function select(i){
 cur=i;var s=S[i],main=document.getElementById("v-main");main.textContent="";
 Array.prototype.forEach.call(document.querySelectorAll("#v-list li"),function(li){li.classList.toggle("sel",Number(li.dataset.i)===i);});
 if(location.hash!=="#s="+i)history.replaceState(null,"","#s="+i);
 var v=verdict(s),head=el("div","s-head "+v);head.appendChild(el("div","s-title",label(s)));
 var line=el("div");line.appendChild(el("span","badge "+v,s.correct===true?"correct":(s.correct===false?"wrong":"not graded")));
 line.appendChild(document.createTextNode(" predicted: "+fmt(s.pred)+"   gold: "+fmt(s.answer)));head.appendChild(line);
 var chips=el("div","chips");[["mode",s.mode],["finish",s.finish_reason],["format",s.format_valid==null?null:(s.format_valid?"valid":"invalid")],
  ["parallel blocks",s.parallel_blocks],["branches/block",s.branches_per_block?s.branches_per_block.join(", "):null],["tokens",s.tokens],
  ["critical path",s.critical_path_tokens],["forward passes",s.forward_passes],["wall s",s.wall_time_s],["reward",s.reward],["source",s.trace.source_format]]
  .forEach(function(c){if(c[1]!=null&&c[1]!=="")chips.appendChild(el("span",null,c[0]+": "+fmt(c[1])));});
 head.appendChild(chips);main.appendChild(head);
 if(s.problem_ref!=null)details(main,"problem",str(s.problem_ref),true);
 if(s.prompt_ref!=null)details(main,"full prompt",str(s.prompt_ref),false);
 if(s.diagnostic!=null)box(main,"warn","engine diagnostic",typeof s.diagnostic==="string"?s.diagnostic:JSON.stringify(s.diagnostic,null,1));
 if(s.format_errors&&s.format_errors.length)box(main,"warn","format errors",s.format_errors.join("\n"));
 var blocks=s.trace.blocks||[];
 if(!blocks.length)main.appendChild(el("div","warn","No parallel block in this output: showing the raw text."));
 blocks.forEach(function(b,n){renderBlock(main,s,b,n);});
 if(blocks.length)renderFinal(main,s);
 var bad=!blocks.length||s.format_valid===false;
 if(s.output!=null)details(main,"raw output"+(bad?" (the trace is invalid or has no block)":""),s.output,bad);
 var ex=s.extra||{};if(Object.keys(ex).length)details(main,"other fields",JSON.stringify(ex,null,1),false);
 document.body.dataset.selected=String(i);}
[fb,fc,fk].forEach(function(x){x.addEventListener("change",refresh);});ft.addEventListener("input",refresh);
document.addEventListener("keydown",function(e){if(e.target.tagName==="INPUT"||e.target.tagName==="SELECT")return;
 var pos=shown.findIndex(function(s){return s._i===cur;});
 if((e.key==="j"||e.key==="ArrowDown")&&pos<shown.length-1){select(shown[pos+1]._i);e.preventDefault();}
 if((e.key==="k"||e.key==="ArrowUp")&&pos>0){select(shown[pos-1]._i);e.preventDefault();}});
var m=/^#s=(\d+)$/.exec(location.hash);if(m&&S[+m[1]])cur=+m[1];
refresh();if(cur>=0&&S[cur])select(cur);
if(!S.length)document.getElementById("v-main").textContent="No samples.";
document.body.dataset.viewerReady="1";
})();
"""
