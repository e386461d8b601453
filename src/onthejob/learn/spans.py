"""Answer spans and rule-made questions: pure text rules, no model.

A session's material is split into sentences; in each, candidate answers (numbers and dates,
quoted phrases, runs of capitalized words) are picked out verbatim, and a question that asks
for a span can be made from its sentence by rule (the span replaced in place by a question
phrase). Practice material (learn/practice.py) and dreaming (dream/tasks.py) both use them.
"""

from __future__ import annotations

import re

from onthejob.learn.evaluate import normalize

# Answer-first examples: (sentence, answer span, question). Each kind of span the rules pick
# (a year, a person, a place, a number, an organization) is shown once.
_SPAN_EXAMPLES = (
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.", "1889",
     "When was the Eiffel Tower completed?"),
    ("Marie Curie won the Nobel Prize in Chemistry in 1911 for discovering radium.",
     "Marie Curie", "Who won the Nobel Prize in Chemistry in 1911?"),
    ("The Amazon River flows through Brazil, Peru and Colombia before reaching the Atlantic.",
     "Atlantic", "Where does the Amazon River end?"),
    ("The bridge, which opened after four years of work, carries 120,000 cars a day.",
     "120,000", "How many cars does the bridge carry a day?"),
    ("In 1602 the Dutch East India Company was founded to trade spices with Asia.",
     "Dutch East India Company", "Which company was founded in 1602 to trade spices?"),
)


_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
           "December")
_NUMBER = re.compile(
    rf"\b(?:(?:{_MONTHS})\s+\d{{1,2}},?\s+\d{{4}}|(?:{_MONTHS})\s+\d{{4}}|\d{{1,2}}\s+(?:{_MONTHS})"
    rf"(?:\s+\d{{4}})?|(?:{_MONTHS})\s+\d{{1,2}}\b|\d+(?:[,.]\d+)*(?:[–-]\d+)?"
    r"(?:\s*(?:%|percent|million|billion|thousand|hundred|years|km|miles|metres|meters|feet))?)")
# Words that may sit inside a capitalized name ("University of Warsaw", "Leonardo da Vinci").
_JOINERS = {"of", "the", "de", "da", "del", "di", "von", "van", "der", "du", "la", "le", "y"}
_WORD = re.compile(r"\S+")
_EDGE = "\"'()[]{},;:.!?“”‘’"


def span_prompt(sentence: str, answer: str, lead: str = "") -> str:
    """The "span" writer: answer-first examples, then the sentence, its answer span and the
    question's first words (`lead`, see `question_lead`), which the model goes on from."""
    blocks = [f"Sentence: {s}\nAnswer: {a}\nQuestion: {q}\n" for s, a, q in _SPAN_EXAMPLES]
    return ("Quiz questions, each answered by the given words of the sentence.\n\n"
            + "\n".join(blocks) + f"\nSentence: {sentence}\nAnswer: {answer}\nQuestion:"
            + (f" {lead}" if lead else ""))


# -- answer spans ----------------------------------------------------------------------------
_LEADERS = {"the", "a", "an", "in", "on", "at", "by", "for", "from", "with", "as", "though",
            "although", "after", "before", "during", "his", "her", "its", "their", "this", "that",
            "these", "those", "when", "while", "other", "one", "many", "some", "since", "under",
            "of", "to", "it", "he", "she", "they", "we", "i", "there", "here", "but", "and", "or"}


def _name_runs(sentence: str) -> list[tuple[int, str]]:
    """(position, text) of each run of capitalized words, verbatim from `sentence`."""
    words = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(sentence)]
    capital = [w.strip(_EDGE)[:1].isupper() for _, _, w in words]
    runs, i = [], 0
    while i < len(words):
        if not capital[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(words):
            here, nxt = words[j][2], words[j + 1][2]
            if here.endswith((",", ";", ":", ")", "\"", "”")) or nxt.startswith(("(", "\"", "“")) \
                    or (here.endswith(".") and len(here.strip(_EDGE)) > 3):
                break
            if capital[j + 1]:
                j += 1
            elif (nxt.lower() in _JOINERS and j + 2 < len(words) and capital[j + 2]
                  and not nxt.endswith((",", ";", "."))):
                j += 2
            else:
                break
        first = i
        while first <= j and words[first][2].strip(_EDGE).lower() in _LEADERS | _JOINERS:
            first += 1  # "The", "In the", "Though": sentence words, not part of the name
        if first <= j and not (first == 0 and first == j):
            text = sentence[words[first][0]:words[j][1]].strip(_EDGE)
            if text.endswith(("'s", "’s")):
                text = text[:-2]
            if len(text) >= 3 or text.isupper() and len(text) >= 2:
                runs.append((words[first][0], text))
        i = j + 1
    return runs


# Words that open a noun phrase (determiners, possessives, prepositions) and words that end
# one (function words: a phrase is the run of content words between them).
_NP_OPENERS = {"the", "a", "an", "his", "her", "its", "their", "our", "my", "your", "this",
               "these", "those", "in", "on", "at", "by", "for", "from", "with", "into", "of",
               "about", "through", "over", "under", "between", "against", "without", "as",
               "than", "using", "called", "named", "known"}
_NP_STOP = _LEADERS | _JOINERS | _NP_OPENERS | {
    "is", "was", "are", "were", "be", "been", "being", "has", "had", "have", "do", "did", "does",
    "not", "no", "also", "which", "who", "whom", "whose", "where", "what", "how", "why", "then",
    "so", "such", "very", "more", "most", "less", "least", "only", "even", "just", "all", "both",
    "each", "any", "would", "could", "should", "will", "can", "may", "might", "must", "him",
    "them", "us", "me", "if", "because", "until", "upon", "within", "around", "toward",
    "towards", "among", "via", "per", "like", "unlike", "including", "however", "often",
    "later", "first", "again", "out", "up", "down", "off", "back", "well", "there", "too",
    # common verbs in the third person, seldom nouns: "the best algorithm requires ..." ends
    # the phrase at "algorithm" (there is no tagger; plural nouns such as "specialists" stay)
    "depends", "requires", "includes", "contains", "tends", "makes", "takes", "gives", "shows",
    "means", "seems", "becomes", "remains", "provides", "allows", "involves", "consists",
    "represents", "refers", "describes", "appears", "occurs", "causes", "leads", "helps", "needs",
    "lies", "holds", "keeps", "produces", "creates", "follows", "grows", "lives", "says", "knows",
    "gets", "goes", "comes", "begins", "continues", "reaches", "receives", "carries", "serves",
    "whether"}


# One-word "phrases" that are sentence adverbials ("in particular", "for instance", "in
# general"), not a thing the sentence says anything about.
_NP_ADVERBIAL = {"particular", "general", "instance", "example", "fact", "addition", "contrast",
                 "turn", "short", "effect", "course", "brief", "sum", "total", "summary"}


def noun_phrases(sentence: str, max_words: int = 4) -> list[tuple[int, str]]:
    """(position, text) of lowercase noun phrases, by rule: the run of content words that
    follows a determiner, possessive or preposition ("a fluorescent screen" -> "fluorescent
    screen", "detected by radar" -> "radar"), cut at a function word or punctuation. Capitalized
    words and numbers are left to the other rules."""
    words = [(m.start(), m.group(0)) for m in _WORD.finditer(sentence)]
    out = []
    for k, (_, w) in enumerate(words[:-1]):
        if w.lower() not in _NP_OPENERS or w.endswith((",", ";", ":", ".")):
            continue
        run: list[tuple[int, str]] = []
        for pos, nxt in words[k + 1:k + 1 + max_words]:
            bare = nxt.strip(_EDGE)
            if (not bare or not re.fullmatch(r"[a-z][a-z'-]*", bare)
                    or bare.lower() in _NP_STOP or nxt.startswith(("(", "\"", "“"))):
                break
            run.append((pos, bare))
            if nxt != bare and not nxt.endswith("'s"):
                break  # punctuation after the word ends the phrase
        while run and (run[-1][1].endswith("ly") or run[-1][1].endswith("ing")
                       and len(run) > 1):
            run.pop()  # a trailing adverb or participle is not the phrase's head
        text = " ".join(word for _, word in run)
        if (run and len(text) >= 4 and any(len(word) >= 4 for _, word in run)
                and text.lower() not in _NP_ADVERBIAL):
            out.append((run[0][0], text))
    return out


def answer_spans(sentence: str, avoid: str = "", phrases: bool = False) -> list[str]:
    """Candidate answers in `sentence`, verbatim, by rules (no model): numbers and dates,
    quoted phrases, runs of capitalized words (joined by "of", "de", ...); best first
    (numbers, then multi-word names, then single names). A span that is only (part of)
    `avoid` (the session's title) is left out, and so is one inside a better span. With
    `phrases`, lowercase noun phrases (`noun_phrases`) come last."""
    found: list[tuple[int, int, str]] = []  # (rank, position, span)
    for m in _NUMBER.finditer(sentence):
        span = m.group(0).strip(" ,.")
        if span and not (len(span) == 1 and span.isdigit()):
            found.append((0, m.start(), span))
    for m in re.finditer(r"[\"“]([^\"”]{2,40})[\"”]", sentence):
        found.append((1, m.start(), m.group(1).strip(" ,.")))
    for position, text in _name_runs(sentence):
        found.append((1 if len(text.split()) > 1 else 2, position, text))
    for position, text in noun_phrases(sentence) if phrases else ():
        found.append((3, position, text))
    norm_avoid = normalize(avoid)
    out: list[str] = []
    for _, _, span in sorted(found, key=lambda x: (x[0], x[1])):
        key = normalize(span)
        if (not key or len(span.split()) > 8 or (norm_avoid and key in norm_avoid)
                or any(key in normalize(o) for o in out)):
            continue
        out.append(span)
    return out


def window(sentence: str, span: str, words: int = 28) -> str:
    """`sentence` cut to about `words` words around the first occurrence of `span`."""
    tokens = sentence.split()
    if len(tokens) <= words:
        return sentence
    at = sentence.find(span)
    first = len(sentence[:at].split()) if at >= 0 else 0
    lo = max(0, min(first - words // 2, len(tokens) - words))
    hi = lo + words
    return ("... " if lo else "") + " ".join(tokens[lo:hi]) + (" ..." if hi < len(tokens) else "")


_YEAR = re.compile(r"(?:1[0-9]|20)\d\d")
_PERCENT = re.compile(r".*\d\s*(?:%|percent)$")
# Words that make a capitalized name an organization, place or thing rather than a person.
_NOT_PERSON = {"university", "college", "school", "company", "corporation", "river", "city",
               "church", "empire", "kingdom", "republic", "street", "state", "states", "united",
               "north", "south", "east", "west", "new", "museum", "academy", "institute", "bank",
               "party", "house", "park", "station", "bridge", "island", "islands", "mountains",
               "sea", "ocean", "lake", "award", "prize", "war", "world", "national", "royal",
               "council", "army", "league", "cup", "bowl", "hall", "centre", "center", "library",
               "club", "society", "association", "group", "press", "times", "festival", "tower"}


def span_kind(span: str) -> str:
    """The kind of an answer span, by rule: year, date, percent, number, person or name."""
    if _YEAR.fullmatch(span):
        return "year"
    if re.search(rf"\b(?:{_MONTHS})\b", span):
        return "date"
    if span[:1].isdigit():
        return "percent" if _PERCENT.match(span) else "number"
    words = span.split()
    if (2 <= len(words) <= 3 and all(w[:1].isupper() and w.isalpha() for w in words)
            and not {w.lower() for w in words} & (_NOT_PERSON | _JOINERS)):
        return "person"
    return "name"


_LEADS = {"year": "When", "date": "When", "percent": "What percentage", "number": "How many",
          "person": "Who", "name": "What"}
_IN_PLACE = {"year": "what year", "date": "what date", "percent": "what percentage",
             "number": "how many", "person": "who", "name": "what"}


def question_lead(span: str) -> str:
    """The first word(s) of a question whose answer is `span`."""
    return _LEADS[span_kind(span)]


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """Sentences of `text`: like learn.probes.sentences, but a sentence may start with any
    capital letter (É, Ł, ...) and an abbreviation ("U.S.", "St.") does not end one."""
    parts = re.split(r"(?<=[.!?])[\"”)]?\s+", text.strip())
    out: list[str] = []
    for part in parts:
        if out and (not part[:1].isupper() and not part[:1].isdigit() and part[:1] not in "\"“("
                    or re.search(r"(?:\b[A-Z]\.|\b(?:St|Mr|Mrs|Dr|Jr|Sr|vs|No|Co|Inc)\.)$", out[-1])):
            out[-1] += " " + part
        else:
            out.append(part)
    return [p.strip() for p in out if len(p.split()) >= min_words]



def rule_question(sentence: str, span: str, title: str = "") -> str:
    """A question made from `sentence` by rule: the span replaced in place by a question
    phrase ("... completed in what year for the World's Fair?"), `title` in front when the
    question does not name it."""
    text = window(sentence, span).removeprefix("... ").removesuffix(" ...")
    kind = span_kind(span)
    phrase = _IN_PLACE[kind]
    if span in text:
        at = text.index(span)
        if kind == "number" and re.match(r"\s*(?:million|billion|thousand)\b",
                                         text[at + len(span):]):
            phrase = "how many"
        before = re.sub(r"\b(?:the|a|an)\s+$", "", text[:at], flags=re.IGNORECASE)
        text = before + phrase + text[at + len(span):]
    question = text.strip().rstrip(".!;:, ") + "?"
    question = question[:1].upper() + question[1:]
    if title and normalize(title) not in normalize(question):
        question = f"{title}: {question}"
    return question


def span_question_problem(question: str, sentence: str, answer: str) -> str:
    """'' when `question` is usable as a question for `answer` (a span of `sentence`), else
    what is wrong with it."""
    words = question.split()
    sentence_words = {w for w in normalize(sentence).split() if len(w) > 3}
    if not question.endswith("?") or len(words) < 3:
        return "no question (a line ending in '?', at least 3 words)"
    if len(words) > 30:
        return "question longer than 30 words"
    if normalize(answer) in normalize(question):
        return "the question gives its own answer away"
    if sentence_words and not sentence_words & set(normalize(question).split()):
        return "the question shares no word with the sentence (off topic)"
    return ""
