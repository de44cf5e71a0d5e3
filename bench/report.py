"""The benchmark's markdown table, target checks and plot (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.model import BENCH_MODEL

Row = dict[str, Any]


def _find(
    rows: list[Row], server: str, mode: str, sessions: int, steps: int, model: str
) -> Row | None:
    for row in rows:
        if (row["server"], row["mode"], row["sessions"], row["steps"], row["model"]) == (
            server, mode, sessions, steps, model,
        ):  # fmt: skip
            return row
    return None


def _ceiling(
    results: dict[str, Any], mode: str, sessions: int, steps: int, model: str
) -> Row | None:
    for row in results["ceilings"]:
        if (row["mode"], row["sessions"], row["steps"], row["model"]) == (
            mode,
            sessions,
            steps,
            model,
        ):
            return row
    return None


def _keys(rows: list[Row], model: str) -> list[tuple[str, int, int]]:
    keys = {
        (r["mode"], r["sessions"], r["steps"])
        for r in rows
        if r["model"] == model and r["server"] not in ("echo", "floor")
    }
    return sorted(keys, key=lambda k: (k[0] != "stream", k[2], k[1]))


def table(results: dict[str, Any], model: str) -> str:
    rows = results["points"]
    head = (
        "| mode | S | k | batched steps/s | naive steps/s | x naive | echo msg/s | batched msg/s "
        "| % echo | floor msg/s | % floor | ceiling steps/s (batch) | % ceiling | % 1-thread "
        "ceiling | p50 / p99 ms | echo p50 ms | mean batch | server CPU |\n|" + "---|" * 18
    )
    lines = [head]
    for mode, s, k in _keys(rows, model):
        b = _find(rows, "batched", mode, s, k, model)
        n = _find(rows, "naive", mode, s, k, model)
        e = _find(rows, "echo", mode, s, k, model) if model == BENCH_MODEL else None
        f = _find(rows, "floor", mode, s, k, model) if model == BENCH_MODEL else None
        c = _ceiling(results, mode, s, k, model)
        if b is None:
            continue
        cells = [
            mode, str(s), str(k), f"{b['steps_per_s']:,.0f}",
            f"{n['steps_per_s']:,.0f}" if n else "-",
            f"{b['steps_per_s'] / n['steps_per_s']:.1f}x" if n else "-",
            f"{e['messages_per_s']:,.0f}" if e else "-",
            f"{b['messages_per_s']:,.0f}",
            f"{100 * b['messages_per_s'] / e['messages_per_s']:.0f} %" if e else "-",
            f"{f['messages_per_s']:,.0f}" if f else "-",
            f"{100 * b['messages_per_s'] / f['messages_per_s']:.0f} %" if f else "-",
            f"{c['steps_per_s']:,.0f} ({c['batch']})" if c else "-",
            f"{100 * b['steps_per_s'] / c['steps_per_s']:.0f} %" if c else "-",
            f"{100 * b['steps_per_s'] / c['steps_per_s_1_thread']:.0f} %" if c else "-",
            f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f}",
            f"{e['p50_ms']:.2f}" if e else "-",
            f"{b['mean_batch']:.1f}" if b["mean_batch"] else "-",
            f"{b['server_cpu_pct']:.0f} %",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> str:
    """Each target of the issue: met or missed, with the figures."""
    rows, m = results["points"], BENCH_MODEL
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'MET' if ok else 'MISSED'}: {text}")

    b, e = _find(rows, "batched", "stream", 1, 1, m), _find(rows, "echo", "stream", 1, 1, m)
    if b and e:
        gap = b["p50_ms"] - e["p50_ms"]
        line(b["p50_ms"] <= 1 and gap <= 0.5,
             f"S=1 k=1 p50 {b['p50_ms']:.3f} ms (<= 1 ms), {gap:+.3f} ms vs echo p50 "
             f"{e['p50_ms']:.3f} ms (<= 0.5 ms)")  # fmt: skip
        line(gap <= 0.25, f"S=1 k=1 p50 {gap:+.3f} ms over echo (<= +0.25 ms, the per-message "
             "path's own target)")  # fmt: skip
    b, e = _find(rows, "batched", "stream", 256, 1, m), _find(rows, "echo", "stream", 256, 1, m)
    f = _find(rows, "floor", "stream", 256, 1, m)
    if b and e:
        pct = 100 * b["messages_per_s"] / e["messages_per_s"]
        floor = ""
        if f:
            of_echo = 100 * f["messages_per_s"] / e["messages_per_s"]
            floor = (f" (the protocol floor reaches {of_echo:.0f} % of echo: "
                     f"{f['messages_per_s']:,.0f} msg/s)")  # fmt: skip
        line(pct >= 80, f"S=256 k=1 {b['messages_per_s']:,.0f} msg/s = {pct:.0f} % of echo "
             f"{e['messages_per_s']:,.0f} (>= 80 %){floor}")  # fmt: skip
    b, n = _find(rows, "batched", "stream", 256, 16, m), _find(rows, "naive", "stream", 256, 16, m)
    c = _ceiling(results, "stream", 256, 16, m)
    if b and n and c:
        x, pct = b["steps_per_s"] / n["steps_per_s"], 100 * b["steps_per_s"] / c["steps_per_s"]
        one = 100 * b["steps_per_s"] / c["steps_per_s_1_thread"]
        line(x >= 3 and pct >= 60, f"S=256 k=16 {b['steps_per_s']:,.0f} steps/s = {x:.1f}x "
             f"batching-off (>= 3x), {pct:.0f} % of the compute ceiling {c['steps_per_s']:,.0f} "
             f"at batch {c['batch']} (>= 60 %; {one:.0f} % of the 1-thread ceiling)")  # fmt: skip
    for k in (16, 1):
        b, c = _find(rows, "batched", "multi", 1024, k, m), _ceiling(results, "multi", 1024, k, m)
        if b and c:
            pct = 100 * b["steps_per_s"] / c["steps_per_s"]
            one = 100 * b["steps_per_s"] / c["steps_per_s_1_thread"]
            line(pct >= 60, f"multi 1024 sessions k={k}: {b['steps_per_s']:,.0f} steps/s = "
                 f"{pct:.0f} % of the compute ceiling {c['steps_per_s']:,.0f} at batch "
                 f"{c['batch']} (>= 60 %; {one:.0f} % of the 1-thread ceiling)")  # fmt: skip
    for k, goal in ((1, 60), (16, 90)):  # StreamColumns: against the 1-thread ceiling
        b, c = (
            _find(rows, "batched", "columns", 1024, k, m),
            _ceiling(results, "columns", 1024, k, m),
        )
        if b and c:
            one = 100 * b["steps_per_s"] / c["steps_per_s_1_thread"]
            line(one >= goal, f"columns 1024 sessions k={k}: {b['steps_per_s']:,.0f} steps/s = "
                 f"{one:.0f} % of the 1-thread compute ceiling {c['steps_per_s_1_thread']:,.0f} "
                 f"at batch {c['batch']} (>= {goal} %)")  # fmt: skip
    mem = results.get("memory")
    if mem:
        mib = 2**20
        line(
            mem["ratio"] <= 1.5,
            f"{mem['sessions']:,} idle sessions: RSS +{mem['rss_growth_bytes'] / mib:,.0f} MiB = "
            f"{mem['ratio']:.2f}x their raw state bytes ({mem['raw_state_bytes'] / mib:,.0f} MiB; "
            f"<= 1.5x); Python objects {mem['python_bytes_per_session']:.0f} B per session",
        )
    return "\n".join(out)


def _series(rows: list[Row], server: str, k: int, key: str) -> tuple[list[int], list[float]]:
    """(S values, figures) of one server's stream points of the bench model at chunk length k."""
    pts = sorted(
        (r["sessions"], r[key] * (k if server == "echo" and key == "messages_per_s" else 1))
        for r in rows
        if r["server"] == server and r["mode"] == "stream" and r["steps"] == k
        and r["model"] == BENCH_MODEL
    )  # fmt: skip
    return [p[0] for p in pts], [p[1] for p in pts]


STYLES = (("batched", "o-"), ("naive", "s--"), ("echo", "^:"), ("floor", "v-."))
LABELS = {"echo": "echo ceiling (msg/s x k)", "floor": "protocol floor"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["points"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, k in zip(axes[:2], (1, 16), strict=True):
        for server, style in STYLES:
            key = "messages_per_s" if server == "echo" else "steps_per_s"
            ax.plot(*_series(rows, server, k, key), style, label=LABELS.get(server, server))
        ceil = sorted(
            (c["sessions"], c["steps_per_s"]) for c in results["ceilings"]
            if c["mode"] == "stream" and c["steps"] == k and c["model"] == BENCH_MODEL
        )  # fmt: skip
        ax.plot([c[0] for c in ceil], [c[1] for c in ceil], "k-.", label="compute ceiling")
        ax.set(xscale="log", yscale="log", xlabel="concurrent sessions S", ylabel="steps/s",
               title=f"{BENCH_MODEL}, k={k} steps per chunk")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for server, style in STYLES:
        for k, alpha in ((1, 1.0), (16, 0.5)):
            ax.plot(
                *_series(rows, server, k, "p50_ms"), style, alpha=alpha, label=f"{server} k={k}"
            )
    ax.set(xscale="log", yscale="log", xlabel="concurrent sessions S",
           ylabel="p50 chunk latency (ms)", title="latency")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def native_table(results: dict[str, Any]) -> str:
    """The native front against the Python front, echo and the floor, stream points."""
    rows = results["points"]
    head = (
        "| model | S | k | native msg/s | Python msg/s | x Python | echo msg/s | x echo "
        "| floor msg/s | native p50 / p99 ms | Python p50 / p99 ms | CPU native (both) "
        "| CPU Python |\n|" + "---|" * 13
    )
    lines = [head]
    for r in rows:
        if r["server"] != "native":
            continue
        key = (r["mode"], r["sessions"], r["steps"], r["model"])
        b = _find(rows, "batched", *key)
        e = _find(rows, "echo", *key)
        f = _find(rows, "floor", *key)
        cells = [
            r["model"], str(r["sessions"]), str(r["steps"]), f"{r['messages_per_s']:,.0f}",
            f"{b['messages_per_s']:,.0f}" if b else "-",
            f"{r['messages_per_s'] / b['messages_per_s']:.2f}x" if b else "-",
            f"{e['messages_per_s']:,.0f}" if e else "-",
            f"{r['messages_per_s'] / e['messages_per_s']:.2f}x" if e else "-",
            f"{f['messages_per_s']:,.0f}" if f else "-",
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
            f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f}" if b else "-",
            f"{r['server_cpu_pct']:.0f} %", f"{b['server_cpu_pct']:.0f} %" if b else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def client_line(results: dict[str, Any]) -> str:
    """Which load generator measured, and the native one's exactness check."""
    if results.get("client", "python") == "python":
        return "Load generator: bench.load (asyncio gRPC, in the bench process).\n"
    checks = [r["exact"] for r in results["points"] if "exact" in r]
    replies = sum(c["replies"] for c in checks)
    wrong = sum(c["mismatched"] for c in checks)
    worst = max((c["max_abs_diff"] for c in checks), default=0.0)
    return (
        "Load generator: native/build/lstm-serve-load for stream and echo points (multi and "
        f"columns: bench.load); its sampled replies at lstm-serve points: {replies:,} checked "
        f"against offline onnxruntime, {wrong:,} not exact (max |diff| {worst:.1e}).\n"
    )


def write_report(results: dict[str, Any], out: Path) -> str:
    """table.md + throughput.png under `out`; returns the markdown."""
    parts = [f"Command: `{results['command']}` ({results['total_seconds']:.0f} s)\n",
             client_line(results), f"### {BENCH_MODEL}\n", table(results, BENCH_MODEL)]  # fmt: skip
    if any(r["model"] == "langid-chars" for r in results["points"]):
        parts += ["\n### langid-chars/1\n", table(results, "langid-chars")]
    if any(r["server"] == "native" for r in results["points"]):
        parts += ["\n### The native front (native/)\n", native_table(results)]
    parts += ["\n### Targets\n", targets(results)]
    text = "\n".join(parts) + "\n"
    (out / "table.md").write_text(text)
    ks = {r["steps"] for r in results["points"] if r["mode"] == "stream"}
    if ks >= {1, 16}:  # the plot is of the stream points, both chunk lengths
        plot(results, out / "throughput.png")
    return text
