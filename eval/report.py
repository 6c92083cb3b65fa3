"""What eval/librispeech.py reports: per-system summaries, per-utterance records (results.json),
the markdown table (results.md) and the speed-vs-WER plot (speed_vs_wer.png)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from crosswhisper.metrics import word_error_rate

if TYPE_CHECKING:
    from common import Utterance
    from librispeech import Run, System

REFERENCE = "generate"  # id of the system every ratio and mismatch count refers to


# --------------------------------------------------------------------------------------------
# Summaries (results.json)
# --------------------------------------------------------------------------------------------


def _sum_or_none(values: list[Optional[float]]):
    return None if any(v is None for v in values) else sum(values)


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def summarise(systems: list[System], utterances: list[Utterance], runs: dict[str, list[Run]]) -> list[dict]:
    """Per-system totals, WER, mismatches against the reference and ratios against it."""
    audio_seconds = sum(u.seconds for u in utterances)
    scored = [i for i, u in enumerate(utterances) if u.reference is not None and u.reference.strip()]
    reference_runs = runs[REFERENCE]
    rows = []
    for system in systems:
        system_runs = runs[system.id]
        wer = None
        if scored:
            wer = word_error_rate([utterances[i].reference for i in scored], [system_runs[i].text for i in scored])
        mismatched = [u.id for u, r, ref in zip(utterances, system_runs, reference_runs) if r.tokens != ref.tokens]
        generated = _sum_or_none([r.generated_tokens for r in system_runs])
        calls = _sum_or_none([r.forward_calls for r in system_runs])
        if system.family == "faster-whisper":
            tokens_per_forward = 1.0  # one token per decoder step by construction (greedy)
        else:
            tokens_per_forward = _ratio(generated, calls)
        histogram: list[int] = []
        for r in system_runs:
            for i, count in enumerate(r.acceptance_histogram):
                histogram += [0] * (i + 1 - len(histogram))
                histogram[i] += count
        e2e = sum(r.e2e_seconds for r in system_runs)
        rows.append({
            "id": system.id,
            "name": system.name,
            "family": system.family,
            "settings": system.settings,
            "wer": wer,
            "wer_percent": None if wer is None else 100 * wer,
            "scored_utterances": len(scored),
            "tokens_per_forward": tokens_per_forward,
            "generated_tokens": generated,
            "forward_calls": calls,
            "text_tokens": sum(len(r.tokens) for r in system_runs),
            "mismatches": len(mismatched),
            "mismatched_utterances": mismatched,
            "encode_seconds": _sum_or_none([r.encode_seconds for r in system_runs]),
            "decode_seconds": _sum_or_none([r.decode_seconds for r in system_runs]),
            "e2e_seconds": e2e,
            "audio_seconds": audio_seconds,
            "rtfx": audio_seconds / e2e if e2e else None,
            "acceptance_histogram": histogram if system.family in ("lossless", "lossy") else None,
        })
    reference = rows[0]
    for row in rows:
        row["e2e_speedup_vs_reference"] = _ratio(reference["e2e_seconds"], row["e2e_seconds"])
        row["decode_speedup_vs_reference"] = _ratio(reference["decode_seconds"], row["decode_seconds"])
    return rows


def per_utterance(systems: list[System], utterances: list[Utterance], runs: dict[str, list[Run]]) -> list[dict]:
    """results.json's `utterances`: every system's tokens, text and timings on every utterance."""
    items = []
    for i, utterance in enumerate(utterances):
        reference_tokens = runs[REFERENCE][i].tokens
        items.append({
            "id": utterance.id,
            "speaker": utterance.speaker,
            "source": utterance.source,
            "audio_seconds": utterance.seconds,
            "reference": utterance.reference,
            "systems": {
                system.id: {
                    "text": runs[system.id][i].text,
                    "tokens": list(runs[system.id][i].tokens),
                    "matches_reference": runs[system.id][i].tokens == reference_tokens,
                    "e2e_seconds": runs[system.id][i].e2e_seconds,
                    "encode_seconds": runs[system.id][i].encode_seconds,
                    "decode_seconds": runs[system.id][i].decode_seconds,
                    "generated_tokens": runs[system.id][i].generated_tokens,
                    "forward_calls": runs[system.id][i].forward_calls,
                }
                for system in systems
            },
        })
    return items

# --------------------------------------------------------------------------------------------
# results.md and speed_vs_wer.png
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    """The summary table (one row per system) with a one-line caption of what was measured."""
    s = report["settings"]
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu_model'] or m['machine']}, {m['torch_threads']} threads"
    lines = [
        f"{report['model']} on {s['data_label']}: {s['utterances']} utterances, {s['audio_seconds']:.1f} s of audio; "
        f"{where}; γ={s['gamma']}; ratios vs generate (reference) from this run",
        "",
        "| system | WER % | tokens/fwd | mismatches | enc s | dec s | e2e s | RTFx | e2e × ref | decode × ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = s["utterances"]
    for row in report["systems"]:
        lines.append(
            f"| {row['name']} | {_fmt(row['wer_percent'], '.2f')} | {_fmt(row['tokens_per_forward'], '.2f')} "
            f"| {row['mismatches']}/{n} | {_fmt(row['encode_seconds'], '.2f')} | {_fmt(row['decode_seconds'], '.2f')} "
            f"| {row['e2e_seconds']:.2f} | {_fmt(row['rtfx'], '.1f')} | {_fmt(row['e2e_speedup_vs_reference'], '.2f')} "
            f"| {_fmt(row['decode_speedup_vs_reference'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


_FAMILY_STYLE = {
    "reference": ("black", "s"),
    "baseline": ("tab:gray", "D"),
    "lossless": ("tab:green", "o"),
    "lossy": ("tab:orange", "^"),
    "faster-whisper": ("tab:blue", "P"),
}

# label positions tried around a point, in points: (dx, dy, horizontal alignment, vertical alignment)
_LABEL_SPOTS = [
    (dx * sx, dy * sy, "left" if sx > 0 else "right", "bottom" if sy > 0 else "top")
    for dx, dy in ((7, 5), (7, 20), (7, 36), (7, 52))
    for sy in (1, -1)
    for sx in (1, -1)
]


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], colors: list[str]) -> None:
    """Put each label beside its point where it overlaps no other label, point or the axes' edge."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    taken = []
    for x, y in points:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        taken.append((px - 6, py - 6, px + 6, py + 6))
    frame = ax.get_window_extent(renderer)
    for (x, y), label, color in zip(points, labels, colors):
        best = None
        for dx, dy, ha, va in _LABEL_SPOTS:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                               fontsize=7.5, color=color, arrowprops=None)
            box = text.get_window_extent(renderer)
            box = (box.x0 - 2, box.y0 - 1, box.x1 + 2, box.y1 + 1)
            overlap = sum(
                max(0.0, min(box[2], o[2]) - max(box[0], o[0])) * max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
                for o in taken
            )
            outside = (max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1)
                       + max(0.0, frame.y0 - box[1]) + max(0.0, box[3] - frame.y1))
            cost = overlap + 1000 * outside + 0.01 * abs(dy)  # prefer close, free, inside spots
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost < 1:
                break
        if abs(best[1].xyann[1]) > 12:  # moved away from its point: draw a thin leader line
            best[1].remove()
            dx, dy = best[1].xyann
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy),
                               ha=best[1].get_ha(), va=best[1].get_va(), fontsize=7.5, color=color,
                               arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6, shrinkA=0, shrinkB=4))
        taken.append(best[2])


def plot(report: dict, path: Path) -> None:
    """speed_vs_wer.png: WER % against RTFx (bottom axis) and speed-up vs the reference (top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["systems"] if r["rtfx"]]
    ref_rtfx = report["systems"][0]["rtfx"]
    n = report["settings"]["utterances"]
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120, layout="constrained")
    points, labels, colors = [], [], []
    for row in rows:
        color, marker = _FAMILY_STYLE.get(row["family"], ("tab:purple", "o"))
        y = row["wer_percent"] if row["wer_percent"] is not None else 0.0
        seen = ax.get_legend_handles_labels()[1]
        ax.scatter(row["rtfx"], y, s=70, color=color, marker=marker, zorder=3, edgecolors="white", linewidths=0.5,
                   label=row["family"] if row["family"] not in seen else None)
        details = []
        if row["family"] in ("lossless", "lossy") and row["tokens_per_forward"]:
            details.append(f"{row['tokens_per_forward']:.2f} tok/fwd")
        if row["mismatches"]:
            details.append(f"{row['mismatches']}/{n} utt. differ")
        points.append((row["rtfx"], y))
        labels.append(row["name"] + ("\n" + ", ".join(details) if details else ""))
        colors.append(color)
    if ref_rtfx:
        ax.axvline(ref_rtfx, color="black", lw=0.6, ls=":", zorder=1)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / ref_rtfx, lambda s: s * ref_rtfx))
        top.set_xlabel("end-to-end speed-up vs generate (reference), same run")
    ax.set_xlabel("RTFx = audio seconds / end-to-end seconds   (→ faster)")
    ax.set_ylabel("WER %   (↓ better)")
    wers = [y for _, y in points]
    ax.set_ylim(0, max(wers, default=1.0) * 1.3 + 0.5)
    xs = [x for x, _ in points]
    span = max(xs) - min(xs) or max(xs)
    ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.35 * span)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=True)
    s, m = report["settings"], report["machine"]
    where = m["gpu"] or f"{m['cpu_model'] or m['machine']}, {m['torch_threads']} threads"
    fig.suptitle(
        f"Whisper {report['model']} on {s['data_label']} ({n} utterances, {s['audio_seconds']:.0f} s of audio)"
        f" — {where}",
        fontsize=10,
    )
    fig.canvas.draw()  # fixes the layout, so that label boxes can be measured
    _place_labels(ax, points, labels, colors)
    fig.savefig(path)
    plt.close(fig)
