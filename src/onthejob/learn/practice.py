"""Practice material (self-study): what a session revealed, turned into many student prompts
that look like what a user will ask later. Consolidation and dreaming both use this module.

Where the material is: the session's own turns (the teacher's context, learn/lesson.py):
every user turn (pasted text included), tool observations, the assistant's answers and the
reviewer's words. A real session has no title, so none is needed.

The prompts, for each sentence of the material:
  - per answer span (numbers, dates, names, quoted phrases, and, when asked, up to
    `phrases_per_sentence` lowercase noun phrases such as "a fluorescent screen";
    learn/spans.py), the same fact
    asked two ways (a sentence with neither gets up to `bare_phrases` noun phrases): "rule", the question made by rule in place ("... opened in what year?"),
    and "span", the model's own question for that span (answer-typed few-shot prompt), in
    the short-answer form (" Answer in a few words."). Both keep the span they ask for, so a
    teacher answer that misses it can be dropped and the gate can score against it;
  - "question": the model's question for the sentence (few-shot, learn/probes.py), whose
    answer is not known in advance, kept only when `grounded` (it names one of the material's
    names or numbers, or says "our"/"my"): an ungrounded one ("Which city is the largest?") is
    answered by the teacher from the session and teaches the student to answer the world's
    questions with the session's facts;
  - "topic": "What do you know about NAME?" for the names the material mentions most (the
    fact asked the other way round: name -> sentence);
and from the session itself: "replay", its short user turns, each with the assistant's
answer as it was given (a teacher sample: it was produced with the session in context).

`coverage` measures, never selects: the share of a benchmark's gold answers that some
prompt's known span matches (token F1 >= 0.5). `assert_unseen` makes sure no evaluation
question reached training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onthejob.learn.evaluate import ANSWER_HINT, f1, normalize
from onthejob.learn.probes import question_probes
from onthejob.learn.spans import (
    answer_spans,
    question_lead,
    rule_question,
    span_kind,
    span_prompt,
    span_question_problem,
    split_sentences,
    window,
)
from onthejob.model import LoadedModel, SamplingParams, generate

KINDS = ("rule", "span", "question", "topic", "replay")
# Lowercase noun phrases asked per sentence beside names and numbers. Off by default: on dev
# articles 148-152 two a sentence raised coverage of the gold answers from 0.70 to 0.76 but
# transfer fell from 0.58 to 0.42 and the general drop grew from 10 to 20 points at the same
# visits (docs/RESULTS.md, "Noun phrases").
PHRASES_PER_SENTENCE = 0
# Lowercase noun phrases asked of a sentence that has no name or number at all. Such sentences
# gave no practice prompt whatever: explanatory text (how a method works, what a role does)
# went untaught. On the test split's name-poor subjects (computational complexity, teaching)
# the rule spans covered 23 % of the gold answers against 55-70 % on each dev subject; two
# phrases a bare sentence raise the whole test split's rule coverage from 0.34 to 0.47 while
# adding 7 % spans on dev (nearly every dev sentence names something; coverage 0.65 -> 0.67).
# Off by default until its transfer and forgetting are measured (docs/results/bare-sentences/).
BARE_PHRASES = 0
# The model's own questions per answer span ("span" kind): its greedy question, plus the rest
# sampled, so that a fact is asked in several phrasings, each checked against the span.
SPAN_PHRASINGS = 1
SPAN_TEMPERATURE = 0.8
REPLAY_MAX_CHARS = 400  # longer user turns carry material: replayed, they would put it in context
FEEDBACK_PREFIX = "My feedback on this session:"


@dataclass(frozen=True)
class PracticePrompt:
    text: str  # the student's prompt (a user turn, without the session)
    kind: str  # one of KINDS
    answer: str = ""  # the span it asks for, when known ("rule", "span")
    given: str = ""  # the session's own answer to it ("replay")
    sentence: str = ""  # the sentence of the material it was made from
    given_at: int = -1  # the index of `given` in the session's context (Lesson.kept's key)


def material(context: Sequence[dict], roles: Sequence[str] = ("user", "assistant", "tool")) -> str:
    """The text a session revealed: user turns, tool observations, the assistant's answers
    and the review, in order (the teacher's context less its system prompt); `roles` keeps
    only the turns of those roles."""
    parts = []
    for m in context:
        if m["role"] in roles and m["content"].strip():
            parts.append(m["content"].removeprefix(FEEDBACK_PREFIX).strip())
    return "\n".join(parts)


def replayed(context: Sequence[dict], max_chars: int = REPLAY_MAX_CHARS) -> list[PracticePrompt]:
    """The session's short user turns with the assistant's answer that followed each."""
    out = []
    for i, m in enumerate(context):
        if m["role"] != "user" or not 0 < len(m["content"]) <= max_chars:
            continue
        if m["content"].startswith(FEEDBACK_PREFIX):
            continue
        nxt = context[i + 1] if i + 1 < len(context) else None
        given = nxt["content"] if nxt and nxt["role"] == "assistant" else ""
        out.append(PracticePrompt(m["content"], "replay", given=given,
                                  given_at=i + 1 if given else -1))
    return out


def sentences_of(text: str) -> list[str]:
    """Sentences of `text`, paragraph by paragraph (a line break always ends a sentence)."""
    return [s for para in text.splitlines() for s in split_sentences(para)]


def _inner_capitals(sentences: Sequence[str]) -> set[str]:
    """Lowercased words that some sentence of the material capitalizes after its first word."""
    out = set()
    for s in sentences:
        for w in s.split()[1:]:
            bare = w.strip("\"'()[]{},;:.!?“”‘’")
            if bare[:1].isupper():
                out.add(bare.lower().removesuffix("'s"))
    return out


def _opening_word(span: str, sentence: str, names: set[str]) -> bool:
    """Whether `span` is only its sentence's capitalized first word ("Remember the codename."),
    which the material never capitalizes elsewhere: an imperative or a plain word, not a name."""
    return (len(span.split()) == 1 and not span[:1].isdigit() and sentence.startswith(span)
            and span.lower() not in names)


def span_units(text: str, spans_per_sentence: int = 4,
               phrases_per_sentence: int = 0, bare_phrases: int = 0,
               bare_from: str | None = None) -> list[tuple[str, str]]:
    """(sentence, answer span) pairs of `text`, each span once, best spans of a sentence first:
    up to `spans_per_sentence` numbers, dates and names, then up to `phrases_per_sentence`
    lowercase noun phrases (a fact is as often "a fluorescent screen" as a name or a date), or
    up to `bare_phrases` where the sentence has no name or number to ask for (when that is
    more), and where `bare_from` is given only in its sentences (the material the user or a tool
    supplied: the assistant's own wording, "these notes provide a comprehensive overview",
    taught no fact). A sentence's capitalized first word is a span only where the material
    capitalizes it elsewhere too."""
    units, used = [], set()
    sentences = sentences_of(text)
    bare_ok = set(sentences_of(bare_from)) if bare_phrases and bare_from is not None else None
    names = _inner_capitals(sentences)
    for s in sentences:
        base = [a for a in answer_spans(s) if not _opening_word(a, s, names)]
        named = [a for a in base if normalize(a) not in used][:spans_per_sentence]
        bare = 0 if base or (bare_ok is not None and s not in bare_ok) else bare_phrases
        n_plain = max(phrases_per_sentence, bare)
        plain = [a for a in answer_spans(s, phrases=True) if a not in base
                 and normalize(a) not in used][:n_plain] if n_plain else []
        for a in named + plain:
            used.add(normalize(a))
            units.append((s, a))
    return units


def model_span_questions(lm: LoadedModel, units: Sequence[tuple[str, str]],
                         max_new_tokens: int = 32, batch: int = 16) -> list[str]:
    """The model's question for each (sentence, span), greedy; "" where it did not parse."""
    return [qs[0] for qs in span_phrasings(lm, units, 1, max_new_tokens, batch)]


def span_phrasings(lm: LoadedModel, units: Sequence[tuple[str, str]], n: int = SPAN_PHRASINGS,
                   max_new_tokens: int = 32, batch: int = 16, seed: int = 0) -> list[list[str]]:
    """`n` model-written questions for each (sentence, span): the greedy one, then samples at
    SPAN_TEMPERATURE ("" where one did not parse; a repeat of an earlier one counts as "")."""
    tok = lm.tokenizer
    prompts, leads = [], []
    for s, a in units:
        lead = question_lead(a)
        leads.append(lead)
        prompts.append(tok.encode(span_prompt(window(s, a), a, lead), add_special_tokens=False))
    out: list[list[str]] = [[] for _ in units]
    for k in range(n):
        params = SamplingParams(max_tokens=max_new_tokens, stop=["\n"],
                                temperature=0.0 if k == 0 else SPAN_TEMPERATURE,
                                seed=None if k == 0 else seed * 1009 + k)
        for start in range(0, len(prompts), batch):
            done = generate(lm, prompts[start:start + batch], params)
            for j, c in enumerate(done, start):
                (s, a), lead = units[j], leads[j]
                line = f"{lead} {c.text.split(chr(10))[0].strip()}".strip()
                question = line[:line.index("?") + 1] if "?" in line else line
                seen = {normalize(q) for q in out[j]}
                bad = span_question_problem(question, s, a) or normalize(question) in seen
                out[j].append("" if bad else question)
    return out


# Words by which a question points at the user's own setting ("our project", "my team"): such a
# question is about the session even without a name in it, and a general question never has one.
_OWN_WORDS = {"our", "ours", "we", "us", "my", "mine", "me", "i"}
_ANCHOR_STOP = {"of", "the", "de", "da", "del", "di", "von", "van", "der", "du", "la", "le", "y",
                "a", "an", "and", "in", "on", "at", "for", "to"}


def anchors(text: str) -> set[str]:
    """The words of the material's answer spans (names, numbers, dates): what a question must
    name to be about this material rather than the world (see `grounded`)."""
    out = set()
    for _, a in span_units(text, spans_per_sentence=99):
        out |= set(normalize(a).split()) - _ANCHOR_STOP
    return out


def grounded(question: str, material_anchors: set[str]) -> bool:
    """Whether a model-written question is about the session: it names one of the material's
    names or numbers, or speaks of the user's own setting ("our", "my"). "Which city is the
    largest?" is neither: the teacher answers it from the session ("Oslo"), and a student taught
    that answers the world's questions with the session's facts (the demo's general drop)."""
    words = set(normalize(question).split())
    return bool(words & _OWN_WORDS or words & material_anchors)


def repetitive(text: str, n: int = 4, share: float = 0.25) -> bool:
    """Whether more than `share` of the text's word n-grams repeat an earlier one: a small
    model's answer that loops ("The briefing is about the Bluefin project. ... The briefing is
    about the Bluefin project.")."""
    words = normalize(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return bool(grams) and (len(grams) - len(set(grams))) / len(grams) > share


def informative(answer: str, prompt: str, material_anchors: set[str]) -> bool:
    """Whether the teacher's answer to an open practice prompt (no known span: a model-written
    question, a topic, a replayed turn) teaches something of the session: it names one of the
    material's names or numbers that the prompt does not already name, and does not loop. An
    answer with none of them is the model's general talk in the session's voice; a student
    trained on it learns the voice, not the facts (the demo's general drop)."""
    new = set(normalize(answer).split()) - set(normalize(prompt).split())
    return bool(new & material_anchors) and not repetitive(answer)


def topic_names(text: str, n: int = 8) -> list[str]:
    """The names (multi-word capitalized spans first) the material mentions most."""
    counts: Counter[str] = Counter()
    sentences = sentences_of(text)
    names = _inner_capitals(sentences)
    for s in sentences:
        for a in answer_spans(s):
            if span_kind(a) in ("person", "name") and not _opening_word(a, s, names):
                counts[a] += 1 + (len(a.split()) > 1)
    return [name for name, _ in counts.most_common(n)]


def practice_prompts(lm: LoadedModel | None, context: Sequence[dict],
                     kinds: Sequence[str] = KINDS, spans_per_sentence: int = 4,
                     max_prompts: int | None = None,
                     phrases_per_sentence: int = PHRASES_PER_SENTENCE,
                     span_phrasings_per_span: int = SPAN_PHRASINGS,
                     bare_phrases: int = BARE_PHRASES) -> list[PracticePrompt]:
    """Student prompts for one session (see the module docstring); `lm` writes the "span" and
    "question" kinds (None: rule-made kinds only), `span_phrasings_per_span` questions a span,
    `bare_phrases` noun phrases asked of a sentence without a name or number. Duplicates are
    dropped."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown practice kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    text = material(context)
    out: list[PracticePrompt] = []
    units = span_units(text, spans_per_sentence, phrases_per_sentence, bare_phrases,
                       bare_from=material(context, ("user", "tool")))
    if "rule" in kinds:
        out += [PracticePrompt(rule_question(s, a) + ANSWER_HINT, "rule", answer=a, sentence=s)
                for s, a in units]
    if "span" in kinds and lm is not None and units:
        for (s, a), qs in zip(units, span_phrasings(lm, units, span_phrasings_per_span), strict=True):
            out += [PracticePrompt(q + ANSWER_HINT, "span", answer=a, sentence=s) for q in qs if q]
    if "question" in kinds and lm is not None:
        keys = anchors(text)
        out += [PracticePrompt(q, "question") for q in question_probes(lm, text)
                if grounded(q, keys)]
    if "topic" in kinds:
        out += [PracticePrompt(f"What do you know about {name}?", "topic")
                for name in topic_names(text)]
    if "replay" in kinds:
        out += replayed(context)
    seen, unique = set(), []
    for p in out:
        key = normalize(p.text)
        if key and key not in seen:
            seen.add(key)
            unique.append(p)
    return unique[:max_prompts] if max_prompts else unique


def coverage(prompts: Iterable[PracticePrompt], golds: Sequence[str],
             threshold: float = 0.5) -> float:
    """Share of `golds` that some prompt's known answer span matches (token F1 >= threshold).
    Measured only: it never picks prompts."""
    if not golds:
        return float("nan")
    return sum(covered(prompts, golds, threshold)) / len(golds)


def covered(prompts: Iterable[PracticePrompt], golds: Sequence[str],
            threshold: float = 0.5) -> list[bool]:
    """Per gold answer: whether some prompt's known answer span matches it (token F1 >=
    threshold). Measured only, to split a benchmark's questions into those the practice
    material asks about and those it does not."""
    spans = {p.answer for p in prompts if p.answer}
    return [any(f1(s, g) >= threshold for s in spans) for g in golds]


def without(prompts: Sequence[PracticePrompt], questions: Iterable[str]) -> list[PracticePrompt]:
    """`prompts` less any that contain an evaluation question (normalized): the model may
    write a benchmark's very question itself; a benchmark must then not train on it."""
    keys = [k for k in (normalize(q) for q in questions) if k]
    return [p for p in prompts if not any(k in normalize(p.text) or (p.given and k in normalize(p.given))
                                          for k in keys)]


class LeakError(AssertionError):
    """An evaluation question reached training."""


def assert_unseen(questions: Iterable[str], training_texts: Iterable[str]) -> None:
    """Raise LeakError when an evaluation question appears (normalized) in any text that
    training saw: a practice prompt, a replayed turn, a training row."""
    seen = [normalize(t) for t in training_texts]
    for q in questions:
        key = normalize(q)
        if key and any(key in t for t in seen):
            raise LeakError(f"evaluation question {q!r} appears in the training material")
