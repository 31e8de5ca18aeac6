"""Zero-shot accuracy through lm-evaluation-harness (not the paper): what Wanda, SparseGPT,
SliceGPT, FLAP and LLM-Pruner report besides perplexity, on PIQA, HellaSwag, WinoGrande,
ARC-easy and ARC-challenge (PEERS). lm-eval is an optional dependency (`pip install lm-eval`).

    import zeroshot
    zeroshot.evaluate(model, tokenizer, ["piqa", "arc_easy"])   # {"piqa": {"acc": ..}, ..}

The model is evaluated as it is in memory (pruned, compacted, any dtype) through lm-eval's
`HFLM`; `task_dir` adds task definitions from a folder (lm-eval's include path), such as a
multiple-choice task over a local JSON file.
"""
import contextlib
import os

PEERS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


def task_manager(task_dir=None):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=task_dir)


@contextlib.contextmanager
def hub_offline(offline: bool):
    """With `offline`, the datasets library reads its cache alone, at once, with no retries."""
    import datasets
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    if offline:
        constants.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def check(tasks: list[str], task_dir=None, offline=False):
    """Each task known and its data at hand (built here, as the evaluation will): a sentence
    saying what is missing, or None."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "--tasks needs lm-evaluation-harness: pip install lm-eval"
    if task_dir and not os.path.isdir(task_dir):
        return f"--task-dir {task_dir}: not a folder"
    manager = task_manager(task_dir)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        return (f"--tasks: unknown task {', '.join(unknown)} (lm-eval's names, such as "
                f"{', '.join(PEERS)}; your own with --task-dir DIR)")
    for task in tasks:
        try:
            with hub_offline(offline):
                manager.load([task])
        except Exception as err:            # noqa: BLE001  lm-eval and datasets raise many kinds
            from huggingface_hub import constants                   # offline here, or already
            where = ("the hub cannot be reached and it is not in the datasets cache"
                     if offline or constants.HF_HUB_OFFLINE else f"{type(err).__name__}: {err}")
            return f"--tasks {task}: its data could not be loaded ({where})"
    return None


def evaluate(model, tokenizer, tasks: list[str], task_dir=None, batch_size=8,
             offline=False) -> dict:
    """{task: {metric: value}} of lm-eval's zero-shot evaluation of `model` as it is (acc, and
    acc_norm where the task has it)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with hub_offline(offline):
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(task_dir),
                              num_fewshot=0, log_samples=False, bootstrap_iters=0,
                              verbosity="ERROR")
    return {task: {metric.split(",")[0]: value for metric, value in results.items()
                   if metric.endswith(",none") and "stderr" not in metric}
            for task, results in out["results"].items()}


def summary(results: dict) -> str:
    """One line: each task's accuracy (and normalized accuracy where there is one)."""
    return ", ".join(f"{task} {r['acc']:.4f}" + (f" (acc_norm {r['acc_norm']:.4f})"
                                                 if "acc_norm" in r else "")
                     for task, r in results.items())
