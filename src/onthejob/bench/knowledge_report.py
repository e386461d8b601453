"""The knowledge benchmark's report: three PNG plots (transfer ratio per method with its spread
over seeds; the retention curve of sequential consolidation; gain vs forgetting over the
learning-rate sweep) and a markdown page that embeds them beside the tables."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"opsd": "tab:blue", "sft": "tab:orange", "notes": "tab:green"}


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if _nan(x) else format(x, spec)


def plot_all(result: dict, prefix: str) -> dict[str, str]:
    """Write the plots next to `prefix` (prefix-transfer.png, ...); return {name: path}."""
    out = {}
    if result["methods"]:
        out["transfer"] = _plot_transfer(result, f"{prefix}transfer.png")
    if result["sequential"]:
        out["retention"] = _plot_retention(result, f"{prefix}retention.png")
    if result["sweep"]:
        out["pareto"] = _plot_pareto(result, f"{prefix}gain-vs-forgetting.png")
    if result.get("joint"):
        out["joint"] = _plot_joint(result["joint"], f"{prefix}joint.png")
    return out


def _plot_joint(joint: dict, path: str) -> str:
    """Left: no-context accuracy after each method against base and in context; right: gain
    against forgetting (in-context reading drop)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(joint["methods"])
    ax = axes[0]
    for x, m in enumerate(names):
        ax.bar(x, 100 * joint["methods"][m]["after"], color=COLORS.get(m, "gray"), alpha=0.7)
    ax.axhline(100 * joint["base"], color="gray", lw=1, label="base")
    ax.axhline(100 * joint["in_context"], color="gray", lw=1, ls="--", label="in context")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("no-context accuracy (%)")
    ax.set_title("after consolidating all sessions")
    ax.legend(fontsize=8)
    ax = axes[1]
    for m in names:
        v = joint["methods"][m]
        ax.scatter(v["reading_drop_pts"], 100 * (v["after"] - joint["base"]),
                   color=COLORS.get(m, "gray"), s=40, label=m)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel("in-context reading drop (pts)")
    ax.set_ylabel("gain (pts)")
    ax.set_title("gain vs forgetting")
    ax.legend(fontsize=8)
    fig.suptitle(f"{len(joint['sessions'])} sessions consolidated together, "
                 f"{sum(joint['questions'])} questions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_transfer(result: dict, path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    names = list(result["methods"])
    for ax, key, label in ((axes[0], "transfer", "normalized match"),
                           (axes[1], "transfer_f1", "token F1")):
        for x, m in enumerate(names):
            t = result["methods"][m][key]
            per_seed = [p["transfer_ratio" if key == "transfer" else "transfer_ratio_f1"]
                        for p in result["methods"][m]["per_seed"].values()]
            if _nan(t["mean"]):
                ax.text(x, 0, "n/a", ha="center")
                continue
            ax.bar(x, t["mean"], color=COLORS.get(m, "gray"), alpha=0.6)
            ax.errorbar(x, t["mean"], yerr=[[t["mean"] - t["min"]], [t["max"] - t["mean"]]],
                        color="black", capsize=6)
            ax.scatter([x] * len(per_seed), per_seed, color="black", s=12, zorder=3)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"transfer ratio ({label})")
        ax.set_ylabel("(after - base) / (in context - base)")
    fig.suptitle(f"{result['config']['split']} split, {result['questions']} questions, "
                 f"{len(result['seeds'])} seed(s): bar = mean, whiskers = min..max, dots = seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_retention(result: dict, path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, seq in result["sequential"].items():
        n = len(seq["correct"])
        xs = list(range(1, n + 1))
        c = COLORS.get(m, "gray")
        axes[0].plot(xs, [100 * v for v in seq["accuracy_so_far"]], marker="o", color=c, label=m)
        axes[0].plot(xs, [100 * v for v in seq["base_so_far"]], color=c, ls=":", lw=1,
                     label=f"{m}: base")
        axes[0].plot(xs, [100 * v for v in seq["in_context_so_far"]], color=c, ls="--", lw=1,
                     label=f"{m}: in context")
        for key, style in (("retention", "-o"), ("retention_f1", "--s")):
            pts = [(lag, v) for lag, v in enumerate(seq[key]) if v is not None]
            if pts:
                axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, color=c,
                             label=f"{m} ({'match' if key == 'retention' else 'F1'})")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("sessions consolidated (adapter version)")
    axes[0].set_ylabel("no-context accuracy on sessions so far (%)")
    axes[0].set_title("accuracy on everything learned so far")
    axes[0].legend(fontsize=7)
    axes[1].axhline(1, color="gray", lw=0.8)
    axes[1].axhline(0.9, color="gray", lw=0.8, ls="--")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_xlabel("later sessions consolidated since (lag)")
    axes[1].set_ylabel("share of the immediate gain kept")
    axes[1].set_title("retention curve (pooled over sessions)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "no gain to keep", ha="center", transform=axes[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pareto(result: dict, path: str) -> str:
    panels = (("reading_drop_pts", "in-context reading drop (points)"),
              ("general_drop_pts", "general-question drop (points)"),
              ("kl_to_base", "KL to base on ordinary prompts (nats/token)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in dict.fromkeys(p["method"] for p in result["sweep"]):
            pts = sorted((p for p in result["sweep"] if p["method"] == m), key=lambda p: p["lr"])
            xs, ys = [p[key] for p in pts], [p["gain_pts"] for p in pts]
            ax.plot(xs, ys, "-o", color=COLORS.get(m, "gray"), label=m)
            for p in pts:
                ax.annotate(f"{p['lr']:g}", (p[key], p["gain_pts"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_xlabel(label + "  (less is better)")
        ax.set_ylabel("no-context accuracy gain (points)")
        ax.legend(fontsize=7)
    fig.suptitle("gain vs forgetting over the learning-rate sweep (labels: learning rate; "
                 "up and to the left is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: dict, command: str, plots: dict[str, str], md_dir: str | None = None) -> str:
    cfg = result["config"]
    rel = {k: _relative(v, md_dir) for k, v in plots.items()}
    fb = result["forgetting_base"]
    sizes = result.get("probe_sizes", {})
    lines = [
        f"# Knowledge transfer ({cfg['split']} split, "
        f"{max(len(result['rows']), len(result.get('joint', {}).get('sessions', [])))} sessions, "
        f"{len(result['seeds'])} seed(s))", "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}; machine: {result['machine']}; total "
        f"{result['seconds'] / 60:.1f} min. Protocol: docs/BENCHMARKS.md.", "",
        (f"Each session consolidated from the base: {cfg['steps']} steps, lr {cfg['lr']:g}, "
         f"seeds {', '.join(map(str, result['seeds']))}; " if result["methods"] else "")
        + f"LoRA on every projection; training in "
        f"{'bf16 autocast' if cfg.get('bf16_used') else 'float32'}. "
        + (f"Base (no context) {result['base']:.1%}, in context {result['in_context']:.1%} "
           f"(token F1 {_f(result['base_f1'])} and {_f(result['in_context_f1'])}). "
           if result["methods"] else "")
        + f"Forgetting probes on the "
        f"base: in-context reading {_f(fb['reading'], '.1%')} ({sizes.get('reading_items', '?')} "
        f"passages from articles 1000+), general questions {_f(fb['general'], '.1%')} "
        f"({sizes.get('general_items', '?')} questions).", "",
    ]
    if result["methods"]:
        lines += [
            "## Transfer ratio", "",
            "| method | no-context accuracy after | transfer ratio: mean ± std [min, max] | "
            "transfer ratio (F1) | reading drop (pts) | general drop (pts) | KL to base |",
            "|---|---|---|---|---|---|---|",
            f"| base | {result['base']:.1%} | 0 | 0 | 0 | 0 | 0 |",
            f"| in context | {result['in_context']:.1%} | 1 | 1 | | | |",
        ]
    for m, v in result["methods"].items():
        t, tf = v["transfer"], v["transfer_f1"]
        lines.append(f"| {m} | {v['after']:.1%} | {_f(t['mean'])} ± {_f(t['std'])} "
                     f"[{_f(t['min'])}, {_f(t['max'])}] | {_f(tf['mean'])} ± {_f(tf['std'])} | "
                     f"{_f(v['reading_drop_pts'], '+.1f')} | {_f(v['general_drop_pts'], '+.1f')} | "
                     f"{_f(v['kl_to_base'])} |")
    if "transfer" in rel:
        lines += ["", f"![transfer ratio per method]({rel['transfer']})"]
    if result["methods"]:
        lines += ["", "## Cost per session", "",
                  "| method | wall s | train s | tokens student | tokens teacher | peak MB "
                  "| adapter MB | KV cache MB of the session | adapter / KV cache |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for m, v in result["methods"].items():
        c = v["cost"]
        lines.append(f"| {m} | {c['seconds']:.0f} | {c['train_seconds']:.0f} | "
                     f"{c['tokens_student']:.0f} | {c['tokens_teacher']:.0f} | "
                     f"{_f(c['peak_mb'], '.0f')} (max {_f(c['peak_mb_max'], '.0f')}) | "
                     f"{c['adapter_bytes'] / 1e6:.2f} | {c['kv_cache_bytes'] / 1e6:.2f} | "
                     f"{c['adapter_bytes'] / c['kv_cache_bytes']:.2f}x |")
    if result["methods"]:
        kind = next(iter(result["methods"].values()))["cost"]["peak_kind"]
        lines += ["", f"Wall time for opsd includes writing its probes. Peak memory: {kind}. "
                  "KV cache = layers x 2 x kv_heads x head_dim x the session's tokens x bytes "
                  "per value, in the model's dtype (the adapter is stored in the same dtype)."]
    if result["sweep"]:
        lines += ["", "## Learning-rate sweep: gain vs forgetting "
                  f"(seed {result['seeds'][0]})", "",
                  "| method | lr | gain (pts) | transfer ratio | reading drop (pts) "
                  "| general drop (pts) | KL to base |", "|---|---|---|---|---|---|---|"]
        for p in result["sweep"]:
            lines.append(f"| {p['method']} | {p['lr']:g} | {p['gain_pts']:+.1f} | "
                         f"{_f(p['transfer_ratio'])} | {_f(p['reading_drop_pts'], '+.1f')} | "
                         f"{_f(p['general_drop_pts'], '+.1f')} | {_f(p['kl_to_base'])} |")
        if "pareto" in rel:
            lines += ["", f"![gain vs forgetting]({rel['pareto']})"]
    for m, seq in result["sequential"].items():
        lines += _sequential_lines(m, seq, fb)
    if result.get("joint"):
        lines += _joint_lines(result["joint"], cfg)
    if "retention" in rel:
        lines += ["", f"![retention curve]({rel['retention']})"]
    if "joint" in rel:
        lines += ["", f"![joint consolidation]({rel['joint']})"]
    if not result["rows"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Per session (first seed, main lr)", "",
              "| # | article | tokens | probes | base | in context | "
              + " | ".join(result["methods"]) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(result["methods"])]
    for r in result["rows"]:
        lines.append(f"| {r['index']} | {r['article']} | {r['context_tokens']} | {r['probes']} | "
                     f"{r['base']}/{r['questions']} | {r['in_context']}/{r['questions']} | "
                     + " | ".join(",".join(map(str, r["methods"][m]["after_by_seed"]))
                                  if m in r["methods"] else "" for m in result["methods"]) + " |")
    return "\n".join(lines) + "\n"


def _joint_lines(joint: dict, cfg: dict) -> list[str]:
    n, q = len(joint["sessions"]), sum(joint["questions"])
    steps = cfg.get("joint_steps") or cfg["steps"]
    budget = (f"{cfg['visits']:g} visits per practice prompt" if cfg.get("visits")
              and not cfg.get("joint_steps") else f"{steps} steps")
    prompts = joint.get("practice_prompts") or []
    lines = ["", f"## Joint consolidation: {n} sessions together into one adapter per method", "",
             f"As `onthejob consolidate` does with a tenant's batch of approved sessions: "
             f"{budget}, lr {cfg['lr']:g}, seed {cfg['seed']}; {q} questions, asked "
             f"without context. Base {joint['base']:.1%}, in context {joint['in_context']:.1%} "
             f"(F1 {_f(joint['base_f1'])} and {_f(joint['in_context_f1'])}; exact match "
             f"{_f(joint.get('base_em'))} and {_f(joint.get('in_context_em'))})."
             + (f" Practice prompts per session {min(prompts)}-{max(prompts)} "
                f"({sum(prompts)} in all); coverage of the gold answers "
                f"{_f(joint.get('coverage'))}." if prompts else ""), "",
             "| method | no-context accuracy after | transfer ratio | transfer ratio (F1) | "
             "transfer ratio (EM) | "
             "reading drop (pts) | general drop (pts) | KL to base | wall s (per session) | "
             "peak MB | tokens student | tokens teacher |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in joint["methods"].items():
        c = v["cost"]
        lines.append(f"| {m} | {v['after']:.1%} | {_f(v['transfer_ratio'])} | "
                     f"{_f(v['transfer_ratio_f1'])} | {_f(v.get('transfer_ratio_em'))} | "
                     f"{_f(v['reading_drop_pts'], '+.1f')} | "
                     f"{_f(v['general_drop_pts'], '+.1f')} | {_f(v['kl_to_base'])} | "
                     f"{c['seconds']:.0f} ({c['seconds_per_session']:.0f}) | "
                     f"{_f(c['peak_mb'], '.0f')} | {c['tokens_student']:.0f} | "
                     f"{c['tokens_teacher']:.0f} |")
    chained = [(m, v["rounds"]) for m, v in joint["methods"].items() if v.get("rounds")]
    if chained:
        lines += ["", f"Consolidated in {len(chained[0][1]) + 1} rounds, each version a child of "
                  "the last; no-context accuracy on the sessions consolidated so far after each "
                  "round before the last (the last is the table above):", ""]
        for m, rounds in chained:
            lines.append(f"- {m}: " + "; ".join(
                f"round {r['round']}: {r['after']}/{r['questions']} of {r['sessions']} sessions, "
                f"KL {_f(r['kl_to_base'])}" for r in rounds))
    split = [(m, v["by_coverage"]) for m, v in joint["methods"].items() if v.get("by_coverage")]
    if split:
        lines += ["", "By coverage: the questions whose gold answer some practice prompt targets "
                  "(token F1 >= 0.5 with its span) and the rest.", "",
                  "| method | covered: questions | base | in context | after | transfer | "
                  "uncovered: questions | base | in context | after | transfer |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, bc in split:
            cells = [f"{bc[k]['questions']} | {_f(bc[k]['base'], '.1%')} | "
                     f"{_f(bc[k]['in_context'], '.1%')} | {_f(bc[k]['after'], '.1%')} | "
                     f"{_f(bc[k]['transfer_ratio'])}"
                     for k in ("covered", "uncovered")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = joint.get("base_practice_recall") or {}
    recall = [(m, v["practice_recall"]) for m, v in joint["methods"].items()
              if (v.get("practice_recall") or {}).get("prompts")]
    if recall:
        lines += ["", "Practice recall: the training prompts with a known answer span, asked "
                  "without context after training; the share answered with the span (fit, "
                  "beside transfer's generalization): " + "; ".join(
                      f"{m} {_f(r['recall'], '.1%')} of {r['prompts']}" for m, r in recall)
                  + (f"; the base {_f(base['recall'], '.1%')}" if base.get("prompts") else "")
                  + "."]
        kinds = [(m, r["by_kind"]) for m, r in recall if r.get("by_kind")]
        if kinds:
            lines += ["", "By kind of prompt: " + "; ".join(
                f"{m} " + ", ".join(f"{k} {_f(v['recall'], '.1%')} of {v['prompts']}"
                                    for k, v in bk.items()) for m, bk in kinds) + "."]
    fit = [(m, v["by_fit"]) for m, v in joint["methods"].items() if v.get("by_fit")]
    if fit:
        lines += ["", "Fit and transfer: the covered questions apart by whether a trained prompt "
                  "for their gold answer was answered with its span after training (the lesson "
                  "was fit) or none was; transfer in the fit part is what fitting carries to "
                  "paraphrases.", "",
                  "| method | fit: questions | in context | after | transfer | "
                  "not fit: questions | in context | after | transfer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, bf in fit:
            cells = [f"{bf[k]['questions']} | {_f(bf[k]['in_context'], '.1%')} | "
                     f"{_f(bf[k]['after'], '.1%')} | {_f(bf[k]['transfer_ratio'])}"
                     for k in ("fit", "unfit")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lost = [(m, v["general_lost"]) for m, v in joint["methods"].items() if v.get("general_lost")]
    if lost:
        lines += ["", "General questions lost (right on the base, wrong after; the answers before "
                  "and after, cut at 80 characters):", ""]
        for m, rows in lost:
            lines += [f"- {m}: " + "; ".join(
                f"\"{q}\" {_cut(a0)!r} -> {_cut(a1)!r}" for q, a0, a1 in rows[:8])
                + (f"; and {len(rows) - 8} more" if len(rows) > 8 else "")]
    methods = list(joint["methods"])
    numbers = joint.get("articles") or joint["sessions"]
    lines += ["", "| # | article | base | in context | " + " | ".join(methods) + " |",
              "|---|---|---|---|" + "---|" * len(methods)]
    for k, (index, title) in enumerate(zip(numbers, joint["titles"], strict=True)):
        qn = joint["questions"][k]
        lines.append(f"| {index} | {title} | {joint['base_per_session'][k]}/{qn} | "
                     f"{joint['in_context_per_session'][k]}/{qn} | "
                     + " | ".join(f"{joint['methods'][m]['per_session'][k]}/{qn}" for m in methods)
                     + " |")
    return lines


def _sequential_lines(m: str, seq: dict, fb: dict) -> list[str]:
    n = len(seq["correct"])
    lines = ["", f"## Sequential consolidation: {m}, {n} sessions, one adapter chain", "",
             "Rows: adapter version (after consolidating sessions 1..k, each version the child "
             "of the last); columns: no-context correct answers on session j's questions.", "",
             "| version | " + " | ".join(f"s{j + 1}" for j in range(n)) + " | so far | KL |",
             "|---|" + "---|" * (n + 2),
             "| base | " + " | ".join(f"{b}/{q}" for b, q in zip(seq["base"], seq["questions"],
                                                               strict=True))
             + f" | {seq['base_so_far'][-1]:.1%} | 0 |"]
    for k, row in enumerate(seq["correct"]):
        cells = [str(c) for c in row] + [""] * (n - len(row))
        lines.append(f"| v{k + 1} | " + " | ".join(cells) + f" | {seq['accuracy_so_far'][k]:.1%} "
                     f"| {seq['cost'][k]['kl_to_base']:.3f} |")
    lines += ["", "Share of the immediate gain kept, by the number of later sessions "
              "consolidated since (pooled over sessions; n/a where there was no gain to keep):", "",
              "| lag | " + " | ".join(str(lag) for lag in range(n)) + " |",
              "|---|" + "---|" * n,
              "| match | " + " | ".join(_f(v, ".2f") for v in seq["retention"]) + " |",
              "| F1 | " + " | ".join(_f(v, ".2f") for v in seq["retention_f1"]) + " |"]
    drops = seq.get("forgetting_drop_pts", {})
    if drops:
        lines += ["", f"After the whole chain: in-context reading drop {drops['reading']:+.1f} "
                  f"pts, general-question drop {drops['general']:+.1f} pts, KL to base "
                  f"{seq['forgetting']['kl_to_base']:.3f}; {sum(c['seconds'] for c in seq['cost']) / 60:.1f} "
                  "min of training in all."]
    return lines


def _relative(path: str, md_dir: str | None) -> str:
    if md_dir is None:
        return Path(path).name
    try:
        return str(Path(path).resolve().relative_to(Path(md_dir).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _cut(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
