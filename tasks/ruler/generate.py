"""RULER's synthetic-task generators, ported from NVIDIA/RULER's scripts so that each (task, length, seed)
gives the samples RULER's ``scripts/data/prepare.py`` writes with ``--model_template_type base``.

Source: NVIDIA/RULER at commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a, Copyright (c) 2024 NVIDIA CORPORATION,
Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0):

* ``scripts/data/synthetic/constants.py`` (``TASKS``: templates, answer prefixes, tokens to generate),
  copied character for character into :data:`TEMPLATES`;
* ``scripts/synthetic.yaml`` (the 13 task configurations), copied into :data:`CONFIGS`;
* ``scripts/data/synthetic/niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``,
  ``freq_words_extraction.py``, ``qa.py``: ``generate_input_output`` and the sample loops below follow them
  line by line, with the same random calls in the same order (RULER seeds the global ``random`` and
  ``np.random`` once per task and length; here one ``random.Random(seed)`` and one
  ``np.random.RandomState(seed)`` per (task, length) stand for them, which draw the same numbers);
* ``scripts/data/prepare.py``: the prompt is ``model_template.format(task_template=template) +
  answer_prefix`` and the seed of chunk 0 is ``--random_seed`` (default 42).

What differs, and why:

* Token counts. RULER counts ``tokenizer.tokenize(text)`` of the whole prompt (model template included)
  plus ``tokens_to_generate`` against ``max_seq_length``. Here :class:`Tokens` counts the ids the model is
  fed: the task text split at its answer prefix, the part before it wrapped as one user turn of the
  tokenizer's chat template where chat is on (the answer prefix then follows the assistant marker, as
  RULER's model templates put it after ``[/INST]``), and the BOS the tokenizer adds otherwise, so prompt
  plus generated tokens never exceed the length. RULER's vt few-shot example is counted without the chat
  wrapper, as RULER counts it without the model template.
* Where even the smallest haystack does not fit, RULER's sample loop retries forever; here a
  ``ValueError`` names the task, the length and the tokens the smallest prompt needs.
* ``essay`` haystacks (Paul Graham essays in RULER; niah_single_2/3, niah_multikey_1, niah_multivalue,
  niah_multiquery) come from :class:`Haystack`: RULER's noise sentences by default (laid out as RULER's
  ``noise`` branch does), or the words of a text file laid out as RULER's ``essay`` branch does (NLTK's
  ``sent_tokenize`` where its punkt data are installed, else NLTK's untrained Punkt splitter; the one
  used is recorded). ``noise`` and ``needle`` tasks keep RULER's own haystack whatever the option says.
* cwe beyond the ~8,500 wonderwords words draws from RULER's ``json/english_words.json`` (a Git LFS file
  upstream): it is read from ``<data>/ruler/english_words.json`` and refused in one line without it.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

# scripts/data/synthetic/constants.py, TASKS (character for character)
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": """Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?""",  # noqa: E501
        "answer_prefix": """ The special magic {type_needle_v} for {query} mentioned in the provided text are""",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": """Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.""",  # noqa: E501
        "answer_prefix": """ Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: """,  # noqa: E501
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": """Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?""",  # noqa: E501
        "answer_prefix": """ Answer: The top 10 words that appear most often in the list are:""",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": """Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?""",  # noqa: E501
        "answer_prefix": """ Answer: According to the coded text above, the three most frequently appeared words are:""",  # noqa: E501
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": """Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}""",  # noqa: E501
        "answer_prefix": """ Answer:""",
    },
}


def _niah(haystack: str, k: str, v: str, nk: int = 1, nv: int = 1, nq: int = 1) -> dict[str, Any]:
    args = dict(type_haystack=haystack, type_needle_k=k, type_needle_v=v)
    return {"task": "niah", "args": {**args, "num_needle_k": nk, "num_needle_v": nv, "num_needle_q": nq}}


# scripts/synthetic.yaml
CONFIGS: dict[str, dict[str, Any]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": {"task": "variable_tracking", "args": {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}},
    "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
    "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
    "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
    "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
}

ALL_TASKS = tuple(CONFIGS)
GROUPS: dict[str, tuple[str, ...]] = {
    "all": ALL_TASKS,
    "offline": tuple(t for t in ALL_TASKS if CONFIGS[t]["task"] != "qa"),
}
DEFAULT_SEED = 42  # prepare.py --random_seed
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = list(np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))


def tokens_to_generate(task: str) -> int:
    return TEMPLATES[CONFIGS[task]["task"]]["tokens_to_generate"]


def full_template(task: str) -> str:
    """prepare.py's template for the ``base`` model template: task template + answer prefix."""
    t = TEMPLATES[CONFIGS[task]["task"]]
    return t["template"] + t["answer_prefix"]


def split_prefix(task: str, text: str) -> tuple[str, str]:
    """(input, answer_prefix) as the generators split them: at the last occurrence of the answer
    prefix's first 10 characters (``input_text.rfind(TASKS[...]['answer_prefix'][:10])``)."""
    at = text.rfind(TEMPLATES[CONFIGS[task]["task"]]["answer_prefix"][:10])
    return text[:at], text[at:]


# --------------------------------------------------------------------------------------------
# Counting tokens, haystacks
# --------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Token counts in the target model's tokenizer: ``fed`` for a whole task text (what the model
    reads: chat-wrapped input + answer prefix, or the plain text with the tokenizer's special tokens),
    ``raw`` for a piece of text (``tokenizer.tokenize``, RULER's ``text_to_tokens``)."""

    tokenizer: Any
    chat: bool = False

    def render(self, task: str, text: str) -> tuple[str, bool]:
        """(prompt text, holds its special tokens) for a full task text."""
        if not self.chat:
            return text, False
        body, prefix = split_prefix(task, text)
        messages = [{"role": "user", "content": body}]
        wrapped = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return wrapped + prefix, True

    def ids(self, task: str, text: str) -> list[int]:
        prompt, special = self.render(task, text)
        return self.tokenizer(prompt, add_special_tokens=not special, verbose=False).input_ids

    def fed(self, task: str, text: str) -> int:
        return len(self.ids(task, text))

    def raw(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


@dataclass
class Haystack:
    """What replaces RULER's ``essay`` haystack: ``"noise"`` or the text of a file (its words)."""

    spec: str = "noise"
    words: list[str] | None = None  # the file's words, re.sub(r'\s+', " ", text).split(" ")
    splitter: str = ""

    @classmethod
    def load(cls, spec: str) -> Haystack:
        if spec == "noise":
            return cls()
        text = Path(spec).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"ruler: haystack file {spec} is empty")
        return cls(spec, re.sub(r"\s+", " ", text).split(" "), _splitter()[0])

    def kind(self, task: str) -> str:
        """The haystack layout a task uses: RULER's, with ``essay`` -> ``noise`` unless a file is given."""
        kind = CONFIGS[task]["args"].get("type_haystack", "")
        return "noise" if kind == "essay" and self.words is None else kind


@cache
def _splitter() -> tuple[str, Callable[[str], list[str]]]:
    """NLTK's ``sent_tokenize`` (RULER's) where punkt data are installed, else untrained Punkt."""
    import nltk

    try:
        nltk.sent_tokenize("A b. C d.")
        return "nltk.sent_tokenize", nltk.sent_tokenize
    except LookupError:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        return "nltk PunktSentenceTokenizer (untrained: no punkt data)", PunktSentenceTokenizer().tokenize


@cache
def _wonderwords() -> tuple[list[str], list[str], list[str]]:
    from wonderwords import random_word

    get = random_word._get_words_from_text_file  # as RULER reads them
    return get("nounlist.txt"), get("adjectivelist.txt"), get("verblist.txt")


@cache
def niah_words() -> list[str]:
    nouns, adjs, _ = _wonderwords()
    return sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    task: str
    length: int
    index: int
    input: str  # the task text before the answer prefix (base model template)
    answer_prefix: str
    outputs: list[str]
    length_tokens: int  # prompt tokens fed + tokens_to_generate (RULER's "length")
    haystack_size: int  # the haystack count the sample was made with (sentences, words, documents)
    extra: dict[str, Any] = field(default_factory=dict)


class TooShort(ValueError):
    pass


def _too_short(task: str, length: int, need: int) -> TooShort:
    return TooShort(
        f"ruler {task}: length {length} is too short: its smallest prompt needs {need} tokens "
        f"(with {tokens_to_generate(task)} to generate)"
    )


def binary_search(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """RULER's search for the largest haystack size that fits (None: not even ``lo``)."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


class Generator:
    """One (task, length) of RULER: ``samples(n)`` gives its first n samples, the same for every n."""

    def __init__(
        self,
        task: str,
        length: int,
        seed: int,
        tokens: Tokens,
        haystack: Haystack | None = None,
        qa: tuple[list[dict[str, Any]], list[str]] | None = None,
        extra_words: list[str] | None = None,
    ):
        self.task, self.length, self.seed, self.tok = task, length, seed, tokens
        self.haystack = haystack or Haystack()
        self.family = CONFIGS[task]["task"]
        self.args = dict(CONFIGS[task]["args"])
        self.ttg = tokens_to_generate(task)
        self.template = full_template(task)
        self.qa = qa
        self.extra_words = extra_words
        self.rng = random.Random(seed)  # random.seed(args.random_seed)
        self.nprng = np.random.RandomState(seed)  # np.random.seed(args.random_seed)
        self._made: list[Sample] = []
        self._state: dict[str, Any] | None = None

    def fed(self, text: str) -> int:
        return self.tok.fed(self.task, text)

    def samples(self, n: int) -> list[Sample]:
        if self._state is None:
            self._state = getattr(self, f"_setup_{self.family}")()
        while len(self._made) < n:
            self._made.append(getattr(self, f"_sample_{self.family}")(len(self._made)))
        return self._made[:n]

    def _finish(self, index: int, text: str, length: int, size: int, outputs: list[str], **extra: Any) -> Sample:
        body, prefix = split_prefix(self.task, text)
        return Sample(self.task, self.length, index, body, prefix, list(outputs), length, size, extra)

    def _fit_loop(self, start: int, step: int, make: Callable[[int], tuple[str, Any]]) -> tuple[str, Any, int, int]:
        """The sample loop: from the searched size down by ``step`` until the prompt fits."""
        used = start
        while True:
            text, answer = make(used)
            length = self.fed(text) + self.ttg
            if length <= self.length:
                return text, answer, length, used
            if used > step:
                used -= step
            else:
                raise _too_short(self.task, self.length, length)

    # ---------------------------------------------------------------- niah (scripts/data/synthetic/niah.py)

    def _setup_niah(self) -> dict[str, Any]:
        a = self.args
        a["num_needle_k"] = max(a["num_needle_k"], a["num_needle_q"])
        kind = self.haystack.kind(self.task)
        if kind == "essay":
            incremental = 500
        else:
            incremental = 25
        if kind != "essay" and self.length < 4096:
            incremental = 5
        sample_text, _ = self._niah_io(incremental)
        per = (self.fed(sample_text)) / incremental
        estimated = int((self.length / per) * 3)
        best = binary_search(
            incremental,
            max(estimated, incremental * 2),
            lambda n: self.fed(self._niah_io(n)[0]) + self.ttg <= self.length,
        )
        return {"kind": kind, "incremental": incremental, "num": best if best is not None else incremental}

    def _random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return self.rng.choice(niah_words())
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        raise NotImplementedError(kind)

    def _niah_io(self, num_haystack: int) -> tuple[str, list[str]]:
        a, rng = self.args, self.rng
        kind = self._state["kind"] if self._state else self.haystack.kind(self.task)
        keys, values, needles = [], [], []
        for _ in range(a["num_needle_k"]):
            keys.append(self._random(a["type_needle_k"]))
            value = []
            for _ in range(a["num_needle_v"]):
                value.append(self._random(a["type_needle_v"]))
                needles.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)

        if kind == "essay":
            hay = self.haystack.words
            if num_haystack <= len(hay):
                text = " ".join(hay[:num_haystack])
            else:
                repeats = (num_haystack + len(hay) - 1) // len(hay)
                text = " ".join((hay * repeats)[:num_haystack])
            sents = _splitter()[1](text.strip())
            positions = (
                [0]
                + sorted([int(len(sents) * (depth / 100)) for depth in rng.sample(DEPTHS, len(needles))])
                + [len(sents)]
            )
            parts = []
            for i in range(1, len(positions)):
                parts.append(" ".join(sents[positions[i - 1] : positions[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if kind == "noise":
                sentences = [NOISE] * num_haystack
            else:  # needle
                sentences = [
                    NEEDLE.format(
                        type_needle_v=a["type_needle_v"],
                        key=self._random(a["type_needle_k"]),
                        value=self._random(a["type_needle_v"]),
                    )
                    for _ in range(num_haystack)
                ]
            indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for index, element in zip(indexes, needles, strict=False):
                sentences.insert(index, element)
            context = "\n".join(sentences)

        indices = rng.sample(range(a["num_needle_k"]), a["num_needle_q"])
        queries = [keys[i] for i in indices]
        answers = [x for i in indices for x in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_needle_v = self.template, a["type_needle_v"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:
            template = template.replace("Some", "A")
            template = template.replace("are all", "is")
            template = template.replace("are", "is")
            template = template.replace("answers", "answer")
            type_needle_v = type_needle_v[:-1]
        return template.format(type_needle_v=type_needle_v, context=context, query=query), answers

    def _sample_niah(self, index: int) -> Sample:
        st = self._state
        text, answers, length, used = self._fit_loop(st["num"], st["incremental"], self._niah_io)
        body, _ = split_prefix(self.task, text)
        pos = body.find(answers[0])
        depth = pos / max(1, len(body))
        return self._finish(
            index, text, length, used, answers, haystack_type=st["kind"], answer_char=pos, answer_depth=depth
        )

    # ------------------------------------------- variable tracking (scripts/data/synthetic/variable_tracking.py)

    def _vt_chains(self, num_chains: int, num_hops: int, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        rng = self.rng
        k = 5 if not is_icl else 3
        num_hops = num_hops if not is_icl else min(10, num_hops)
        vars_all = [
            "".join(rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range((num_hops + 1) * num_chains)
        ]
        while len(set(vars_all)) < num_chains * (num_hops + 1):
            vars_all.append("".join(rng.choices(string.ascii_uppercase, k=k)).upper())
        vars_ret, chains_ret = [], []
        for i in range(0, len(vars_all), num_hops + 1):
            this_vars = vars_all[i : i + num_hops + 1]
            vars_ret.append(this_vars)
            if is_icl:
                chain = [f"VAR {this_vars[0]} = 12345"]
            else:
                chain = [f"VAR {this_vars[0]} = {str(self.nprng.randint(10000, 99999))}"]
            for j in range(num_hops):
                chain.append(f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} ")
            chains_ret.append(chain)
        return vars_ret, chains_ret

    def _vt_io(self, num_noises: int, is_icl: bool) -> tuple[str, list[str]]:
        num_chains, num_hops = self.args["num_chains"], self.args["num_hops"]
        variables, chains = self._vt_chains(num_chains, num_hops, is_icl)
        value = chains[0][0].split("=")[-1].strip()
        sentences = [NOISE] * num_noises  # vt's haystack is noise in synthetic.yaml
        for chain in chains:
            positions = sorted(self.rng.sample(range(len(sentences)), len(chain)))
            for insert_pi, j in zip(positions, range(len(chain)), strict=True):
                sentences.insert(insert_pi + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        return self.template.format(context=context, query=value, num_v=num_hops + 1), variables[0]

    def _randomize_icl(self, icl_example: str) -> str:
        for item in icl_example.strip().split()[-self.args["num_hops"] - 1 :]:
            new_item = "".join(self.rng.choices(string.ascii_uppercase, k=len(item))).upper()
            icl_example = icl_example.replace(item, new_item)
        return icl_example.replace("12345", str(self.nprng.randint(10000, 99999)))

    def _setup_variable_tracking(self) -> dict[str, Any]:
        # main(): the few-shot example (num_samples=1, max_seq_length=500, add_fewshot=True, icl_example=None)
        inc = 5
        text, _ = self._vt_io(inc, True)
        per = self.tok.raw(text) / inc
        estimated = int((500 / per) * 3)
        best = binary_search(inc, max(estimated, inc * 2), lambda n: self.tok.raw(self._vt_io(n, True)[0]) <= 500)
        used = best if best is not None else inc
        while True:
            icl_text, icl_answer = self._vt_io(used, True)
            if self.tok.raw(icl_text) <= 500:
                break
            if used > inc:
                used -= inc
            else:
                raise ValueError("ruler vt: the few-shot example does not fit 500 tokens in this tokenizer")
        icl_example = icl_text + " " + " ".join(icl_answer) + "\n"
        # the task's samples (icl_example given, final_output=True)
        inc = 5 if self.length < 4096 else 10
        example_tokens = self.tok.raw(icl_example)
        text, _ = self._vt_io(inc, False)
        per = self.fed(text) / inc
        estimated = int((self.length / per) * 3)
        best = binary_search(
            inc,
            max(estimated, inc * 2),
            lambda n: self.fed(self._vt_io(n, False)[0]) + example_tokens + self.ttg <= self.length,
        )
        return {"icl": icl_example, "incremental": inc, "num": best if best is not None else inc}

    def _sample_variable_tracking(self, index: int) -> Sample:
        st = self._state
        cut = TEMPLATES["variable_tracking"]["template"][:20]

        def make(n: int) -> tuple[str, list[str]]:
            text, answer = self._vt_io(n, False)
            cutoff = text.index(cut)
            return text[:cutoff] + self._randomize_icl(st["icl"]) + "\n" + text[cutoff:], answer

        text, answer, length, used = self._fit_loop(st["num"], st["incremental"], make)
        return self._finish(index, text, length, used, answer, haystack_type="noise")

    # ------------------------------------- common words (scripts/data/synthetic/common_words_extraction.py)

    def _setup_common_words_extraction(self) -> dict[str, Any]:
        nouns, adjs, verbs = _wonderwords()
        words = sorted(set(nouns + adjs + verbs))
        random.Random(self.seed).shuffle(words)
        self._cwe_words = words
        text, _ = self._cwe_io(4096)
        per = self.fed(text) / 4096
        estimated = int(self.length // per) * 2
        inc = 10
        best = binary_search(
            inc, max(estimated, inc * 2), lambda n: self.fed(self._cwe_io(n)[0]) + self.ttg <= self.length
        )
        return {"incremental": inc, "num": best if best is not None else inc}

    def _cwe_example(self, num_words: int, common_repeats: int, uncommon_repeats: int, common_nums: int):
        if num_words <= len(self._cwe_words):
            full = self.rng.sample(self._cwe_words, num_words)
        else:
            if self.extra_words is None:
                raise ValueError(
                    f"ruler cwe: length {self.length} needs more than the {len(self._cwe_words)} wonderwords "
                    "words: RULER's scripts/data/synthetic/json/english_words.json is read from "
                    "<data>/ruler/english_words.json, not found"
                )
            full = self.rng.sample(self.extra_words, num_words)
        common, uncommon = full[:common_nums], full[common_nums:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(word_list)
        return " ".join([f"{i + 1}. {word}" for i, word in enumerate(word_list)]), common

    def _cwe_io(self, num_words: int) -> tuple[str, list[str]]:
        a = self.args
        shots = []
        if self.length < 4096:
            for _ in range(1):  # num_fewshot
                shots.append(self._cwe_example(20, 3, 1, a["num_cw"]))
            context, answer = self._cwe_example(num_words, 6, 1, a["num_cw"])
        else:
            for _ in range(1):
                shots.append(self._cwe_example(40, 10, 3, a["num_cw"]))
            context, answer = self._cwe_example(num_words, a["freq_cw"], a["freq_ucw"], a["num_cw"])
        shot_texts = [
            self.template.format(num_cw=a["num_cw"], context=c, query="")
            + " "
            + " ".join([f"{i + 1}. {word}" for i, word in enumerate(ans)])
            for c, ans in shots
        ]
        text = self.template.format(num_cw=a["num_cw"], context=context, query="")
        return "\n".join(shot_texts) + "\n" + text, answer

    def _sample_common_words_extraction(self, index: int) -> Sample:
        st = self._state
        text, answer, length, used = self._fit_loop(st["num"], st["incremental"], self._cwe_io)
        return self._finish(index, text, length, used, answer)

    # ----------------------------------------- frequent words (scripts/data/synthetic/freq_words_extraction.py)

    def _fwe_io(self, max_len: int, num_words: int, vocab_size: int, incremental: int) -> tuple[str, list[str], int]:
        coded_wordlen, alpha = 6, float(self.args["alpha"])
        vocab = ["".join(self.rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(self.rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # treat the top ranked as noise

        def gen_text(n: int) -> tuple[str, list[str]]:
            k = np.arange(1, len(vocab) + 1)
            counts = n * (k**-alpha) / _zeta(alpha)
            words = [x for w, zi in zip(vocab, counts.astype(int), strict=True) for x in [w] * zi]
            random.Random(self.seed).shuffle(words)
            return self.template.format(context=" ".join(words), query=""), vocab[1:4]

        if num_words > 0:
            text, answer = gen_text(num_words)
            while self.fed(text) > max_len:
                num_words -= incremental
                if num_words <= 0:
                    raise _too_short(self.task, self.length, self.fed(gen_text(0)[0]) + self.ttg)
                text, answer = gen_text(num_words)
        else:
            num_words = max_len // coded_wordlen
            text, answer = gen_text(num_words)
            while self.fed(text) < max_len:
                num_words += incremental
                text, answer = gen_text(num_words)
            num_words -= incremental
        text, answer = gen_text(num_words)
        return text, answer, num_words

    def _setup_freq_words_extraction(self) -> dict[str, Any]:
        max_len = self.length - self.ttg
        vocab_size = max_len // 50
        if vocab_size < 4:
            raise _too_short(self.task, self.length, 4 * 50 + self.ttg)
        _, _, n = self._fwe_io(max_len, -1, vocab_size, max(1, max_len // 32))
        return {"max_len": max_len, "vocab_size": vocab_size, "num": n}

    def _sample_freq_words_extraction(self, index: int) -> Sample:
        st = self._state
        text, answer, n = self._fwe_io(st["max_len"], st["num"], st["vocab_size"], max(1, st["max_len"] // 32))
        return self._finish(index, text, self.fed(text) + self.ttg, n, answer)

    # --------------------------------------------------------------------- qa (scripts/data/synthetic/qa.py)

    def _qa_io(self, index: int, num_docs: int) -> tuple[str, list[str]]:
        qas, docs = self.qa
        q = qas[index]
        curr_docs, curr_more = q["context"], q.get("more_context", [])
        if num_docs < len(docs):
            if (num_docs - len(curr_docs)) > len(curr_more):
                taken = set(curr_docs + curr_more)
                addition = [i for i in range(len(docs)) if i not in taken]
                picked = (
                    curr_docs
                    + curr_more
                    + self.rng.sample(addition, max(0, num_docs - len(curr_docs) - len(curr_more)))
                )
            else:
                picked = curr_docs + self.rng.sample(curr_more, num_docs - len(curr_docs))
            all_docs = [docs[i] for i in picked]
        else:
            repeats = (num_docs + len(docs) - 1) // len(docs)
            all_docs = (docs * repeats)[:num_docs]
        random.Random(self.seed).shuffle(all_docs)
        context = "\n\n".join([f"Document {i + 1}:\n{d}" for i, d in enumerate(all_docs)])
        return self.template.format(context=context, query=q["query"]), q["outputs"]

    def _setup_qa(self) -> dict[str, Any]:
        if self.qa is None:
            raise ValueError(f"ruler {self.task}: no QA data loaded")
        inc = 10
        text, _ = self._qa_io(0, inc)
        per = self.fed(text) / inc
        estimated = int((self.length / per) * 3)
        best = binary_search(
            inc, max(estimated, inc * 2), lambda n: self.fed(self._qa_io(0, n)[0]) + self.ttg <= self.length
        )
        return {"incremental": inc, "num": best if best is not None else inc}

    def _sample_qa(self, index: int) -> Sample:
        st = self._state
        if index >= len(self.qa[0]):
            raise ValueError(f"ruler {self.task}: {index + 1} samples asked, the data hold {len(self.qa[0])} questions")
        text, answer, length, used = self._fit_loop(st["num"], st["incremental"], lambda n: self._qa_io(index, n))
        return self._finish(index, text, length, used, answer)


@cache
def _zeta(alpha: float) -> float:
    try:
        from scipy.special import zeta

        return float(zeta(alpha))
    except ImportError:  # the Riemann zeta function: closed form at 2 (RULER's alpha), else a partial sum + tail
        if alpha == 2.0:
            return float(np.pi**2 / 6)
        n = 100000
        return float(sum(k**-alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1))
