"""lm-eval-harness on loaded models: the built-in cloze task, tables, retention, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from depthprobe.cli import main
from depthprobe.data import builtin_text
from depthprobe.evaluate import cloze
from depthprobe.evaluate.harness import EvalOutput, resolve_tasks, results_table, retention


def test_cloze_items_are_deterministic_and_true_to_the_text():
    items = cloze.cloze_items()
    assert items == cloze.cloze_items() and len(items) == cloze.NUM_ITEMS
    words = builtin_text().split()
    flat = " ".join(words)
    half = len(" ".join(words[: len(words) // 2]))
    labels = [it["label"] for it in items]
    assert set(labels) == {0, 1, 2, 3}
    for it in items[:: 25]:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert len(it["context"].split()) == cloze.CONTEXT_WORDS
        truth = it["choices"][it["label"]]
        # the true continuation follows the context in the text; made from its second half
        assert flat.rfind(it["context"] + " " + truth) >= half - len(it["context"]) - 1
        for other in it["choices"]:
            assert len(other.split()) == cloze.CHOICE_WORDS and other in flat


def test_task_files_are_valid_lm_eval_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHPROBE_CACHE", str(tmp_path))
    folder = cloze.task_dir()
    spec = resolve_tasks(cloze.TASK_NAME)
    assert spec.names == [cloze.TASK_NAME] and spec.include_paths == [str(folder)]
    lines = (folder / f"{cloze.TASK_NAME}.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == cloze.cloze_items()


def test_results_table_and_retention_interval():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.1, "acc_norm,none": 0.5,
                                 "acc_norm_stderr,none": "N/A"}}}
    table = results_table(results, "a")
    assert table.to_dict("records") == [
        {"model": "a", "task": "t", "metric": "acc", "value": 0.75, "stderr": 0.1},
        {"model": "a", "task": "t", "metric": "acc_norm", "value": 0.5, "stderr": pytest.approx(np.nan, nan_ok=True)},
    ]
    ref_acc = np.array([1, 1, 0, 1, 1, 0, 1, 1.0])
    new_acc = np.array([1, 0, 0, 1, 0, 0, 1, 1.0])
    ref = EvalOutput(pd.DataFrame([{"model": "full", "task": "t", "metric": "acc", "value": ref_acc.mean(),
                                    "stderr": 0.1}]), {"t": pd.DataFrame({"doc_id": range(8), "acc": ref_acc})})
    new = EvalOutput(pd.DataFrame([{"model": "pruned", "task": "t", "metric": "acc", "value": new_acc.mean(),
                                    "stderr": 0.1}]), {"t": pd.DataFrame({"doc_id": range(8), "acc": new_acc})})
    row = retention([ref, new], n_boot=400, seed=1).iloc[0]
    assert row["retention"] == pytest.approx(new_acc.mean() / ref_acc.mean())
    idx = np.random.default_rng(1).integers(0, 8, size=(400, 8))
    den = ref_acc[idx].mean(1)
    ratios = np.where(den > 0, new_acc[idx].mean(1) / np.where(den > 0, den, 1), np.nan)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    assert (row["retention_low"], row["retention_high"]) == pytest.approx((lo, hi))


def _choice_loglik(model, tok, context: str, choice: str) -> float:
    """Sum of log p(continuation tokens | context) with one plain forward (lm-eval's split:
    encode context + continuation whole, the continuation is what follows the context's ids)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + " " + choice)
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    positions = range(len(ctx) - 1, len(whole) - 1)
    return float(sum(logp[p, whole[p + 1]] for p in positions))


@pytest.mark.slow
def test_lm_eval_cloze_accuracy_equals_plain_forward_count(smollm2):
    from depthprobe.evaluate.harness import evaluate_model

    model, tok = smollm2
    limit = 12
    out = evaluate_model(model, tok, cloze.TASK_NAME, label="smollm2", limit=limit, batch_size=16)
    correct, correct_norm = [], []
    for item in cloze.cloze_items()[:limit]:
        lls = np.array([_choice_loglik(model, tok, item["context"], c) for c in item["choices"]])
        lengths = np.array([len(c) for c in item["choices"]], float)
        correct.append(float(np.argmax(lls) == item["label"]))
        correct_norm.append(float(np.argmax(lls / lengths) == item["label"]))
    samples = out.samples[cloze.TASK_NAME]
    assert samples["doc_id"].tolist() == list(range(limit))
    assert samples["acc"].tolist() == correct and samples["acc_norm"].tolist() == correct_norm
    table = out.table.set_index("metric")
    assert table.loc["acc", "value"] == sum(correct) / limit
    assert table.loc["acc_norm", "value"] == sum(correct_norm) / limit
    assert table.loc["acc", "value"] > 0.5  # chance is 0.25


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "no_such_task_xyz"], "unknown task no_such_task_xyz"),
        (["--tasks", "BAD_YAML"], "is not valid YAML"),
        (["--tasks", "NO_NAME_YAML"], "has no 'task:' name"),
        (["--tasks", "missing/task.yaml"], "task file not found"),
        (["--tasks", cloze.TASK_NAME, "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", ""], "at least one task"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\ndataset_path: [json\n")
    noname = tmp_path / "noname.yaml"
    noname.write_text("dataset_path: json\n")
    args = [str(bad) if a == "BAD_YAML" else str(noname) if a == "NO_NAME_YAML" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["eval", "no-such-model-folder/", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_prune_with_eval_tasks_and_bench_writes_tables_and_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_dir("llama")), "--remove", "1,2", "--no-curve", "--num-sequences", "2",
              "--seq-len", "32", "--eval-tasks", cloze.TASK_NAME, "--eval-limit", "3", "--bench", "--out", str(out),
              "--quiet", "--device", "cpu"])
    assert exc.value.code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "eval.csv")
    assert list(table["model"].unique()) == ["original", "pruned"]
    assert set(table["metric"]) == {"acc", "acc_norm"}
    kept = pd.read_csv(out / "eval_retention.csv")
    for row in kept.itertuples(index=False):
        before = table[(table.model == "original") & (table.metric == row.metric)]["value"].item()
        after = table[(table.model == "pruned") & (table.metric == row.metric)]["value"].item()
        assert row.retention == pytest.approx(after / before) if before else np.isnan(row.retention)
    samples = pd.read_csv(out / "eval_samples.csv")
    assert len(samples) == 6 and samples.groupby("model")["acc"].mean().to_dict() == pytest.approx(
        table[table.metric == "acc"].set_index("model")["value"].to_dict())
    speed = pd.read_csv(out / "bench_speedup.csv")
    assert (speed["ideal_speedup"] == 2.0).all()
    report = (out / "report.html").read_text()
    assert "Task scores (lm-eval-harness)" in report and "Speed" in report


def test_hub_task_offline_fails_in_one_line_naming_the_local_alternative(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = str(tiny_dir("llama"))
    capsys.readouterr()  # the fixture's own output
    with pytest.raises(SystemExit) as exc:
        main(["eval", folder, "--tasks", "hellaswag", "--limit", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "hellaswag" in err and cloze.TASK_NAME in err and "task.yaml" in err
