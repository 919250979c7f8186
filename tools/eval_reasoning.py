"""Evaluate fine-tuned runs side by side (e.g. the lambda = 0 baseline and Step-JEPA).

  python tools/eval_reasoning.py --task gsm8k --test_file ../shared/data/gsm8k/test.jsonl \\
      --run baseline=runs/lm --run step_jepa=runs/step_jepa --output eval.json --plot steps.png

Per run (a local HF model directory or a LoRA adapter directory saved by pretrain/step_jepa.py):
  gsm8k: accuracy of greedy answers; the predicted number is what follows '####', else the
         last number in the text, compared with the gold '#### N';
  nlrx:  exact match of the greedy answer with the reference regex (whitespace-stripped);
  steps (gsm8k): on the gold solutions, cosine similarity of consecutive steps: the step-end
         states of the plain causal pass, and the Step-JEPA views (predictor after step i vs
         step i+1 in isolation); and a PCA projection of the isolated step embeddings (PNG).
"""
import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cromwell.data.chats import hf_chat_encoder
from cromwell.data.chat_views import lm_batch, packed_batch
from cromwell.data.tokenizer import predictor_token
from cromwell.model.generate import Sampling
from cromwell.pretrain.checkpoint.load import load, locate
from cromwell.pretrain.evaluation.generation import answers
from cromwell.pretrain.evaluation.reasoning import gsm8k_correct, read_tasks, regex_match

@torch.no_grad()
def step_embeddings(model, tokenizer, chats: list[list[dict]], predictors: int, batch_size: int) -> dict:
    """Consecutive-step cosines (causal step ends; JEPA views) and the isolated step embeddings."""
    encoder = hf_chat_encoder(tokenizer)
    preds = tokenizer.convert_tokens_to_ids([predictor_token(i) for i in range(1, predictors + 1)])
    causal_cos, view_cos, emb, step_index = [], [], [], []
    examples = [e for e in (encoder(c) for c in chats) if len(e.steps) >= 2]
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = lm_batch(chunk, tokenizer.pad_token_id)
        h = model(b.input_ids, b.position_ids)
        for r, e in enumerate(chunk):
            ends = torch.stack([h[r, end - 1] for _, end in e.steps])
            causal_cos += F.cosine_similarity(ends[:-1], ends[1:], dim=-1).tolist()
        p = packed_batch(chunk, "multistep", preds, tokenizer.pad_token_id)
        h = model(p.input_ids, p.position_ids, p.attention_mask)
        v1, v2 = h[p.view1[:, 0], p.view1[:, 1]], h[p.view2[:, 0], p.view2[:, 1]]
        view_cos += F.cosine_similarity(v1, v2, dim=-1).tolist()
        emb.append(v2.float())
        step_index += [k + 2 for e in chunk for k in range(len(e.steps) - 1)]  # view 2 is step k+2
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    return {"consecutive_step_cosine": mean(causal_cos), "predictor_vs_next_step_cosine": mean(view_cos),
            "pairs": len(view_cos), "embeddings": torch.cat(emb) if emb else torch.zeros(0), "step_index": step_index}


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    _, _, v = torch.pca_lowrank(x, q=2, center=False)
    return x @ v[:, :2]


def plot_steps(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        xy = pca_2d(r["embeddings"])
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=r["step_index"], cmap="viridis", s=8)
        ax.set_title(f"{name}: step embeddings (PCA)\nconsecutive cos {r['predictor_vs_next_step_cosine']:.3f}")
        fig.colorbar(sc, ax=ax, label="step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["gsm8k", "nlrx"], required=True)
    ap.add_argument("--test_file", required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--limit", type=int, default=0, help="first N test records (0: all)")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--predictors", type=int, default=1)
    ap.add_argument("--output", default=None, help="JSON with every metric and the first predictions")
    ap.add_argument("--plot", default=None, help="PNG of the step-embedding projection (gsm8k)")
    args = ap.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.run if "=" in r)
    if len(runs) != len(args.run):
        sys.exit(f"--run must be NAME=DIR, got {args.run}")

    items = read_tasks(args.task, args.test_file, args.limit)
    score = gsm8k_correct if args.task == "gsm8k" else regex_match
    metric = "accuracy" if args.task == "gsm8k" else "exact_match"
    report, embeddings = {}, {}
    for name, path in runs.items():
        print(f"{name}: {path}", flush=True)
        torch.manual_seed(0)
        loaded = load(locate(Path(path)))
        model, tokenizer = loaded.model, loaded.tokenizer
        encoder = hf_chat_encoder(tokenizer)
        prompts = [encoder.encode(encoder.render_prompt(it["messages"][:-1])) for it in items]
        # greedy, through the project's decoding loop (model/generate.py, KV-cached)
        preds = [g.text for g in answers(loaded, prompts, Sampling(args.max_new_tokens), True, args.batch_size,
                                          next(model.parameters()).device)]
        correct = [score(p, it["gold"]) for p, it in zip(preds, items)]
        report[name] = {"path": path, metric: sum(correct) / len(items), "n": len(items),
                        "examples": [{"prediction": p, "gold": it["gold"], "correct": c}
                                     for p, it, c in list(zip(preds, items, correct))[:20]]}
        if args.task == "gsm8k":
            emb = step_embeddings(model, tokenizer, [it["messages"] for it in items], args.predictors, args.batch_size)
            embeddings[name] = emb
            report[name].update({k: emb[k] for k in ("consecutive_step_cosine", "predictor_vs_next_step_cosine", "pairs")})
    print(f"\n{'run':<20}{metric:>14}" + ("  step cos (causal / jepa views)" if args.task == "gsm8k" else ""))
    for name, r in report.items():
        extra = f"  {r['consecutive_step_cosine']:.3f} / {r['predictor_vs_next_step_cosine']:.3f}" if args.task == "gsm8k" else ""
        print(f"{name:<20}{r[metric]:>14.4f}{extra}")
    if args.plot and embeddings:
        plot_steps(embeddings, args.plot)
        print(f"plot: {args.plot}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"task": args.task, "test_file": args.test_file, "runs": report}, f, indent=1)
    return report


if __name__ == "__main__":
    main()
