"""The report's account of the equal-tuning protocol (bench/runner/tuning.py): what each method was swept over, how
many runs it got, the selection score across its sweep (the sensitivity table), the setting chosen, and a flag
where the best value sits at an edge of its sweep (the optimum may lie outside it)."""
from __future__ import annotations

import math


from bench.core.lazy import lazy_module
from bench.reporting.report_sections import ci_text, short
from bench.reporting.thresholds import fmt_nfe

pd = lazy_module("pandas")


def _value(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _keys(tune_runs: pd.DataFrame) -> list[str]:
    return [c for c in tune_runs.columns if c.startswith("tune:") and c != "tune:of"]


def tuning_table(tune_runs: pd.DataFrame, score: str) -> pd.DataFrame:
    """Per method and setting: the scores of its tuning runs (mean, their values), runs, diverged runs."""
    keys = _keys(tune_runs)
    rows = []
    for (method, *setting), g in tune_runs.groupby(["tune:of", *keys], dropna=False, sort=True):
        rows.append({"method": method, **dict(zip(keys, setting)), "values": g[score].to_numpy(float),
                     "mean": float(g[score].mean()), "runs": len(g), "diverged": int((g.state == "diverged").sum())})
    return pd.DataFrame(rows)


def chosen_settings(runs: pd.DataFrame) -> dict[str, dict[str, str]]:
    """The setting each compared method ran at (what bench/runner/tuning.py chose), from its runs' tune: columns."""
    keys = [c for c in runs.columns if c.startswith("tune:") and c != "tune:of"]
    out = {}
    for method, g in runs.groupby("method", sort=True):
        setting = {k[5:]: g[k].iloc[0] for k in keys if isinstance(g[k].iloc[0], str)}
        if setting:
            out[method] = setting
    return out


def edge_flags(table: pd.DataFrame, chosen: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Per method, the swept numeric keys whose chosen value is the smallest or largest value tried."""
    out: dict[str, list[str]] = {}
    for method, setting in chosen.items():
        g = table[table.method == method]
        for key, v in setting.items():
            tried = sorted({_value(x) for x in g[f"tune:{key}"].dropna()}, key=lambda x: (isinstance(x, str), x))
            if len(tried) >= 2 and all(isinstance(x, float) for x in tried) and float(v) in (tried[0], tried[-1]):
                out.setdefault(method, []).append(f"{key}={v} is the sweep's {'smallest' if float(v) == tried[0] else 'largest'}")
    return out


def tuning_summary_line(tune_runs: pd.DataFrame, runs: pd.DataFrame, select: str, metric: str) -> str | None:
    """The first screen's sentence on tuning: seeds, settings per method, chosen values, edges."""
    if not len(tune_runs):
        return None
    table = tuning_table(tune_runs, "score")
    chosen = chosen_settings(runs)
    counts = table.groupby("method").agg(settings=("runs", "size"), runs=("runs", "sum"))
    sizes = counts.groupby(["settings", "runs"]).size()
    budget = "; ".join(f"{n} methods {s} settings x {r // s} seeds = {r} runs" for (s, r), n in sizes.items())
    fair = "every method got the same" if len(sizes) == 1 else "**unequal tuning budgets**"
    seeds = sorted(tune_runs.seed.unique())
    flags = edge_flags(table, chosen)
    keys = sorted({k for s in chosen.values() for k in s})
    picked = "; ".join(f"{k.split('.')[-1]}: " + ", ".join(
        f"{v} ({sum(s.get(k) == v for s in chosen.values())})" for v in sorted({s[k] for s in chosen.values() if k in s},
                                                                              key=_value)) for k in keys)
    line = (f"- **Tuning**: each method ran at its own best setting, chosen by the mean {select} of {short(metric)} "
            f"on tuning seeds {', '.join(map(str, seeds))} and reported on fresh seeds ({fair}: {budget}). Chosen "
            f"values (methods): {picked}.")
    if flags:
        line += f" Best at the edge of its sweep in {len(flags)} methods (the optimum may lie outside): " + "; ".join(
            f"`{m}` {', '.join(f)}" for m, f in sorted(flags.items())) + "."
    return line


def tuning_section(tune_runs: pd.DataFrame, runs: pd.DataFrame, select: str, metric: str,
                   budget: float | None) -> list[str]:
    """The sensitivity table: per method, the selection score across its sweep; the chosen setting in bold."""
    if not len(tune_runs):
        return []
    table = tuning_table(tune_runs, "score")
    chosen = chosen_settings(runs)
    flags = edge_flags(table, chosen)
    keys = _keys(tune_runs)
    first, rest = keys[0], keys[1:]
    levels = sorted({v for v in table[first].dropna()}, key=_value)
    what = (f"the mean {short(metric)} over the {fmt_nfe(budget)}-NFE budget (AUC / budget)" if select == "auc" and budget
            else f"{short(metric)} at the budget" if select == "final" else f"the {select} of {short(metric)}")
    lines = ["", "## Tuning (equal-tuning protocol)", "",
             f"Each method was run at every setting of its sweep on the tuning seeds; the score is {what}, mean "
             "[95% t interval] over the tuning seeds (a diverged run counts 0 from its divergence on; d: diverged runs). "
             "The chosen setting (bold) is the one the compared runs use, on fresh seeds. 'edge' marks a best value at "
             "the smallest or largest value tried.", "",
             "| method | " + " | ".join(k[5:] for k in rest) + (" | " if rest else "") +
             " | ".join(f"{first[5:]}={v}" for v in levels) + " | chosen |",
             "|---" * (2 + len(rest) + len(levels)) + "|"]
    for method, g in table.groupby("method", sort=True):
        for sub_key, h in (g.groupby(rest, dropna=False, sort=True) if rest else [((), g)]):
            sub_key = sub_key if isinstance(sub_key, tuple) else (sub_key,)
            cells = []
            for lv in levels:
                r = h[h[first] == lv]
                if not len(r):
                    cells.append("—")
                    continue
                r = r.iloc[0]
                text = ci_text(r["values"]) + (f" d{r.diverged}" if r.diverged else "")
                is_chosen = chosen.get(method, {}).get(first[5:]) == lv and all(
                    chosen[method].get(k[5:]) == v for k, v in zip(rest, sub_key) if isinstance(v, str))
                cells.append(f"**{text}**" if is_chosen else text)
            setting = ", ".join(f"{k}={v}" for k, v in chosen.get(method, {}).items())
            edge = f" (edge: {'; '.join(flags[method])})" if method in flags else ""
            lines.append(f"| `{method}` | " + " | ".join("—" if not isinstance(v, str) else v for v in sub_key)
                         + (" | " if rest else "") + " | ".join(cells) + f" | {setting}{edge} |")
    return lines


def tuning_scores(tune_runs: pd.DataFrame, select: str, metric: str) -> pd.DataFrame:
    """The tuning runs with their selection score (`score`): the AUC, or the final metric at the budget."""
    out = tune_runs.copy()
    out["score"] = out["auc"] if select == "auc" else out[metric] if metric in out else math.nan
    return out
