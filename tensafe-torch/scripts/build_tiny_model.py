#!/usr/bin/env python3
"""Build the embedded default assets of tensafe-torch, reproducibly and offline.

Writes, under ``tensafe-torch/src/tensafe_torch/assets/``:

* ``tiny-llama/``: a ~1.05M-parameter Llama causal LM pretrained on
  ``pydoc_data.topics`` (Python's own bundled documentation), with its
  byte-level BPE tokenizer (Hugging Face fast tokenizer format);
* ``default_dataset.jsonl``: the synthetic "private records" fine-tuning task.

Everything is seeded and the step count is fixed (no wall-clock limits), so a
rebuild with the same library versions on the same kind of CPU gives the same
bytes. Run from anywhere::

    python tensafe-torch/scripts/build_tiny_model.py [--out DIR] [--steps N]

Requires torch, transformers (5.x), tokenizers, safetensors. No network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

# Offline and single-configuration before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
DEFAULT_ASSETS = HERE.parent / "src" / "tensafe_torch" / "assets"

SEED = 20240613
NUM_THREADS = 2
EOT = "<|endoftext|>"

# --- tokenizer -------------------------------------------------------------
VOCAB_SIZE = 2048

# --- model -----------------------------------------------------------------
MODEL_KW = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

# --- pretraining -----------------------------------------------------------
SEQ_LEN = 128
BATCH = 16
STEPS = 600
PEAK_LR = 3e-3
MIN_LR = 3e-4
WARMUP = 50
WEIGHT_DECAY = 0.1
LOG_EVERY = 50
HELDOUT_EVERY = 20  # every 20th block of SEQ_LEN corpus tokens is held out

# --- dataset ---------------------------------------------------------------
N_RECORDS = 1600
DATASET_SEED = 7
PRETRAIN_PROMPT_SEED = 11  # prompt-only lines mixed into pretraining
N_PRETRAIN_PROMPTS = 1000

# city -> (country, ISO code).  The fine-tuning task: given a record, state
# the country of its city.  24 cities, 8 countries: a small mapping shared by
# every record, so it is learned in aggregate, not per individual.
COUNTRIES = {
    "France": ("FR", ["Lyon", "Nantes", "Lille"]),
    "Germany": ("DE", ["Berlin", "Munich", "Hamburg"]),
    "Spain": ("ES", ["Madrid", "Seville", "Valencia"]),
    "Italy": ("IT", ["Rome", "Milan", "Naples"]),
    "Japan": ("JP", ["Tokyo", "Osaka", "Kyoto"]),
    "Brazil": ("BR", ["Recife", "Salvador", "Curitiba"]),
    "Canada": ("CA", ["Toronto", "Montreal", "Calgary"]),
    "Kenya": ("KE", ["Nairobi", "Mombasa", "Kisumu"]),
}
CITY_TO_COUNTRY = {city: (country, code) for country, (code, cities) in COUNTRIES.items() for city in cities}
FIRST_NAMES = [
    "Alice",
    "Bruno",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Irene",
    "Jonas",
    "Keiko",
    "Liam",
    "Maria",
    "Nadia",
    "Omar",
    "Paula",
    "Quentin",
    "Rosa",
    "Samuel",
    "Tomas",
    "Ursula",
    "Victor",
    "Wanda",
    "Yusuf",
]
LAST_NAMES = [
    "Moreno",
    "Schmidt",
    "Rossi",
    "Tanaka",
    "Silva",
    "Dubois",
    "Okafor",
    "Novak",
    "Garcia",
    "Muller",
    "Ricci",
    "Sato",
    "Costa",
    "Martin",
    "Kamau",
    "Fischer",
    "Bianchi",
    "Suzuki",
    "Lopez",
    "Laurent",
    "Mwangi",
    "Weber",
    "Ferrari",
    "Santos",
]


def record_prompt(rng: random.Random) -> tuple[str, str]:
    """One synthetic record: (prompt, city)."""
    rid = rng.randrange(10000)
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    city = rng.choice(sorted(CITY_TO_COUNTRY))
    born = rng.randrange(1940, 2006)
    prompt = f"Record {rid:04d}. Name: {first} {last}. Born: {born}. City: {city}. Country:"
    return prompt, city


def make_dataset(n: int = N_RECORDS, seed: int = DATASET_SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, city = record_prompt(rng)
        country, code = CITY_TO_COUNTRY[city]
        out.append({"prompt": prompt, "completion": f" {country} ({code})."})
    return out


def pretrain_extra_text(n: int = N_PRETRAIN_PROMPTS, seed: int = PRETRAIN_PROMPT_SEED) -> str:
    """Dataset-style text for pretraining WITHOUT the answers.

    The model sees the record format (prompt only, never the city->country
    answer) and, separately, lists of countries with their codes in random
    order (never next to a city).  So fine-tuning still has the mapping
    city -> country to learn, but the vocabulary is not cold.
    """
    rng = random.Random(seed)
    lines = []
    names = sorted(COUNTRIES)
    for i in range(n):
        prompt, _city = record_prompt(rng)
        lines.append(prompt[: -len(" Country:")])
        if i % 10 == 0:
            order = names[:]
            rng.shuffle(order)
            k = rng.randrange(3, len(order) + 1)
            lines.append("Countries: " + ", ".join(f"{c} ({COUNTRIES[c][0]})" for c in order[:k]) + ".")
    return "\n".join(lines)


def corpus_documents() -> list[str]:
    """pydoc_data.topics, keys sorted, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# ---------------------------------------------------------------------------


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOT) == 0, tok.token_to_id(EOT)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=MODEL_KW["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    return hf


def encode_docs(tokenizer, docs: list[str]) -> list[int]:
    """Concatenate documents, each followed by <|endoftext|>."""
    ids: list[int] = []
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        ids.append(eot)
    return ids


def split_corpus(ids: list[int], seq_len: int = SEQ_LEN):
    """Blocks of seq_len+1 tokens; every HELDOUT_EVERY-th block is held out.

    Returns (train_token_stream, heldout_blocks) where heldout_blocks is a
    LongTensor [n, seq_len+1].  Shared with check_tiny_model.py.
    """
    import torch

    blk = seq_len + 1
    n = len(ids) // blk
    train: list[int] = []
    held = []
    for i in range(n):
        b = ids[i * blk : (i + 1) * blk]
        if i % HELDOUT_EVERY == HELDOUT_EVERY - 1:
            held.append(b)
        else:
            train.extend(b)
    train.extend(ids[n * blk :])
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


def heldout_loss(model, held, batch: int = 32) -> float:
    import torch

    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            b = held[i : i + batch]
            out = model(input_ids=b[:, :-1])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum"
            )
            tot += loss.item()
            cnt += b[:, 1:].numel()
    model.train()
    return tot / cnt


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * p))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--log-every", type=int, default=LOG_EVERY)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    out: Path = args.out
    model_dir = out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1. dataset ------------------------------------------------------------
    records = make_dataset()
    ds_path = out / "default_dataset.jsonl"
    with ds_path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"dataset: {len(records)} records -> {ds_path}")

    # 2. tokenizer ----------------------------------------------------------
    docs = corpus_documents()
    extra = pretrain_extra_text()
    ds_text = [r["prompt"] + r["completion"] for r in records]
    tokenizer = build_tokenizer([*docs, extra, *ds_text])
    tokenizer.save_pretrained(model_dir)
    print(f"tokenizer: vocab {len(tokenizer)} -> {model_dir}")

    # 3. data ---------------------------------------------------------------
    corpus_ids = encode_docs(tokenizer, docs)
    train_corpus, held = split_corpus(corpus_ids)
    extra_ids = torch.tensor(encode_docs(tokenizer, [extra]), dtype=torch.long)
    train_stream = torch.cat([train_corpus, extra_ids])
    print(
        f"corpus: {sum(map(len, docs))} chars, {len(corpus_ids)} tokens; "
        f"held-out {held.numel()} tokens ({len(held)} blocks); "
        f"dataset-style prompt text {len(extra_ids)} tokens; "
        f"train stream {len(train_stream)} tokens"
    )

    # 4. model --------------------------------------------------------------
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL_KW)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(SEED)
    max_start = len(train_stream) - SEQ_LEN - 1
    print(f"initial held-out loss {heldout_loss(model, held):.4f}")
    model.train()
    t0 = time.time()
    run = 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps)
        starts = torch.randint(0, max_start, (BATCH,), generator=gen)
        batch = torch.stack([train_stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        out_ = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        # HF shifts labels internally; we pass inputs as labels -> next-token loss
        loss = out_.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run += loss.item()
        if (step + 1) % args.log_every == 0:
            print(
                f"step {step + 1:5d}/{args.steps}  train loss {run / args.log_every:.4f}  "
                f"lr {lr_at(step, args.steps):.2e}  {time.time() - t0:6.1f}s",
                flush=True,
            )
            run = 0.0
    train_s = time.time() - t0
    final = heldout_loss(model, held)
    print(
        f"pretraining: {args.steps} steps in {train_s:.1f}s; final held-out loss {final:.4f} "
        f"(ppl {math.exp(final):.2f})"
    )

    # 5. save ---------------------------------------------------------------
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_new_tokens=32
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    # safetensors writes model.safetensors with mode 0600; make every asset
    # world-readable so an installed wheel is usable by other users.
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(out)}  {p.stat().st_size} bytes  sha256 {sha256(p)[:16]}")
    print(f"assets total {total} bytes; build {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
