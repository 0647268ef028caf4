"""Several runs side by side: one table and overlaid learning curves (terminal and HTML)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from cnnkit.errors import RunError
from cnnkit.fileio import write_bytes_atomic
from cnnkit.plotting import png_bytes, pyplot
from cnnkit.runs import read_summary, run_settings


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for d in map(Path, run_dirs):
        if not (d / "summary.json").is_file() or not (d / "metrics.jsonl").is_file():
            raise RunError(f"{d}: not a finished cnnkit run (summary.json and metrics.jsonl are needed)")
        runs.append({
            "name": d.name, "path": str(d),
            "summary": read_summary(d), "config": run_settings(d),
            "metrics": [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()],
        })
    return runs


def table_rows(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for r in runs:
        s, c = r["summary"], r["config"]
        rows.append({
            "run": r["name"], "recipe": c.get("recipe") or "-", "model": c["model"],
            "augment": c["augment"] if isinstance(c["augment"], str) else "custom",
            "epochs": str(s["epochs_run"]),
            # A probe chosen by cross-validation has no validation split: its folds' estimate, marked
            "best val": f"{100 * s['cv_accuracy']:.2f}% (cv)" if "cv_accuracy" in s else f"{100 * s['best_val_accuracy']:.2f}%",
            # The whole `cnnkit train`, report included (runs before total_time_s: to the test)
            "test": f"{100 * s['test_accuracy']:.2f}%", "wall time": f"{s.get('total_time_s', s['wall_time_s']) / 60:.1f} min",
        })
    return rows


def curves_png(runs: list[dict[str, Any]]) -> bytes:
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4))
    for r in runs:
        epochs = [m["epoch"] for m in r["metrics"]]
        line, = axes[0].plot(epochs, [100 * m["val_accuracy"] for m in r["metrics"]], "o-", label=f"{r['name']} (val)")
        axes[0].plot(epochs, [100 * m["train_accuracy"] for m in r["metrics"]], "--", color=line.get_color(), alpha=0.6,
                     label=f"{r['name']} (train)")
        axes[1].plot(epochs, [m["val_loss"] for m in r["metrics"]], "o-", color=line.get_color(), label=f"{r['name']} (val)")
        axes[1].plot(epochs, [m["train_loss"] for m in r["metrics"]], "--", color=line.get_color(), alpha=0.6)
    axes[0].set_title("accuracy (%): validation solid, training dashed")
    axes[1].set_title("loss: validation solid, training dashed")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def write_html(runs: list[dict[str, Any]], path: Path) -> None:
    rows = table_rows(runs)
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    png = base64.b64encode(curves_png(runs)).decode()
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cnnkit: comparing {len(runs)} runs</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#1a202c}}table{{border-collapse:collapse}}
td,th{{padding:4px 12px;border-bottom:1px solid #e2e8f0;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>Comparing {len(runs)} runs</h1><table><tr>{head}</tr>{body}</table>
<img src="data:image/png;base64,{png}" alt="learning curves"></body></html>"""
    write_bytes_atomic(path, page.encode())
