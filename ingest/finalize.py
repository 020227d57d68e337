"""Phase 4, finalize: dataset.json, the error summary and the printed report."""
from __future__ import annotations

from pathlib import Path


def finalize(root: Path, extra: dict, kind: str | None = None) -> dict:
    """Shard tables and dataset.json from the per-shard summaries in the manifest and error footers:
    O(shards + error files) small reads, nothing per sample (shards/FORMAT.md). `kind`: "slices" or
    "volumes" (None: that of the shards)."""
    from shards import write_dataset_json

    return write_dataset_json(root, kind=kind, ingest=extra)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def report(summary: dict, run: dict) -> str:
    """The table printed at the end of a job (also returned, for logs)."""
    lines = []
    mods = summary.get("modalities", {})
    unit = "volumes" if summary.get("kind") == "volumes" else "slices"
    header = f"{'modality':<9}{unit:>9}{'train':>9}{'val':>8}{'labelled':>10}{'shards':>8}{'bytes':>12}"
    lines += [header, "-" * len(header)]
    for m, c in sorted(mods.items()):
        lines.append(f"{m:<9}{c['samples']:>9,}{c['train']:>9,}{c['val']:>8,}{c['labelled']:>10,}{c['shards']:>8,}"
                     f"{_size(c['bytes']):>12}")
    lines.append(f"{'total':<9}{summary.get('samples', 0):>9,}{'':>9}{'':>8}{'':>10}"
                 f"{sum(c['shards'] for c in mods.values()):>8,}{_size(summary.get('bytes', 0)):>12}")
    reasons = summary.get("error_reasons", {})
    total_errors = sum(sum(r.values()) for r in reasons.values())
    lines.append("")
    lines.append(f"rejected inputs: {total_errors:,}" + (" (details: errors/*.parquet)" if total_errors else ""))
    for stage, counts in reasons.items():
        for reason, n in counts.items():
            lines.append(f"  {stage:<8} {reason:<32} {n:>7,}")
    lines.append("")
    lines.append(
        f"this run: {run.get('files', 0):,} files scanned, {run.get('new_slices', 0):,} new slices planned, "
        f"{run.get('already_ingested', 0):,} already ingested, {run.get('shards_written', 0):,} shards written, "
        f"{run.get('shards_skipped', 0):,} already committed"
    )
    return "\n".join(lines)
