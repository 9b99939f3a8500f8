"""The markdown table of a benchmark result (written next to the JSON and pasted into docs/benchmarks.md)."""

from __future__ import annotations

# (JSON key, figure, target as text, predicate on the value)
RATIOS = [
    ("rackwise_vs_plain_torch_tokens_per_s", "rackwise tokens/s, 1 process, vs plain PyTorch", "≥ 0.90",
     lambda v: v >= 0.90),
    ("pipeline_pp2_vs_pp1_tokens_per_s", "tokens/s, 2 stages on 2 cores vs 1 stage on 1 core", "(report)", None),
    ("stackwise_last_phase_vs_rackwise_step_time", "last stackwise phase step / rackwise step", "≤ 0.6 (ideal ≈ 0.5)",
     lambda v: v <= 0.6),
    ("stackwise_step_time_vs_ideal", "last stackwise phase step / ideal from per-stack costs", "≤ 1.15",
     lambda v: v <= 1.15),
]


def markdown_table(r: dict) -> str:
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for key, label, target, ok in RATIOS:
        mark = "" if ok is None else (" ✅" if ok(r[key]) else " ❌")
        lines.append(f"| {label} (`{key}`) | {r[key]:.3f}{mark} | {target} |")
    b = r["pipeline_bubble"]
    predicted = b.get("predicted_speedup_1f1b_with_imbalance")
    lines.append(f"| pp=2 bubble (p={b['p']}, m={b['m']}): measured 1 − speedup/p | {b['measured']:.3f} | "
                 f"1F1B formula (p−1)/(m+p−1) = {b['formula_1f1b']:.3f}"
                 + (f"; with measured stage imbalance {b['stage_imbalance']:.2f}: speedup ≤ {predicted:.2f}"
                    if predicted else "")
                 + " |")
    lines += ["", "| mode | val loss (mean ± sd over seeds) | steps per phase | peak RSS MB "
                  "| optimizer state MB (max phase) |",
              "|---|---|---|---|---|"]
    detail = r["modes_detail"]["per_mode"]
    for mode, loss in r["val_loss"].items():
        steps = detail[mode]["phase_steps"]
        steps_text = f"{steps[0]} × {len(steps)}" if len(set(steps)) == 1 else " + ".join(map(str, steps))
        lines.append(f"| {mode} | {loss:.4f} ± {r['val_loss_std'][mode]:.4f} | {steps_text} | "
                     f"{r['peak_rss_mb'][mode]:.0f} | {r['optimizer_state_mb'][mode]:.2f} |")
    return "\n".join(lines) + "\n"
