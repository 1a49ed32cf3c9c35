"""Reporting for the entry points: plots, markdown and LaTeX (outside the library).

matplotlib is imported only when a plot is made. The numbers come from the
library (:mod:`cnf.evaluation`, :mod:`cnf.cost`, :mod:`cnf.tables`); this
module only draws and typesets them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.evaluation import MMD_KERNEL
from cnf.quality import image_grid
from cnf.tables import STATUS_FOOTNOTES, Cell, Metric, Table  # noqa: F401 - STATUS_FOOTNOTES re-exported

__all__ = [
    "cost_curve_markdown",
    "data_window",
    "density_on_grid",
    "latex_escape",
    "plot_cost_curve",
    "render_latex",
    "render_markdown",
    "save_density_plot",
    "save_image_grid",
    "save_samples_plot",
]


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------ 2-D plots
def data_window(
    points: np.ndarray, *, quantile: float = 0.005, margin: float = 0.15
) -> tuple[tuple[float, float], tuple[float, float]]:
    """A plot window for 2-D data: the ``[q, 1 − q]`` quantiles per axis, widened by ``margin``.

    Returns ``((x_lo, x_hi), (y_lo, y_hi))``; a square-ish window around the
    data whatever their scale (a user's file need not live in [−4, 4]²).
    """
    pts = np.asarray(points, dtype=np.float64)
    pts = pts[np.isfinite(pts).all(axis=1)]
    lo = np.quantile(pts, quantile, axis=0)
    hi = np.quantile(pts, 1 - quantile, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - margin * span, hi + margin * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


@torch.no_grad()
def density_on_grid(
    model: Any,
    window: tuple[tuple[float, float], tuple[float, float]],
    *,
    n: int = 120,
    batch_size: int = 5000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Model density of a 2-D model on an ``n × n`` grid over ``window``.

    Returns ``(xs, ys, density (n, n), mass)`` where ``mass = Σ p · cell area``
    is the probability the model puts on the window.
    """
    (x0, x1), (y0, y1) = window
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    logp = []
    for i in range(0, len(pts), batch_size):
        xb = torch.as_tensor(pts[i : i + batch_size], dtype=model.dtype, device=model.device)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = model.evaluate(xb)
        lp = -(out.nll if out.nll is not None else out.nelbo)
        logp.append(lp.double().cpu().numpy())
    dens = np.exp(np.concatenate(logp)).reshape(n, n)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    return xs, ys, dens, float(dens.sum() * cell)


def save_density_plot(
    xs: np.ndarray, ys: np.ndarray, dens: np.ndarray, path: str | Path, *, title: str = ""
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2), dpi=120)
    ax.pcolormesh(xs, ys, dens, cmap="inferno", shading="auto")
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples_plot(
    samples: np.ndarray,
    path: str | Path,
    window: tuple[tuple[float, float], tuple[float, float]],
    *,
    title: str = "",
    data: np.ndarray | None = None,
) -> None:
    """2-D histograms of model samples (and held-out data) over the same window."""
    plt = _pyplot()
    ncols = 2 if data is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.4 * ncols, 4.2), dpi=120, squeeze=False)
    panels = [(samples, "model samples")] + ([(data, "data (test)")] if data is not None else [])
    for ax, (pts, label) in zip(axes[0], panels):
        pts = pts[np.isfinite(pts).all(axis=1)]
        ax.hist2d(pts[:, 0], pts[:, 1], bins=120, range=list(window), cmap="inferno")
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_title(f"{label}: {title}" if title else label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_image_grid(
    images: np.ndarray,
    path: str | Path,
    *,
    image_shape: tuple[int, int, int],
    ncols: int = 10,
    nrows: int | None = None,
    title: str = "",
) -> None:
    """Save up to ``nrows × ncols`` images ``(N, *)`` with values in ``[0, 1]`` as one PNG grid.

    ``image_shape`` is ``(C, H, W)`` (C = 1 grey, 3 RGB); values are clipped to
    ``[0, 1]`` (model samples can leave the data range slightly). Tiled by
    :func:`cnf.quality.image_grid`; ``title`` may have several lines.
    """
    plt = _pyplot()
    c, h, w = image_shape
    nrows = nrows or ncols
    imgs = np.clip(np.asarray(images, dtype=np.float64)[: ncols * nrows], 0, 1)
    imgs = imgs.reshape(-1, c, h, w)
    grid = image_grid(imgs, max(1, -(-len(imgs) // ncols)), ncols, pad=1)
    gh, gw = grid.shape[:2]
    lines = title.count("\n") + 1 if title else 0
    fig, ax = plt.subplots(
        figsize=(max(3.0, gw / 12), max(3.0 * gh / gw, gh / 12) + 0.18 * lines), dpi=120
    )
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------ cost curves
def _num(v: Any, digits: int = 3, *, sci: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if sci:
        return f"{v:.2e}"
    if digits == 0:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.{digits}f}"


def _fid_cells(r: Mapping[str, Any]) -> str:
    if "fid" not in r:
        return "— | — | —"
    kid = f"{r['kid']:.2e} ± {r['kid_stderr']:.1e}"
    return f"{_num(r['fid'], 3)} | {kid} | {_num(r.get('fid_nfe'), 0)}"


def _nelbo_cell(r: Mapping[str, Any]) -> str:
    if r["objective"] != "nll" or r.get("nelbo") is None:
        return "—"
    return f"{r['nelbo']:.4f} ± {r['nelbo_stderr']:.4f}"


def _gap_cell(r: Mapping[str, Any]) -> str:
    if r.get("gap") is None:
        return "—"
    return f"{r['gap']:+.4f} ± {r['gap_stderr']:.4f}"


def cost_curve_markdown(records: Iterable[Mapping[str, Any]]) -> str:
    """A markdown table of cost-curve records (each with ``model`` added by the caller)."""
    records = list(records)
    with_bpd = any("bpd" in r for r in records)
    # Models with an NLL and a bound (score SDEs, INDM) also show the NELBO.
    with_nelbo = any(r["objective"] == "nll" and r.get("nelbo") is not None for r in records)
    with_gap = any(r.get("gap") is not None for r in records)
    with_fid = any("fid" in r for r in records)
    head = (
        "| model | setting | objective | value (nats) | Δ vs ref | "
        + ("gap to floor | " if with_gap else "")
        + ("NELBO (nats) | " if with_nelbo else "")
        + ("bits/dim | " if with_bpd else "")
        + "eval NFE | eval s | MMD² | data log p | in support | sample NFE | sample s |"
        + (" FD | KID | FD NFE |" if with_fid else "")
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        obj = r["objective"]
        value = f"{r[obj]:.4f} ± {r[f'{obj}_stderr']:.4f}"
        if r["label"] == r.get("ref_label"):
            delta = "ref"
        else:
            d = r["objective_minus_ref"]
            d = 0.0 if abs(d) < 5e-5 else d  # no "-0.0000"
            delta = f"{d:+.4f} ± {r['objective_minus_ref_stderr']:.4f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("model", "")),
                    r["label"],
                    obj.upper(),
                    value,
                    delta,
                    *([_gap_cell(r)] if with_gap else []),
                    *([_nelbo_cell(r)] if with_nelbo else []),
                    *([_num(r.get("bpd"), 4)] if with_bpd else []),
                    _num(r.get("eval_nfe"), 0),
                    _num(r.get("eval_seconds"), 2),
                    _num(r.get("sample_mmd2"), sci=True),
                    _num(r.get("sample_data_logp"), 3),
                    _num(r.get("sample_support_fraction"), 3),
                    _num(r.get("sample_nfe"), 0),
                    _num(r.get("sample_seconds"), 2),
                    *([_fid_cells(r)] if with_fid else []),
                ]
            )
            + " |"
        )
    notes = [
        "",
        "Objective per test point in nats: NLL = exact or Hutchinson-estimated negative "
        "log-likelihood; NELBO = negative ELBO (an upper bound on the NLL). Δ vs ref: paired "
        "mean difference to the model's most expensive setting (same probes), ± its "
        "standard error. eval NFE: mean function evaluations per evaluation batch; eval s / "
        "sample s: wall time of the whole evaluation / sampling.",
        "gap to floor: paired mean of NLL − (−log p_data) over the same test points (the "
        "Monte Carlo KL(data ‖ model)) ± its paired standard error, where the data density is "
        "known; the floor line of the plot is those points' own mean −log p_data.",
        f"Sample quality: {MMD_KERNEL}, model samples vs held-out test data; "
        "data log p = mean exact data log-density of the samples inside the support; "
        "in support = fraction of samples where the data density is positive "
        "(— where the density is unknown).",
    ]
    if with_fid:
        floors = {
            (r["fid_info"]["features"], r.get("fid_data"), r.get("kid_data"))
            for r in records
            if "fid_info" in r
        }
        first_fid = next(r for r in records if "fid" in r)
        notes.append(
            f"FD / KID: Fréchet distance and kernel inception distance (± its standard error) of "
            f"{first_fid['fid_num_samples']} samples per setting against the training set "
            "(docs/methods.md §8.5), same noise for every setting; FD NFE: the sampler's mean NFE. "
            + "; ".join(
                f"{f} features: test images score FD {_num(fd, 3)}, KID {_num(kd, sci=True)}"
                for f, fd, kd in sorted(floors, key=str)
            )
            + " (the floor)."
        )
    conventions = sorted({r["bpd_convention"] for r in records if "bpd_convention" in r})
    notes += [f"Bits/dim: {c}." for c in conventions]
    first = records[0] if records else {}
    if first:
        notes.append(
            f"Common random numbers: seed {first.get('seed')} for every setting and model; "
            f"{first.get('num_test')} test points, {first.get('num_samples', 0)} samples."
        )
    return "\n".join(lines + notes) + "\n"


def plot_cost_curve(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = ""
) -> None:
    """Two panels per data set, log-x: objective vs evaluation NFE, MMD² vs sampling NFE.

    One row of panels per data set (``record["dataset"]``), one colour per
    model (``record["model"]``), one line per model and solver family
    (``method``/``sampler`` of the setting, with its ``grid``), points sorted
    by NFE. The data floor (the test points' own mean −log p_data, the best a
    model can score on them) is drawn as a dashed line where the data density
    is known. Image data: bits/dim instead of nats, and FD of the samples
    (``fid``, against ``fid_nfe``) instead of MMD², with the test images' own
    FD (``fid_data``) as the dashed floor.
    """
    import matplotlib.ticker

    plt = _pyplot()

    models = list(dict.fromkeys(str(r.get("model", "")) for r in records))
    groups = list(dict.fromkeys(_group(r["setting"]) for r in records))
    datasets = list(dict.fromkeys(r.get("dataset") for r in records))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P")]
    fig, axes = plt.subplots(
        len(datasets), 2, figsize=(11, 0.6 + 3.6 * len(datasets)), dpi=120, squeeze=False
    )
    seen: dict[str, Any] = {}  # legend entries, one per model x group over all rows
    for row, dataset in enumerate(datasets):
        ax_l, ax_s = axes[row]
        rows = [r for r in records if r.get("dataset") == dataset]
        objectives = sorted({r["objective"] for r in rows})
        bpd = all("bpd" in r for r in rows)
        fid = any("fid" in r for r in rows)

        def y_left(r: Mapping[str, Any], bpd: bool = bpd) -> tuple[float, float]:
            key = "bpd" if bpd else r["objective"]
            return r[key], r[f"{key}_stderr"]

        for mi, model in enumerate(models):
            for gi, group in enumerate(groups):
                pts = [r for r in rows if str(r.get("model", "")) == model]
                pts = [r for r in pts if _group(r["setting"]) == group]
                if not pts:
                    continue
                ls, marker = styles[gi % len(styles)]
                color = colors[mi % len(colors)]
                label = f"{model} · {group}" if len(groups) > 1 else model
                ev = sorted(
                    (r for r in pts if r.get("eval_nfe") is not None), key=lambda r: r["eval_nfe"]
                )
                if ev:
                    seen[label] = ax_l.errorbar(
                        [r["eval_nfe"] for r in ev],
                        [y_left(r)[0] for r in ev],
                        yerr=[y_left(r)[1] for r in ev],
                        color=color,
                        ls=ls,
                        marker=marker,
                        ms=4,
                        capsize=2,
                    )
                x_key, y_key = ("fid_nfe", "fid") if fid else ("sample_nfe", "sample_mmd2")
                sq = sorted(
                    (r for r in pts if r.get(x_key) is not None and y_key in r),
                    key=lambda r: r[x_key],
                )
                if sq:
                    (line,) = ax_s.plot(
                        [r[x_key] for r in sq],
                        [r[y_key] for r in sq],
                        color=color,
                        ls=ls,
                        marker=marker,
                        ms=4,
                    )
                    seen.setdefault(label, line)
        _floor_lines(ax_l, rows, "floor", "floor: −log p_data of the test points")
        where = f"{dataset}: " if dataset else ""
        ax_l.set_xscale("log")
        ax_l.set_xlabel("NFE (evaluation, per batch)")
        ax_l.set_ylabel(
            " / ".join(o.upper() for o in objectives)
            + (" bits/dim (test)" if bpd else " (nats, test)")
        )
        ax_l.set_title(f"{where}likelihood vs cost", fontsize=10)
        ax_s.set_xscale("log")
        ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        for ax in (ax_l, ax_s):
            ax.xaxis.set_major_formatter(ticks)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3, which="both")
        ax_s.set_xlabel("NFE (sampling)")
        if fid:
            features = sorted({str(r["fid_info"]["features"]) for r in rows if "fid_info" in r})
            _floor_lines(ax_s, rows, "fid_data", "test images vs training set")
            ax_s.set_yscale("log")
            ax_s.set_ylabel(f"FD to training set ({', '.join(features)} features)")
            ax_s.set_title(f"{where}sample quality vs cost", fontsize=10)
        else:
            # Unbiased MMD² can be slightly negative: symlog keeps zero and small values visible.
            ax_s.set_yscale("symlog", linthresh=1e-4)
            ax_s.axhline(0.0, color="grey", lw=0.6)
            ax_s.set_ylabel("MMD² to test data")
            ax_s.set_title(f"{where}sample quality vs cost (RBF σ = 0.1, 0.5, 1, 2)", fontsize=10)
    if seen:
        fig.legend(
            list(seen.values()), list(seen), loc="lower center", ncol=min(4, len(seen)), fontsize=7
        )
    if title:
        fig.suptitle(title, fontsize=10)
    legend_rows = (len(seen) + 3) // 4
    fig.tight_layout(
        rect=(0, min(0.4, (0.02 + 0.025 * legend_rows) * 2 / len(datasets) ** 0.5), 1, 1)
    )
    fig.savefig(path)
    plt.close(fig)


def _floor_lines(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, text: str) -> None:
    """A dashed, labelled horizontal line at each distinct value of ``key`` in ``rows``."""
    for h in sorted({round(r[key], 6) for r in rows if r.get(key) is not None}):
        ax.axhline(h, color="grey", ls="--", lw=0.8)
        ax.annotate(
            text,
            (0.01, h),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="grey",
            va="bottom",
        )


def _group(setting: Mapping[str, Any]) -> str:
    for key in ("method", "sampler"):
        if key in setting:
            grid = f" {setting['grid']}" if "grid" in setting else ""
            return f"{setting[key]}{grid}"
    return "default" if not setting else "other"


# ---------------------------------------------------------------- tables
def _fmt(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _cell_md(cell: Cell, m: Metric, ours: bool) -> str:
    if cell.mean is None:
        return "—"
    text = _fmt(cell.mean, m.decimals)
    if ours:
        if cell.std is not None:
            text += f" ± {_fmt(cell.std, m.decimals)}"
        text = f"**{text}**" if cell.bold else text
        return f"{text} (n={cell.n})"
    return text + cell.mark


def _headers(table: Table) -> list[tuple[str, str, Metric]]:
    return [(c.label, m.key, m) for c in table.spec.columns for m in table.spec.metrics]


def _status_lines(table: Table) -> list[str]:
    lines = []
    for title, items in (
        ("missing (no run folder)", table.missing),
        ("unfinished (no usable final.json)", table.unfinished),
        ("warnings", table.warnings),
    ):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {x}" for x in items]
    return lines


def render_markdown(table: Table) -> str:
    """The table in markdown, its footnotes, and the status of the runs."""
    spec = table.spec
    multi = len(spec.metrics) > 1
    heads = _headers(table)
    header = ["method"] + [f"{c} {m.label}" if multi else c for c, _, m in heads]
    lines = [f"### {spec.title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|---" + "|---:" * len(heads) + "|")
    for label, ours in [(r, True) for r in table.rows] + [(r, False) for r in table.ref_rows]:
        cells = [_cell_md(table.cells[(label, c, k)], m, ours) for c, k, m in heads]
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines.append("")
    lines.append(
        "Our rows: mean ± std over seeds (n = finished runs; no ± when n = 1); "
        "— = no finished run or no reference."
    )
    lines += [f"- {f}" for f in table.footnotes]
    status = _status_lines(table)
    if status:
        lines += ["", "Run status:", ""] + status
    else:
        lines += ["", "Run status: every selected run is finished."]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "†": r"$^\dagger$",
    "‡": r"$^\ddagger$",
    "—": "---",
    "×": r"$\times$",
    "²": r"$^2$",
    "Δ": r"$\Delta$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols the tables use."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _cell_tex(cell: Cell, m: Metric, ours: bool) -> str:
    if cell.mean is None:
        return "---"
    # One math group per cell: "$a$$^\dagger$" would open display math.
    text = _fmt(cell.mean, m.decimals)
    if not ours:
        mark = {"†": r"^\dagger", "‡": r"^\ddagger"}.get(cell.mark, "")
        return f"${text}{mark}$"
    if cell.std is not None:
        text += rf" \pm {_fmt(cell.std, m.decimals)}"
    if cell.bold:
        text = rf"\mathbf{{{text}}}"
    return f"${text}$" + rf" {{\scriptsize({cell.n})}}"


def render_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    spec = table.spec
    nm, nc = len(spec.metrics), len(spec.columns)
    heads = _headers(table)
    lines = [
        f"% generated by experiments/tables.py from the table spec '{spec.name}'",
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(spec.caption)}}}",
        rf"\label{{tab:{spec.name}}}",
        r"\begin{tabular}{l" + ("".join(" " + "r" * nm for _ in range(nc))) + "}",
        r"\toprule",
    ]
    if nm > 1:
        groups = " & ".join(
            rf"\multicolumn{{{nm}}}{{c}}{{{latex_escape(c.label)}}}" for c in spec.columns
        )
        lines.append(f" & {groups} \\\\")
        lines.append(
            "".join(rf"\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}" for i in range(nc))
        )
        lines.append("Method & " + " & ".join(latex_escape(m.label) for _, _, m in heads) + r" \\")
    else:
        lines.append("Method & " + " & ".join(latex_escape(c) for c, _, _ in heads) + r" \\")
    lines.append(r"\midrule")
    for label in table.rows:
        cells = [_cell_tex(table.cells[(label, c, k)], m, True) for c, k, m in heads]
        lines.append(" & ".join([latex_escape(label)] + cells) + r" \\")
    if table.ref_rows:
        lines.append(r"\midrule")
        for label in table.ref_rows:
            cells = [_cell_tex(table.cells[(label, c, k)], m, False) for c, k, m in heads]
            lines.append(" & ".join([latex_escape(label)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = ["Ours: mean $\\pm$ std over seeds, number of finished runs in parentheses."] + [
        latex_escape(f) for f in table.footnotes
    ]
    lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}")
    lines.append(r"\end{table}")
    for x in table.missing:
        lines.append(f"% missing: {x}")
    for x in table.unfinished:
        lines.append(f"% unfinished: {x}")
    return "\n".join(lines) + "\n"
