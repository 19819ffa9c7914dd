"""Demo data from real corpora that ship inside PyPI packages, so `make demo` runs offline.

    python -m rlhf_cli.demo.prepare data/demo --seed 0

Writes into OUT_DIR (every file atomically):

    pretrain.jsonl                          {"text"}                     chitchat conversations
    sft.jsonl, sft_eval.jsonl               {"messages": [user, assistant]}  chatterbot-corpus Q/A pairs
    preferences.jsonl, preferences_eval.jsonl   {"prompt", "chosen", "rejected"}  chitchat, by human rating
    prompts.jsonl, prompts_eval.jsonl       {"prompt"}                   chitchat starters + chatterbot questions
    manifest.json                           sources (package==version, license), counts, seed, sizes

Held-out files never share a prompt with training files: preference pairs are split by chitchat starter
prompt, SFT pairs by question, and pretraining leaves out every chat under a held-out starter.
The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.demo.assets import package_dir
from rlhf_cli.errors import DataError, RlhfError
from rlhf_cli.runs import atomic_write_json, atomic_write_text

# Defaults size the demo (a few minutes per stage on a CPU); tests pass tiny values.
DEFAULT_SIZES: dict[str, int | None] = {
    "pretrain": 1000,
    "sft": None,  # None: every chatterbot pair not held out (about 1,070)
    "sft_eval": 100,
    "preferences": 1500,
    "preferences_eval": 200,
    "prompts": 256,
    "prompts_eval": 40,  # what is there: 6 held-out starters + held-out conversational questions
}
HELDOUT_STARTERS = 6  # of the 34 chitchat starter prompts
# Points on the 1-10 scale between chosen and rejected. At 4 the pairs differ visibly in their openings
# (see response_text); at 2 a LoRA reward model on SmolLM2-135M stayed at chance on held-out starters.
MIN_GAP = 4.0
MAX_RESPONSE_CHARS = 400
MAX_DOC_CHARS = 2000  # pretraining documents; long chats would otherwise dominate the token count
MAX_USES = 3  # pairs one conversation may appear in, so a few chats cannot dominate the preference set

RATING_KEYS = ("interesting", "upbeat", "witty")
# chatterbot files whose lists are one dialogue (each line answers the previous one), not a question
# followed by alternative answers: only their first exchange is a Q/A pair.
DIALOGUE_FILES = frozenset({"conversations", "health"})
# Categories with one factual answer per question. They stay in SFT but give no PPO or eval prompts: a reward
# model trained on chitchat ratings, and a sentiment check, have nothing to say about a trivia answer.
FACTUAL_FILES = frozenset({"trivia", "tech_support", "coding"})

SOURCES = (
    ("chitchat-dataset", "MIT", "https://github.com/BYU-PCCL/chitchat-dataset",
     "pretrain, preferences, prompts (starter prompts and 1-10 human ratings)"),
    ("chatterbot-corpus", "BSD", "https://github.com/gunthercox/chatterbot-corpus",
     "sft, prompts (English question/answer pairs)"),
    ("vadersentiment", "MIT", "https://github.com/cjhutto/vaderSentiment",
     "rlhf_cli.demo.rewards:vader_sentiment, an independent rule-based check of responses"),
)


def norm_key(text: str) -> str:
    """Case- and punctuation-blind key, so "What is AI?" and "what is ai" count as one prompt."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def _clean(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- chitchat


@dataclass(frozen=True)
class Conversation:
    """One chitchat conversation.

    In dataset.json each conversation is {"prompt", "ratings", "start", "messages"}: `prompt` is the starter
    prompt shown to both people (missing in 239 chats), `ratings` is {"interesting", "upbeat", "witty"} on
    1-10 (missing in 1,180), and `messages` is a list of turns, each a list of {"sender", "text",
    "timestamp"} utterances from one sender.
    """

    id: str
    prompt: str
    turns: tuple[str, ...]  # one string per turn: that sender's utterances joined by spaces
    utterances: tuple[str, ...]
    senders: int
    ratings: tuple[int, int, int] | None  # (interesting, upbeat, witty)

    @property
    def score(self) -> float | None:
        return sum(self.ratings) / 3 if self.ratings else None


@lru_cache(maxsize=2)
def load_chitchat(path: Path | None = None) -> tuple[Conversation, ...]:
    """All conversations, sorted by id so that the order does not depend on the file's key order."""
    path = Path(path) if path else package_dir("chitchat_dataset") / "dataset.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the chitchat dataset ({e})") from None
    out = []
    for cid in sorted(raw):
        conv = raw[cid]
        turns, utterances, senders = [], [], set()
        for turn in conv.get("messages") or []:
            texts = [_clean(str(u.get("text", ""))) for u in turn]
            texts = [t for t in texts if t]
            senders.update(u.get("sender") for u in turn)
            if texts:
                turns.append(" ".join(texts))
                utterances.extend(texts)
        r = conv.get("ratings") or {}
        try:
            ratings = tuple(int(r[k]) for k in RATING_KEYS)
        except (KeyError, TypeError, ValueError):
            ratings = None  # unrated (1,180 chats) or a rating that is not a number
        out.append(Conversation(cid, _clean(conv.get("prompt") or ""), tuple(turns), tuple(utterances),
                                len(senders), ratings))
    return tuple(out)


def join_within(lines: tuple[str, ...] | list[str], max_chars: int) -> str:
    """Whole lines, one per line of text, as many as fit in max_chars ("" when the first does not)."""
    out = ""
    for line in lines:
        joined = f"{out}\n{line}" if out else line
        if len(joined) > max_chars:
            break
        out = joined
    return out


def response_text(conv: Conversation, max_chars: int = MAX_RESPONSE_CHARS) -> str:
    """The opening of a chat as one response: whole turns, one per line, up to max_chars.

    The ratings judge the whole chat, but a reward model sees only this window, so the pair has to differ in
    something visible there. With a rating gap of 4 or more (the default) the chosen opening is longer in 68%
    of the training pairs and 66% of the held-out ones, and has the higher VADER score in 61% / 58% (at a gap
    of 2: 61% / 55% longer, 57% / 54% more positive): chats that people rated well get going and stay
    friendly within the first few turns. Cutting both sides to the same length leaves the sentiment cue
    close to noise, so we keep whole turns and accept the length cue (generation length is bounded by
    max_new_tokens anyway).
    """
    out = join_within(conv.turns, max_chars)
    if not out and conv.turns:
        # A first turn longer than the cap: cut it at a word boundary.
        out = conv.turns[0][: max_chars + 1].rsplit(" ", 1)[0][:max_chars]
    return out


def rated(conv: Conversation) -> bool:
    """Usable for preferences: a starter prompt, a real rating, and two people talking.

    (5, 5, 5) is the rating form's untouched default: 2,957 of 5,988 rated chats sum to exactly 15 while
    14 and 16 have 37 and 71, so it says nothing about the chat. A chat where only one person wrote was
    never answered; its rating says the partner left, not how good the text was.
    """
    return bool(conv.prompt) and conv.ratings not in (None, (5, 5, 5)) and conv.senders >= 2 and bool(conv.turns)


def starter_prompts(convs: tuple[Conversation, ...] | list[Conversation]) -> list[str]:
    return sorted({c.prompt for c in convs if rated(c)})


def split_starters(convs: tuple[Conversation, ...] | list[Conversation], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) starter prompts; held-out ones give preference eval pairs and eval prompts."""
    starters = starter_prompts(convs)
    if not 0 < n_heldout < len(starters):
        raise DataError(f"heldout_starters={n_heldout}: choose 1..{len(starters) - 1} of the {len(starters)} starter prompts")
    random.Random(seed).shuffle(starters)
    return sorted(starters[n_heldout:]), sorted(starters[:n_heldout])


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Conversation
    rejected: Conversation
    chosen_text: str
    rejected_text: str

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen_text, "rejected": self.rejected_text}


def build_pairs(
    convs: tuple[Conversation, ...] | list[Conversation],
    starters: list[str],
    n: int,
    seed: int,
    *,
    min_gap: float = MIN_GAP,
    max_chars: int = MAX_RESPONSE_CHARS,
    max_uses: int = MAX_USES,
) -> list[Pair]:
    """Up to n pairs of chats under the same starter prompt, the higher mean rating chosen.

    Both sides answer the same prompt, so the reward model learns what made one chat better rather than
    which topic it was about. Pairs are taken round-robin over starters so that every prompt is represented
    at any n, and each chat is used in at most max_uses pairs.
    """
    rng = random.Random(seed)
    wanted = set(starters)
    groups: dict[str, list[Conversation]] = {p: [] for p in sorted(wanted)}
    for c in convs:
        if c.prompt in wanted and rated(c):
            groups[c.prompt].append(c)
    queues = []
    for prompt, group in groups.items():
        candidates = [
            (a, b) if a.score > b.score else (b, a)
            for i, a in enumerate(group)
            for b in group[i + 1 :]
            if abs(a.score - b.score) >= min_gap
        ]
        rng.shuffle(candidates)
        queues.append((prompt, candidates))

    uses: Counter[str] = Counter()
    positions = [0] * len(queues)
    out: list[Pair] = []
    progress = True
    while len(out) < n and progress:
        progress = False
        for q, (prompt, candidates) in enumerate(queues):
            while positions[q] < len(candidates) and len(out) < n:
                chosen, rejected = candidates[positions[q]]
                positions[q] += 1
                if uses[chosen.id] >= max_uses or uses[rejected.id] >= max_uses:
                    continue
                chosen_text, rejected_text = response_text(chosen, max_chars), response_text(rejected, max_chars)
                if chosen_text == rejected_text:
                    continue
                uses.update((chosen.id, rejected.id))
                out.append(Pair(prompt, chosen, rejected, chosen_text, rejected_text))
                progress = True
                break
    return out


def pretrain_docs(convs: tuple[Conversation, ...] | list[Conversation], exclude_starters: set[str], n: int | None,
                  seed: int, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """One document per chat (utterances one per line), leaving out chats under held-out starters."""
    docs = []
    for c in convs:
        if c.prompt in exclude_starters or len(c.utterances) < 2:
            continue
        text = join_within(c.utterances, max_chars)
        if text:
            docs.append(text)
    random.Random(seed).shuffle(docs)
    return docs if n is None else docs[:n]


# --------------------------------------------------------------------------- chatterbot


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    category: str  # the .yml file name without extension


@lru_cache(maxsize=2)
def load_chatterbot(folder: Path | None = None) -> tuple[QA, ...]:
    """Distinct English question/answer pairs from every category, in file order.

    A `conversations:` entry is a list whose first item is the question and whose further items are
    alternative answers (except in DIALOGUE_FILES). Entries that are not lists of strings are skipped
    (trivia.yml has one plain string).
    """
    folder = Path(folder) if folder else package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"{folder}: no chatterbot-corpus .yml files found")
    pairs: list[QA] = []
    seen: set[tuple[str, str]] = set()
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML ({e})") from None
        for entry in doc.get("conversations") or []:
            if not isinstance(entry, list) or len(entry) < 2 or not all(isinstance(x, str) for x in entry):
                continue
            question = _clean(entry[0])
            answers = entry[1:2] if path.stem in DIALOGUE_FILES else entry[1:]
            for answer in map(_clean, answers):
                key = (norm_key(question), norm_key(answer))
                # An answer that repeats the question is a copy-paste slip in the corpus, not an answer.
                if not question or not answer or key[0] == key[1] or key in seen:
                    continue
                seen.add(key)
                pairs.append(QA(question, answer, path.stem))
    return tuple(pairs)


def split_sft(pairs: tuple[QA, ...] | list[QA], n_eval: int, seed: int) -> tuple[list[QA], list[QA]]:
    """(train, eval) split by question, so no eval question has an answer in training."""
    by_question: dict[str, list[QA]] = {}
    for qa in pairs:
        by_question.setdefault(norm_key(qa.question), []).append(qa)
    keys = sorted(by_question)
    random.Random(seed).shuffle(keys)
    train: list[QA] = []
    held: list[QA] = []
    for key in keys:
        if len(held) < n_eval:
            # The last held-out question may overshoot n_eval; its extra answers are dropped, not trained on.
            held.extend(by_question[key][: n_eval - len(held)])
        else:
            train.extend(by_question[key])
    return train, held


# --------------------------------------------------------------------------- prompts


def prompt_lists(train_starters: list[str], heldout_starters: list[str], sft_train: list[QA], sft_eval: list[QA],
                 n_train: int | None, n_eval: int | None, seed: int) -> tuple[list[str], list[str]]:
    """PPO prompts and held-out eval prompts.

    Starter prompts come first because the reward model was trained on them; conversational chatterbot
    questions (not FACTUAL_FILES) fill up the rest (the policy saw them in SFT, which is how InstructGPT drew its PPO prompts). Eval prompts come
    from held-out starters and held-out SFT questions and share no key with anything trained on.
    """
    rng = random.Random(seed)

    def pick(starters: list[str], questions: list[str], n: int | None, exclude: set[str]) -> list[str]:
        out: list[str] = []
        seen = set(exclude)
        qs = sorted(set(questions))
        rng.shuffle(qs)
        for p in [*starters, *qs]:
            if norm_key(p) not in seen and (n is None or len(out) < n):
                seen.add(norm_key(p))
                out.append(p)
        rng.shuffle(out)
        return out

    def questions(pairs: list[QA]) -> list[str]:
        return [qa.question for qa in pairs if qa.category not in FACTUAL_FILES]

    train = pick(train_starters, questions(sft_train), n_train, set())
    trained_on = {norm_key(p) for p in [*train_starters, *train]} | {norm_key(qa.question) for qa in sft_train}
    held = pick(heldout_starters, questions(sft_eval), n_eval, trained_on)
    return train, held


# --------------------------------------------------------------------------- writing


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def prepare(
    out_dir: Path,
    seed: int = 0,
    *,
    pretrain: int | None = DEFAULT_SIZES["pretrain"],
    sft: int | None = DEFAULT_SIZES["sft"],
    sft_eval: int = DEFAULT_SIZES["sft_eval"],
    preferences: int = DEFAULT_SIZES["preferences"],
    preferences_eval: int = DEFAULT_SIZES["preferences_eval"],
    prompts: int | None = DEFAULT_SIZES["prompts"],
    prompts_eval: int | None = DEFAULT_SIZES["prompts_eval"],
    heldout_starters: int = HELDOUT_STARTERS,
    min_gap: float = MIN_GAP,
    max_response_chars: int = MAX_RESPONSE_CHARS,
) -> dict[str, int]:
    """Write the demo data files into out_dir and return {file name: record count}.

    Sizes are upper bounds (None: all available). The counts returned are what was written; they can fall
    short of a size when the sources run out (1,291 training and 306 held-out preference pairs at MIN_GAP=4,
    MAX_USES=3 and seed 0).
    """
    out_dir = Path(out_dir)
    convs = load_chitchat()
    train_starters, held_starters = split_starters(convs, heldout_starters, seed)
    sft_train, sft_held = split_sft(load_chatterbot(), sft_eval, seed)
    sft_train = random.Random(seed).sample(sft_train, len(sft_train) if sft is None else min(sft, len(sft_train)))
    ppo_prompts, eval_prompts = prompt_lists(train_starters, held_starters, sft_train, sft_held, prompts, prompts_eval, seed)

    def chat(qa: QA) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]}

    files: dict[str, list[dict[str, Any]]] = {
        "pretrain.jsonl": [{"text": t} for t in pretrain_docs(convs, set(held_starters), pretrain, seed)],
        "sft.jsonl": [chat(qa) for qa in sft_train],
        "sft_eval.jsonl": [chat(qa) for qa in sft_held],
        "preferences.jsonl": [p.record() for p in build_pairs(convs, train_starters, preferences, seed,
                                                               min_gap=min_gap, max_chars=max_response_chars)],
        "preferences_eval.jsonl": [p.record() for p in build_pairs(convs, held_starters, preferences_eval, seed,
                                                                    min_gap=min_gap, max_chars=max_response_chars)],
        "prompts.jsonl": [{"prompt": p} for p in ppo_prompts],
        "prompts_eval.jsonl": [{"prompt": p} for p in eval_prompts],
    }
    for name, records in files.items():
        if not records:
            raise DataError(f"{out_dir / name}: no records; raise its size above 0")
        atomic_write_text(out_dir / name, _jsonl(records))
    counts = {name: len(records) for name, records in files.items()}
    # No timestamps, so the same seed gives the same bytes here too.
    atomic_write_json(out_dir / "manifest.json", {
        "generator": "rlhf_cli.demo.prepare",
        "seed": seed,
        "counts": counts,
        "sizes": {"pretrain": pretrain, "sft": sft, "sft_eval": sft_eval, "preferences": preferences,
                  "preferences_eval": preferences_eval, "prompts": prompts, "prompts_eval": prompts_eval,
                  "heldout_starters": heldout_starters, "min_gap": min_gap, "max_response_chars": max_response_chars},
        "heldout_starter_prompts": held_starters,
        "preference_rule": (
            "chitchat chats under the same starter prompt, both answered by a second person and rated (not the"
            f" 5/5/5 default); chosen has a mean of interesting/upbeat/witty at least {min_gap} points higher;"
            f" each side is the chat's opening, whole turns one per line, up to {max_response_chars} characters"
        ),
        "sources": [{"package": f"{dist}=={_version(dist)}", "license": lic, "url": url, "used_for": used}
                    for dist, lic, url, used in SOURCES],
    })
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.demo.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    for name, default in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, metavar="N",
                            help=f"at most N records (default {'all' if default is None else default})")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.out_dir, args.seed, **{k: getattr(args, k) for k in DEFAULT_SIZES})
    except RlhfError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    width = max(map(len, counts))
    for name, count in counts.items():
        print(f"{name:<{width}}  {count:>6}", file=sys.stderr)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
