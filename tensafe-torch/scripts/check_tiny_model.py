#!/usr/bin/env python3
"""Check the embedded default assets of tensafe-torch, offline.

1. loads ``assets/tiny-llama`` with AutoModelForCausalLM / AutoTokenizer
   (``local_files_only=True``), prints the parameter count, the held-out
   corpus loss (same held-out slice as build_tiny_model.py) and greedy
   completions of three prompts;
2. fine-tunes a LoRA adapter (peft, r=8 on all attention and MLP projections)
   on ``assets/default_dataset.jsonl`` WITHOUT privacy and prints the held-out
   loss on completion tokens (prompt tokens masked) before and after;
3. does the same with DP-SGD through Opacus (Poisson sampling, noise
   multiplier 1.0, clipping 1.0) and prints epsilon.

Each fine-tune runs a fixed number of steps, capped by a wall-clock limit as a
safety net (the script says which bound stopped it).

    python tensafe-torch/scripts/check_tiny_model.py [--skip-dp] [--skip-nondp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_tiny_model as B  # noqa: E402  (shared corpus split / constants)

N_EVAL = 200  # last N_EVAL records of the dataset are held out
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(assets: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype="float32")
    return tok, model


def encode_records(tok, records):
    """Fixed-length tensors: input_ids, attention_mask, labels (-100 on prompt/pad)."""
    import torch

    rows = []
    for r in records:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p, c))
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        att[i, :n] = 1
        lab[i, len(p) : n] = torch.tensor(c)
    return ids, att, lab


def per_sample_loss(model, ids, att, lab):
    """Mean CE over each sample's completion tokens -> [B]."""
    import torch

    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    tgt = lab[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(tgt.shape)
    mask = (tgt != -100).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def eval_loss(model, data, batch=100) -> float:
    import torch

    ids, att, lab = data
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            ls = per_sample_loss(model, ids[i : i + batch], att[i : i + batch], lab[i : i + batch])
            tot += ls.sum().item()
            n += len(ls)
    model.train(was)
    return tot / n


def exact_match(model, tok, records, n=100) -> float:
    ok = 0
    for r in records[:n]:
        if greedy(model, tok, r["prompt"], max_new_tokens=8).split("<|endoftext|>")[0] == r["completion"]:
            ok += 1
    return ok / min(n, len(records))


def greedy(model, tok, prompt, max_new_tokens=24) -> str:
    import torch

    was = model.training
    model.eval()
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    model.train(was)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=False)


def lora_model(base):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(base, cfg)


def show(model, tok, records, tag):
    for r in records[:3]:
        print(f"  [{tag}] {r['prompt']!r} -> {greedy(model, tok, r['prompt'], 8)!r}  (want {r['completion']!r})")


def finetune_nondp(assets, train, test, test_records, tok, steps, max_s, batch, lr):
    import torch

    torch.manual_seed(0)
    _, base = load(assets)
    model = lora_model(base)
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n== non-DP LoRA: {ntrain} trainable params, batch {batch}, lr {lr}, up to {steps} steps / {max_s}s")
    before = eval_loss(model, test)
    print(f"held-out completion loss before {before:.4f}")
    show(model, tok, test_records, "before")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids, att, lab = train
    model.train()
    t0 = time.time()
    step = 0
    while step < steps and time.time() - t0 < max_s:
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        loss = per_sample_loss(model, ids[idx], att[idx], lab[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"  step {step}  train loss {loss.item():.4f}  {time.time() - t0:.1f}s", flush=True)
    dt = time.time() - t0
    after = eval_loss(model, test)
    print(
        f"non-DP: {step} steps in {dt:.1f}s ({'steps' if step >= steps else 'time'} bound); "
        f"held-out completion loss {before:.4f} -> {after:.4f}; "
        f"exact match {exact_match(model, tok, test_records):.2f}"
    )
    show(model, tok, test_records, "after")


def finetune_dp(assets, train, test, test_records, tok, steps, max_s, batch, lr, sigma, clip, delta):
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    _, base = load(assets)
    model = lora_model(base)
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = len(train[0])
    print(
        f"\n== DP LoRA (Opacus): {ntrain} trainable params, expected batch {batch} of {n} "
        f"(q={batch / n:.4f}), noise multiplier {sigma}, clip {clip}, lr {lr}, "
        f"up to {steps} steps / {max_s}s"
    )
    before = eval_loss(model, test)
    print(f"held-out completion loss before {before:.4f}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loader = DataLoader(
        TensorDataset(*train), batch_size=batch, shuffle=False, generator=torch.Generator().manual_seed(0)
    )
    pe = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, dp_opt, dp_loader = pe.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            poisson_sampling=True,
        )
    dp_model.train()
    t0 = time.time()
    step = 0
    done = False
    while not done:
        for ids, att, lab in dp_loader:
            if step >= steps or time.time() - t0 >= max_s:
                done = True
                break
            # Poisson sampling could draw an empty batch; at q=64/1400 the
            # chance is (1-q)^1400 ~ e^-65, so it is not handled here.
            dp_opt.zero_grad()
            loss = per_sample_loss(dp_model, ids, att, lab).mean()
            loss.backward()
            dp_opt.step()
            step += 1
            if step % 50 == 0:
                print(
                    f"  step {step}  batch {len(ids)}  train loss {loss.item():.4f}  {time.time() - t0:.1f}s",
                    flush=True,
                )
    dt = time.time() - t0
    eps = pe.get_epsilon(delta)
    after = eval_loss(model, test)
    print(
        f"DP: {step} steps in {dt:.1f}s ({'steps' if step >= steps else 'time'} bound); "
        f"held-out completion loss {before:.4f} -> {after:.4f}; "
        f"epsilon {eps:.3f} at delta {delta} ({pe.accountant.mechanism()} accountant); "
        f"exact match {exact_match(model, tok, test_records):.2f}"
    )
    show(model, tok, test_records, "after-DP")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=B.DEFAULT_ASSETS)
    ap.add_argument("--skip-nondp", action="store_true")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--nondp-steps", type=int, default=300)
    ap.add_argument("--nondp-max-s", type=float, default=60)
    ap.add_argument("--dp-steps", type=int, default=600)
    ap.add_argument("--dp-max-s", type=float, default=150)
    ap.add_argument("--dp-lr", type=float, default=5e-3)
    ap.add_argument("--dp-batch", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=1.0)
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(B.NUM_THREADS)
    torch.manual_seed(0)

    tok, model = load(args.assets)
    print(f"tokenizer {type(tok).__name__}, vocab {len(tok)}, eos={tok.eos_token!r}/{tok.eos_token_id}")
    print(f"model {type(model).__name__}: {sum(p.numel() for p in model.parameters())} parameters")
    print(
        f"config: hidden {model.config.hidden_size}, layers {model.config.num_hidden_layers}, "
        f"heads {model.config.num_attention_heads}, ffn {model.config.intermediate_size}, "
        f"vocab {model.config.vocab_size}, ctx {model.config.max_position_embeddings}, "
        f"tied {model.config.tie_word_embeddings}"
    )

    _, held = B.split_corpus(B.encode_docs(tok, B.corpus_documents()))
    hl = B.heldout_loss(model, held)
    print(f"held-out corpus loss {hl:.4f} (ppl {math.exp(hl):.2f}) over {held[:, 1:].numel()} tokens")
    for p in ["The `for` statement is used to", "Raises a", "Record 0007. Name: Alice Moreno. Born: 1980. City: Lyon."]:
        print(f"  {p!r} -> {greedy(model, tok, p)!r}")

    records = [json.loads(line) for line in (args.assets / "default_dataset.jsonl").read_text().splitlines()]
    train_r, test_r = records[:-N_EVAL], records[-N_EVAL:]
    train = encode_records(tok, train_r)
    test = encode_records(tok, test_r)
    clen = [(x != -100).sum().item() for x in test[2]]
    print(
        f"\ndataset: {len(train_r)} train / {len(test_r)} held-out records, padded length "
        f"{train[0].shape[1]}, completion tokens (incl. eos) {min(clen)}-{max(clen)}"
    )

    if not args.skip_nondp:
        finetune_nondp(args.assets, train, test, test_r, tok, args.nondp_steps, args.nondp_max_s, 32, 3e-3)
    if not args.skip_dp:
        finetune_dp(
            args.assets,
            train,
            test,
            test_r,
            tok,
            args.dp_steps,
            args.dp_max_s,
            args.dp_batch,
            args.dp_lr,
            args.sigma,
            1.0,
            1e-5,
        )


if __name__ == "__main__":
    main()
