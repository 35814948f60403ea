"""Caption metrics as the COCO caption evaluation (coco-caption / pycocoevalcap) computes them:
BLEU-1..4 and CIDEr-D, in pure Python (no Java), on text tokenised as its PTB tokenizer does.

Written from the papers, with the choices of coco-caption's scorers where the papers leave room
(pycocoevalcap 1.2, last released in 2020, runs its tokenizer, Stanford CoreNLP, in Java):

Tokenisation (`tokenize`): coco-caption runs Stanford's PTBTokenizer (CoreNLP 3.4.1, options
`-preserveLines -lowerCase`) and drops the tokens in PTB_PUNCTUATION:
    ''  '  ``  `  -LRB-  -RRB-  -LCB-  -RCB-  .  ?  !  ,  :  -  --  ...  ;
i.e. quotes, sentence punctuation, commas, colons, semicolons, dashes and ellipses. The bracket
names are compared in upper case after the tokenizer has lower-cased them, so brackets are in
fact kept, as the tokens -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-; so are runs such as "?!" or "!!!",
which are not in the list. This module emulates that tokenizer on caption-like text: words are
split on whitespace; quotes, brackets, . , ; : ? ! and dashes at a word's edges are split off,
and so are commas and colons (unless between digits), semicolons, quotes, brackets, "--" and
"..." inside a word; clitics are split as in the Penn Treebank ("dog's" -> dog 's, "isn't" ->
is n't, "can't" -> ca n't, "cannot" -> can not, "gonna" -> gon na); "$", "#", "%" and a final
"/" become tokens of their own; hyphenated words, decimals, "1,000", "10:30", "'90s" and
"o'clock" stay whole. A word's final period stays on abbreviations ("mr.", "st.", "u.s.",
"e.g.", "no." before a number, a single letter unless a sentence starts after it) and is split
off (and dropped) elsewhere. Unicode quotes, dashes and the ellipsis count as their ASCII forms.
On caption-like text this agrees with CoreNLP 3.4.1 (tests/evals/test_caption_metrics.py
checks it against the jar where Java and pycocoevalcap are installed); beyond it (URLs,
e-mail addresses, SGML, emoticons such as "<3") it is not exact.

BLEU (Papineni et al. 2002), corpus level: for n = 1..N the clipped n-gram matches (a candidate
n-gram counts at most as often as in the reference that has it most) summed over the corpus,
over the candidate n-grams; BLEU-N = geometric mean of those precisions for 1..N times the
brevity penalty exp(1 - r/c) when c < r, where c is the total candidate length and r the sum over
captions of the reference length closest to the candidate's (the shorter on a tie: coco-caption's
'closest'). As in coco-caption, a precision is (matches + 1e-15) / (n-grams + 1e-9), so a corpus
without any matching 4-gram has a BLEU-4 of about 1e-4, not 0.

CIDEr-D (Vedantam et al. 2015), as coco-caption's `Cider` scorer: each caption is a vector of
n-gram TF-IDF weights per n = 1..4, weight = count in the caption * log(N / df), N = the number
of images of the evaluated corpus and df = the number of images whose references contain the
n-gram (at least 1: an n-gram no reference has gets log N). For a candidate c and a reference s,
per n:  sum over c's n-grams of min(w_c, w_s) * w_s / (|w_c| |w_s|)  (clipping: a candidate
n-gram counts at most with the reference's weight), times exp(-(len(c) - len(s))^2 / (2 * 6^2))
(the length penalty, lengths in words). An image's CIDEr-D is 10 * the mean over n and over its
references; the corpus CIDEr-D is the mean over images. Counts are raw, as in coco-caption (the
paper normalises them by the caption's n-gram total). With one image every idf is log 1 = 0, so
CIDEr-D needs a corpus.

`caption_scores` returns {"bleu4", "cider_d"}; candidates[i] is scored against references[i].
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

PTB_PUNCTUATION = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                   ".", "?", "!", ",", ":", "-", "--", "...", ";")
_DROPPED = frozenset(PTB_PUNCTUATION)

CIDER_MAX_N = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
_BLEU_TINY = 1e-15   # coco-caption's BleuScorer: added to matches and to the candidate length
_BLEU_SMALL = 1e-9   # added to n-gram counts and to the reference length

# --- tokenisation ----------------------------------------------------------------------------

_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                          "\u2026": "...", "\u2013": "--", "\u2014": "--"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_BRACKET_NAMES = frozenset(_BRACKETS.values())
# Words that keep their final period in PTB 3.4.1 (checked against it): titles, company and
# street abbreviations, months and days, US states that are not also words.
_ABBREVIATIONS = frozenset("""
    mr mrs ms messrs mme mlle dr prof rev hon gen sen rep gov pres adm maj capt cmdr lt col sgt
    jr sr st mt ave rd blvd ct sq bldg univ assn dept est co inc ltd corp bros vs etc cf al alex
    ft mo jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri
    ala ariz calif colo conn fla ga ind kan ky md mich minn mont neb nev okla tenn va vt wis wyo
    """.split())
_ABBREVIATIONS_BEFORE_NUMBER = frozenset({"no", "fig"})
_ACRONYM = re.compile(r"[a-z]{1,2}(?:\.[a-z]{1,2})+", re.I)           # u.s  e.g  a.m  ph.d
_DECADE = re.compile(r"'\d+s(?![a-z])", re.I)                         # '90s
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)", re.I)
_CLITIC_TOKEN = re.compile(r"(?:n't|'s|'re|'ve|'ll|'d|'m|'t)(?![a-z])", re.I)
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3,
                "'tis": 2, "'twas": 2}
# Inside a word: brackets, quotes, ";", "--", "...", and "," or ":" unless between digits.
_INNER = re.compile(r"([()\[\]{}\";]|--+|\.\.\.+|(?<=\D)[,:]|[,:](?!\d))")
# A single letter's period ends a sentence before these words (PTB 3.4.1, checked against it).
_SENTENCE_START = re.compile(r"(?:A|An|The|It|He|She|We|They|This|That|These|There|Here|Some|"
                             r"Many|In|At|But|So|If|When|While|As|After|Her|Their|Our|One|"
                             r"What)\s")
_TIME_SUFFIX = re.compile(r"(\d+:\d+)([a-z]+)", re.I)                   # 12:30pm -> 12:30 pm


def _dashes(run: str) -> str:
    return "-" if len(run) == 1 else "--"


def _keeps_period(word: str, following: str | None) -> bool:
    """Whether PTB keeps the final period of `word` + "." (`following`: the next text, or
    None where the caption ends: coco-caption's next line starts a capitalised caption)."""
    lower = word.lower()
    if lower in _ABBREVIATIONS or _ACRONYM.fullmatch(word):
        return True
    if lower in _ABBREVIATIONS_BEFORE_NUMBER:
        return bool(following) and following[0].isdigit()
    if len(word) == 1 and word.isalpha():  # an initial, unless a sentence ends there
        return following is not None and not _SENTENCE_START.match(following)
    return False


def _split_word(word: str) -> list[str]:
    """Clitics and contractions of a word without edge punctuation."""
    lower = word.lower()
    if lower in _SPLIT_WORDS:
        cut = _SPLIT_WORDS[lower]
        return [word[:cut], word[cut:]]
    time = _TIME_SUFFIX.fullmatch(word)
    if time:
        return [time.group(1), time.group(2)]
    clitics = []
    while (m := _CLITIC.fullmatch(word)) and not _CLITIC_TOKEN.fullmatch(word):
        word, clitic = m.group(1), m.group(2)
        clitics.insert(0, clitic)
    return [word, *clitics]


def _split_chunk(chunk: str, following: str | None) -> list[str]:
    """PTB tokens of one whitespace-free chunk (`following`: the next two, or None)."""
    if chunk.upper() in _BRACKET_NAMES:  # already tokenised: "-lrb-"
        return [chunk]
    head, tail = [], []
    core = chunk
    while core:  # leading punctuation
        c = core[0]
        if c == '"':
            head.append("``")
        elif c in _BRACKETS:
            head.append(_BRACKETS[c])
        elif c in "'`":
            if (_CLITIC_TOKEN.match(core) or core.lower() in _SPLIT_WORDS
                    or _DECADE.match(core)):
                break
            head.append("`")
        elif c in ",:" and core[1:2].isdigit():
            break
        elif c in "$#,;:":
            head.append(c)
        elif c in "?!":
            run = re.match(r"[?!]+", core).group()
            head.append(run)
            core = core[len(run):]
            continue
        elif c == "-" and not core[1:2].isdigit():
            run = re.match(r"-+", core).group()
            head.append(_dashes(run))
            core = core[len(run):]
            continue
        elif c == "." and not core[1:2].isdigit():
            run = re.match(r"\.+", core).group()
            head.extend(["..."] if len(run) >= 3 else ["."] * len(run))
            core = core[len(run):]
            continue
        else:
            break
        core = core[1:]
    while core:  # trailing punctuation
        c = core[-1]
        if c == '"':
            tail.insert(0, "''")
        elif c in _BRACKETS:
            tail.insert(0, _BRACKETS[c])
        elif c in "'`,;:%/":
            tail.insert(0, c)
        elif c in "?!":
            run = re.search(r"[?!]+$", core).group()
            tail.insert(0, run)
            core = core[:-len(run)]
            continue
        elif c == "-":
            run = re.search(r"-+$", core).group()
            tail.insert(0, _dashes(run))
            core = core[:-len(run)]
            continue
        elif c == ".":
            run = re.search(r"\.+$", core).group()
            word = core[:-len(run)]
            context = "" if len(run) > 1 else None if tail else following
            keep = bool(word) and _keeps_period(word, context)
            if keep:  # an abbreviation keeps one period, also before "..."
                run = run[1:]
            tail[:0] = ["..."] if len(run) >= 3 else ["."] * len(run)
            core = word + "." if keep else word
            if keep:
                break
            continue
        else:
            break
        core = core[:-1]
    middle = []
    for i, piece in enumerate(_INNER.split(core)):  # odd i: a separator
        if i % 2:
            middle.append(_BRACKETS.get(piece) or {'"': "``", "-": "--", ".": "..."}.get(
                piece[0], piece))
        elif piece:
            middle.extend(_split_word(piece))
    return head + [t for t in middle if t] + tail


def tokenize(text: str) -> list[str]:
    """Lower-cased PTB tokens of a caption, without coco-caption's PTB_PUNCTUATION."""
    chunks = str(text).translate(_UNICODE).split()
    tokens = []
    for i, chunk in enumerate(chunks):
        # (each caption is a line of coco-caption's tokenizer input: a newline follows it)
        following = " ".join(chunks[i + 1:i + 3]) + "\n" if i + 1 < len(chunks) else None
        tokens += _split_chunk(chunk, following)
    lowered = (token.lower() for token in tokens)
    return [token for token in lowered if token not in _DROPPED]


# --- n-gram statistics -----------------------------------------------------------------------

def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    """Counts of every n-gram (a tuple of words) for n = 1..max_n."""
    return Counter(tuple(words[i:i + n])
                   for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _checked(candidates, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(candidates, str) or isinstance(references, str):
        raise TypeError("caption metrics take a list of candidate captions and a list of "
                        "reference-caption lists, not a single string")
    candidates, references = list(candidates), list(references)
    if len(candidates) != len(references):
        raise ValueError(f"caption metrics: {len(candidates)} candidates but "
                         f"{len(references)} reference lists; give one list of reference "
                         "captions per candidate")
    if not candidates:
        raise ValueError("caption metrics: no candidates to score")
    for i, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise TypeError(f"caption metrics: candidate {i} is a {type(candidate).__name__}, "
                            "not a string")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"caption metrics: references[{i}] is {refs!r}; each entry must "
                             "be a non-empty list of reference strings")
    return candidates, [list(refs) for refs in references]


def _tokenized(candidates, references):
    candidates, references = _checked(candidates, references)
    return ([tokenize(c) for c in candidates],
            [[tokenize(r) for r in refs] for refs in references])


# --- BLEU ------------------------------------------------------------------------------------

def _bleu_tokens(candidates: list[list[str]], references: list[list[list[str]]],
                 max_n: int) -> list[float]:
    matches, totals = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for words, refs in zip(candidates, references):
        most = Counter()  # per n-gram, its count in the reference that has it most
        for ref in refs:
            most |= _ngram_counts(ref, max_n)
        for gram, count in _ngram_counts(words, max_n).items():
            matches[len(gram) - 1] += min(count, most[gram])
        for n in range(max_n):
            totals[n] += max(0, len(words) - n)
        candidate_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (matches[n] + _BLEU_TINY) / (totals[n] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (candidate_length + _BLEU_TINY) / (reference_length + _BLEU_SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def bleu(candidates: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of `candidates` (one per image) against their references."""
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"bleu: max_n must be a positive integer, got {max_n!r}")
    return _bleu_tokens(*_tokenized(candidates, references), max_n)


# --- CIDEr-D ---------------------------------------------------------------------------------

def _cider_d_tokens(candidates: list[list[str]],
                    references: list[list[list[str]]]) -> list[float]:
    candidate_counts = [_ngram_counts(words, CIDER_MAX_N) for words in candidates]
    reference_counts = [[_ngram_counts(ref, CIDER_MAX_N) for ref in refs] for refs in references]
    document_frequency = Counter()
    for refs in reference_counts:
        document_frequency.update(set().union(*refs))
    log_images = math.log(len(candidates))

    def vectors(counts: Counter) -> tuple[list[dict], list[float]]:
        """Per n: {n-gram: tf-idf weight} and the vector's norm."""
        weights = [{} for _ in range(CIDER_MAX_N)]
        for gram, count in counts.items():
            idf = log_images - math.log(max(1, document_frequency.get(gram, 0)))
            weights[len(gram) - 1][gram] = count * idf
        norms = [math.sqrt(sum(w * w for w in per_n.values())) for per_n in weights]
        return weights, norms

    scores = []
    for words, counts, refs, ref_counts in zip(candidates, candidate_counts, references,
                                               reference_counts):
        weights, norms = vectors(counts)
        total = 0.0
        for ref, ref_count in zip(refs, ref_counts):
            ref_weights, ref_norms = vectors(ref_count)
            penalty = math.exp(-(len(words) - len(ref)) ** 2 / (2 * CIDER_SIGMA ** 2))
            for n in range(CIDER_MAX_N):
                if norms[n] == 0 or ref_norms[n] == 0:
                    continue  # no n-grams of this order, or only ones every image has
                dot = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0)
                          for g, w in weights[n].items())
                total += dot / (norms[n] * ref_norms[n]) * penalty
        scores.append(CIDER_SCALE * total / (CIDER_MAX_N * len(refs)))
    return scores


def cider_d_scores(candidates: list[str], references: list[list[str]]) -> list[float]:
    """Per-image CIDEr-D (document frequencies from the references of the whole list)."""
    return _cider_d_tokens(*_tokenized(candidates, references))


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D: the mean over images of `cider_d_scores`."""
    scores = cider_d_scores(candidates, references)
    return sum(scores) / len(scores)


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"bleu4": corpus BLEU-4, "cider_d": corpus CIDEr-D}, tokenising each caption once."""
    tokens = _tokenized(candidates, references)
    cider = _cider_d_tokens(*tokens)
    return {"bleu4": _bleu_tokens(*tokens, 4)[3], "cider_d": sum(cider) / len(cider)}
