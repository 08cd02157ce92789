"""Draw nemo_lite's packages as the code has them: docs/img/architecture.png (shown in docs/architecture.md).

    python scripts/plot_architecture.py [--out docs/img/architecture.png]

Nothing is placed by hand. The modules are read from ``nemo_lite/`` with ``ast``: each folder is a box listing
its modules, and an arrow goes from one box to another where a module of the first imports a module of the
second (imports inside functions count). Columns follow the imports: a box stands left of every box it
imports, except inside an import circle, whose boxes share a column. The PNG keeps a digest of the graph it
draws; tests/test_docs_architecture.py fails when the package no longer matches it, so the picture is
redrawn with the code it shows.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nemo_lite"
DIGEST_KEY = "nemo_lite graph"  # the PNG text chunk that holds the digest


def architecture_graph(package: Path = PACKAGE) -> tuple[dict[str, list[str]], dict[tuple[str, str], int]]:
    """Folders with their modules (file names, ``__init__.py`` left out where empty), and for each pair of
    folders the number of module-to-module imports from the first into the second."""
    files = sorted(package.rglob("*.py"))

    def folder_of(path: Path) -> str:
        return path.parent.relative_to(package.parent).as_posix()

    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in files}  # fmt: skip
    folders: dict[str, list[str]] = {}
    for path in files:
        if path.name != "__init__.py" or path.read_text().strip():
            folders.setdefault(folder_of(path), []).append(path.name)
    edges: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    pair = (folder_of(path), folder_of(modules[target]))
                    if pair[0] != pair[1]:
                        edges[pair] = edges.get(pair, 0) + 1
    return folders, dict(sorted(edges.items()))


def digest(folders: dict[str, list[str]], edges: dict[tuple[str, str], int]) -> str:
    text = json.dumps({"folders": folders, "edges": sorted(edges)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def columns(folders: list[str], edges: dict[tuple[str, str], int]) -> dict[str, int]:
    """Column of each folder: 0 for those that import no other folder, else one more than the deepest
    folder it imports; the folders of an import circle share the column of the circle."""
    reach = {f: {f} for f in folders}  # folders reachable by imports
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if not reach[b] <= reach[a]:
                reach[a] |= reach[b]
                changed = True
    circle = {f: frozenset(g for g in reach[f] if f in reach[g]) for f in folders}
    column: dict[frozenset, int] = {}

    def depth(group: frozenset) -> int:
        if group not in column:
            column[group] = 0  # a circle's own edges stay inside it
            below = {circle[b] for a, b in edges if a in group} - {group}
            column[group] = 1 + max((depth(g) for g in below), default=-1)
        return column[group]

    return {f: depth(circle[f]) for f in folders}


def spread(i: int, n: int, low: float, high: float) -> float:
    """The ``i``-th of ``n`` values spread evenly from ``low`` to ``high``."""
    return low + (high - low) * (i + 0.5) / n


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders, edges = architecture_graph()
    column = columns(list(folders), edges)
    n_columns = max(column.values()) + 1
    width, line, gap, lane, margin = 3.0, 0.17, 0.5, 1.8, 1.0  # inches
    skips = [e for e in edges if column[e[0]] - column[e[1]] > 1]  # routed above the boxes
    stacks: dict[int, list[str]] = {}
    for folder in sorted(folders, key=lambda f: (column[f], f)):
        stacks.setdefault(column[folder], []).append(folder)
    heights = {f: line * (len(folders[f]) + 2) for f in folders}
    total = max(sum(heights[f] for f in stack) + gap * (len(stack) - 1) for stack in stacks.values())
    top = total + 0.6
    fig_w, fig_h = margin + n_columns * (width + lane) - lane + 0.3, top + 0.15 * len(skips) + 0.3
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")
    colors = plt.get_cmap("tab10")
    box: dict[str, tuple[float, float, float, float]] = {}  # folder -> x, y (bottom), w, h
    for col, stack in stacks.items():
        x = margin + (n_columns - 1 - col) * (width + lane)  # importers left, what they import right
        y = top
        for folder in stack:
            h = heights[folder]
            y -= h
            box[folder] = (x, y, width, h)
            color = colors(sorted(folders).index(folder) % 10)
            ax.add_patch(plt.Rectangle((x, y), width, h, fc=(*color[:3], 0.07), ec=color, lw=1.5))
            ax.text(x + 0.12, y + h - 0.1, folder + "/", va="top", fontsize=10, weight="bold", color=color)
            ax.text(x + 0.2, y + h - 0.1 - 1.5 * line, "\n".join(folders[folder]), va="top", fontsize=9,
                    linespacing=1.3, family="monospace")  # fmt: skip
            y -= gap

    def share(edge: tuple[str, str], group: list[tuple[str, str]], low: float, high: float) -> float:
        """Where ``edge`` runs among ``group`` (ordered by the other end's height), between low and high."""
        order = sorted(group, key=lambda e: (-box[e[1]][1], -box[e[0]][1]))
        return spread(order.index(edge), len(order), low, high)

    # Every line runs in the lanes between the columns or above the boxes, never across a box: out of the
    # importer's right edge (an import circle: its left edge), into the imported folder's left edge.
    crossing = [e for e in edges if column[e[0]] != column[e[1]]]
    for (a, b), count in edges.items():
        (xa, ya, wa, ha), (xb, yb, _, hb) = box[a], box[b]
        same = column[a] == column[b]
        out_group = [e for e in edges if e[0] == a and (column[e[1]] == column[a]) == same]
        in_group = [e for e in edges if e[1] == b and (column[e[0]] == column[b]) == same]
        sy = ya + ha * share((a, b), out_group, 0.85, 0.15)
        ey = yb + hb * share((a, b), in_group, 0.85, 0.15)
        if same:
            circle = [e for e in edges if column[e[0]] == column[e[1]] == column[a]]
            x = xa - lane * share((a, b), circle, 0.25, 0.5)
            points = [(xa, sy), (x, sy), (x, ey)]
        else:
            column_out = [e for e in crossing if column[e[0]] == column[a]]
            x_out = xa + wa + lane * share((a, b), column_out, 0.08, 0.45)
            if (a, b) in skips:
                x_in = xb - lane * share((a, b), [e for e in skips if e[1] == b], 0.05, 0.2)
                channel = top + 0.15 * (skips.index((a, b)) + 1)
                points = [(xa + wa, sy), (x_out, sy), (x_out, channel), (x_in, channel), (x_in, ey)]
            else:
                points = [(xa + wa, sy), (x_out, sy), (x_out, ey)]
        line_style = {"color": "#37474f", "lw": 0.5 + 0.2 * min(count, 8), "alpha": 0.8}
        ax.plot(*zip(*points, strict=True), **line_style)
        ax.annotate("", (xb, ey), points[-1], arrowprops={"arrowstyle": "-|>", "shrinkA": 0, "shrinkB": 0,
                                                          **line_style})  # fmt: skip
    ax.text(margin, 0.15, "arrow: modules of one folder import modules of the other (thicker: more imports); "
            "drawn from the code by scripts/plot_architecture.py", fontsize=9, color="#455a64")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={DIGEST_KEY: digest(folders, edges)})
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "architecture.png")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
