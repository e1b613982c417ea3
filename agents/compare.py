"""Compare recipes by their agents' real-maze returns, one agent per training seed.

    python -m agents.compare real='outputs/agents/ppo-real-seed*' \\
        balls='outputs/agents/ppo-s27-s27-ball20-dream8-seed*' \\
        control='outputs/agents/ppo-s27-s27-ctrl-dream8-seed*' --reference real

Each group is NAME=PATTERN, a glob over agent folders (or the JSON files `agents.evaluate --out`
writes; a folder means its eval.json). Per group: every seed's return, the mean over seeds and
its standard error (the spread between training runs, not the spread over maze seeds inside one
evaluation: PPO seeds of one recipe differ far more than one agent's evaluations do), and the
ratio to the reference group, and the mean share of forward moves that walked into a wall (the
behaviour that most separates imagination agents from real ones; `agents.evaluate` records it
for either view since session 30; '-' where no seed recorded it). Then every pair of groups: the difference of
means, its standard error (unpaired: different recipes' seed 0 share nothing but the number) and
how many of those it is. Every file must come from the same evaluation (episodes, steps per
episode, first maze seed, deterministic or sampled actions, view), or the comparison stops and
names two files that differ.
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tyro


@dataclass
class Group:
    name: str
    labels: list[str]
    returns: np.ndarray  # (seeds,) mean real-maze return of each agent
    blocked: np.ndarray  # (seeds,) share of each agent's forward moves a wall stopped; NaN where not recorded

    @property
    def mean(self) -> float:
        return float(self.returns.mean())

    @property
    def stderr(self) -> float:
        n = len(self.returns)
        return float(self.returns.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def mean_blocked(self) -> float:
        """Mean over the seeds that recorded it (NaN if none did)."""
        known = self.blocked[~np.isnan(self.blocked)]
        return float(known.mean()) if len(known) else float("nan")


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _eval_file(path: Path) -> Path:
    return path / "eval.json" if path.is_dir() else path


# what makes two evaluations comparable; the checkpoint a --view model agent saw is not among
# them (recipes may each be judged through their own model)
COMPARABLE = ("episodes", "max_steps", "first_seed", "deterministic", "view")


def _evaluation_setting(d: dict) -> dict:
    """The JSON's `setting` (written since session 28) and the episode count every summary
    carries (all an older file can be checked on)."""
    setting = {k: v for k, v in d.get("setting", {}).items() if k in COMPARABLE}
    return {**setting, "episodes": d["agent"]["episodes"]}


def _seed_label(f: Path) -> str:
    """'seed N' from the agent's own name (its folder for an eval.json, else the file's stem)."""
    name = f.parent.name if f.name == "eval.json" else f.stem
    seeds = re.findall(r"seed(\d+)", name)
    return f"seed {seeds[-1]}" if seeds else name


def load_group(spec: str) -> tuple[Group, dict[Path, dict]]:
    """NAME=PATTERN -> the group and each file's evaluation setting."""
    name, sep, pattern = spec.partition("=")
    if not sep or not name or not pattern:
        raise SystemExit(f"group {spec!r}: expected NAME=PATTERN, e.g. balls='outputs/agents/ppo-balls-seed*'")
    files = [_eval_file(Path(p)) for p in sorted(glob.glob(pattern), key=_natural_key)]
    if not files:
        raise SystemExit(f"group {name!r}: no agent folder or file matches {pattern!r}")
    labels, returns, blocked, settings = [], [], [], {}
    for f in files:
        if not f.is_file():
            raise SystemExit(f"group {name!r}: {f} does not exist (evaluate the agent with "
                             f"`python -m agents.evaluate --agent {f.parent} --out {f}`)")
        try:
            d = json.loads(f.read_text())
            returns.append(float(d["agent"]["mean"]))
            share = (d["agent"].get("behaviour") or {}).get("forward_blocked_share")  # absent or null: not recorded
            blocked.append(float("nan") if share is None else float(share))
            settings[f] = _evaluation_setting(d)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"group {name!r}: {f} is not an agents.evaluate result with an agent "
                             f"({type(e).__name__}: {e})") from None
        labels.append(_seed_label(f))
    return Group(name, labels, np.array(returns), np.array(blocked)), settings


def check_same_evaluation(settings: dict[Path, dict]) -> None:
    """Every file agrees on every setting it recorded with the first file that recorded it (so any
    two files that both recorded a setting agree on it); else stop, naming two that differ."""
    first: dict[str, tuple[Path, object]] = {}
    for f, s in settings.items():
        for k, v in sorted(s.items()):
            f0, v0 = first.setdefault(k, (f, v))
            if v0 != v:
                raise SystemExit(f"{f0} and {f} come from different evaluations ({k} {v0!r} vs {v!r}); "
                                 f"evaluate every agent the same way (agents.evaluate with the same --episodes, "
                                 f"--max-steps, --first-seed, --deterministic and --view)")


def difference(a: Group, b: Group) -> tuple[float, float]:
    """b - a and its standard error (unpaired)."""
    return b.mean - a.mean, math.sqrt(a.stderr ** 2 + b.stderr ** 2)


def ratio(a: Group, ref: Group) -> tuple[float, float]:
    """a / ref and its standard error (first-order propagation of both means' errors)."""
    if ref.mean == 0:
        return float("nan"), float("nan")
    r = a.mean / ref.mean
    return r, math.sqrt(a.stderr ** 2 + (r * ref.stderr) ** 2) / abs(ref.mean)


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass
class Args:
    groups: tyro.conf.Positional[list[str]]
    """NAME=PATTERN per recipe: a glob over agent folders (each with eval.json) or eval JSON files."""
    reference: Optional[str] = None
    """The group the ratios are taken against (the real-maze agents); default: the first."""
    json: Optional[Path] = None
    """Also write the table as JSON here."""


def main(args: Args) -> dict:
    loaded = [load_group(spec) for spec in args.groups]
    groups = [g for g, _ in loaded]
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise SystemExit(f"group names must differ: {names}")
    check_same_evaluation({f: s for _, settings in loaded for f, s in settings.items()})
    ref_name = args.reference or names[0]
    if ref_name not in names:
        raise SystemExit(f"--reference {ref_name!r} is not one of the groups {names}")
    ref = groups[names.index(ref_name)]

    def fmt(x: float) -> str:
        return f"{'-':>5}" if math.isnan(x) else f"{x:.3f}"

    def fmt_ratio(r: float, se: float) -> str:
        return "-" if math.isnan(r) else f"{r:.0%}" + ("" if math.isnan(se) else f" +- {se:.0%}")

    print(f"real-maze return per agent (one per training seed); ratios against {ref_name!r}")
    print(f"{'group':>12} | seeds | mean +- s.e.  | {'of ' + ref_name:>14} | into walls | returns")
    out = {"reference": ref_name, "groups": {}, "differences": []}
    for g in groups:
        r, r_se = (1.0, float("nan")) if g is ref else ratio(g, ref)
        walls = "-" if math.isnan(g.mean_blocked) else f"{g.mean_blocked:.0%}"
        print(f"{g.name:>12} | {len(g.returns):>5} | {fmt(g.mean)} +- {fmt(g.stderr)} | {fmt_ratio(r, r_se):>14}"
              f" | {walls:>10} | " + ", ".join(f"{x:.2f}" for x in g.returns))
        out["groups"][g.name] = {"seeds": g.labels, "returns": g.returns.tolist(), "mean": g.mean,
                                 "stderr": g.stderr, "ratio": r, "ratio_stderr": r_se,
                                 "forward_blocked_share": g.blocked.tolist(), "mean_forward_blocked_share": g.mean_blocked}
    print("differences (unpaired):")
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            d, se = difference(a, b)
            z = d / se if se > 0 else float("nan")
            print(f"  {b.name} - {a.name}: {d:+.3f} +- {fmt(se)}" + ("" if math.isnan(z) else f" ({z:+.1f} s.e.)"))
            out["differences"].append({"a": a.name, "b": b.name, "b_minus_a": d, "stderr": se, "in_stderrs": z})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_nan_to_none(out), indent=2) + "\n")  # strict JSON: null, not NaN
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
