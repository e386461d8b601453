"""The conventions benchmark's report: markdown tables, the retention plot, the screen's page."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# How the report's protocol line says where the teacher read the review's words.
REVIEW_PLACES = {
    "rule": ", is approved with the convention's rule as the review's words (the teacher reads "
            "them in its system prompt)",
    "rule-after": ", is approved with the convention's rule as the review's words (the teacher "
                  "reads them after the session, as `onthejob consolidate` gives them)",
}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _pts(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1f}"


def screen_markdown(result: dict, command: str) -> str:
    rows = result["conventions"]
    kept = [cid for cid, r in rows.items() if r["kept"]]
    dropped = [cid for cid, r in rows.items() if not r["kept"]]
    lines = [f"# Conventions screen ({result['date']})", "",
             f"Command: `{command}`  ",
             f"Model {Path(result['model']).name}, greedy, {result['max_tokens']} new tokens (more where a "
             f"convention says so); {result['seconds'] / 60:.1f} min. Adherence over each "
             "convention's 16 eval prompts, checked by program: base (no context), in context "
             "(the first up-front statement and a scripted acknowledgement before the prompt), "
             f"memory (the rule in the system prompt). Kept: in context >= "
             f"{result['keep_at']:.0%}. {len(kept)} kept, {len(dropped)} dropped"
             + (f" ({', '.join(dropped)})" if dropped else "") + ".", "",
             "| convention | kind | base | in context | memory | kept |",
             "|---|---|---|---|---|---|"]
    for cid, r in rows.items():
        lines.append(f"| {cid} | {r['kind']} | {_pct(r['base'])} | {_pct(r['in_context'])} | "
                     f"{_pct(r['memory'])} | {'yes' if r['kept'] else '**dropped**'} |")
    lines += ["", "## Example replies (first two eval prompts, in context)", ""]
    for cid, r in rows.items():
        for text in r["replies"]["in_context"][:2]:
            lines.append(f"- {cid}: {_quote(text)}")
    return "\n".join(lines) + "\n"


def _quote(text: str, n: int = 160) -> str:
    flat = " ".join(text.split())
    return "`" + (flat[:n] + "…" if len(flat) > n else flat).replace("`", "'") + "`"


def plot_retention(result: dict, path: str) -> str:
    chain = result["retention"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    n = len(chain["conventions"])
    for j, cid in enumerate(chain["conventions"]):
        xs = list(range(j + 1, n + 1))
        ys = [100 * chain["adherence"][k][j] for k in range(j, n)]
        line, = ax.plot(xs, ys, "-o", ms=3, label=cid)
        ax.axhline(100 * chain["base"][j], color=line.get_color(), lw=0.6, ls=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("consolidation round (conventions learned so far)")
    ax.set_ylabel("adherence without context (%)")
    ax.set_title(f"one tenant, {n} conventions in sequence, gate {'on' if chain['gate'] else 'off'}"
                 " (dotted: base)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict, command: str, plots: dict[str, str], md_dir: str) -> str:
    from onthejob.bench.conventions import headlines

    cfg = result["config"]
    methods = list(result["methods"])
    sizes = result["sizes"]
    fb = result["forgetting_base"]
    lines = [f"# Conventions learned into a tenant's adapter ({len(result['conventions'])} "
             f"conventions)", "",
             f"Command: `{command}`  ",
             f"Date {result['date']}; {result['seconds'] / 60:.1f} min in all. Protocol: "
             "src/onthejob/bench/conventions.py. Each convention is one tenant; its session "
             f"teaches it ({cfg['form']} form, {cfg['examples']} example prompts answered by "
             f"the model)" + REVIEW_PLACES.get(cfg.get("review", "none"), "")
             + f", then is consolidated at {cfg['visits']:g} visits per practice "
             f"prompt, lr {cfg['lr']:g}; adherence is the share of the {cfg['max_tokens']}-token "
             "greedy replies to the convention's 16 eval prompts (never trained on, asserted) "
             "that its checker passes. Conventions: " + ", ".join(
                 r["id"] for r in result["conventions"]) + " (chosen from those the screen "
             "kept, which the model follows at least half the time with the instruction in "
             "context: screen.md).", "",
             "```", *headlines(result), "```", "",
             "## Adherence (mean over conventions)", "",
             "| row | adherence | / in context | general drop (pts) | reading drop (pts) | "
             "KL to base | context tokens per request | s per consolidation |",
             "|---|---|---|---|---|---|---|---|",
             f"| base | {_pct(result['base'])} | | 0 | 0 | 0 | 0 | |",
             f"| in context | {_pct(result['in_context'])} | 1.00 | 0 | 0 | 0 | "
             f"{result['context_tokens']:.0f} (the session) | |",
             f"| memory | {_pct(result['memory'])} | "
             f"{_ratio(result['memory'], result['in_context'])} | 0 | 0 | 0 | "
             f"{result['memory_tokens']:.0f} (the rule) | |"]
    if result.get("teacher") is not None:
        order = ("the session, then the review's words" if cfg.get("review") == "rule-after"
                 else "the review's words, then the session")
        lines.append(f"| teacher ({order}) | {_pct(result['teacher'])} | "
                     f"{_ratio(result['teacher'], result['in_context'])} | 0 | 0 | 0 | "
                     f"{result['context_tokens'] + result['memory_tokens']:.0f} | |")
    for m, v in result["methods"].items():
        lines.append(f"| {m} | {_pct(v['adherence'])} | {_ratio(v['adherence'], result['in_context'])}"
                     f" | {_pts(v['general_drop_pts'])} | {_pts(v['reading_drop_pts'])} | "
                     f"{v['kl_to_base']:.3f} | 0 | {v['seconds']:.0f} |")
    lines += ["", f"Forgetting probes on the base: general questions {_pct(fb['general'])} "
              f"({sizes['general_items']}), in-context reading {_pct(fb['reading'])} "
              f"({sizes['reading_items']} items).", ""]
    if "opsd" in result["methods"] and "memory" in result:
        o, mem = result["methods"]["opsd"]["adherence"], result["memory"]
        others = [m for m in ("sft", "notes") if m in result["methods"]
                  and result["methods"][m]["adherence"] > o]
        verdict = []
        if not math.isnan(o) and not math.isnan(mem) and o < mem:
            verdict.append(f"opsd ({_pct(o)}) loses to memory ({_pct(mem)})")
        if others:
            verdict.append(f"opsd loses to {', '.join(others)}")
        if verdict:
            lines += ["**" + "; ".join(verdict) + ".**", ""]
    teacher = result.get("teacher") is not None
    lines += ["## Per convention", "",
              "| convention | kind | form | session follows | base | in context | memory | "
              + ("teacher | " if teacher else "") + " | ".join(methods) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * (len(methods) + teacher)]
    for r in result["conventions"]:
        sf = r["session_follows"]
        lines.append(f"| {r['id']} | {r['kind']} | {r['form']} | {sum(sf)}/{len(sf)} | "
                     f"{_pct(r['base'])} | {_pct(r['in_context'])} | {_pct(r['memory'])} | "
                     + (f"{_pct(r.get('teacher'))} | " if teacher else "")
                     + " | ".join(_pct(r["methods"].get(m, {}).get("adherence")) for m in methods)
                     + " |")
    iso = result["isolation"]
    if iso:
        lines += ["", "## Isolation: tenant B's adapter on tenant A's prompts", "",
                  f"Leak: {iso['leak_pts']:+.1f} pts (B's adherence to A's convention minus A's "
                  "base rate; B = the next convention's tenant, its opsd adapter).", "",
                  "| A's convention | B's convention | B on A's prompts | A's base |",
                  "|---|---|---|---|"]
        for p in iso["pairs"]:
            lines.append(f"| {p['a']} | {p['b']} | {_pct(p['b_on_a'])} | {_pct(p['base_a'])} |")
    chain = result["retention"]
    if chain:
        n = len(chain["conventions"])
        lines += ["", f"## Retention: one tenant learns {n} conventions in sequence "
                  f"(opsd, gate {'on' if chain['gate'] else 'off'})", "",
                  "Rows: after round k (the active adapter); columns: adherence without context "
                  "to each convention learned so far.", "",
                  "| round | promoted | " + " | ".join(chain["conventions"]) + " |",
                  "|---|---|" + "---|" * n,
                  "| base | | " + " | ".join(_pct(b) for b in chain["base"]) + " |",
                  "| in context | | " + " | ".join(_pct(b) for b in chain["in_context"]) + " |"]
        for k, row in enumerate(chain["adherence"]):
            v = chain["verdicts"][k]
            cells = [_pct(x) for x in row] + [""] * (n - len(row))
            lines.append(f"| {k + 1} | {'yes' if v['promoted'] else 'no'} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Gate verdicts: " + "; ".join(f"round {v['round']} ({v['convention']}): "
                                                     f"{v['reason']}" for v in chain["verdicts"])]
        if chain.get("forgetting"):
            f = chain["forgetting"]
            lines += ["", f"After the chain: general {_pct(f['general'])} (base "
                      f"{_pct(fb['general'])}), reading {_pct(f['reading'])} (base "
                      f"{_pct(fb['reading'])})."]
        if "retention" in plots:
            lines += ["", f"![retention]({_relative(plots['retention'], md_dir)})"]
    sh = result.get("shared")
    if sh:
        lines += ["", f"## Shared adapter: {sh['convention']} taught by three tenants", "",
                  "Three tenants that allow shared learning each teach it in their own session "
                  f"(a different statement each, a third of the train prompts each); the three "
                  f"sessions are consolidated together with opsd ({sh['steps']} steps, "
                  f"{sh['practice_prompts']} practice prompts, KL to base "
                  f"{sh['kl_to_base']:.3f}) into the shared adapter, activated in a store; two "
                  "more tenants are served as the server resolves their adapters.", "",
                  "| tenant | adapters served | adherence |", "|---|---|---|",
                  f"| base (no adapter) | 0 | {_pct(sh['base'])} |",
                  f"| in context (one teaching session) | 0 | {_pct(sh['in_context'])} |",
                  f"| allows shared learning | {sh['allows']['adapters']} | "
                  f"{_pct(sh['allows']['adherence'])} |",
                  f"| declines shared learning | {sh['declines']['adapters']} | "
                  f"{_pct(sh['declines']['adherence'])} |"]
    lines += ["", "## Sessions (first convention of each form)", ""]
    shown = set()
    for r in result["conventions"]:
        if r["form"] in shown:
            continue
        shown.add(r["form"])
        lines.append(f"{r['id']} ({r['form']}):")
        lines.append("")
        for m in r["session"]:
            lines.append(f"- {m['role']}: {_quote(m['content'], 240)}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _ratio(a, b) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return "n/a"
    return f"{a / b:.2f}"


def _relative(path: str, md_dir: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(md_dir).resolve()))
    except ValueError:
        return str(Path(path).resolve())
