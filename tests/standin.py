"""Stand-ins for the shared mirror on a machine that has none (a user's fresh clone).

``standin_model(folder)``: a Llama of stories260K's exact shape (dim 64, 5 layers, 8 heads, 4 KV
heads, head_dim 8, vocab 512, context 512, tied embeddings) with a byte-level BPE tokenizer trained
here, the model trained for a few hundred steps on the text below (seconds on a CPU): a real, small,
deterministic language model, so quantization visibly hurts it and fp16 paths can be compared.

``standin_data(folder)``: the mirror's layout (``wikitext-2-raw/wiki.test.raw``,
``wikitext-2/valid.txt``, ``longbench/{trec,samsum,qasper}.jsonl``, ``lm-eval/*.jsonl`` in the
llm-foundry layout, ``lm-eval/hellaswag.jsonl`` in the hub's) filled with text generated here.

Everything is written by this module (no third-party text; the project's licence).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Zoe", "Leo"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fish", "bear"]
THINGS = ["ball", "kite", "box", "hat", "cake", "book", "car", "flower", "toy", "boat"]
PLACES = ["park", "garden", "house", "school", "forest", "beach", "river", "farm"]
COLORS = ["red", "blue", "green", "big", "small", "shiny", "old", "happy"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "excited"]


def story(rng: random.Random) -> str:
    """One short story of a fixed grammar (subject, place, object, feeling)."""
    n, a, t, p = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS), rng.choice(PLACES)
    c, f, m = rng.choice(COLORS), rng.choice(FEELINGS), rng.choice(NAMES)
    parts = [
        f"Once upon a time there was a little {a} named {n} .",
        f"{n} loved to play in the {p} with a {c} {t} .",
        f"One day {n} lost the {t} and felt {f} .",
        f"{m} came to the {p} and helped {n} look for the {t} .",
        f"They found the {t} under a tree and they were {rng.choice(FEELINGS)} .",
        f"The {a} said thank you to {m} and they played all day .",
    ]
    return " ".join(parts[: rng.randint(4, 6)])


def corpus(n_stories: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(n_stories)]


def wikitext_file(stories: list[str]) -> str:
    """The raw release's layout: a title line, then paragraphs separated by blank (" ") lines."""
    lines = [" = The Little Stories = ", " "]
    for s in stories:
        lines += [" " + s + " ", " "]
    return "\n".join(lines) + "\n"


def standin_data(root: Path) -> Path:
    """Write the mirror's layout under ``root`` (see the module docstring); returns ``root``."""
    (root / "wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(wikitext_file(corpus(900, seed=1)))
    (root / "wikitext-2").mkdir(exist_ok=True)
    (root / "wikitext-2" / "valid.txt").write_text(wikitext_file(corpus(900, seed=2)))
    rng = random.Random(3)
    lb = root / "longbench"
    lb.mkdir(exist_ok=True)
    classes = ["Animal", "Place", "Thing", "Person"]
    rows = {
        "trec": [
            {
                "input": f"What did {rng.choice(NAMES)} find ?",
                "context": "\n".join(
                    f"Question: Where is the {rng.choice(THINGS)} ?\nType: {rng.choice(classes)}" for _ in range(30)
                ),
                "answers": [rng.choice(classes)],
                "all_classes": classes,
            }
            for _ in range(3)
        ],  # fmt: skip
        "samsum": [
            {
                "input": f"{rng.choice(NAMES)}: I lost my {rng.choice(THINGS)} .\n{rng.choice(NAMES)}: I will help .",
                "context": "\n\n".join(f"Dialogue: {story(rng)}\nSummary: {story(rng)[:60]}" for _ in range(6)),
                "answers": ["They look for the toy ."],
                "all_classes": None,
            }
            for _ in range(3)
        ],  # fmt: skip
        "qasper": [
            {
                "input": f"What did {rng.choice(NAMES)} lose ?",
                "context": " ".join(story(rng) for _ in range(12)),
                "answers": ["a ball"],
                "all_classes": None,
            }
            for _ in range(3)
        ],  # fmt: skip
    }
    for ds, items in rows.items():
        with open(lb / f"{ds}.jsonl", "w") as f:
            for i, r in enumerate(items):
                row = {"_id": f"{ds}-{i}", "dataset": ds, "language": "en", "length": len(r["context"].split()), **r}
                f.write(json.dumps(row) + "\n")
    le = root / "lm-eval"
    le.mkdir(exist_ok=True)

    def mc(query: str, choices: list[str], gold: int) -> dict:
        return {"query": query, "choices": choices, "gold": gold}

    def things(k: int) -> list[str]:
        return rng.sample(THINGS, k)

    files = {
        "piqa": [mc(f"Question: How do I find a lost {t[0]}?\n", [f"Look under the {p}.", "Eat the sky."], 0)
                 for t, p in ((things(1), rng.choice(PLACES)) for _ in range(12))],
        "arc_easy": [mc(f"Question: Which one is a {rng.choice(['toy', 'animal'])}?", things(4), rng.randrange(4))
                     for _ in range(12)],
        "arc_challenge": [mc(f"Question: What does a {rng.choice(ANIMALS)} like?", things(4), rng.randrange(4))
                          for _ in range(12)],
        "openbook_qa": [mc(f"The {rng.choice(ANIMALS)} went to the", rng.sample(PLACES, 4), rng.randrange(4))
                        for _ in range(12)],
        "boolq": [mc(f"Passage: {story(rng)}\nQuestion: did they find the {rng.choice(THINGS)}?", ["no", "yes"],
                     rng.randrange(2)) for _ in range(12)],
        "copa": [mc(f"{n} lost the {t}, {w}", [f"{n} felt sad.", f"{n} found a {rng.choice(THINGS)}."],
                    rng.randrange(2))
                 for n, t, w in ((rng.choice(NAMES), rng.choice(THINGS), rng.choice(["because", "therefore"]))
                                 for _ in range(12))],
    }  # fmt: skip
    for name, items in files.items():
        (le / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    with open(le / "hellaswag.jsonl", "w") as f:
        for i in range(12):
            n = rng.choice(NAMES)
            row = {"ind": i, "activity_label": "Playing", "ctx_a": f"{n} is in the {rng.choice(PLACES)}.",
                   "ctx_b": "she then", "split": "val", "split_type": "indomain", "label": rng.randrange(4),
                   "endings": [f"plays with a {t}." for t in things(4)], "source_id": f"standin-{i}"}  # fmt: skip
            row["ctx"] = row["ctx_a"] + " " + row["ctx_b"]
            f.write(json.dumps(row) + "\n")
    return root


def standin_model(folder: Path, steps: int = 150, seed: int = 0) -> Path:
    """Train and save the stand-in model and tokenizer (see the module docstring); returns ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = corpus(3000, seed=10)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)  # fmt: skip
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(fast(" ".join(text)).input_ids)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - 129, (8,), generator=g)
        batch = torch.stack([ids[s : s + 128] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
