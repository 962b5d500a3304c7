"""The toy world: a tiny review language, its datasets, and the hidden gold scorer.

Everything here is pure Python and deterministic from a seed. The language:

    prompt:     "review of the soup in paris :"
    completion: "the soup was good and fresh . we went there on monday ."

The **gold scorer** (hidden from every learned model) gives credit only to a proper review of the prompt's noun:
its content grows with the distinct positive minus distinct negative adjectives (up to ``MAX_COUNTED``), and its
format term asks for an answer that ends properly within ``GOLD_MAX_WORDS`` and says no adjective twice. The
pretraining corpus leans negative (base ~0.3: proper negative reviews), SFT answers lean positive with mostly one
adjective (SFT ~0.65), and the top of the scale (1.0) needs two distinct positive adjectives and nothing negative,
which is what preference optimisation has to discover. The second sentence of a review follows from its verdict
often enough (``VERDICT_FILLERS``) that a pretrained base carries the review's sentiment, as real models do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

POSITIVE = (
    "good great nice fine lovely superb tasty fresh warm friendly clean bright sweet perfect excellent "
    "pleasant charming cozy splendid delightful wonderful brilliant neat gentle calm tidy crisp rich smooth fair"
).split()
NEGATIVE = (
    "bad awful poor stale cold rude dirty dull bitter horrible terrible nasty bland soggy greasy noisy slow "
    "broken cheap grim gloomy harsh sour rotten weak messy shabby dreary lousy sad"
).split()
FOOD_NOUNS = "soup bread coffee tea pizza cake salad pasta burger rice fish cheese".split()
OTHER_NOUNS = (
    "hotel room bed shower lobby staff service view garden pool beach train bus ticket movie song book "
    "game phone laptop camera chair lamp shirt bike car park museum"
).split()
NOUNS = FOOD_NOUNS + OTHER_NOUNS
PLACES = (
    "paris rome london tokyo berlin madrid lisbon vienna prague oslo dublin cairo lima quito delhi seoul "
    "sydney boston denver austin miami accra nairobi hanoi manila bogota riga sofia porto malmo"
).split()
NUMBERS = "one two three four five six seven eight nine".split()
# Second sentences. Several repeat the prompt's place or noun: more to copy from the prompt makes the base model learn
# copying early and robustly; the food and other fillers give food nouns a feature the base model knows (the topic
# task reads it).
FILLERS = [
    "we went there on monday",
    "i will come back",
    "it was a long day",
    "my friend came with me",
    "it was my first visit",
    "we went there on friday",
    "we were {number} people",
    "we went to {place} on monday",
    "i will come back to {place}",
    "it was my first visit to {place}",
]
FOOD_FILLERS = ["i ate {number} of them", "i had the {noun} for lunch", "we ate the {noun} in {place}"]
OTHER_FILLERS = ["we stayed for an hour", "i paid with cash", "i used the {noun} every day"]
# Second sentences that follow from the review's verdict, more often the clearer it is (``SENTIMENT_FILLER_RATE``
# per distinct adjective of net polarity): predicting the word after " ." then needs the review's sentiment, so a
# pretrained base carries it in its hidden state there, as real pretrained models carry sentiment. Without them the
# base's state at " ." held no sentiment at all (a linear probe: 0.48 on held-out reviews), and a reward model read
# from that state had to build the feature from scratch through LoRA (it learned length instead: 0.70 vs 0.63).
VERDICT_FILLERS = {
    True: ["what a day", "what a lovely visit", "what a treat in {place}"],
    False: ["never again", "never going back to {place}", "never in my life"],
}
SENTIMENT_FILLER_RATE = 0.3
# Words the continual-learning tasks and the default chat template need.
TASK_WORDS = "question is the review positive ? about food does it mention a number above five answer yes no".split()
CHAT_WORDS = "user assistant system : \n".split()

GOLD_MAX_WORDS = 20  # a response longer than this (in words) loses the format term
GOLD_MAX_NEW_TOKENS = 24  # generation budget of the shared gold evaluator
MAX_COUNTED = 2  # distinct (positive - negative) adjectives beyond this earn nothing more
FORMAT_WEIGHT = 0.2
REVIEW_CONTENT = 0.125  # content of a proper review before its adjectives: with the format, a proper review scores >= 0.3
ADJECTIVE_NOISE = 0.1  # chance that one adjective of a review has the other polarity
PRETRAIN_POSITIVE = 0.3  # share of positive adjectives in the pretraining text
REPEAT_PAIRS = 0.25  # share of preference pairs that contrast a distinct review with its one-repeat imitation
VERDICT_PAIRS = 0.15  # share that contrast a better review with a worse one followed by a glowing second sentence

_SALAD = POSITIVE + NEGATIVE + NOUNS + PLACES + NUMBERS + "the was and of in".split() + " ".join(FILLERS).split()
_SALAD = [w for w in _SALAD if "{" not in w]
# Every review of the world says its adjectives in one fixed (alphabetical) order: what may follow "and" then depends
# on what was said, so a model learns to continue with a new adjective (a context-free next-adjective distribution
# makes greedy decoding repeat its favourite one: "tidy and tidy and tidy").
ADJECTIVE_ORDER = {a: i for i, a in enumerate(sorted(POSITIVE + NEGATIVE))}
_POSITIVE = frozenset(POSITIVE)
_NEGATIVE = frozenset(NEGATIVE)
_ADJECTIVES = _POSITIVE | _NEGATIVE


@dataclass(frozen=True)
class GoldScore:
    reward: float  # in [0, 1]: (1 - FORMAT_WEIGHT) * content + FORMAT_WEIGHT * format
    content: float  # in [0, 1]: 0 unless the answer is a proper review of the prompt's noun
    format: float  # 0 or 1


def prompt_noun(prompt: str) -> str | None:
    words = prompt.split()
    if "the" in words:
        i = words.index("the")
        if i + 1 < len(words):
            return words[i + 1]
    return None


def is_review_of(sentence: list[str], noun: str | None) -> bool:
    """``the <noun> was <adjective> [and] <adjective> ...``: the prompt's noun, then only adjectives (joined by
    ``and`` or not), starting and ending with one."""
    if noun is None or sentence[:3] != ["the", noun, "was"] or len(sentence) < 4:
        return False
    tail = sentence[3:]
    return tail[0] in _ADJECTIVES and tail[-1] in _ADJECTIVES and all(w in _ADJECTIVES or w == "and" for w in tail)


def gold_score(prompt: str, completion: str, finished: bool = True) -> GoldScore:
    """The hidden gold scorer. ``finished`` is False when generation hit its token limit without ending.

    Only a proper review earns anything: its first sentence (up to the first ``.``) is ``the <prompt's noun> was``
    followed by adjectives. Its content is ``REVIEW_CONTENT`` plus the rest in proportion to the distinct positive
    minus distinct negative adjectives (a repeated adjective counts once), capped at ``MAX_COUNTED``; its format term
    is 1 when the answer ends with ``.`` within ``GOLD_MAX_WORDS`` words, generation finished and the review says no
    adjective twice (a repeat is no extra credit, and degenerate text: it costs the format). Anything else (the
    wrong noun, no sentence, word salad) scores 0, so it is at least 0.3 below a proper review with the same
    adjectives.
    """
    words = completion.split()
    if "." not in words or not is_review_of(words[: words.index(".")], prompt_noun(prompt)):
        return GoldScore(0.0, 0.0, 0.0)
    said = [w for w in words[3 : words.index(".")] if w != "and"]
    adjectives = set(said)
    sentiment = min(max(len(adjectives & _POSITIVE) - len(adjectives & _NEGATIVE), 0), MAX_COUNTED) / MAX_COUNTED
    content = REVIEW_CONTENT + (1 - REVIEW_CONTENT) * sentiment
    fmt = float(finished and words[-1] == "." and len(words) <= GOLD_MAX_WORDS and len(said) == len(adjectives))
    return GoldScore((1 - FORMAT_WEIGHT) * content + FORMAT_WEIGHT * fmt, content, fmt)


# ----------------------------------------------------------------------------------------------- generators


def make_prompt(noun: str, place: str) -> str:
    return f"review of the {noun} in {place} :"


def net_polarity(adjectives) -> int:
    """Distinct positive minus distinct negative adjectives (what the gold scorer counts, before its cap)."""
    said = set(adjectives)
    return len(said & _POSITIVE) - len(said & _NEGATIVE)


def filler(rng: random.Random, noun: str, place: str, adjectives=()) -> str:
    """A second sentence for a review of ``noun`` in ``place`` that said ``adjectives``: its verdict
    (``VERDICT_FILLERS``) with probability ``SENTIMENT_FILLER_RATE`` per adjective of net polarity (capped at 1),
    else a neutral sentence."""
    net = net_polarity(adjectives)
    if net and rng.random() < min(1.0, SENTIMENT_FILLER_RATE * abs(net)):
        return rng.choice(VERDICT_FILLERS[net > 0]).format(place=place)
    choices = FILLERS + (FOOD_FILLERS if noun in FOOD_NOUNS else OTHER_FILLERS)
    return rng.choice(choices).format(number=rng.choice(NUMBERS), noun=noun, place=place)


def make_response(rng: random.Random, noun: str, n_adjectives: int, p_positive: float, filler_rate: float,
                  one_polarity: bool = True, place: str = "paris") -> str:
    """One review, its adjectives all different (no text of the world repeats one: a base model that never saw a
    repeat is not drawn to them, and repeats are what the gold scorer penalises). ``one_polarity``: the review is
    positive with probability ``p_positive`` and each adjective keeps that polarity except with probability
    ``ADJECTIVE_NOISE``; otherwise each adjective is drawn on its own (the pretraining text)."""
    positive = rng.random() < p_positive
    adjectives: list[str] = []
    while len(adjectives) < n_adjectives:
        if one_polarity:
            pool = POSITIVE if positive != (rng.random() < ADJECTIVE_NOISE) else NEGATIVE
        else:
            pool = POSITIVE if rng.random() < p_positive else NEGATIVE
        adjective = rng.choice(pool)
        if adjective not in adjectives:
            adjectives.append(adjective)
    adjectives.sort(key=ADJECTIVE_ORDER.__getitem__)
    text = f"the {noun} was " + " and ".join(adjectives) + " ."
    if rng.random() < filler_rate:
        text += " " + filler(rng, noun, place, adjectives) + " ."
    return text


def all_prompt_pairs() -> list[tuple[str, str]]:
    return [(n, p) for n in NOUNS for p in PLACES]


def split_prompt_pairs(seed: int, n_eval: int = 128) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, held-out eval pairs): the evaluator's prompts never appear in any training data."""
    pairs = all_prompt_pairs()
    random.Random(seed).shuffle(pairs)
    return pairs[n_eval:], pairs[:n_eval]


def pretrain_corpus(seed: int, n: int) -> list[str]:
    """Full reviews (prompt + completion), adjectives drawn one by one (``PRETRAIN_POSITIVE`` positive), 1-3 of them:
    the base model writes proper reviews of the prompt's noun that lean negative."""
    rng = random.Random(seed * 7919 + 1)
    train, _ = split_prompt_pairs(seed)
    texts = []
    for _ in range(n):
        noun, place = rng.choice(train)
        k = rng.choice([1, 2, 2, 3])
        response = make_response(rng, noun, k, PRETRAIN_POSITIVE, 0.6, one_polarity=False, place=place)
        texts.append(make_prompt(noun, place) + " " + response)
    return texts


def sft_pairs(seed: int, n: int) -> list[dict]:
    """Decent but imperfect answers: one adjective (80 %: greedy decoding stops after it on every world, so SFT scores
    0.65 and two good adjectives are left for preference optimisation to find), else two or three; 80 % positive."""
    rng = random.Random(seed * 7919 + 2)
    train, _ = split_prompt_pairs(seed)
    rows = []
    for _ in range(n):
        noun, place = rng.choice(train)
        k = rng.choices([1, 2, 3], weights=[0.8, 0.15, 0.05])[0]
        completion = " " + make_response(rng, noun, k, 0.8, 0.3, place=place)  # leading space: trainers concatenate strings
        rows.append({"prompt": make_prompt(noun, place), "completion": completion})
    return rows


def preference_pairs(seed: int, n: int, label_noise: float = 0.1, salt: int = 3) -> list[dict]:
    """Two answers to one prompt, ranked by the gold scorer, ``label_noise`` of the labels flipped. Most pairs are two
    independent candidates (``candidate_response``); ``REPEAT_PAIRS`` are *repeat pairs*: a positive review of 2-3
    distinct adjectives against the same review with one adjective said twice in place of another (same length, same
    words but one), so repeats are learned as worse than the distinct review they imitate, and never as better than
    an unrelated answer; ``VERDICT_PAIRS`` are *verdict pairs* (``verdict_pair``): praise in a second sentence is
    worth less than a good adjective.

    Each row also carries ``gold_chosen_is_better`` (the noiseless label) so evaluations can use the truth.
    """
    rng = random.Random(seed * 7919 + salt)
    train, _ = split_prompt_pairs(seed)
    rows = []
    while len(rows) < n:
        noun, place = rng.choice(train)
        prompt = make_prompt(noun, place)
        kind = rng.random()
        if kind < REPEAT_PAIRS:
            said = sorted(rng.sample(POSITIVE, rng.randint(2, 3)), key=ADJECTIVE_ORDER.__getitem__)
            repeated = list(said)
            i = rng.randrange(len(said) - 1)
            repeated[i + 1] = said[i]  # one adjective said twice in place of the next (the order kept)
            a, b = (f" the {noun} was " + " and ".join(words) + " ." for words in (said, repeated))
        elif kind < REPEAT_PAIRS + VERDICT_PAIRS:
            a, b = verdict_pair(rng, noun, place)
        else:
            a, b = (" " + candidate_response(rng, noun, place) for _ in range(2))
        ga, gb = gold_score(prompt, a).reward, gold_score(prompt, b).reward
        if abs(ga - gb) < 1e-9:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        flipped = rng.random() < label_noise
        if flipped:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold_chosen_is_better": not flipped})
    return rows


def verdict_pair(rng: random.Random, noun: str, place: str) -> tuple[str, str]:
    """(better, worse): a review against a worse one whose second sentence praises (``VERDICT_FILLERS[True]``): two good
    adjectives against one and the praise, or one good adjective against a bad one and the praise. The gold scorer
    reads the first sentence only; without these pairs a reward model learns the praise as sentiment (the praise
    follows good reviews) and a policy learns to add it instead of a second good adjective (`alignment bench toy`,
    world 1: ``the bike was splendid . what a day .``)."""
    praise = rng.choice(VERDICT_FILLERS[True]).format(place=place)
    first, second = sorted(rng.sample(POSITIVE, 2), key=ADJECTIVE_ORDER.__getitem__)
    if rng.random() < 0.5:
        return f" the {noun} was {first} and {second} .", f" the {noun} was {first} . {praise} ."
    return f" the {noun} was {first} .", f" the {noun} was {rng.choice(NEGATIVE)} . {praise} ."


def candidate_response(rng: random.Random, noun: str, place: str = "paris") -> str:
    """An answer for a preference pair: mostly a review of 1-6 adjectives, but also the ways a policy can drift that
    the gold scorer does not reward: reviews too long to keep the format (7-10 adjectives), a review of another noun,
    and word salad (repeated adjectives come in their own pairs: ``preference_pairs``). A reward model has seen each of
    them, so a policy cannot win by them."""
    kind = rng.random()
    if kind < 0.7:
        return make_response(rng, noun, rng.randint(1, 6), rng.random(), 0.3, place=place)
    if kind < 0.8:
        return make_response(rng, noun, rng.randint(7, 10), rng.random(), 0.3, place=place)
    if kind < 0.9:
        other = rng.choice([n for n in NOUNS if n != noun])
        return make_response(rng, other, rng.randint(1, 4), rng.random(), 0.3, place=place)
    return " ".join(rng.choice(_SALAD) for _ in range(rng.randint(1, 6))) + " ."


def rl_prompts(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed * 7919 + 4)
    train, _ = split_prompt_pairs(seed)
    return [{"prompt": make_prompt(*rng.choice(train))} for _ in range(n)]


def eval_prompts(seed: int) -> list[str]:
    """The shared gold evaluator's fixed 128 held-out prompts."""
    _, held_out = split_prompt_pairs(seed)
    return [make_prompt(noun, place) for noun, place in held_out]


# ------------------------------------------------------------------------------------- continual-learning tasks

TASKS = ("sentiment", "topic", "number")
TASK_QUESTIONS = {
    "sentiment": "is the review positive ?",
    "topic": "is the review about food ?",
    "number": "does it mention a number above five ?",
}
# The answer words for yes / no. `yes` and `no` are in the tokenizer but never in the pretraining text, so their
# (tied) embeddings stay close to every other unseen word and a LoRA adapter, which cannot move embeddings, cannot
# learn to say one rather than the other. These two are words the base model already uses and tells apart.
TASK_ANSWERS = {True: "the", False: "it"}


def task_examples(seed: int, task: str, n: int, salt: int = 0) -> list[dict]:
    """Yes/no questions about a short review, all in one format and with the same two answer words.

    Only the question tells the tasks apart, so one model can answer all three, but an adapter trained on one task
    alone learns to ignore the question and answers every prompt by that task's rule: the others are forgotten.
    Each task's labels are balanced and independent of the other tasks' labels.
    """
    if task not in TASK_QUESTIONS:
        raise KeyError(task)
    rng = random.Random(seed * 7919 + 100 + TASKS.index(task) * 10 + salt)
    rows = []
    for _ in range(n):
        noun = rng.choice(FOOD_NOUNS if rng.random() < 0.5 else OTHER_NOUNS)
        adjective = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
        number = rng.randint(1, 9)
        review = f"the {noun} was {adjective} . we were {NUMBERS[number - 1]} people ."
        label = {"sentiment": adjective in _POSITIVE, "topic": noun in FOOD_NOUNS, "number": number > 5}[task]
        answer = TASK_ANSWERS[label]
        rows.append(
            {
                "prompt": f"review : {review} question : {TASK_QUESTIONS[task]} answer :",
                "completion": " " + answer,
                "label": answer,
            }
        )
    return rows


def corpus_for_tokenizer(seed: int) -> list[str]:
    """Every word any toy dataset can produce, so the tokenizer has no unknowns on toy data."""
    words = POSITIVE + NEGATIVE + NOUNS + PLACES + NUMBERS + TASK_WORDS + CHAT_WORDS
    fillers = FILLERS + FOOD_FILLERS + OTHER_FILLERS + VERDICT_FILLERS[True] + VERDICT_FILLERS[False]
    words += [w for w in " ".join(fillers).split() if "{" not in w]
    words += "review of in was and .".split()
    return [" ".join(words)] + pretrain_corpus(seed, 200)
