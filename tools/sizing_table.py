"""The sizing page's table of thinker GPUs per replica, from the sizing rules (docs/sizing.md,
between its markers; `python -m tools.generate` writes it, `--check` finds it stale)."""

from __future__ import annotations

from omni_operator.sizing.replicas import Sizing, SizingRequest, size

TABLE_BEGIN = "<!-- sizing-table:begin (generated: python -m tools.generate) -->"
TABLE_END = "<!-- sizing-table:end -->"
TABLE_VIDEO_SECONDS = (15, 30, 60, 120)
TABLE_CONCURRENCY = (1, 8, 32)
TABLE_GPU_GIB = (24, 48, 80, 141)


def gpus_per_replica_table(video_seconds: tuple[float, ...] = TABLE_VIDEO_SECONDS,
                           concurrency: tuple[int, ...] = TABLE_CONCURRENCY,
                           gpu_gib: tuple[float, ...] = TABLE_GPU_GIB) -> str:
    """Markdown: thinker GPUs per replica (one node of 8 GPUs, 0.9 utilization, 4 images, no separate
    audio) for each video length x concurrent sequences x GPU size; '-' where one node can't hold it."""
    head = ["video", "concurrent sequences", "context tokens", "one request (table)"]
    lines = ["| " + " | ".join(head + [f"{g:g} GiB" for g in gpu_gib]) + " |",
             "|" + "---|" * (len(head) + len(gpu_gib))]
    for seconds in video_seconds:
        for seqs in concurrency:
            cells = []
            first: Sizing | None = None
            for gib in gpu_gib:
                s = size(SizingRequest(role="thinker", variant="thinking", video_seconds=seconds,
                                       gpu_memory_gib=gib, max_num_seqs=seqs))
                first = first or s
                cells.append(str(s.gpus_per_replica) if s.fits else "-")
            assert first is not None
            lines.append(f"| {seconds:g} s | {seqs} | {first.context_tokens} | {first.table_gb:.2f} GB | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replace_marked_block(text: str, block: str, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` marker lines replaced by ``block``."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"markers not found: {begin!r} ... {end!r}")
    return text[:start + len(begin)] + "\n" + block + text[stop:]


def marked_block(text: str, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"markers not found: {begin!r} ... {end!r}")
    return text[start + len(begin):stop].removeprefix("\n")
