"""The generation protocol: the built-in recall task and users' own lm-eval ``generate_until``
tasks in `eval`, `prune` and `shrink`, offline."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import depthprobe
from depthprobe.cli import main
from depthprobe.data import builtin_text
from depthprobe.evaluate import recall
from depthprobe.evaluate.harness import resolve_tasks


def test_recall_items_are_deterministic_and_answerable_from_the_passage():
    items = recall.recall_items()
    assert items == recall.recall_items() and len(items) == recall.NUM_ITEMS
    flat = " ".join(builtin_text().split())
    for it in items[::20]:
        passage, cue = it["prompt"].split("\n\n")
        assert len(passage.split()) == recall.PASSAGE_WORDS and len(cue.split()) == recall.CUE_WORDS
        assert cue + " " + it["answer"] in passage and passage in flat
        assert flat.rfind(passage) >= len(" ".join(builtin_text().split()[: len(builtin_text().split()) // 2])) - 1


def test_scores_by_hand():
    assert recall.token_f1("the cat sat on a mat today", "the cat sat on the mat") == pytest.approx(
        2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6))  # first 6 words: the cat sat on a mat -> 5 shared
    assert recall.exact_match("a b c d e f g", "a b c d e f") == 1.0
    assert recall.exact_match("a b c", "a b c d") == 0.0 and recall.token_f1("", "a") == 0.0
    items = [{"prompt": "", "answer": "x the y"}, {"prompt": "", "answer": "of of of"}]
    base = recall.trivial_baseline(items, text="the the the of of a")  # most frequent: the, of, a
    # "the of a" vs "x the y": 1 shared -> F1 1/3; vs "of of of": 1 shared -> 1/3
    assert base == {"exact_match": 0.0, "token_f1": pytest.approx(1 / 3)}


def test_recall_task_files_are_registered(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHPROBE_CACHE", str(tmp_path))
    spec = resolve_tasks([recall.TASK_NAME])
    folder = recall.task_dir()
    assert spec.include_paths == [str(folder)]
    rows = [json.loads(x) for x in (folder / f"{recall.TASK_NAME}.jsonl").read_text().splitlines()]
    assert rows == recall.recall_items()
    assert "output_type: generate_until" in (folder / f"{recall.TASK_NAME}.yaml").read_text()


def _greedy(model, tokenizer, prompt: str, max_new: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def user_task(folder, model_dir) -> str:
    """A user's generate_until task (dataset_path: json): two documents whose target is the
    model's own greedy answer (exact match 1) and two with an answer it cannot give (0)."""
    model, tok = depthprobe.load_model(str(model_dir), dtype="float32", device="cpu")
    prompts = ["a b c d", "e f g h", "i j k l", "m n o p"]
    answers = [_greedy(model, tok, p, 3) for p in prompts[:2]] + ["never said", "nor this"]
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": p, "a": a}) + "\n" for p, a in zip(prompts, answers, strict=True)))
    (folder / "my_gen.yaml").write_text("\n".join([
        "task: my_gen", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data))}",
        "test_split: test", "output_type: generate_until", "doc_to_text: q", "doc_to_target: a",
        "generation_kwargs:", "  until: []", "  do_sample: false", "  max_gen_toks: 3",
        "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true", ""]))
    return str(folder / "my_gen.yaml")


def test_users_generate_until_task_in_eval_prune_and_shrink(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = tiny_dir("llama")
    task = user_task(tmp_path, model_dir)
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(model_dir), "--tasks", task, "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert exc.value.code == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "ev" / "eval.csv")
    assert table[table.metric == "exact_match"]["value"].item() == pytest.approx(0.5)
    samples = pd.read_csv(tmp_path / "ev" / "eval_samples.csv").sort_values("doc_id")
    assert samples["exact_match"].tolist() == [1.0, 1.0, 0.0, 0.0]
    for command, extra in (("prune", ["--remove", "1", "--no-curve"]), ("shrink", ["--target-params", "0.8",
                                                                                   "--no-baselines"])):
        out = tmp_path / command
        with pytest.raises(SystemExit) as exc:
            main([command, str(model_dir), *extra, "--num-sequences", "2", "--seq-len", "16", "--heldout-windows",
                  "2", "--eval-tasks", task, "--out", str(out), "--quiet", "--no-report", "--device", "cpu"])
        assert exc.value.code == 0, capsys.readouterr().err
        scores = pd.read_csv(out / "eval.csv")
        assert list(scores["model"].unique())[0] == "original"
        assert scores[(scores.model == "original") & (scores.metric == "exact_match")]["value"].item() == 0.5
        assert "exact_match" in set(pd.read_csv(out / "eval_retention.csv")["metric"])


@pytest.mark.slow
def test_smollm2_recalls_far_above_the_trivial_baseline(smollm2):
    from depthprobe.evaluate.harness import evaluate_model

    model, tok = smollm2
    out = evaluate_model(model, tok, recall.TASK_NAME, label="smollm2", limit=12, batch_size=4)
    scores = out.table.set_index("metric")["value"]
    base = recall.trivial_baseline(recall.recall_items()[:12])
    assert base["exact_match"] == 0.0
    assert scores["exact_match"] >= 0.15 and scores["token_f1"] >= base["token_f1"] + 0.2
    # lm-eval's per-document scores are the task's own formula on greedy generations
    for _, row in out.samples[recall.TASK_NAME].head(3).iterrows():
        item = recall.recall_items()[int(row["doc_id"])]
        said = _greedy(model, tok, item["prompt"], 4 * recall.ANSWER_WORDS).split("\n")[0]
        assert row["exact_match"] == recall.exact_match(said, item["answer"])
