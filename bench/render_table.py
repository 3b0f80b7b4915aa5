"""Render saved pytest-benchmark JSON files as a Markdown table.

    python bench/render_table.py results/*.json --out bench/results/summary.md [--readme README.md]

With --readme, the table replaces the text between the markers
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in that file.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _fmt_extra(extra: dict) -> str:
    parts = []
    for key, value in sorted(extra.items()):
        if isinstance(value, float):
            value = f"{value:.4g}"
        if "bytes" in key and isinstance(value, (int, str)) and str(value).isdigit():
            value = f"{int(value) / 2**20:.1f} MiB"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def machine_line(data: dict) -> str:
    info = data.get("machine_info", {})
    extra = data.get("benchmarks", [{}])[0].get("extra_info", {}) if data.get("benchmarks") else {}
    cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
    device = extra.get("device_name") or extra.get("device") or "cpu"
    return (f"{data.get('datetime', '?')[:10]} · {info.get('node', '?')} · {cpu} · device {device} · "
            f"python {info.get('python_version', '?')}")


def table(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        data = json.loads(path.read_text())
        lines += [f"**{path.stem}** — {machine_line(data)}", "",
                  "| group | benchmark | median | mean | rounds | notes |", "|---|---|---|---|---|---|"]
        for b in sorted(data.get("benchmarks", []), key=lambda b: (b.get("group") or "", b["name"])):
            s = b["stats"]
            lines.append(f"| {b.get('group') or ''} | {b['name']} | {_fmt_time(s['median'])} | "
                         f"{_fmt_time(s['mean'])} | {s['rounds']} | {_fmt_extra(b.get('extra_info', {}))} |")
        lines.append("")
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"markers {START} / {END} not found")
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{body}\n{END}", text, flags=re.S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--readme", type=Path, action="append", default=[], help="update this file's table section")
    args = parser.parse_args(argv)
    body = table([p for p in args.json if p.exists()])
    if args.out:
        args.out.write_text(body + "\n")
    for readme in args.readme:
        readme.write_text(replace_section(readme.read_text(), body))
    if not args.out and not args.readme:
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
