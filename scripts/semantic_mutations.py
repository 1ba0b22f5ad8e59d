"""Apply each hand-written semantic mutation, run the tests that must catch it, revert.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/semantic_mutations.py [--target library|pipeline] [NAME ...]

Two sets: ``LIBRARY`` (issue 9 §4: the loss, sampler, bank, backends) and ``PIPELINE`` (issue 18:
the wiring of ``reference_pipeline`` — views, teachers, weights, defaults, splits, thresholds,
checkpointing, evaluation, engine). Each mutation names a short code snippet that must occur
exactly once in its file (a stale snippet stops the run naming it, instead of silently testing
nothing) and the test files (or node ids) that must fail.

Prints one line per mutation: KILLED (some test failed, as it should) or SURVIVED, and the kill
rate per set. Exit status 1 if any mutation survived. Files are restored from memory after each
run (also on Ctrl-C). By default each mutant runs in a child forked from a parent that imported
the heavy dependencies (torch, transformers, ...) once — seconds per mutant instead of a fresh
interpreter; ``--no-fork`` runs ``python -m pytest`` in a subprocess instead. Bytecode is never
written while a file is mutated, so no stale ``.pyc`` outlives a mutant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Mutation = tuple[str, list[tuple[str, str]], list[str]]

# name: (file, [(old, new), ...], test files that must fail)
LIBRARY: dict[str, Mutation] = {
    "infonce_positive_from_anchor": (
        "instcontrast/functional.py",
        [("positive_cos = row_dot(anchors_n, positives_n)", "positive_cos = row_dot(anchors_n, anchors_n)")],
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
        [("self.memory_bank.enqueue(local_strong.detach()", "self.memory_bank.enqueue(take_rows(z_weak_flat, local_pool).detach()")],
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
        [("grad_anchors.index_add_(0, block_rows, anchor_grad)", "grad_anchors.index_add_(0, torch.arange(anchor_grad.shape[0]), anchor_grad)")],
        ["tests/test_backends.py", "tests/test_sampler_blocks.py"],
    ),
    "blocked_lse_ignores_row_order": (
        "instcontrast/ops/chunked.py",
        [("            lse[rows] = block_lse", "            lse[blocks.starts[block] : blocks.starts[block] + block_lse.numel()] = block_lse")],
        ["tests/test_backends.py", "tests/test_sampler_blocks.py"],
    ),
    "blocks_index_ignores_row_order": (
        "instcontrast/_types.py",
        [("        index[self.order] = by_row", "        index[:] = by_row")],
        ["tests/test_sampler_blocks.py"],
    ),
    "sampler_row_constants_ignore_row_order": (
        "instcontrast/sampler.py",
        [("row_block = envelope.anchor_block(rows, out=anchor_buffer)", "row_block = envelope.anchor_block(everyone[start:stop], out=anchor_buffer)")],
        ["tests/test_sampler.py", "tests/test_sampler_blocks.py"],
    ),
    "sampler_own_row_first_match_only": (
        "instcontrast/sampler.py",
        [("matches = torch.searchsorted(own_sorted, candidates, right=True) - first", "matches = (torch.searchsorted(own_sorted, candidates, right=True) > first).long()")],
        ["tests/test_sampler.py"],
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


_OBJECTIVE = ["tests/pipeline/test_objective_wiring.py"]
_STAGES = ["tests/pipeline/test_stage_wiring.py"]
_TRAIN_STAGE = ["tests/pipeline/test_train_stage.py"]
_BUDGETS = ["tests/pipeline/test_stage_budgets.py"]
_SPLIT = ["tests/pipeline/test_coco_label_split.py", "tests/pipeline/test_splits.py"]
_PSEUDO = ["tests/pipeline/test_pseudo_label_boundaries.py", "tests/pipeline/test_pseudo_labels.py"]
_WEIGHTS = ["tests/pipeline/test_weights_file.py", "tests/pipeline/test_checkpoint.py"]
_ENGINE_FAST = [  # the in-process engine tests (the SIGKILL and DDP subprocess tests take minutes)
    "tests/pipeline/test_engine.py::test_sampler_ranks_shard_the_same_global_batch",
    "tests/pipeline/test_engine.py::test_metrics_file_holds_train_and_eval_records_at_their_cadence",
    "tests/pipeline/test_engine.py::test_gradients_are_clipped_to_the_configured_norm",
    "tests/pipeline/test_engine.py::test_the_last_step_is_logged_even_off_the_log_cadence",
]

PIPELINE: dict[str, Mutation] = {
    # ---- losses.Objective: which view enters the loss, with or without gradients
    "objective_labeled_anchor_is_strong_view": (
        "reference_pipeline/losses.py", [("anchor_images = [labeled.weak.images]", "anchor_images = [labeled.strong.images]")],
        _OBJECTIVE),
    "objective_pseudo_labeled_anchor_is_weak_view": (
        "reference_pipeline/losses.py",
        [("anchor_images.append(unlabeled.strong.images)", "anchor_images.append(unlabeled.weak.images)")], _OBJECTIVE),
    "pixel_target_is_the_anchor_view_again": (
        "reference_pipeline/losses.py", [("target_images = [labeled.strong.images]", "target_images = [labeled.weak.images]")],
        _OBJECTIVE),
    "pixel_target_forward_with_gradients": (
        "reference_pipeline/losses.py",
        [("@torch.no_grad()\ndef other_view_outputs(", "@torch.enable_grad()\ndef other_view_outputs(")],
        _OBJECTIVE),
    "pixel_geometries_swapped": (
        "reference_pipeline/losses.py",
        [("_cat_geometry(anchor_geometry, device),\n            _cat_geometry(target_geometry, device),",
          "_cat_geometry(target_geometry, device),\n            _cat_geometry(anchor_geometry, device),")], _OBJECTIVE),
    "pixel_ids_of_the_other_view": (
        "reference_pipeline/losses.py", [("instance_ids = [labeled.weak_ids]", "instance_ids = [labeled.strong_ids]")],
        _OBJECTIVE),
    "semi_targets_of_the_weak_view": (
        "reference_pipeline/losses.py",
        [('_to(unlabeled.targets("strong"), device)', '_to(unlabeled.targets("weak"), device)')], _OBJECTIVE),
    "objective_ignores_lambda_semi": (
        "reference_pipeline/losses.py",
        [("unified_objective(sup, semi, pxl, self.lambda_semi, self.lambda_pxl)",
          "unified_objective(sup, semi, pxl, 1.0, self.lambda_pxl)")], _OBJECTIVE),
    # ---- the stages: which teacher, which weights, which config block
    "self_training_not_reinitialised": (
        "reference_pipeline/stages.py", [("teacher.load_state_dict(initial)", "pass  # teacher.load_state_dict(initial)")],
        _STAGES),
    "distill_from_the_fine_tuned_teacher": (
        "reference_pipeline/stages.py",
        [('adapted = _require(cfg, "teacher_self_train")', 'adapted = _require(cfg, "teacher_finetune")')],
        _STAGES),
    "distill_reads_the_fine_tuned_pseudo_label_cache": (
        "reference_pipeline/stages.py", [('"pseudo_labels_teacher_self_train.json"', '"pseudo_labels_teacher_finetune.json"')], _STAGES),
    "refine_from_a_fresh_student": (
        "reference_pipeline/stages.py",
        [("    load_weights(student, distilled)\n", "")], _STAGES),
    "refine_runs_the_distill_block": (
        "reference_pipeline/stages.py",
        [('train_stage("refine", student, cfg, cfg.refine,', 'train_stage("refine", student, cfg, cfg.distill,')],
        _STAGES),
    "demo_teacher_pretrained_on_the_target_labeled_split": (
        "reference_pipeline/teachers.py", [("source_only = Datasets(source,", "source_only = Datasets(datasets.labeled,")],
        _STAGES),
    "evaluate_stage_on_the_labeled_split": (
        "reference_pipeline/stages.py",
        [("load_stage_model(cfg, datasets, stage), datasets.val, stage", "load_stage_model(cfg, datasets, stage), datasets.labeled, stage")],
        _STAGES),
    "teacher_stages_loaded_into_a_student": (
        "reference_pipeline/stages.py", [('if EVALUABLE[stage] == "teacher":', 'if EVALUABLE[stage] == "student":')], _STAGES),
    # ---- train_stage: data, seeds, evaluation
    "train_stage_never_uses_pseudo_labels": (
        "reference_pipeline/stages.py", [("uses_unlabeled = pseudo is not None and", "uses_unlabeled = False and")],
        _TRAIN_STAGE),
    "train_stage_ignores_the_seed_offset": (
        "reference_pipeline/stages.py", [("seed = cfg.seed + seed_offset", "seed = cfg.seed")], _TRAIN_STAGE + _STAGES),
    "train_stage_evaluates_on_labeled_data": (
        "reference_pipeline/stages.py", [("trained, datasets.val, image_size", "trained, datasets.labeled, image_size")],
        _TRAIN_STAGE),
    # ---- defaults and shipped configs
    "refine_default_keeps_the_pixel_term": (
        "reference_pipeline/config.py",
        [("_student_stage(2000, 0.0, 0.0)", "_student_stage(2000, 0.0, 0.2)")], _BUDGETS),
    "baseline_default_budget_of_distill_only": (
        "reference_pipeline/config.py",
        [("_student_stage(92000, 0.0, 0.0)", "_student_stage(90000, 0.0, 0.0)")], _BUDGETS),
    "ablation_baseline_budget_of_distill_only": (
        "configs/ablations.yaml", [("baseline.train.steps=150 ", "baseline.train.steps=120 ")], _BUDGETS),
    # ---- losses
    "unified_objective_weights_swapped": (
        "reference_pipeline/losses.py",
        [('("semi", semi, lambda_semi), ("pxl", pxl, lambda_pxl)', '("semi", semi, lambda_pxl), ("pxl", pxl, lambda_semi)')],
        ["tests/pipeline/test_losses.py"]),
    "pixel_negatives_sampled_from_the_strong_view": (
        "reference_pipeline/losses.py",
        [("source = weak if prediction_source is None else", "source = strong if prediction_source is None else")],
        ["tests/pipeline/test_losses.py", "tests/pipeline/test_pixel_term_sources.py"]),
    # ---- data: the label split
    "unlabeled_split_keeps_the_labeled_images": (
        "reference_pipeline/data/loading.py",
        [("SubsetDataset(dataset, [i for i in ids if i not in chosen])", "SubsetDataset(dataset, ids)")], _SPLIT),
    "label_split_ignores_its_seed": (
        "reference_pipeline/data/loading.py",
        [("make_label_split(ids, fraction, seed=seed)", "make_label_split(ids, fraction, seed=0)")],
        _SPLIT),
    "subset_reads_by_position_not_id": (
        "reference_pipeline/data/splits.py",
        [("self._positions = [position[i] for i in self.image_ids]", "self._positions = list(range(len(self.image_ids)))")],
        _SPLIT),
    # ---- pseudo-labels: boundaries
    "score_threshold_strict": (
        "reference_pipeline/pseudo_labels.py",
        [("(scores >= config.score_threshold)", "(scores > config.score_threshold)")], _PSEUDO),
    "mask_threshold_inclusive": (
        "reference_pipeline/pseudo_labels.py", [("full = logits > logit_threshold", "full = logits >= logit_threshold")], _PSEUDO),
    "min_area_strict": (
        "reference_pipeline/pseudo_labels.py", [("if area < config.min_area or", "if area <= config.min_area or")], _PSEUDO),
    # ---- checkpointing: the final weights file
    "save_weights_leaves_its_temporary_file": (
        "reference_pipeline/atomic.py",
        [("    finally:\n        tmp.unlink(missing_ok=True)\n", "    except BaseException:\n        raise\n")], _WEIGHTS),
    "save_weights_writes_in_place": (
        "reference_pipeline/atomic.py",
        [("        yield tmp\n        fsync_file(tmp)\n        os.replace(tmp, path)", "        yield path")], _WEIGHTS),
    # ---- engine
    "ranks_read_the_same_slice": (
        "reference_pipeline/engine.py",
        [("first = batch * self.batch_size + self.rank * local", "first = batch * self.batch_size")], _ENGINE_FAST),
    "last_window_not_logged": (
        "reference_pipeline/engine.py",
        [("if step % config.log_every == 0 or step == config.steps:", "if step % config.log_every == 0:")], _ENGINE_FAST),
    "gradients_not_clipped": (
        "reference_pipeline/engine.py",
        [('values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))',
          'values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))')], _ENGINE_FAST),
}

MUTATIONS: dict[str, Mutation] = {**LIBRARY, **PIPELINE}


#: Imported once by the parent in fork mode (the children re-import only the mutated packages).
_HEAVY = ("numpy", "torch", "torch.distributed", "scipy", "PIL.Image", "pycocotools.mask", "safetensors.torch",
          "transformers", "timm", "yaml", "tqdm", "hypothesis", "pytest")
_OWN = ("instcontrast", "reference_pipeline")


def _mutated(name: str) -> tuple[Path, str, str]:
    """(path, original text, mutated text); stops naming the snippet if it is not found exactly once."""
    relative, edits, _ = MUTATIONS[name]
    path = ROOT / relative
    original = path.read_text()
    mutated = original
    for old, new in edits:
        if mutated.count(old) != 1:
            raise SystemExit(f"{name}: stale mutant, the code to mutate is not found exactly once in {relative}: {old!r}")
        mutated = mutated.replace(old, new)
    return path, original, mutated


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", *tests]


def _run_forked(tests: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # child: fresh copies of our packages, the parent's heavy imports
        code = 3
        try:
            for module in [m for m in sys.modules if m.split(".")[0] in _OWN]:
                del sys.modules[module]
            import pytest

            os.chdir(ROOT)
            with open(os.devnull, "w") as sink:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
            code = int(pytest.main(_pytest_args(tests)))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run_subprocess(tests: list[str]) -> int:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", *_pytest_args(tests)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800, check=False)
    return result.returncode


def run(name: str, fork: bool = True) -> bool:
    """Apply one mutation, run its tests, restore; True if the tests caught it."""
    path, original, mutated = _mutated(name)
    tests = MUTATIONS[name][2]
    try:
        path.write_text(mutated)
        code = _run_forked(tests) if fork else _run_subprocess(tests)
    finally:
        path.write_text(original)
    if code in (4, 5):  # usage error / no tests collected: a stale test path, not a kill
        raise SystemExit(f"{name}: pytest could not run {tests} (exit {code})")
    return code != 0


def check_baseline(names: list[str], fork: bool) -> None:
    """Every test selection passes on the unmutated code (else a "kill" would mean nothing)."""
    for tests in sorted({tuple(MUTATIONS[name][2]) for name in names}):
        code = _run_forked(list(tests)) if fork else _run_subprocess(list(tests))
        if code != 0:
            raise SystemExit(f"the unmutated code fails {' '.join(tests)} (pytest exit {code}): fix that first")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: every one of --target)")
    parser.add_argument("--target", choices=("all", "library", "pipeline"), default="all")
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant")
    parser.add_argument("--list", action="store_true", help="check every snippet is found and list the mutants")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each test selection unmutated first")
    args = parser.parse_args(argv)
    sets = {"all": MUTATIONS, "library": LIBRARY, "pipeline": PIPELINE}
    names = args.names or list(sets[args.target])
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        raise SystemExit(f"unknown mutation(s): {unknown}")
    for name in names:
        _mutated(name)  # every snippet present before anything runs
    if args.list:
        for name in names:
            print(f"{name}: {MUTATIONS[name][0]} -> {' '.join(MUTATIONS[name][2])}")
        return 0
    fork = not args.no_fork and hasattr(os, "fork")
    sys.dont_write_bytecode = True  # no .pyc of a mutated file
    if fork:
        import importlib

        for module in _HEAVY:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    if not args.no_baseline:
        check_baseline(names, fork)
    survived = []
    for name in names:
        killed = run(name, fork)
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {name}", flush=True)
        if not killed:
            survived.append(name)
    for label, group in (("library", LIBRARY), ("pipeline", PIPELINE)):
        ran = [n for n in names if n in group]
        if ran:
            killed = sum(n not in survived for n in ran)
            print(f"{label}: {killed}/{len(ran)} killed ({100 * killed / len(ran):.0f} %)", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
