"""Apply each hand-written semantic mutation of issue 9 §4, run the tests that must catch it, revert.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/semantic_mutations.py [NAME ...]

Prints one line per mutation: KILLED (some test failed, as it should) or SURVIVED. Exit status 1
if any mutation survived. Files are restored from memory after each run (also on Ctrl-C).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, [(old, new), ...], test files that must fail)
MUTATIONS: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
    "infonce_positive_from_anchor": (
        "instcontrast/functional.py",
        [("positive_logit = (anchors_n * _normalized(positives))", "positive_logit = (anchors_n * anchors_n)")],
        ["tests/test_functional.py", "tests/test_loss_module.py"],
    ),
    "hinge_positive_not_normalized": (
        "instcontrast/functional.py",
        [("positive_cos = (anchors_n * _normalized(positives)).sum(dim=-1)  # (A,)",
          "positive_cos = (anchors_n * positives.to(anchors_n.dtype)).sum(dim=-1)  # (A,)")],
        ["tests/test_functional.py", "tests/test_loss_module.py"],
    ),
    "margin_blocks_wrong_count": (
        "instcontrast/functional.py",
        [("negatives.num_anchors * negatives.num_negatives", "negatives.num_anchors * len(negatives.starts)")],
        ["tests/test_functional.py", "tests/test_loss_module.py"],
    ),
    "ddp_own_row_without_offset": (
        "instcontrast/loss.py",
        [("anchor_pool_index = anchor_in_local + offset", "anchor_pool_index = anchor_in_local")],
        ["tests/test_distributed.py"],
    ),
    "ddp_mean_of_rank_means": (
        "instcontrast/loss.py",
        [('anchor_mean: str = "global",', 'anchor_mean: str = "rank",')],
        ["tests/test_distributed.py"],
    ),
    "bank_stores_weak_view": (
        "instcontrast/loss.py",
        [("self.memory_bank.enqueue(z_strong_flat[local_pool].detach()", "self.memory_bank.enqueue(z_weak_flat[local_pool].detach()")],
        ["tests/test_memory_bank.py", "tests/test_loss_module.py"],
    ),
    "negative_cosine_wrong_sign": (
        "instcontrast/loss.py",
        [("stats.negative_cosine = stats.positive_cosine - stats.margin", "stats.negative_cosine = stats.margin - stats.positive_cosine")],
        ["tests/test_loss_module.py"],
    ),
    "fnr_bank_negatives_ignored": (
        "instcontrast/loss.py",
        [("bank_keys = -2 - torch.arange(num_bank, device=ids.device)", "bank_keys = torch.full((num_bank,), -1, device=ids.device)")],
        ["tests/test_loss_module.py"],
    ),
    "fnr_image_keys_assume_equal_batches": (
        "instcontrast/loss.py",
        [("+ (rank << _RANK_SHIFT)", "+ rank * batch")],
        ["tests/test_distributed.py"],
    ),
    "bank_pointer_stops_once_full": (
        "instcontrast/memory_bank.py",
        [("self.pointer.fill_((int(self.pointer) + count) % self.size)",
          "self.pointer.fill_((int(self.pointer) + count) % self.size if int(self.filled) < self.size else int(self.pointer))")],
        ["tests/test_memory_bank.py"],
    ),
    "bank_writes_from_filled_not_pointer": (
        "instcontrast/memory_bank.py",
        [("positions = (int(self.pointer) + torch.arange(count", "positions = (int(self.filled) + torch.arange(count")],
        ["tests/test_memory_bank.py"],
    ),
    "enqueue_keeps_the_graph": (
        "instcontrast/memory_bank.py",
        [("    @torch.no_grad()\n    def enqueue(", "    def enqueue("),
         ("        embeddings = embeddings.detach()\n        probs = probs.detach()\n", "")],
        ["tests/test_memory_bank.py"],
    ),
    "blocked_repeats_overwrite": (
        "instcontrast/ops/chunked.py",
        [("score_grad.scatter_add_(1, block_columns, weights)", "score_grad.scatter_(1, block_columns, weights)")],
        ["tests/test_backends.py"],
    ),
    "blocked_segment_rows_without_block_start": (
        "instcontrast/ops/chunked.py",
        [("grad_anchors.index_add_(0, start + rows,", "grad_anchors.index_add_(0, rows,")],
        ["tests/test_backends.py"],
    ),
    "chunked_backward_first_block_lse": (
        "instcontrast/ops/chunked.py",
        [("weights = torch.exp(similarities - lse[start:stop, None])", "weights = torch.exp(similarities - lse[: stop - start, None])")],
        ["tests/test_backends.py"],
    ),
    "normalize_overflows": (
        "instcontrast/functional.py",
        [("    return l2_normalize(x, accumulation_dtype(x.dtype))", "    return F.normalize(x.to(accumulation_dtype(x.dtype)), p=2.0, dim=-1)")],
        ["tests/test_normalize.py"],
    ),
}


def run(name: str) -> bool:
    """Apply one mutation, run its tests, restore; True if the tests caught it."""
    relative, edits, tests = MUTATIONS[name]
    path = ROOT / relative
    original = path.read_text()
    mutated = original
    for old, new in edits:
        if mutated.count(old) != 1:
            raise SystemExit(f"{name}: the code to mutate was not found exactly once in {relative}: {old!r}")
        mutated = mutated.replace(old, new)
    try:
        path.write_text(mutated)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
        )
    finally:
        path.write_text(original)
    return result.returncode != 0


def main(names: list[str]) -> int:
    survived = []
    for name in names or list(MUTATIONS):
        killed = run(name)
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {name}", flush=True)
        if not killed:
            survived.append(name)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
