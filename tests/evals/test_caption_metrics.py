"""BLEU, CIDEr-D and the PTB-style tokenisation of the COCO caption evaluation, checked against
figures worked by hand from the papers, the worked examples of Papineni et al. (2002), outputs of
the real tools (CoreNLP 3.4.1's PTBTokenizer, pycocoevalcap 1.2's Bleu and Cider scorers)
recorded here, and, where pycocoevalcap (and Java) are installed, those tools run live."""
import math
import random
import shutil

import pytest

from vlmjax.evals import caption_metrics as cm
from vlmjax.evals.caption_metrics import bleu, caption_scores, cider_d, cider_d_scores, tokenize

# --- tokenisation ----------------------------------------------------------------------------

# Outputs of CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase, each line followed by a
# capitalised caption as in a COCO file) with coco-caption's punctuation list removed.
PTB_OUTPUTS = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ('The dog\'s ball, "red" (small)!', "the dog 's ball red -lrb- small -rrb-"),
    ("Two people -- one of them isn't smiling...", "two people one of them is n't smiling"),
    ("A black-and-white photo of 1,000 birds at 10:30; wow?",
     "a black-and-white photo of 1,000 birds at 10:30 wow"),
    ("I can't; she won't. They cannot go, gonna wanna gotta.",
     "i ca n't she wo n't they can not go gon na wan na got ta"),
    ("It\u2019s \u201cgreat\u201d \u2014 really \u2013 ok\u2026 yes", "it 's great really ok yes"),
    ("Mr. Smith and Dr. Who in the U.S. at 5 p.m. on Main St.",
     "mr. smith and dr. who in the u.s. at 5 p.m. on main st."),
    ("A [big] {red} bus costs $5 or 50% #1 & more",
     "a -lsb- big -rsb- -lcb- red -rcb- bus costs $ 5 or 50 % # 1 & more"),
    ("dogs' toys 'quoted' o'clock in the '90s", "dogs toys quoted o'clock in the '90s"),
    ("dog,cat a:b -5 .5 well- -well x-ray", "dog cat a b -5 .5 well well x-ray"),
    ("they're we've you'll he'd I'M DON'T", "they 're we 've you 'll he 'd i 'm do n't"),
    ("yahoo! ok?! what?? hi!!! 3.5 3.14.", "yahoo ok ?! what ?? hi !!! 3.5 3.14"),
    ("No. 5 and no. 5 and no.", "no. 5 and no. 5 and no"),
    ("the letter a. A bus", "the letter a a bus"),
    ("J. R. Smith", "j. r. smith"),
    ("A bowl of fruit:apples,bananas and oranges.", "a bowl of fruit apples bananas and oranges"),
    ("A man wearing a hat...and sunglasses.", "a man wearing a hat and sunglasses"),
    ("Kids at the beach w/ surfboards.", "kids at the beach w / surfboards"),
    ("the st.... and etc.. ok", "the st. and etc. ok"),
]

# COCO-style captions for the live comparison with the Java tokenizer.
CAPTIONS = [
    "A plate of food with broccoli, carrots and rice.",
    "A woman's hand holding a smart phone.",
    'A black and white photo of a street sign that says "STOP".',
    "There's a train going down the tracks.",
    "A child in a red shirt (and blue pants) flying a kite.",
    "An elderly man sits on a bench; pigeons surround him.",
    "A giraffe standing next to a tree, eating leaves!",
    "Is this a cake or a pizza?",
    "A dog that's lying on a couch with it's owner.",
    "A bathroom with a toilet , sink and mirror .",
    "a laptop computer sitting on top of a wooden desk",
    "Two zebras grazing in a field -- one is looking up.",
    "A sign that reads 'No Parking' next to a road.",
    "A vase holds flowers; the flowers are yellow/orange.",
    "The motorcycle is parked by the curb,next to a car.",
    "A street at night; cars' headlights are on.",
    "People gathered at Mr. Smith's birthday party.",
    "A refrigerator full of beer cans - lots of them.",
    "A bedroom with a queen-size bed and a T.V.",
    "The sandwich is cut in half.  It has lettuce.",
    "THE DOG IS RUNNING ON THE GRASS.",
    "A street sign for 5th Ave. and Broadway.",
    "A bus is parked in front of a building (a hotel?).",
    "The U.S. flag is flying on a pole.",
    "A young girl (about 5 years old) holding an umbrella.",
    "A plate with a sandwich [half eaten] and chips.",
]


@pytest.mark.parametrize("text, expected", PTB_OUTPUTS)
def test_tokenize_matches_the_ptb_tokenizer(text, expected):
    assert tokenize(text) == expected.split()


def test_tokenize_drops_cocos_punctuation_and_keeps_brackets():
    assert cm.PTB_PUNCTUATION == ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                                  ".", "?", "!", ",", ":", "-", "--", "...", ";")
    # Every symbol of the list, standing alone, is dropped...
    assert tokenize('dog " \' ` . ? ! , : - -- ... ; cat') == ["dog", "cat"]
    # ...but coco-caption compares the bracket names in upper case with lower-cased tokens.
    assert tokenize("( ) [ ] { }") == ["-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"]
    assert tokenize("") == [] and tokenize(" ... !\n") == []


def test_tokenize_is_idempotent_on_its_output():
    for text in CAPTIONS + [t for t, _ in PTB_OUTPUTS]:
        once = tokenize(text)
        assert tokenize(" ".join(once)) == once, text


def test_tokenize_agrees_with_the_java_tokenizer():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("no Java for pycocoevalcap's PTBTokenizer")
    texts = CAPTIONS + [t for t, _ in PTB_OUTPUTS]
    # One image per caption, in order, each followed by the next as in a COCO file.
    out = ptb.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, text in enumerate(texts):
        assert " ".join(tokenize(text)) == out[i][0], text


# --- BLEU ------------------------------------------------------------------------------------

# Papineni et al. (2002), Example 1 (punctuation removed, case ignored as in their counts).
PAPINENI_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]  # 16, 18 and 16 words


def test_bleu_of_a_candidate_equal_to_its_reference_is_one():
    assert bleu(["a dog runs on the grass"], [["A dog runs on the grass."]]) == pytest.approx(
        [1.0] * 4, abs=1e-9)


def test_bleu_papineni_example_1():
    cand1 = "It is a guide to action which ensures that the military always obeys the " \
            "commands of the party."
    # 18 words, 17 of them in a reference (not "obeys"): p1 = 17/18 (the paper's figure).
    # Bigrams found in a reference: it is, is a, a guide, guide to, to action, ensures that,
    # that the, the military, of the, the party: p2 = 10/17. Closest reference length 18 = c.
    b1, b2 = bleu([cand1], [PAPINENI_REFS], max_n=2)
    assert b1 == pytest.approx(17 / 18, rel=1e-9)
    assert b2 == pytest.approx(math.sqrt(17 / 18 * 10 / 17), rel=1e-9)
    cand2 = "It is to insure the troops forever hearing the activity guidebook that party " \
            "direct."
    # 14 words; it, is, to, forever, that, party and "the" twice (clipped to 4) match: 8/14
    # (the paper's figure); of 13 bigrams only "it is" matches: 1/13. Closest reference
    # length 16 > 14: brevity penalty exp(1 - 16/14).
    b1, b2 = bleu([cand2], [PAPINENI_REFS], max_n=2)
    penalty = math.exp(1 - 16 / 14)
    assert b1 == pytest.approx(8 / 14 * penalty, rel=1e-9)
    assert b2 == pytest.approx(math.sqrt(8 / 14 * 1 / 13) * penalty, rel=1e-9)


def test_bleu_clips_repeated_words_and_penalises_short_candidates():
    # Papineni et al.: "the the the the the the the" has a modified unigram precision of 2/7
    # ("the" occurs at most twice in a reference); reference lengths 6 and 7, c = 7: no penalty.
    refs = ["The cat is on the mat.", "There is a cat on the mat."]
    assert bleu(["the the the the the the the"], [refs], max_n=1) == pytest.approx([2 / 7])
    # ...and "of the" has precisions 1 and 1, but is much shorter than the closest reference
    # (16 words): BLEU-2 = exp(1 - 16/2).
    assert bleu(["of the"], [PAPINENI_REFS], max_n=2)[1] == pytest.approx(math.exp(-7))


def test_bleu_pools_counts_over_the_corpus():
    candidates = ["a cat on a mat", "the dog runs fast"]
    references = [["the cat is on the mat", "there is a cat on the mat"],
                  ["a dog runs", "the dog runs fast"]]
    # Image 1 (5 words, closest reference 6): unigrams a, a (clipped to 1), cat, on, mat: 4/5;
    #   bigrams "a cat", "cat on" of 4: 2/4; trigrams "a cat on" of 3: 1/3; 4-grams 0/2.
    # Image 2 (4 words, equal to a reference): 4/4, 3/3, 2/2, 1/1.
    # Pooled: p = 8/9, 5/7, 3/5, 1/3; c = 9, r = 10, brevity penalty exp(1 - 10/9).
    precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
    penalty = math.exp(1 - 10 / 9)
    expected = [math.prod(precisions[:n]) ** (1 / n) * penalty for n in range(1, 5)]
    assert bleu(candidates, references) == pytest.approx(expected, rel=1e-9)
    assert bleu(candidates, references, max_n=2) == pytest.approx(expected[:2], rel=1e-9)
    # The mean of per-sentence scores would differ: image 2 alone scores 1.
    assert bleu(candidates[1:], references[1:]) == pytest.approx([1.0] * 4)


def test_bleu_closest_reference_length_takes_the_shorter_on_a_tie():
    # c = 5 is as close to 4 as to 6: r = 4 < c, no penalty (r = 6 would give exp(1 - 6/5)).
    # All n-grams match (p_n = 1), so BLEU is the brevity penalty alone.
    assert bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx([1.0] * 4)
    assert bleu(["a b c d"], [["a b c d e f", "a b c d e f g"]]) == pytest.approx(
        [math.exp(1 - 6 / 4)] * 4)


def test_bleu_without_a_matching_4gram_is_cocos_tiny_value():
    # p = 4/4, 1/3 ("a b"), 0/2, 0/1 with coco-caption's (m + 1e-15) / (n + 1e-9).
    p = [(4 + 1e-15) / (4 + 1e-9), (1 + 1e-15) / (3 + 1e-9), 1e-15 / (2 + 1e-9), 1e-15 / (1 + 1e-9)]
    b = bleu(["a b c d"], [["a b d c"]])
    assert b[3] == pytest.approx(math.prod(p) ** 0.25, rel=1e-9)
    assert b[3] < 1e-6 and b[1] == pytest.approx(math.sqrt(1 / 3), rel=1e-9)


# --- CIDEr-D ---------------------------------------------------------------------------------

def test_cider_d_worked_example():
    # N = 2 images, references "x y" and "x z": idf(x) = log(2/2) = 0; y, z, "x y", "x z" and
    # n-grams no reference has (e.g. "y y") get log 2 =: L.
    candidates, references = ["x y y", "x z"], [["x y"], ["x z"]]
    # Image 1: candidate unigram weights {x: 0, y: 2L}, reference {x: 0, y: L}:
    #   min(2L, L) * L / (2L * L) = 1/2 (clipped; 1 without clipping).
    # Bigrams {"x y": L, "y y": L} against {"x y": L}: L * L / (sqrt(2) L * L) = 1/sqrt(2).
    # No reference trigrams or 4-grams: 0. Lengths 3 vs 2: penalty exp(-1 / (2 * 36)).
    image1 = 10 * (1 / 2 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    # Image 2: equal to its reference: cosine 1 for n = 1, 2; nothing for n = 3, 4.
    image2 = 10 * 2 / 4
    assert cider_d_scores(candidates, references) == pytest.approx([image1, image2], rel=1e-12)
    assert cider_d(candidates, references) == pytest.approx((image1 + image2) / 2, rel=1e-12)


def test_cider_d_is_ten_for_a_4_word_candidate_equal_to_its_references():
    references = [["a dog runs fast", "A dog runs fast."], ["two cats sleep here"]]
    assert cider_d_scores(["a dog runs fast", "two cats sleep here"], references) == (
        pytest.approx([10.0, 10.0]))


def test_cider_d_is_zero_without_a_shared_ngram():
    references = [["a dog on the grass"], ["a cat on a sofa"], ["two birds in a tree"]]
    scores = cider_d_scores(["red bus parked outside", "a cat on a sofa", "birds"], references)
    assert scores[0] == 0.0 and scores[2] > 0 and scores[1] > scores[2]


def test_cider_d_clips_words_repeated_beyond_the_reference():
    references = [["a dog chasing a ball"], ["two cats on a sofa"], ["a red bus"]]
    base = cider_d_scores(["a dog chasing a ball", "x", "y"], references)[0]
    # Repeating "dog" (and so adding the unseen bigram "dog dog") cannot gain: the extra count
    # is clipped to the reference's while the candidate's norm grows.
    repeated = cider_d_scores(["a dog dog chasing a ball", "x", "y"], references)[0]
    assert repeated < base


def test_cider_d_length_penalty_lowers_longer_candidates():
    references = [["a man riding a horse on a beach"], ["a plate of food"], ["a city street"]]
    scores = [cider_d_scores([cand, "x", "y"], references)[0] for cand in (
        "a man riding a horse on a beach",
        "a man riding a horse on a beach " + "z " * 2,
        "a man riding a horse on a beach " + "z " * 6,
        "a man riding a horse on a beach " + "z " * 12)]
    assert scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[3] < 0.2 * scores[0]  # exp(-144/72) ~ 0.14 and the added unseen n-grams


def test_cider_d_document_frequency_comes_from_the_corpus_references():
    # One image: every idf is log(1/1) = 0 (or log 1 for unseen n-grams): CIDEr-D is 0.
    assert cider_d(["a dog"], [["a dog"]]) == 0.0
    # An n-gram in every image's references carries no weight: "a" does not count.
    references = [["a dog"], ["a cat"]]
    assert cider_d_scores(["a", "a cat"], references)[0] == 0.0


# --- against pycocoevalcap -------------------------------------------------------------------

def random_corpus(seed: int, images: int = 30):
    """Captions from a small grammar; candidates are perturbed references (already tokenised)."""
    rng = random.Random(seed)
    subjects = ["a man", "a woman", "two dogs", "a cat", "a young boy", "the girl", "a horse"]
    verbs = ["sitting on", "standing next to", "running across", "playing with", "looking at"]
    objects = ["a bench", "the beach", "a red ball", "a green field", "a wooden table", "a car"]
    extras = ["", "in the park", "on a sunny day", "at night", "near the water"]
    vocab = sorted({w for part in subjects + verbs + objects + extras for w in part.split()})

    def caption():
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(extras)]
        return " ".join(p for p in parts if p)

    references = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    candidates = []
    for refs in references:
        words = rng.choice(refs).split()
        for _ in range(rng.randint(0, 4)):
            i, op = rng.randrange(len(words)), rng.random()
            if op < 0.3 and len(words) > 1:
                del words[i]
            elif op < 0.6:
                words.insert(i, words[i])
            else:
                words[i] = rng.choice(vocab)
        candidates.append(" ".join(words))
    return candidates, references


# pycocoevalcap 1.2: Bleu(4).compute_score and Cider().compute_score on random_corpus(seed),
# {i: refs} / {i: [candidate]} (no tokenizer: the captions are already tokenised).
COCOEVALCAP_SCORES = {
    0: ([0.8904034581354886, 0.8058452451520861, 0.7376165899157869, 0.675668153660037],
        3.8215553269099494),
    1: ([0.8606641695578493, 0.7722175390398442, 0.6687075724996067, 0.5684298494518331],
        2.4790985928588785),
    2: ([0.8686131386829613, 0.7756425692500794, 0.6741843481016141, 0.5801052176909024],
        2.208370202831651),
}


@pytest.mark.parametrize("seed", sorted(COCOEVALCAP_SCORES))
def test_scores_match_recorded_pycocoevalcap_figures(seed):
    candidates, references = random_corpus(seed)
    expected_bleu, expected_cider = COCOEVALCAP_SCORES[seed]
    assert bleu(candidates, references) == pytest.approx(expected_bleu, rel=1e-9)
    assert cider_d(candidates, references) == pytest.approx(expected_cider, rel=1e-9)
    assert caption_scores(candidates, references) == pytest.approx(
        {"bleu4": expected_bleu[3], "cider_d": expected_cider}, rel=1e-9)


@pytest.mark.parametrize("seed", range(3, 8))
def test_scores_match_pycocoevalcap_live(seed):
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    candidates, references = random_corpus(seed, images=20 + 5 * seed)
    gts = dict(enumerate(references))
    res = {i: [c] for i, c in enumerate(candidates)}
    expected_bleu, _ = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, expected_per_image = cider_module.Cider().compute_score(gts, res)
    assert bleu(candidates, references) == pytest.approx(expected_bleu, rel=1e-9)
    assert cider_d_scores(candidates, references) == pytest.approx(
        list(expected_per_image), rel=1e-9, abs=1e-12)


# --- interface -------------------------------------------------------------------------------

def test_caption_scores_is_bleu4_and_cider_d():
    candidates, references = random_corpus(11, images=8)
    assert caption_scores(candidates, references) == {
        "bleu4": bleu(candidates, references)[3], "cider_d": cider_d(candidates, references)}


@pytest.mark.parametrize("candidates, references, match", [
    (["a dog"], [["a dog"], ["a cat"]], "1 candidates but 2 reference lists"),
    (["a dog"], [[]], "non-empty list"),
    (["a dog"], ["a dog"], "non-empty list"),
    ([], [], "no candidates"),
])
def test_bad_inputs_name_the_problem(candidates, references, match):
    with pytest.raises(ValueError, match=match):
        caption_scores(candidates, references)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(TypeError, match="single string"):
        cider_d("a dog", [["a dog"]])
